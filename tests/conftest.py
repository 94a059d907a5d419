"""Shared fixtures. Tests talk to real servers over real sockets.

Fixtures:
- ``any_db_url`` / ``db_url``: an empty database per test, once as a SQLite
  file in tmp_path and once as a fresh schema in a PostgreSQL database this
  session creates and drops: every test that uses a service runs on both.
  ``postgres_url``: the PostgreSQL one alone (skipped, or failed in CI,
  without a server); ``postgres_database``: the session's database itself.
- ``db_store``: a Store on ``any_db_url``, without a service (closed after);
  ``limiter_store``: the same with its schema and users u1 (1) and u2 (2).
- ``settings``: Settings for a test server (random port, fake agent, a fixed
  JWT secret); tests adjust fields before asking for ``service``.
  ``openai_settings(tmp_path, db_url, upstream, **environ)`` (a function): the
  same with the ``openai`` plugin on a loopback upstream, for a module's own ``settings``.
- ``fake_agent``: the FakeAgent behind agent name ``fake``; ``enqueue()``
  scripts replies, ``history`` holds every request it received.
- ``second_agent``: another FakeAgent, named ``fake2``.
- ``service``: a running tornado_app.app.Service on 127.0.0.1 with its own
  database; ``base_url`` / ``ws_url(client_id)`` point at it.
- ``store``: the service's Store (to read transcripts).
- ``await make_user(name, password=..., disabled=..., admin=...)`` and ``token_for(name)``.
- ``await connect(client_id, user=..., subprotocols=...)``: opens a WebSocket
  (query token or cookie), creating the user on first use, and returns a
  helpers.Client past the welcome (and, v2, the agent frame after it);
  ``subprotocols=["ai-chat.v2"]`` asks for protocol v2.
- ``servers(config, **options)``: starts a tests.servers.ServerProcess (a real
  ``python -m tornado_app``); all are killed when the test ends.
- ``repo_root``: the repository's folder.
- Browsers, for a module that defines a module-scoped ``live_server`` (a
  ServerProcess): ``chromium`` (Debian's, through Playwright; skipped without
  it, failed with ``CHAT_BROWSER_REQUIRED=1``), ``browser`` (``localhost:8000``
  maps to ``live_server``), ``browser_context_args`` (a module may override
  it) and ``page``: a page in a fresh context, whose page errors and
  Content-Security-Policy reports fail the test.

Tests run on pytest-tornado's ``io_loop`` (``@pytest.mark.gen_test``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from tornado.testing import bind_unused_port

from tornado_app import auth
from tornado_app.app import Service
from tornado_app.config import load_settings
from tornado_app.store import Store

from .helpers import BROWSER_TIMEOUT_MS, Client, FakeAgent, connect_ws, offering, run_async
from .servers import ROOT, serving

TEST_SECRET = "test-secret-" + "x" * 40
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
# CI sets TEST_POSTGRES_URL: there an unreachable PostgreSQL fails the run.
POSTGRES_REQUIRED = "TEST_POSTGRES_URL" in os.environ


# Databases


async def _as_admin(statement: str) -> None:
    # CREATE and DROP DATABASE cannot run inside a transaction.
    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await admin.dispose()


async def _create_postgres_database() -> str:
    name = f"tornado_app_test_{uuid.uuid4().hex[:8]}"
    await _as_admin(f'CREATE DATABASE "{name}"')
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


async def _drop_postgres_database(url: str) -> None:
    await _as_admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_database():
    """One PostgreSQL database for the session; each test gets a fresh schema in it."""
    try:
        url = run_async(_create_postgres_database())
    except Exception as exc:  # unreachable server, auth refused...
        if POSTGRES_REQUIRED:
            pytest.fail(f"PostgreSQL expected at TEST_POSTGRES_URL but unusable: {exc!r}")
        pytest.skip(f"PostgreSQL not reachable ({type(exc).__name__}); set TEST_POSTGRES_URL")
    yield url
    run_async(_drop_postgres_database(url))


async def _reset_postgres_schema(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            # A connection an earlier test leaked would hold locks that block
            # DROP SCHEMA for ever: end them first.
            await conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ))
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    finally:
        await engine.dispose()


@pytest.fixture
def postgres_url(postgres_database):
    """A fresh schema in the session's PostgreSQL database."""
    run_async(_reset_postgres_schema(postgres_database))
    return postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path):
    """An empty database of each kind: tests using it run on both."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def db_url(any_db_url):
    """The service's database: every test that runs a service runs on both."""
    return any_db_url


@pytest.fixture
def db_store(io_loop, any_db_url):
    """A Store on an empty database of each kind, with no service around it."""
    store = Store.from_url(any_db_url)
    yield store
    io_loop.run_sync(store.close)


@pytest.fixture
def limiter_store(io_loop, db_store):
    """A Store on an empty database of each kind, with users u1 (1) and u2 (2)
    (the rate limit and quota tests)."""

    async def prepare():
        await db_store.ensure_schema()
        for name in ("u1", "u2"):
            await db_store.create_user(name, None)

    io_loop.run_sync(prepare)
    return db_store


# The service


@contextlib.contextmanager
def offered(name: str, agent: FakeAgent):
    """Offer ``agent`` under ``name`` through the real plugin manager, for one test."""
    with offering(agents={name: agent}):
        yield agent


@pytest.fixture
def fake_agent():
    with offered("fake", FakeAgent()) as agent:
        yield agent


@pytest.fixture
def second_agent():
    """Another FakeAgent, offered as ``fake2`` (for fallbacks and hot swap)."""
    with offered("fake2", FakeAgent(model="fake-model-2")) as agent:
        yield agent


@pytest.fixture
def settings(tmp_path, db_url, fake_agent):
    environ = {
        "TORNADO_APP_DATA_DIR": str(tmp_path / "data"),
        "TORNADO_APP_DATABASE__URL": db_url,
        "TORNADO_APP_AUTH__JWT_SECRET": TEST_SECRET,
        "TORNADO_APP_AGENT__BACKEND": "fake",
        "TORNADO_APP_SERVER__HOST": "127.0.0.1",
        "TORNADO_APP_SERVER__SHUTDOWN_GRACE_SECONDS": "2",
    }
    return load_settings(None, environ)


def openai_settings(tmp_path, db_url: str, upstream, **environ: str):
    """Settings of a test service whose agent is the ``openai`` plugin on the
    loopback ``upstream`` (tests/openai_upstream.py), with more ``environ``."""
    return load_settings(None, {
        "TORNADO_APP_DATA_DIR": str(tmp_path / "data"),
        "TORNADO_APP_DATABASE__URL": db_url,
        "TORNADO_APP_AUTH__JWT_SECRET": TEST_SECRET,
        "TORNADO_APP_SERVER__HOST": "127.0.0.1",
        "TORNADO_APP_AGENT__BACKEND": "openai",
        "TORNADO_APP_AGENT__OPENAI__BASE_URL": upstream.base_url,
        "TORNADO_APP_AGENT__OPENAI__API_KEY": "sk-test",
        "TORNADO_APP_AGENT__OPENAI__MAX_RETRIES": "0",
        **environ,
    })


@pytest.fixture
def service(io_loop, settings):
    sock, _port = bind_unused_port()
    running = Service(settings)
    io_loop.run_sync(lambda: running.start(sockets=[sock]))
    yield running
    io_loop.run_sync(running.stop, timeout=30)


@pytest.fixture
def store(service):
    return service.store


@pytest.fixture
def base_url(service):
    return f"http://127.0.0.1:{service.port}"


@pytest.fixture
def ws_url(service):
    def url(client_id: str = "client-1", token: str | None = None) -> str:
        query = f"?token={token}" if token is not None else ""
        return f"ws://127.0.0.1:{service.port}/ws/ai/ai-chat/{client_id}{query}"

    return url


@pytest.fixture
def make_user(service):
    async def make(name="alice", password="correct horse", disabled=False, admin=False):
        user = await service.store.create_user(name, auth.hash_password(password), admin)
        if disabled:
            await service.store.set_disabled(name)
        return user

    return make


@pytest.fixture
def token_for(settings):
    def token(name="alice", ttl_minutes=5):
        return auth.TokenVerifier.from_settings(settings).issue(name, ttl_minutes)

    return token


@pytest.fixture
def connect(ws_url, token_for, make_user):
    """connect(client_id, user="alice") -> Client, creating the user on first use."""
    made: set[str] = set()

    async def open_client(client_id="client-1", user="alice", token=None, cookie=None,
                          welcome=True, subprotocols=None) -> Client:
        if token is None and cookie is None:
            if user not in made:
                await make_user(user)
                made.add(user)
            token = token_for(user)
        client = await connect_ws(ws_url(client_id, token), cookie=cookie,
                                  subprotocols=subprotocols)
        if welcome:
            frame = await client.receive()
            assert frame["type"] == "system", frame
            if subprotocols and "ai-chat.v2" in subprotocols:
                frame = await client.receive()  # v2: the conversation's agent, for a picker
                assert "selectable" in frame, frame
        return client

    return open_client


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


# Real server processes


@pytest.fixture
def servers():
    """``servers(config, **options) -> ServerProcess`` started; all killed at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda config, **options: stack.enter_context(serving(config, **options))


# Browsers (test_browser.py, test_admin_browser.py)

BROWSER_REQUIRED = os.environ.get("CHAT_BROWSER_REQUIRED") == "1"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _browser_unavailable(reason: str):
    if BROWSER_REQUIRED:
        pytest.fail(f"{reason} (CHAT_BROWSER_REQUIRED=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium():
    """Chromium's path and Playwright's entry point; skip (or fail in CI) without them."""
    executable = shutil.which("chromium")
    if executable is None:
        _browser_unavailable(
            "Chromium not found on PATH: `apt-get install chromium` to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _browser_unavailable(
            "Playwright not installed: `pip install -e .[dev]` to run the browser tests")
    return executable, sync_playwright


@pytest.fixture(scope="module")
def browser(chromium, live_server):
    """One Chromium for the module. It maps ``localhost:8000`` to ``live_server``,
    so that the spec's JavaScript example, which hard-codes that address, runs unchanged."""
    executable, sync_playwright = chromium
    args = [*LAUNCH_ARGS, f"--host-resolver-rules=MAP localhost:8000 127.0.0.1:{live_server.port}"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser_context_args(live_server) -> dict:
    """What each test's browser context is made with."""
    return {"base_url": live_server.base_url, "viewport": {"width": 1100, "height": 760}}


@pytest.fixture
def page(browser, browser_context_args):
    """A page in a fresh context (its own cookies and storage). A page error or a
    Content-Security-Policy report in the console fails the test."""
    context = browser.new_context(**browser_context_args)
    context.set_default_timeout(BROWSER_TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda message: problems.append(message.text)
            if "Content Security Policy" in message.text else None)
    yield page
    context.close()
    assert not problems, problems
