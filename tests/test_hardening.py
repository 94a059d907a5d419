"""Protections a security reviewer asks for, each with a test that fails without it:
origin checks, compression off, pings, slow readers, close codes, secrets in logs."""

import asyncio
import base64
import logging
import os
import struct

import pytest

from tornado_app.agents import AgentError

from .helpers import connect_ws, saved_messages


# Origin (cross-site WebSocket hijacking)


@pytest.mark.gen_test
async def test_a_cross_origin_browser_is_refused_with_cookie_or_query_token(
    ws_url, make_user, token_for
):
    await make_user("alice")
    token = token_for("alice")
    by_cookie = await connect_ws(ws_url(), cookie=f"access_token={token}",
                                 origin="https://evil.example")
    assert await by_cookie.wait_closed() == 1008
    assert by_cookie.close_reason == "Origin not allowed"
    by_query = await connect_ws(ws_url(token=token), origin="https://evil.example")
    assert await by_query.wait_closed() == 1008


@pytest.mark.gen_test
async def test_same_origin_and_scripts_without_origin_pass(service, ws_url, make_user, token_for):
    await make_user("alice")
    same = await connect_ws(ws_url(token=token_for()), origin=f"http://127.0.0.1:{service.port}")
    assert (await same.receive())["type"] == "system"
    script = await connect_ws(ws_url(token=token_for()))
    assert (await script.receive())["type"] == "system"


class TestAllowList:
    @pytest.fixture
    def settings(self, settings):
        settings.server.allowed_origins = ["https://app.example.org", "http://localhost:3000/"]
        return settings

    @pytest.mark.gen_test
    async def test_only_the_exact_scheme_host_and_port_pass(
        self, service, ws_url, make_user, token_for
    ):
        await make_user("alice")
        for origin, allowed in [
            ("https://app.example.org", True),
            ("HTTPS://APP.EXAMPLE.ORG", True),
            ("http://localhost:3000", True),
            ("http://app.example.org", False),  # scheme
            ("https://app.example.org:8443", False),  # port
            ("https://evil.app.example.org", False),  # host
            (f"http://127.0.0.1:{service.port}", False),  # the list replaces same-origin
        ]:
            client = await connect_ws(ws_url(token=token_for()), origin=origin)
            frame = await client.receive()
            assert (frame is not None) == allowed, origin


# Transport


@pytest.mark.gen_test
async def test_compression_is_never_negotiated(ws_url, make_user, token_for):
    from tornado.websocket import websocket_connect

    await make_user("alice")
    conn = await websocket_connect(ws_url(token=token_for()), compression_options={})
    await conn.read_message()
    assert "Sec-WebSocket-Extensions" not in conn.headers
    conn.close()


async def raw_handshake(port: int, path: str):
    """A bare WebSocket client (asyncio streams) that answers nothing and reads
    only when told: no pongs, and no reading at all if the test wants that."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode())
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert response.startswith(b"HTTP/1.1 101"), response
    return reader, writer


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class TestPings:
    @pytest.fixture
    def settings(self, settings):
        settings.server.ping_interval_seconds = 0.2
        settings.server.ping_timeout_seconds = 0.2
        return settings

    @pytest.mark.gen_test(timeout=20)
    async def test_a_client_that_stops_answering_pings_is_dropped(
        self, service, make_user, token_for
    ):
        await make_user("alice")
        reader, writer = await raw_handshake(service.port, f"/ws/ai/ai-chat/c1?token={token_for()}")
        received = b""
        while True:  # pings arrive, no pong goes back; then the server closes
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            received += chunk
        writer.close()
        assert b"\x89" in received  # a ping frame was sent
        assert b"\x88" in received  # then a close frame


class TestSlowReader:
    @pytest.fixture
    def settings(self, settings):
        settings.server.write_timeout_seconds = 0.5
        return settings

    @pytest.mark.gen_test(timeout=30)
    async def test_a_client_that_does_not_read_is_closed_and_generation_stops(
        self, service, make_user, token_for, fake_agent, store
    ):
        await make_user("alice")
        pieces = ["x" * 60_000] * 2000  # 120 MB if nothing stopped it
        fake_agent.enqueue(*pieces)
        _reader, writer = await raw_handshake(service.port, f"/ws/ai/ai-chat/c1?token={token_for()}")
        writer.write(masked_text_frame('{"content": "flood me", "stream": true}'))
        conversation = await store.open_conversation(1, "c1")
        for _ in range(300):
            rows = await saved_messages(store, conversation)
            if len(rows) == 2:
                break
            await asyncio.sleep(0.05)
        writer.close()
        assert rows[-1].status == "cancelled"
        assert len(rows[-1].content) < len(pieces) * 60_000 / 4  # stopped early


# Close codes: every trigger in docs/protocol.md's list


async def close_normally(ctx):
    client = await ctx.connect()
    client.conn.close(1000)
    return client


async def shut_down(ctx):
    client = await ctx.connect()
    await ctx.service.stop()
    return client


async def bad_token(ctx):
    return await connect_ws(ctx.ws_url(token="not-a-token"))


async def rate_abuse(ctx):
    ctx.settings.rate_limit.messages = 1
    ctx.settings.rate_limit.max_rejections = 2
    client = await ctx.connect()
    for _ in range(3):
        await client.send({"content": "spam"})
    return client


async def too_big(ctx):
    client = await ctx.connect()
    await client.send("x" * (ctx.settings.server.max_message_bytes + 1))
    return client


async def server_bug(ctx):
    async def broken(*_args, **_kwargs):
        raise RuntimeError("a bug whose text must not leak: sk-secret")

    ctx.service.store.admit = broken
    client = await ctx.connect()
    await client.send({"content": "trigger"})
    return client


async def too_many(ctx):
    ctx.settings.limits.connections_per_user = 1
    await ctx.connect("first")
    return await ctx.connect("second", welcome=False)


CLOSE_TRIGGERS = [
    (close_normally, 1000),
    (shut_down, 1001),
    (bad_token, 1008),
    (rate_abuse, 1008),
    (too_big, 1009),
    (server_bug, 1011),
    (too_many, 1013),
]


class Context:
    def __init__(self, **fixtures):
        self.__dict__.update(fixtures)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("trigger,code", CLOSE_TRIGGERS, ids=[t.__name__ for t, _ in CLOSE_TRIGGERS])
async def test_close_codes(trigger, code, service, settings, connect, ws_url):
    ctx = Context(service=service, settings=settings, connect=connect, ws_url=ws_url)
    client = await trigger(ctx)
    assert await client.wait_closed(timeout=10) == code
    reason = client.close_reason or ""
    assert len(reason.encode()) < 123
    assert "sk-secret" not in reason and "Error" not in reason


# Secrets never logged


@pytest.mark.gen_test(timeout=30)
async def test_no_log_record_holds_a_token_or_an_api_key(
    service, settings, ws_url, make_user, token_for, caplog, fake_agent
):
    """DEBUG on every logger, a query token, an upstream failure that quotes the key."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    try:
        await make_user("alice")
        token = token_for("alice")
        key = "sk-live-" + "k" * 32
        fake_agent.enqueue(error=AgentError("upstream", "upstream refused"))
        fake_agent.enqueue(error=RuntimeError(f"HTTP 401 for key {key}: {token}"))
        client = await connect_ws(ws_url(token=token))
        await client.receive()
        for text in ("one", "two"):
            await client.send({"content": text})
            await client.receive()
        await connect_ws(ws_url(token=token + "tampered"))
    finally:
        root.setLevel(level)
    formatter = logging.Formatter("%(message)s")
    for record in caplog.records:
        line = formatter.format(record)  # the message, its arguments and any traceback
        assert token not in line, record.name
        assert key not in line, record.name
