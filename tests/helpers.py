"""Test helpers: a WebSocket client, HTTP requests, a scriptable fake agent and
its plugin, coroutines run outside the test's loop, the store's rows as tests
read and write them, and the browser tests' steps."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, text
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tornado_app.agents import Agent, AgentRequest, get_plugin_manager
from tornado_app.hookspecs import hookimpl
from tornado_app.store import Store
from tornado_app.store.models import Message, ToolStep

TIMEOUT = 5.0
BROWSER_TIMEOUT_MS = 10_000
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """Save a screenshot of the page: over the docs' copy with
    UPDATE_SCREENSHOTS=1 (to refresh the README's pictures), else in a
    temporary folder, so that a test run never changes a tracked file."""
    folder = SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name))
    return folder / name


def run_async(coro):
    """Run a coroutine to completion outside the test's event loop.

    asyncio.run() in the main thread would close and unset the loop that
    pytest-tornado's io_loop relies on; a worker thread leaves it alone.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def on_engine(url: str, use):
    """``await use(engine)`` with the engine of a Store on ``url``, outside the
    test's loop (set-up, not under test); its result."""

    async def run():
        store = Store.from_url(url)
        try:
            return await use(store.engine)
        finally:
            await store.close()

    return run_async(run())


# HTTP


async def get(url: str, **headers: str) -> HTTPResponse:
    """A GET whose error answers are returned, not raised; redirects are not followed."""
    return await AsyncHTTPClient().fetch(url, headers=headers, raise_error=False,
                                         follow_redirects=False)


async def logout(base_url: str, token: str) -> HTTPResponse:
    """``POST /logout`` with ``token`` as the bearer."""
    return await AsyncHTTPClient().fetch(f"{base_url}/logout", method="POST", body=b"",
                                         headers={"Authorization": f"Bearer {token}"},
                                         raise_error=False)


# WebSocket


class Client:
    """A WebSocket client that reads frames as dicts (None once closed)."""

    def __init__(self, conn: WebSocketClientConnection):
        self.conn = conn

    async def send(self, message) -> None:
        if isinstance(message, bytes):
            await self.conn.write_message(message, binary=True)
        elif isinstance(message, str):
            await self.conn.write_message(message)
        else:
            await self.conn.write_message(json.dumps(message))

    async def receive(self, timeout: float = TIMEOUT) -> dict | None:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        return None if raw is None else json.loads(raw)

    async def receive_type(self, kind: str, timeout: float = TIMEOUT) -> dict:
        """Skip frames until one of the given type arrives."""
        while True:
            frame = await self.receive(timeout)
            assert frame is not None, f"closed ({self.close_code}) before a {kind} frame"
            if frame["type"] == kind:
                return frame

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes; returns the close code."""
        while await self.receive(timeout) is not None:
            pass
        return self.close_code

    async def receive_until(self, kind: str, timeout: float = TIMEOUT) -> list[dict]:
        """Every frame up to and including the first one of the given type."""
        frames = []
        while True:
            frame = await self.receive(timeout)
            assert frame is not None, f"closed ({self.close_code}) before a {kind} frame"
            frames.append(frame)
            if frame["type"] == kind:
                return frames

    @property
    def subprotocol(self) -> str | None:
        return self.conn.selected_subprotocol

    @property
    def close_code(self) -> int | None:
        return self.conn.close_code

    @property
    def close_reason(self) -> str | None:
        return self.conn.close_reason

    def close(self) -> None:
        self.conn.close()


async def connect_ws(url: str, cookie: str | None = None, origin: str | None = None,
                     subprotocols: list[str] | None = None) -> Client:
    headers = {}
    if cookie is not None:
        headers["Cookie"] = cookie
    if origin is not None:
        headers["Origin"] = origin
    request = HTTPRequest(url, headers=headers, connect_timeout=TIMEOUT)
    conn = await websocket_connect(request, max_message_size=64 * 1024 * 1024,
                                   subprotocols=subprotocols)
    return Client(conn)


@dataclass
class Step:
    """One scripted reply: pieces to yield, then maybe an error."""

    pieces: tuple[str, ...]
    error: BaseException | None = None
    delay: float = 0.0
    gate: asyncio.Event | None = None
    usage: tuple[int, int] | None = None


@dataclass
class FakeAgent(Agent):
    """Deterministic agent: replies from ``enqueue()``, or ``"fake reply to: <content>"``."""

    model: str = "fake-model"
    script: deque = field(default_factory=deque)
    history: list[AgentRequest] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self):
        Agent.__init__(self)

    def enqueue(self, *pieces: str, error=None, delay=0.0, gate=None, usage=None) -> None:
        self.script.append(Step(pieces, error, delay, gate, usage))

    async def received(self, count: int = 1) -> None:
        """Wait until ``count`` requests have arrived (there is no event to await)."""
        while len(self.history) < count:
            await asyncio.sleep(0.005)

    async def stream(self, request: AgentRequest):
        self.history.append(request)
        step = self.script.popleft() if self.script else Step(
            (f"fake reply to: {request.messages[-1]['content']}",)
        )
        for piece in step.pieces:
            if step.gate is not None:
                await step.gate.wait()
            if step.delay:
                await asyncio.sleep(step.delay)
            yield piece
        if step.error is not None:
            raise step.error
        if step.usage is not None:
            request.usage.tokens_in, request.usage.tokens_out = step.usage

    async def close(self) -> None:
        self.closed = True


class FakePlugin:
    """A plugin object offering the given agent (and tool) instances under their names."""

    def __init__(self, agents: dict[str, Agent], tools: dict | None = None):
        self.agents = agents
        self.tools = tools or {}

    @hookimpl
    def register_agents(self, register):
        for name, agent in self.agents.items():
            register(name, lambda options, settings, agent=agent: agent)

    @hookimpl
    def register_tools(self, register):
        for name, tool in self.tools.items():
            register(name, lambda options, settings, tool=tool: tool)


# Browser steps (Playwright's sync API; see the page fixture in conftest.py)


def expect(locator):
    from playwright.sync_api import expect as playwright_expect  # only where Chromium runs
    return playwright_expect(locator)


def log_in(page, username: str, password: str, path: str = "/") -> None:
    """Sign in on the page at ``path`` with the keyboard alone, as a user without a mouse would."""
    page.goto(path)
    expect(page.locator("#username")).to_be_focused()
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")


def run_axe(page) -> list:
    """axe-core's violations on the page as it is now."""
    page.add_script_tag(url="/static/vendor/axe-core/axe.min.js")
    return page.evaluate("""async () => {
        const result = await axe.run(document);
        return result.violations.map(v => ({id: v.id, help: v.help,
                                            nodes: v.nodes.map(n => n.html)}));
    }""")
# The store, as tests use it: what it saved is read back with plain SQL, and
# what a test needs saved goes through the production path (Store.admit).


async def saved_messages(store, conversation_id: int) -> list:
    """Every row the store saved in a conversation, oldest first."""
    messages = Message.__table__
    async with store.engine.connect() as conn:
        result = await conn.execute(select(messages).where(
            messages.c.conversation_id == conversation_id).order_by(messages.c.id))
        return list(result)


async def saved_tool_steps(store) -> list:
    """Every tool step the store saved, oldest first."""
    steps = ToolStep.__table__
    async with store.engine.connect() as conn:
        return list(await conn.execute(select(steps).order_by(steps.c.id)))


# A tool package, "late", for tests that install one while the service runs.
LATE_PACKAGE = """
from pydantic import BaseModel, ConfigDict
from tornado_app.hookspecs import hookimpl
from tornado_app.tools import Tool


class Late(Tool):
    description = "Installed after start-up."

    class Arguments(BaseModel):
        model_config = ConfigDict(extra="forbid")

    async def call(self, arguments, context):
        return "late tool here"


@hookimpl
def register_tools(register):
    register("late", lambda options, settings: Late())
"""


def install_late_tool(site: Path, name: str = "late_tool_pkg") -> None:
    """Install the "late" tool into ``site`` as pip would: the module, its
    dist-info and the entry point in the group ``tornado_app``."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[tornado_app]\nlate = {name}\n")
    (site / f"{name}.py").write_text(LATE_PACKAGE)


# Store.admit's arguments for a test's messages: a process name, and a lease
# that never runs out (no sweep saves a test's reply as interrupted).
ADMIT = {"instance": "test", "lease_seconds": 1e9}


async def seed_old_schema(conn, username: str = "old", client_ids=("c",),
                          at: datetime = datetime(2025, 1, 1)) -> None:
    """User 1 named ``username`` and conversations 1, 2... with these client
    ids, in plain SQL: a migration test at an older revision cannot use the
    Store, whose statements name the newest revision's columns."""
    await conn.execute(text(
        "INSERT INTO users (id, username, is_admin, disabled, created_at) "
        "VALUES (1, :username, false, false, :at)"), {"username": username, "at": at})
    for conversation_id, client_id in enumerate(client_ids, start=1):
        await conn.execute(text(
            "INSERT INTO conversations (id, user_id, client_id, created_at) "
            "VALUES (:id, 1, :client_id, :at)"),
            {"id": conversation_id, "client_id": client_id, "at": at})


async def add_user_message(store, conversation_id: int, user_id: int, content: str) -> int:
    """Save a user message as an exchange does (with a rate limit no test reaches)."""
    admission = await store.admit(conversation_id, user_id, content, now=time.time(),
                                  messages=1_000_000, per_seconds=1.0, after_id=0,
                                  history_limit=0, **ADMIT)
    return admission.message_id


async def add_reply(store, conversation_id: int, user_id: int, message_id: int,
                    **columns) -> int:
    """Save a reply to a message as an exchange does (Store.finish_reply)."""
    pieces = [columns["content"]] if columns.get("content") else []
    return await store.finish_reply(uuid.uuid4().hex, conversation_id, user_id, message_id,
                                    pieces, False, **columns)


async def take_rate_limit(store, user_id: int, now: float, messages: int, per_seconds: float):
    """The rate limit's decision for one message, through Store.admit."""
    conversation = await store.open_conversation(user_id, "rate-limit")
    admission = await store.admit(conversation, user_id, "a message", now=now, messages=messages,
                                  per_seconds=per_seconds, after_id=0, history_limit=0, **ADMIT)
    return admission.decision


class KeyArguments(BaseModel):
    """The arguments of the test tools: one short key."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1, max_length=10)


def wait_for_log(server, text: str, timeout: float = 20) -> None:
    """Wait until a server process's log holds ``text``."""
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)  # a log file has nothing to await


@contextlib.contextmanager
def offering(tools: dict | None = None, agents: dict | None = None):
    """The real plugin manager offers these tool (and agent) instances, by
    name, meanwhile; yields ``tools``."""
    plugin = FakePlugin(agents or {}, tools)
    manager = get_plugin_manager()
    manager.register(plugin, name=f"test-plugin-{id(plugin)}")
    try:
        yield tools
    finally:
        manager.unregister(plugin)
