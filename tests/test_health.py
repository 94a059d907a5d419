"""Liveness and readiness."""

import json

import pytest

from .helpers import get


@pytest.mark.gen_test
async def test_healthz(base_url):
    response = await get(f"{base_url}/healthz")
    assert (response.code, json.loads(response.body)) == (200, {"status": "ok"})


@pytest.mark.gen_test
async def test_readyz_waits_for_the_agent(base_url, fake_agent, caplog):
    fake_agent.set_ready(False)
    response = await get(f"{base_url}/readyz")
    assert response.code == 503
    assert json.loads(response.body)["agent"] == "loading"
    # Not ready is a state, not a fault: no ERROR line per load-balancer poll.
    (line,) = [r for r in caplog.records
               if r.name == "tornado.access" and "/readyz" in r.getMessage()]
    assert line.levelname == "WARNING"
    fake_agent.set_ready()
    response = await get(f"{base_url}/readyz")
    assert response.code == 200
    assert json.loads(response.body) == {"status": "ready", "database": "ok", "agent": "ok"}


@pytest.mark.gen_test
async def test_readyz_reports_an_unreachable_database(base_url, service):
    from sqlalchemy.ext.asyncio import create_async_engine

    from tornado_app.store.executor import EngineExecutor

    # Point the store at a port where nothing listens, then put it back.
    store = service.store
    good = store.reader, store.sqlite_file
    nowhere = EngineExecutor(create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none"))
    store.reader, store.sqlite_file = nowhere, None
    try:
        response = await get(f"{base_url}/readyz")
    finally:
        await nowhere.close()
        store.reader, store.sqlite_file = good
    assert response.code == 503
    assert json.loads(response.body)["database"] == "unavailable"


@pytest.mark.gen_test
async def test_readyz_reports_a_locked_sqlite_file(base_url, service, settings):
    import sqlite3

    if service.store.sqlite_file is None:
        pytest.skip("SQLite only")
    lock = sqlite3.connect(service.store.sqlite_file, isolation_level=None, timeout=0)
    lock.execute("BEGIN EXCLUSIVE")  # another writer holds the file
    try:
        response = await get(f"{base_url}/readyz")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert response.code == 503
    assert json.loads(response.body)["database"] == "unavailable"
