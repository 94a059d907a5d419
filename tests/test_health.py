"""Liveness and readiness."""

import json

import pytest
from tornado.httpclient import AsyncHTTPClient


@pytest.mark.gen_test
async def test_healthz(base_url):
    response = await AsyncHTTPClient().fetch(f"{base_url}/healthz")
    assert json.loads(response.body) == {"status": "ok"}


@pytest.mark.gen_test
async def test_readyz_waits_for_the_agent(base_url, fake_agent):
    fake_agent._ready.clear()
    response = await AsyncHTTPClient().fetch(f"{base_url}/readyz", raise_error=False)
    assert response.code == 503
    assert json.loads(response.body)["agent"] == "loading"
    fake_agent._ready.set()
    response = await AsyncHTTPClient().fetch(f"{base_url}/readyz")
    assert json.loads(response.body) == {"status": "ready", "database": "ok", "agent": "ok"}


@pytest.mark.gen_test
async def test_readyz_reports_an_unreachable_database(base_url, service):
    from sqlalchemy.ext.asyncio import create_async_engine

    # Point the store at a port where nothing listens, then put it back.
    good = service.store.engine
    service.store.engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        response = await AsyncHTTPClient().fetch(f"{base_url}/readyz", raise_error=False)
    finally:
        await service.store.engine.dispose()
        service.store.engine = good
    assert response.code == 503
    assert json.loads(response.body)["database"] == "unavailable"
