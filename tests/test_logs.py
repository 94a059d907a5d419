"""Secrets never reach the logs: tokens in URLs, JWTs and API keys anywhere."""

import io
import logging

import pytest

from tornado_app.config import LoggingSettings
from tornado_app.logs import setup_logging

from .helpers import connect_ws


@pytest.mark.gen_test
async def test_query_token_is_scrubbed_from_access_log(ws_url, make_user, token_for, caplog):
    await make_user("alice")
    token = token_for("alice")
    caplog.set_level(logging.DEBUG)
    client = await connect_ws(ws_url(token=token))
    await client.receive()
    bad = await connect_ws(ws_url(token="SECRET-NOT-A-JWT"))
    await bad.wait_closed()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "/ws/ai/ai-chat/client-1?token=[redacted]" in text
    assert token not in text
    assert "SECRET-NOT-A-JWT" not in text


@pytest.fixture
def log_stream():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_filter_redacts_jwts_keys_and_query_tokens(fmt, log_stream):
    setup_logging(LoggingSettings(level="DEBUG", format=fmt), stream=log_stream)
    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"
    log = logging.getLogger("some.library")
    log.debug("got %s", jwt_like)
    log.info("key sk-proj-abcdefghijklmnop in a message")
    log.warning("GET /x?token=plainsecret&other=1")
    try:
        raise ValueError(f"failed with {jwt_like}")
    except ValueError:
        log.exception("boom")
    output = log_stream.getvalue()
    for secret in (jwt_like, "sk-proj-abcdefghijklmnop", "plainsecret"):
        assert secret not in output
    assert output.count("[redacted]") >= 4
    assert "other=1" in output
