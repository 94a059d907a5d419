"""The agent interface and the plugin manager that finds agents.

An agent only *produces text*: ``Agent.stream(request)`` yields pieces of the
reply as they come (and, if it supports tools, tool-call requests that the
host runs: tool_loop.py). The host (tornado_app.chat) owns everything else: timing,
deadlines, token accounting, transcripts, cancellation and fallbacks.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .config import ConfigError, Settings, describe_error
from .threads import call_in_loops  # noqa: F401  (for plugins that work on a thread)

logger = logging.getLogger(__name__)

PROJECT = "tornado_app"
DEFAULT_PLUGINS = (
    "plugins.echo_agent",
    "plugins.openai_agent",
    "plugins.transformers_agent",
    "plugins.clock_tool",
    "plugins.memory_tools",
)


class AgentError(Exception):
    """An agent failure with a message that is safe to show and to log.

    ``kind`` names the class of failure for logs and metrics (``timeout``,
    ``rate_limited``, ``upstream``, ``connection``, ``bad_reply``...). The
    message must never hold upstream bodies or keys.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Usage:
    """Token counts an agent may report; the host counts them when it does not."""

    tokens_in: int | None = None
    tokens_out: int | None = None


@dataclass
class AgentRequest:
    # OpenAI chat format: the system prompt, earlier turns, then the new message.
    # Read-only: the dicts are the socket's copy of its history (history.py).
    messages: list[dict[str, str]]
    username: str
    usage: Usage = field(default_factory=Usage)
    # The tools the model may call: name, description, parameters (JSON
    # Schema). Empty: answer without tools. Only for agents that support them.
    tools: list[dict] = field(default_factory=list)


class Agent:
    """Base class for agents. Subclasses implement :meth:`stream`."""

    #: Set by the host to the name the backend was registered under.
    name: str = ""
    #: The model id recorded with every reply.
    model: str = ""
    #: Tokens of context the model accepts; history is trimmed to fit.
    context_tokens: int = 8192
    #: Tokens kept free in the context for the reply.
    reply_tokens: int = 512
    #: Whether :meth:`stream` takes ``request.tools`` and yields ToolCalls.
    supports_tools: bool = False

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self._ready.set()

    async def start(self) -> None:
        """Load weights or open clients. Called once, in the background; the
        server accepts connections meanwhile. An agent with work to do here
        calls ``set_ready(False)`` in ``__init__`` and ``set_ready()`` when done."""

    def set_ready(self, ready: bool = True) -> None:
        """Say whether the agent can answer; messages wait until it can."""
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        """Yield the reply in pieces; an agent that supports tools may also
        yield :class:`tornado_app.tools.ToolCall` requests (when
        ``request.tools`` is not empty). Raise :class:`AgentError` on failure."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``; a rough estimate unless the agent knows better."""
        return max(1, len(text) // 4)

    async def close(self) -> None:
        """Release clients, threads and memory."""


@dataclass(frozen=True)
class AgentSpec:
    name: str
    factory: Callable[[Any, Settings], Agent]
    options: type[BaseModel] | None
    plugin: str


_manager: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, built on first use: hookspecs, entry points, built-ins."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager(PROJECT)
        manager.add_hookspecs(hookspecs)
        manager.load_setuptools_entrypoints(PROJECT)
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            if not manager.is_registered(module):
                manager.register(module, name=module_name)
        _manager = manager
    return _manager


def load_new_plugins(manager: pluggy.PluginManager | None = None) -> None:
    """Register entry points of packages installed since start-up (SIGHUP):
    pluggy skips those already registered."""
    importlib.invalidate_caches()
    (manager or get_plugin_manager()).load_setuptools_entrypoints(PROJECT)


def available_agents(manager: pluggy.PluginManager | None = None) -> dict[str, AgentSpec]:
    manager = manager or get_plugin_manager()
    specs: dict[str, AgentSpec] = {}
    for impl in manager.hook.register_agents.get_hookimpls():

        def register(name, factory, options=None, _plugin=impl.plugin_name):
            if name in specs:
                raise ConfigError(
                    f"agent {name!r} is offered by both {specs[name].plugin} and {_plugin}"
                )
            specs[name] = AgentSpec(name, factory, options, _plugin)

        impl.function(register=register)
    return specs


def validate_agent_settings(settings: Settings, specs: dict[str, AgentSpec]) -> None:
    """Check ``agent.backend``, ``agent.fallbacks``, ``agent.selectable`` and every ``agent.<plugin>``
    section against the registered agents, with one clear line on failure."""
    agent = settings.agent
    for key, name in [("agent.backend", agent.backend)] + [
        (f"agent.fallbacks[{i}]", n) for i, n in enumerate(agent.fallbacks)
    ] + [(f"agent.selectable[{i}]", n) for i, n in enumerate(agent.selectable)]:
        if name not in specs:
            raise ConfigError(
                f"{key}: unknown agent {name!r}; available: {', '.join(sorted(specs))}"
            )
    for section in agent.model_extra or {}:
        if section not in specs:
            raise ConfigError(
                f"agent.{section}: unknown key; agent option sections available: "
                f"{', '.join(sorted(specs))}"
            )
        plugin_options(settings, specs[section])


def plugin_options(settings: Settings, spec: AgentSpec) -> Any:
    return validate_options(settings.agent.plugin_options(spec.name), spec.options,
                            ("agent", spec.name), "agent")


def validate_options(raw: dict, model: type[BaseModel] | None, key: tuple[str, str],
                     kind: str) -> Any:
    """A plugin's options section (``agent.<name>``, ``tools.<name>``) checked
    by its own model; one ConfigError line at the key on a mistake."""
    if model is None:
        if raw:
            raise ConfigError(f"{'.'.join(key)}: this {kind} takes no options")
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, key, model)) from None


def create_agent(settings: Settings, spec: AgentSpec) -> Agent:
    agent = spec.factory(plugin_options(settings, spec), settings)
    agent.name = spec.name
    return agent
