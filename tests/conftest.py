"""Shared fixtures. Tests talk to real servers over real sockets.

Fixtures:
- ``any_db_url`` / ``db_url``: an empty database per test, once as a SQLite
  file in tmp_path and once as a fresh schema in a PostgreSQL database this
  session creates and drops: every test that uses a service runs on both.
- ``settings``: Settings for a test server (random port, fake agent, a fixed
  JWT secret); tests adjust fields before asking for ``service``.
- ``fake_agent``: the FakeAgent behind agent name ``fake``; ``enqueue()``
  scripts replies, ``history`` holds every request it received.
- ``second_agent``: another FakeAgent, named ``fake2``.
- ``service``: a running tornado_app.app.Service on 127.0.0.1 with its own
  database; ``base_url`` / ``ws_url(client_id)`` point at it.
- ``store``: the service's Store (to read transcripts).
- ``await make_user(name, password=..., disabled=..., admin=...)`` and ``token_for(name)``.
- ``await connect(client_id, user=..., subprotocols=...)``: opens a WebSocket
  (query token or cookie), creating the user on first use, and returns a
  helpers.Client; ``subprotocols=["ai-chat.v2"]`` asks for protocol v2.

Tests run on pytest-tornado's ``io_loop`` (``@pytest.mark.gen_test``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from tornado.testing import bind_unused_port

from tornado_app import auth
from tornado_app.agents import get_plugin_manager
from tornado_app.app import Service
from tornado_app.config import load_settings

from .helpers import Client, FakeAgent, FakePlugin, connect_ws

TEST_SECRET = "test-secret-" + "x" * 40
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
# CI sets TEST_POSTGRES_URL: there an unreachable PostgreSQL fails the run.
POSTGRES_REQUIRED = "TEST_POSTGRES_URL" in os.environ


# Databases


def run_async(coro):
    """Run a coroutine to completion outside the test's event loop.

    asyncio.run() in the main thread would close and unset the loop that
    pytest-tornado's io_loop relies on; a worker thread leaves it alone.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _create_postgres_database() -> str:
    name = f"tornado_app_test_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


async def _drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


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


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path):
    """An empty database of each kind: tests using it run on both."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    url = request.getfixturevalue("postgres_database")
    run_async(_reset_postgres_schema(url))
    return url


@pytest.fixture
def db_url(any_db_url):
    """The service's database: every test that runs a service runs on both."""
    return any_db_url


# The service


@contextlib.contextmanager
def offered(name: str, agent: FakeAgent):
    """Offer ``agent`` under ``name`` through the real plugin manager, for one test."""
    plugin = FakePlugin({name: agent})
    manager = get_plugin_manager()
    manager.register(plugin, name=f"{name}-{id(plugin)}")
    try:
        yield agent
    finally:
        manager.unregister(plugin)


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
        return client

    return open_client


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
