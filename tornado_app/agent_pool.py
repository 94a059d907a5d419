"""The agents in use: the chosen backend, then its fallbacks.

The pool can be rebuilt from a new ``agent`` config section while the server
runs (SIGHUP). Each reply takes a *snapshot* of the chain, so a reply in
flight finishes on the agents it started with; an agent no longer in the
chain is closed once its last reply ends. An agent whose name and options did
not change is kept as it is (a local model is not loaded twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter

from . import agents
from .agents import Agent
from .config import Settings

logger = logging.getLogger(__name__)


def _identity(settings: Settings, name: str) -> str:
    return json.dumps([name, settings.agent.plugin_options(name)], sort_keys=True, default=str)


class AgentPool:
    def __init__(self, settings: Settings):
        self._specs = agents.available_agents()
        self._chain: list[Agent] = []
        # Every agent by name: the chain's and agent.selectable's.
        self._named: dict[str, Agent] = {}
        self._identities: dict[int, str] = {}
        self._in_use: Counter[int] = Counter()
        self._retired: dict[int, Agent] = {}
        self._tasks: set[asyncio.Task] = set()
        self._chain, self._named = self._build(settings)

    def _build(self, settings: Settings) -> tuple[list[Agent], dict[str, Agent]]:
        agents.validate_agent_settings(settings, self._specs)
        current = {self._identities[id(a)]: a for a in self._named.values()}
        chain_names = list(dict.fromkeys([settings.agent.backend, *settings.agent.fallbacks]))
        named = {}
        for name in dict.fromkeys([*chain_names, *settings.agent.selectable]):
            identity = _identity(settings, name)
            agent = current.get(identity)
            if agent is None:
                agent = agents.create_agent(settings, self._specs[name])
                self._identities[id(agent)] = identity
                self._start(agent)
            named[name] = agent
        return [named[name] for name in chain_names], named

    def _start(self, agent: Agent) -> None:
        async def start():
            try:
                await agent.start()
            except Exception:
                logger.exception("agent %s failed to start", agent.name)

        task = asyncio.get_running_loop().create_task(start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def chain(self) -> tuple[Agent, ...]:
        return tuple(self._chain)

    @property
    def ready(self) -> bool:
        return self._chain[0].ready

    def has(self, name: str) -> bool:
        return name in self._named

    def every_agent(self) -> tuple[Agent, ...]:
        """The chain, then every other agent a conversation may choose: what a
        reply's quota bound must cover."""
        chain = tuple(self._chain)
        return chain + tuple(agent for agent in self._named.values() if agent not in chain)

    @contextlib.contextmanager
    def lease(self, name: str | None = None):
        """The current chain, kept alive (not closed by a swap) while in use;
        with ``name`` (a conversation's chosen agent), that agent first, then
        the fallbacks."""
        chain = tuple(self._chain)
        if name is not None and name in self._named:
            chosen = self._named[name]
            chain = (chosen, *(agent for agent in chain[1:] if agent is not chosen))
        for agent in chain:
            self._in_use[id(agent)] += 1
        try:
            yield chain
        finally:
            for agent in chain:
                self._in_use[id(agent)] -= 1
            self._close_retired()

    def swap(self, settings: Settings) -> None:
        """Switch to the agents of a new ``agent`` section (raises ConfigError)."""
        old = list(self._named.values())
        self._chain, self._named = self._build(settings)
        kept = set(map(id, self._named.values()))
        for agent in old:
            if id(agent) not in kept:
                self._retired[id(agent)] = agent
        logger.info("agents now: %s", ", ".join(a.name for a in self._chain))
        self._close_retired()

    def _close_retired(self) -> None:
        for key, agent in list(self._retired.items()):
            if self._in_use[key] == 0:
                del self._retired[key]
                self._identities.pop(key, None)
                task = asyncio.get_running_loop().create_task(agent.close())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for agent in [*self._named.values(), *self._retired.values()]:
            with contextlib.suppress(Exception):
                await agent.close()
