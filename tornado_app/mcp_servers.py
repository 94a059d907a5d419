"""The MCP servers of ``mcp.servers``: connected, watched and retried in the background.

Each server has one :class:`McpConnection`, a task that connects with the
official SDK (``mcp.Client``: Streamable HTTP for ``url``, a supervised child
process for ``command``), lists the tools, and then watches the connection:
on a 2026-era server through ``subscriptions/listen`` (tool list changes
arrive as events), on an older one by its list-changed notifications and a
periodic re-list that also notices a dead server. When the connection fails
or the child exits, the tools are dropped from prompts, the log says why once,
and the task tries again with exponential backoff (a child is restarted).

Nothing here blocks start-up or a reply: :meth:`McpServers.tools` is what is
connected now. ``McpServers.reload`` (SIGHUP) keeps unchanged servers and
starts or stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import httpx2
import mcp_types
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from . import metrics
from .config import ConfigError, McpServerSettings, McpSettings
from .mcp_tools import SEPARATOR, McpTool
from .tools import ToolError

logger = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 0.25
MAX_RETRY_SECONDS = 30.0
# How often an older server (no subscriptions/listen) is re-listed: the
# liveness check that notices it went away, and a refresh besides its notifications.
POLL_SECONDS = 30.0
MAX_PAGES = 100
# An SSE server's event stream may stay quiet this long before it is reconnected.
SSE_IDLE_SECONDS = 3600.0


class McpConnection:
    """One server: its connection task, its state and its tools (by host name)."""

    def __init__(self, settings: McpServerSettings, on_change=lambda: None):
        self.settings = settings
        self.name = settings.name
        self._on_change = on_change
        self.tools: dict[str, McpTool] = {}
        self.state = "connecting"  # connected, down
        self.reason: str | None = None
        self._client: Client | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def identity(self) -> str:
        return self.settings.model_dump_json()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        # The SDK's cancel scopes may absorb one cancel (a transport shutting
        # down): cancel again until the task is over.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1)
        with contextlib.suppress(KeyError):  # never connected nor failed yet
            metrics.mcp_server_up.remove(self.name)

    def _changed_state(self, state: str, reason: str | None) -> None:
        self.state, self.reason = state, reason
        metrics.mcp_server_up.labels(self.name).set(state == "connected")
        self._on_change()

    # The connection's life

    async def _supervise(self) -> None:
        delay = FIRST_RETRY_SECONDS
        while not self._closing:
            try:
                await self._connect_and_watch()
                reason = "the connection ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever the transport raised: retried
                reason = describe(exc)
            if self.state == "connected":
                delay = FIRST_RETRY_SECONDS  # it worked: start the backoff again
            self._set_down(reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def _connect_and_watch(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            # The SDK waits 10 s for its version probe: a silent server gets ours.
            async with asyncio.timeout(self.settings.timeout_seconds):
                client = await stack.enter_async_context(self._client_for(stack))
            self._client = client
            try:
                await self._watch(client)
            finally:
                self._client = None

    async def _connected(self, client: Client) -> None:
        """Listed (once changes are being followed, so that none is missed): in use."""
        await self._refresh(client)
        self._changed_state("connected", None)
        logger.info("MCP server %s connected: %d tools", self.name, len(self.tools))

    def _set_down(self, reason: str, retry_in: float) -> None:
        self.tools = {}
        if self.state != "down":  # once per outage; retries are quiet
            logger.warning("MCP server %s unreachable (%s): its tools are left out; "
                           "retrying from %.2g s on", self.name, reason, retry_in)
        else:
            logger.debug("MCP server %s still unreachable (%s)", self.name, reason)
        self._changed_state("down", reason)

    def _client_for(self, stack: contextlib.AsyncExitStack, headers: dict | None = None) -> Client:
        """A client of this server; an HTTP one with ``headers`` on top of the configured ones."""
        settings = self.settings
        timeout = settings.timeout_seconds
        if settings.url and settings.transport == "sse":
            transport = sse_client(settings.url, headers={**settings.headers, **(headers or {})},
                                   timeout=timeout, sse_read_timeout=SSE_IDLE_SECONDS)
            return Client(transport, read_timeout_seconds=timeout,
                          message_handler=self._notified, client_info=CLIENT_INFO)
        if settings.url:
            # No read timeout on the connection itself: the listen stream idles
            # for ever; each request has the session's read timeout.
            http = httpx2.AsyncClient(headers={**settings.headers, **(headers or {})},
                                      timeout=httpx2.Timeout(timeout, read=None))
            stack.push_async_callback(http.aclose)
            transport = streamable_http_client(settings.url, http_client=http)
            return Client(transport, read_timeout_seconds=timeout,
                          message_handler=self._notified, client_info=CLIENT_INFO)
        errlog = stderr_to_log(self.name, stack)
        parameters = StdioServerParameters(command=settings.command, args=settings.args,
                                           env=settings.env or None)
        return Client(stdio_transport(parameters, errlog), read_timeout_seconds=timeout,
                      message_handler=self._notified, client_info=CLIENT_INFO)

    async def _notified(self, message: Any) -> None:
        """Older servers' notifications: a changed tool list wakes the watch."""
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._changed.set()

    async def _watch(self, client: Client) -> None:
        """Follow the tool list until the connection ends (returns or raises)."""
        if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
            try:
                async with client.listen(tools_list_changed=True) as subscription:
                    await self._connected(client)
                    async for _event in subscription:
                        await self._refresh(client)
                return
            except (ListenNotSupportedError, MCPError) as exc:
                if self.state == "connected":
                    raise  # the stream was up, then failed: reconnect
                logger.info("MCP server %s: no change events (%s); polling", self.name, exc)
        await self._connected(client)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):  # not wait_for: see Replies._loop
                    await self._changed.wait()
            self._changed.clear()
            await self._refresh(client)

    async def _refresh(self, client: Client) -> None:
        """List the server's tools (every page) and keep the allowed ones."""
        specs: list[mcp_types.Tool] = []
        cursor = None
        for _page in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor, cache_mode="refresh")
            specs.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        allow = set(self.settings.allow)
        tools: dict[str, McpTool] = {}
        for spec in specs:
            if allow and spec.name not in allow:
                continue
            tool = McpTool(self, spec)
            if tool.name in tools:
                logger.warning("MCP server %s: tools %r and %r have the same name %s; "
                               "keeping the first", self.name, tools[tool.name].remote_name,
                               spec.name, tool.name)
                continue
            tools[tool.name] = tool
        if self.state == "connected" and tools.keys() != self.tools.keys():
            logger.info("MCP server %s: tools now %s", self.name, ", ".join(tools) or "none")
        self.tools = tools
        self._on_change()

    # Calls

    async def call_tool(self, tool: str, arguments: dict, username: str) -> mcp_types.CallToolResult:
        """Call ``tool``. A failure to reach the server is a ToolError for the
        model; no answer within ``timeout_seconds`` a TimeoutError, which the
        host's loop records as a timeout like its own."""
        client = self._client
        if client is None:
            raise ToolError(f"the MCP server {self.name} is unreachable")
        timeout = self.settings.timeout_seconds
        try:
            if self.settings.user_header:
                return await self._call_as(username, tool, arguments)
            return await client.call_tool(tool, arguments, read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise TimeoutError(f"MCP server {self.name}: no answer in {timeout:g} s") from None
            raise ToolError(f"the MCP server {self.name} refused the call: {exc}") from None
        except (OSError, httpx2.HTTPError) as exc:
            raise ToolError(f"the MCP server {self.name} failed: {describe(exc)}") from None

    async def _call_as(self, username: str, tool: str, arguments: dict) -> mcp_types.CallToolResult:
        """A call on a connection of its own that carries the user's name in
        ``user_header``: the SDK's requests share no per-call headers."""
        async with asyncio.timeout(self.settings.timeout_seconds):
            async with contextlib.AsyncExitStack() as stack:
                header = {self.settings.user_header: username}
                client = await stack.enter_async_context(self._client_for(stack, header))
                return await client.call_tool(tool, arguments)


CLIENT_INFO = mcp_types.Implementation(name="tornado-app", version="0.1.0")


def describe(exc: BaseException) -> str:
    """A short reason for the log (no traceback for a server that is simply down)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.asynccontextmanager
async def stdio_transport(parameters: StdioServerParameters, errlog):
    from mcp.client.stdio import stdio_client

    async with stdio_client(parameters, errlog=errlog) as streams:
        errlog.close()  # the child has its copy; EOF reaches the reader when it exits
        yield streams


def stderr_to_log(name: str, stack: contextlib.AsyncExitStack):
    """A pipe for a child's stderr whose lines go to this log, one task reading it."""
    read_fd, write_fd = os.pipe()
    errlog = os.fdopen(write_fd, "w")
    task = asyncio.get_running_loop().create_task(_log_lines(name, read_fd))
    stack.push_async_callback(_finish, task)
    stack.callback(errlog.close)  # first out: the reader then sees EOF once the child is gone
    return errlog


async def _log_lines(name: str, read_fd: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
    try:
        while line := await reader.readline():
            logger.info("MCP server %s: %s", name, line.decode(errors="replace").rstrip())
    finally:
        transport.close()


async def _finish(task: asyncio.Task) -> None:
    # The child is gone by now (the client closed first); let the last lines out.
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


SERVER_PREFIX = "mcp:"


def plugin_tool_names(names: list[str], settings: McpSettings) -> dict[int, str]:
    """The ``agent.tools`` entries (by position) that are not MCP tools, for the
    plugin tools' check. ``mcp:<server>`` and ``<server>__<tool>`` name tools of
    a server in ``mcp.servers`` (which ones it has is known only once it is
    connected); ``mcp:`` with another name is a ConfigError."""
    servers = [server.name for server in settings.servers]
    rest = {}
    for index, name in enumerate(names):
        if name.startswith(SERVER_PREFIX):
            if name[len(SERVER_PREFIX):] not in servers:
                raise ConfigError(
                    f"agent.tools[{index}]: {name!r} names no server of mcp.servers; "
                    f"configured: {', '.join(servers) or 'none'}")
        elif name.split(SEPARATOR, 1)[0] not in servers or SEPARATOR not in name:
            rest[index] = name
    return rest


class McpServers:
    """Every configured server's connection; what tools are available now."""

    def __init__(self, settings: McpSettings):
        self.connections: dict[str, McpConnection] = {}
        self._change = asyncio.Event()
        self._apply(settings)

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def next_change(self) -> None:
        """Wait until a server connects, drops, or changes its tools."""
        await self._change.wait()

    def _apply(self, settings: McpSettings) -> list[McpConnection]:
        """Start new and changed servers; return the ones to close."""
        old = self.connections
        fresh: dict[str, McpConnection] = {}
        for server in settings.servers:
            current = old.get(server.name)
            if current is not None and current.identity == server.model_dump_json():
                fresh[server.name] = current
            else:
                fresh[server.name] = McpConnection(server, self._changed)
                fresh[server.name].start()
        self.connections = fresh
        return [c for name, c in old.items() if fresh.get(name) is not c]

    async def reload(self, settings: McpSettings) -> None:
        """Switch to a new ``mcp`` section (SIGHUP)."""
        retired = self._apply(settings)
        for connection in retired:
            await connection.close()
        if retired or settings.servers:
            logger.info("MCP servers now: %s", ", ".join(self.connections) or "none")

    def tools(self) -> dict[str, McpTool]:
        """The tools of every connected server, by host name."""
        return {name: tool for c in self.connections.values() for name, tool in c.tools.items()}

    def server_tools(self, server: str) -> dict[str, McpTool]:
        connection = self.connections.get(server)
        return dict(connection.tools) if connection is not None else {}

    def enabled(self, names: list[str]) -> dict[str, McpTool]:
        """The connected tools that ``agent.tools`` entries name: ``mcp:<server>``
        (all its tools) or ``<server>__<tool>`` one by one."""
        available = self.tools()
        chosen: dict[str, McpTool] = {}
        for name in names:
            if name.startswith(SERVER_PREFIX):
                chosen.update(self.server_tools(name[len(SERVER_PREFIX):]))
            elif name in available:
                chosen[name] = available[name]
        return chosen

    def states(self) -> dict[str, str]:
        """Each server's state (connecting, connected, down), for /readyz."""
        return {name: c.state for name, c in self.connections.items()}

    async def close(self) -> None:
        connections, self.connections = list(self.connections.values()), {}
        for connection in connections:
            await connection.close()
