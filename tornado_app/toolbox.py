"""The tools in use: found through pluggy like agents, built from the config.

Plugins offer tools with the hook ``register_tools(register)``
(hookspecs.py); ``agent.tools`` names the ones the agent may call, and each
``tools.<name>`` section holds a tool's options, validated by its own model.
A :class:`Toolbox` holds the tools built from the current config; SIGHUP
rebuilds it (:meth:`Toolbox.swap`) and a tool whose options did not change is
kept. A reply takes a snapshot (:meth:`Toolbox.lease`): a tool retired by a
swap is closed once the last reply using it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pluggy
from pydantic import BaseModel

from .agents import get_plugin_manager, load_new_plugins, validate_options
from .config import ConfigError, Settings
from .mcp_servers import McpServers, plugin_tool_names
from .tools import Tool

logger = logging.getLogger(__name__)

# What the model sees as the function's name (OpenAI's rule for them).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    factory: Callable[[Any, Settings], Tool]
    options: type[BaseModel] | None
    plugin: str


def available_tools(manager: pluggy.PluginManager | None = None) -> dict[str, ToolSpec]:
    manager = manager or get_plugin_manager()
    specs: dict[str, ToolSpec] = {}
    for impl in manager.hook.register_tools.get_hookimpls():

        def register(name, factory, options=None, _plugin=impl.plugin_name):
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ConfigError(f"tool name {name!r} of {_plugin}: use 1-64 letters, "
                                  f"digits, '_' or '-'")
            if name in specs:
                raise ConfigError(
                    f"tool {name!r} is offered by both {specs[name].plugin} and {_plugin}")
            specs[name] = ToolSpec(name, factory, options, _plugin)

        impl.function(register=register)
    return specs


def validate_tool_settings(settings: Settings, specs: dict[str, ToolSpec]) -> None:
    """Check ``agent.tools`` and every ``tools.<name>`` section against the
    registered tools, with one clear line on failure."""
    available = ", ".join(sorted(specs)) or "none installed"
    # MCP tools (mcp:<server>, <server>__<tool>) are known once their server is connected.
    for index, name in plugin_tool_names(settings.agent.tools, settings.mcp).items():
        if name not in specs:
            raise ConfigError(
                f"agent.tools[{index}]: unknown tool {name!r}; available: {available}")
    for section in settings.tools.model_extra or {}:
        if section not in specs:
            raise ConfigError(
                f"tools.{section}: unknown key; use timeout_seconds or a tool's "
                f"section: {available}")
        tool_options(settings, specs[section])


def tool_options(settings: Settings, spec: ToolSpec) -> Any:
    return validate_options(settings.tools.plugin_options(spec.name), spec.options,
                            ("tools", spec.name), "tool")


def create_tool(settings: Settings, spec: ToolSpec) -> Tool:
    tool = spec.factory(tool_options(settings, spec), settings)
    tool.name = spec.name
    return tool


def _identity(settings: Settings, name: str) -> str:
    return json.dumps([name, settings.tools.plugin_options(name)], sort_keys=True, default=str)


class Toolbox:
    """The tools ``agent.tools`` enables, by name (see the module)."""

    def __init__(self, settings: Settings, mcp: McpServers | None = None):
        self._specs = available_tools()
        # The MCP servers' tools join each lease as their servers are connected.
        self.mcp = mcp
        self._mcp_names: list[str] = settings.agent.tools
        self._tools: dict[str, Tool] = {}
        self._identities: dict[int, str] = {}
        self._in_use: Counter[int] = Counter()
        self._retired: dict[int, Tool] = {}
        self._tasks: set[asyncio.Task] = set()
        self._tools = self._build(settings)

    def _build(self, settings: Settings) -> dict[str, Tool]:
        validate_tool_settings(settings, self._specs)
        current = {self._identities[id(tool)]: tool for tool in self._tools.values()}
        tools = {}
        for name in dict.fromkeys(plugin_tool_names(settings.agent.tools, settings.mcp).values()):
            identity = _identity(settings, name)
            tool = current.get(identity)
            if tool is None:
                tool = create_tool(settings, self._specs[name])
                self._identities[id(tool)] = identity
            tools[name] = tool
        return tools

    @contextlib.contextmanager
    def lease(self):
        """The current tools by name, kept open (not closed by a swap) while in use."""
        tools = dict(self._tools)
        for tool in tools.values():
            self._in_use[id(tool)] += 1
        # MCP tools are not the toolbox's to close: their server's connection owns them.
        mcp_tools = self.mcp.enabled(self._mcp_names) if self.mcp is not None else {}
        try:
            yield {**tools, **mcp_tools}
        finally:
            for tool in tools.values():
                self._in_use[id(tool)] -= 1
            self._close_retired()

    def check(self, settings: Settings) -> None:
        """Raise ConfigError if ``settings`` name unknown tools or bad options.
        Tool packages installed since start-up are found first."""
        load_new_plugins()
        self._specs = available_tools()
        validate_tool_settings(settings, self._specs)

    def swap(self, settings: Settings) -> None:
        """Switch to the tools of a new config (raises ConfigError, changing nothing)."""
        self.check(settings)
        old = self._tools
        self._tools = self._build(settings)
        self._mcp_names = settings.agent.tools
        kept = {id(tool) for tool in self._tools.values()}
        for tool in old.values():
            if id(tool) not in kept:
                self._retired[id(tool)] = tool
        logger.info("tools now: %s", ", ".join(self._tools) or "none")
        self._close_retired()

    def _close_retired(self) -> None:
        for key, tool in list(self._retired.items()):
            if self._in_use[key] == 0:
                del self._retired[key]
                self._identities.pop(key, None)
                task = asyncio.get_running_loop().create_task(_close(tool))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for tool in [*self._tools.values(), *self._retired.values()]:
            await _close(tool)
        self._tools, self._retired = {}, {}


async def _close(tool: Tool) -> None:
    try:
        await tool.close()
    except Exception:
        logger.exception("tool %s failed to close", tool.name)
