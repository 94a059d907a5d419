"""Building the Application, starting in order, shutting down in reverse.

Start-up (JupyterHub style, one step each): logging, database schema, agents
(loading in the background), handlers, listening socket. Shutdown on SIGTERM
or SIGINT: stop accepting, let replies in flight finish (up to
``server.shutdown_grace_seconds``), close every socket with 1001, close the
agents, dispose of the database. SIGHUP re-reads the ``agent``, ``tools`` and
``memory`` sections (the memory key excepted).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer

from . import handlers, prefork
from .agent_pool import AgentPool
from .analytics import AnalyticsTask
from .auth import TokenVerifier
from .chat import ChatService
from .connections import Connections, instance_name
from .config import ConfigError, Settings, load_settings
from .handlers.base import log_request
from .mcp_servers import McpServers
from .memory import Memories, MemoryCipher
from .replies import Replies
from .store import Store
from .toolbox import Toolbox

logger = logging.getLogger(__name__)


def make_app(
    settings: Settings, store: Store, chat: ChatService, connections: Connections,
    mcp: McpServers | None = None,
) -> tornado.web.Application:
    """The Application; handlers reach these shared objects through self.settings."""
    server = settings.server
    return tornado.web.Application(
        handlers.all_routes(),
        default_handler_class=handlers.NotFoundHandler,
        config=settings,
        store=store,
        chat=chat,
        connections=connections,
        verifier=chat.verifier,
        memories=chat.memories,
        mcp=mcp,
        log_function=log_request,
        websocket_max_message_size=server.max_message_bytes,
        websocket_ping_interval=server.ping_interval_seconds or None,
        websocket_ping_timeout=server.ping_timeout_seconds,
    )


class Service:
    """The running service: what start() opened, stop() closes in reverse."""

    def __init__(self, settings: Settings, config_path: str | None = None,
                 background_jobs: bool = True):
        self.settings = settings
        self.config_path = config_path
        # The analytics rollups and retention: one worker of a --processes
        # group runs them (claim rows keep separate instances from repeating work).
        self.background_jobs = background_jobs
        self.store: Store | None = None
        self.pool: AgentPool | None = None
        self.mcp: McpServers | None = None
        self.toolbox: Toolbox | None = None
        self.chat: ChatService | None = None
        self.memories: Memories | None = None
        self.replies: Replies | None = None
        self.notifications = None
        self.connections: Connections | None = None
        self.analytics: AnalyticsTask | None = None
        self.http: HTTPServer | None = None
        self.port: int | None = None
        self._reloads: set[asyncio.Task] = set()

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        settings = self.settings
        if sockets is None:
            # Bind first: a port in use fails before anything else is opened.
            sockets = tornado.netutil.bind_sockets(settings.server.port, settings.server.host)
        database = settings.database
        self.store = Store.from_url(database.url, database.echo, database.timeout_seconds)
        if await self.store.ensure_schema() == "created":
            logger.info("created the database schema")
        self.pool = AgentPool(settings)
        # MCP servers connect in the background; their tools join as they come.
        self.mcp = McpServers(settings.mcp)
        self.toolbox = Toolbox(settings, self.mcp)
        self.replies = Replies(self.store, instance_name(), settings.limits.lease_seconds,
                               settings.chat.resume_window_seconds)
        self.replies.start_background()
        self.notifications = self.store.reply_notifications(
            self.replies.notified, self.replies.listening)
        if self.notifications is not None:
            self.notifications.start()
        self.memories = Memories(self.store, MemoryCipher(settings.memory_key),
                                 settings.memory.max_items)
        self.chat = ChatService(settings, self.store, self.pool,
                                TokenVerifier.from_settings(settings), self.replies, self.toolbox,
                                self.memories)
        self.connections = Connections(settings, self.store, self.replies)
        self.connections.start()
        if self.background_jobs:
            # Daily rollups and retention, in the background (tornado_app/analytics).
            self.analytics = AnalyticsTask(self.store.engine, settings.analytics.retention_days,
                                           settings.analytics.rollup_interval_seconds)
            self.analytics.start()
        app = make_app(settings, self.store, self.chat, self.connections, self.mcp)
        self.http = HTTPServer(app, xheaders=False)
        self.http.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        logger.info("serving on http://%s:%s (agent: %s)",
                    settings.server.host, self.port, settings.agent.backend)

    def reload_agents(self) -> None:
        """Re-read the config file: swap to its ``agent`` and ``tools`` sections and its MCP servers."""
        try:
            fresh = load_settings(self.config_path)
            self.toolbox.check(fresh)  # before the agents change: all or nothing
            self.pool.swap(fresh)
            self.toolbox.swap(fresh)
        except ConfigError as exc:
            logger.error("SIGHUP: config not reloaded: %s", exc)
            return
        self.settings.agent = fresh.agent
        self.settings.tools = fresh.tools
        self.reload_memory(fresh)
        self.reload_mcp(fresh)

    def reload_memory(self, fresh: Settings) -> None:
        """SIGHUP: ``memory.max_items`` and ``memory.prompt_share`` take effect
        for the next request. The key does not: memories saved with the old
        one could no longer be read, and one key per process of a group would
        split them. A changed key is kept for the next start, said in the log."""
        memory = self.settings.memory
        if (fresh.memory_key, fresh.memory.key_file) != (self.settings.memory_key,
                                                         memory.key_file):
            logger.warning("SIGHUP: memory.key / memory.key_file changed: they take effect "
                           "only at the next start (the memories stay readable)")
        self.settings.memory = fresh.memory.model_copy(
            update={"key": memory.key, "key_file": memory.key_file})
        self.memories.max_items = fresh.memory.max_items
        logger.info("memory now: max_items %d, prompt_share %s", fresh.memory.max_items,
                    fresh.memory.prompt_share)

    def reload_mcp(self, fresh: Settings) -> None:
        """SIGHUP: connect added or changed MCP servers, drop removed ones."""
        self.settings.mcp = fresh.mcp
        task = asyncio.get_running_loop().create_task(self.mcp.reload(fresh.mcp))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def stop(self) -> None:
        if self.http is None:
            return  # never started, or already stopped
        grace = self.settings.server.shutdown_grace_seconds
        logger.info("shutting down: letting replies finish (up to %.0fs)", grace)
        self.http.stop()
        # Replies in flight get the grace, then are cancelled (each saves
        # itself as cancelled, and its sockets get the cancelled frame).
        await self.replies.stop(grace)
        sockets = list(self.connections.sockets)
        workers = [worker for s in sockets if (worker := s.shut_down()) is not None]
        if workers:
            # A cancelled reply saves itself (status "cancelled") as it ends.
            await asyncio.wait(workers, timeout=5)
        await self.http.close_all_connections()
        await self.connections.stop()
        if self.notifications is not None:
            await self.notifications.stop()
        if self.analytics is not None:
            await self.analytics.stop()
        await self.pool.close()
        await self.toolbox.close()
        await self.mcp.close()
        await self.store.close()
        self.http = None
        logger.info("stopped")


def run(settings: Settings, config_path: str | None) -> None:
    """Serve until SIGTERM or SIGINT, in ``server.processes`` processes."""
    sockets = tornado.netutil.bind_sockets(settings.server.port, settings.server.host)
    worker = 0
    if settings.server.processes > 1:
        # Once, before forking, so that the workers do not race to create it.
        asyncio.run(prepare_database(settings))
        worker = prefork.fork_workers(settings.server.processes)
        if worker is None:
            return  # the supervisor: every worker has exited
    asyncio.run(serve(settings, config_path, sockets, background_jobs=worker == 0))


async def prepare_database(settings: Settings) -> None:
    store = Store.from_url(settings.database.url, timeout=settings.database.timeout_seconds)
    try:
        if await store.ensure_schema() == "created":
            logger.info("created the database schema")
    finally:
        await store.close()


async def serve(
    settings: Settings, config_path: str | None, sockets: list[socket.socket] | None = None,
    background_jobs: bool = True,
) -> None:
    service = Service(settings, config_path, background_jobs)
    await service.start(sockets)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_agents)
    await stopping.wait()
    await service.stop()
