"""The spec's WebSocket API: auth, welcome, frames, bad input, conversations."""

import re

import jwt
import pytest

from tornado_app.frames import WELCOME

from .helpers import connect_ws

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}$")


@pytest.mark.gen_test
async def test_welcome_frame_is_exactly_the_spec(connect):
    client = await connect(welcome=False)
    frame = await client.receive()
    assert set(frame) == {"type", "message", "timestamp"}
    assert frame["type"] == "system"
    assert frame["message"] == WELCOME.format(username="alice")
    assert frame["message"] == "Welcome to AI Chat, alice! How can I assist you today?"
    assert TIMESTAMP.match(frame["timestamp"])


@pytest.mark.gen_test
async def test_message_gets_ai_response(connect, fake_agent):
    client = await connect()
    await client.send({"content": "Hello, AI!"})
    frame = await client.receive()
    assert set(frame) == {"type", "message", "timestamp"}
    assert frame["type"] == "ai_response"
    assert frame["message"] == "fake reply to: Hello, AI!"
    assert TIMESTAMP.match(frame["timestamp"])


@pytest.mark.gen_test
async def test_token_from_cookie_with_and_without_bearer(ws_url, make_user, token_for):
    await make_user("alice")
    for cookie in (f"access_token={token_for()}", f'access_token="Bearer {token_for()}"'):
        client = await connect_ws(ws_url(), cookie=cookie)
        frame = await client.receive()
        assert frame["type"] == "system"
        client.close()


def _forge(claims, key, algorithm="HS256", headers=None):
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def _claims(**overrides):
    import time
    import uuid

    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _alg_none(claims):
    import base64
    import json

    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


BAD_TOKENS = {
    "garbage": lambda secret: "not-a-jwt",
    "expired": lambda secret: _forge(_claims(exp=1_000_000, iat=900_000), secret),
    "tampered": lambda secret: _forge(_claims(), secret)[:-4] + "AAAA",
    "alg_none": lambda secret: _alg_none(_claims()),
    "wrong_key": lambda secret: _forge(_claims(), "another-secret-" + "y" * 40),
    "unknown_user": lambda secret: _forge(_claims(sub="mallory"), secret),
    "no_jti": lambda secret: _forge(_claims(jti=None), secret),
    "no_exp": lambda secret: _forge(_claims(exp=None), secret),
    "hs512": lambda secret: _forge(_claims(), secret, algorithm="HS512"),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_token_is_closed_with_1008(kind, ws_url, make_user, settings):
    await make_user("alice")
    token = BAD_TOKENS[kind](settings.jwt_secret)
    client = await connect_ws(ws_url(token=token))  # the handshake succeeds...
    assert await client.wait_closed() == 1008  # ...then the server closes with 1008
    assert token not in (client.close_reason or "")


@pytest.mark.gen_test
async def test_missing_token_is_closed_with_1008(ws_url, make_user):
    client = await connect_ws(ws_url())
    assert await client.wait_closed() == 1008
    assert client.close_reason == "Authentication failed"


@pytest.mark.gen_test
async def test_disabled_user_is_closed_with_1008(ws_url, make_user, token_for):
    await make_user("bob", disabled=True)
    client = await connect_ws(ws_url(token=token_for("bob")))
    assert await client.wait_closed() == 1008


@pytest.mark.gen_test
async def test_invalid_client_id_is_closed_with_1008(connect):
    client = await connect("x" * 129, welcome=False)
    assert await client.wait_closed() == 1008
    assert client.close_reason == "Invalid client_id"


BAD_FRAMES = [
    ("not json", "expected a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    ('"content"', "expected a JSON object"),
    ("{}", '"content" field is required'),
    ('{"message": "hi"}', '"content" field is required'),
    ('{"content": ""}', "non-empty string"),
    ('{"content": "   "}', "non-empty string"),
    ('{"content": 42}', "non-empty string"),
    ('{"content": null}', "non-empty string"),
    ('{"content": ["a"]}', "non-empty string"),
    ('{"content": "hi", "stream": "yes"}', '"stream" must be true or false'),
    ('{"action": "explode"}', 'the only action is "cancel"'),
    ("[" * 60_000, "expected a JSON object"),  # deep nesting, under the size limit
    (b"\x00\x01binary", "Binary frames are not supported"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("raw,expected", BAD_FRAMES, ids=[str(i) for i in range(len(BAD_FRAMES))])
async def test_bad_frame_gets_error_and_socket_stays_open(raw, expected, connect, fake_agent):
    client = await connect()
    await client.send(raw)
    frame = await client.receive()
    assert frame["type"] == "error"
    assert expected in frame["message"]
    assert TIMESTAMP.match(frame["timestamp"])
    await client.send({"content": "still there?"})
    assert (await client.receive())["type"] == "ai_response"
    assert fake_agent.history[-1].messages[-1]["content"] == "still there?"
    assert len(fake_agent.history) == 1  # the bad frame never reached the agent


@pytest.mark.gen_test
async def test_content_over_the_configured_length(connect, settings):
    limit = settings.chat.max_content_chars
    client = await connect()
    await client.send({"content": "a" * (limit + 1)})
    frame = await client.receive()
    assert frame["type"] == "error"
    assert f"limited to {limit} characters" in frame["message"]
    await client.send({"content": "a" * limit})
    assert (await client.receive())["type"] == "ai_response"


@pytest.mark.gen_test
async def test_frame_over_max_message_bytes_closes_with_1009(connect, settings):
    client = await connect()
    await client.send("x" * (settings.server.max_message_bytes + 1))
    assert await client.wait_closed() == 1009


@pytest.mark.gen_test
async def test_unknown_fields_are_ignored(connect):
    client = await connect()
    await client.send({"content": "hi", "extra": {"nested": True}})
    assert (await client.receive())["type"] == "ai_response"


@pytest.mark.gen_test
async def test_second_message_while_reply_in_flight_waits_its_turn(connect, fake_agent):
    import asyncio

    gate = asyncio.Event()
    fake_agent.enqueue("first", gate=gate)
    fake_agent.enqueue("second")
    client = await connect()
    await client.send({"content": "one"})
    await client.send({"content": "two"})
    await asyncio.sleep(0.2)
    assert len(fake_agent.history) == 1  # the second waits for the first
    gate.set()
    assert (await client.receive())["message"] == "first"
    assert (await client.receive())["message"] == "second"
    # The second request saw the first exchange as history.
    contents = [m["content"] for m in fake_agent.history[1].messages]
    assert contents[-3:] == ["one", "first", "two"]


@pytest.mark.gen_test
async def test_too_many_pending_messages_get_an_error(connect, fake_agent, settings):
    import asyncio

    gate = asyncio.Event()
    for _ in range(settings.chat.max_pending + 1):
        fake_agent.enqueue("ok", gate=gate)
    client = await connect()
    for i in range(settings.chat.max_pending):
        await client.send({"content": f"m{i}"})
    await asyncio.sleep(0.1)
    await client.send({"content": "one too many"})
    frame = await client.receive()
    assert frame["type"] == "error"
    assert "waiting" in frame["message"]
    gate.set()
    replies = [await client.receive() for _ in range(settings.chat.max_pending)]
    assert [f["type"] for f in replies] == ["ai_response"] * settings.chat.max_pending


@pytest.mark.gen_test
async def test_reconnect_with_same_client_id_continues_the_conversation(connect, fake_agent, store):
    first = await connect("conv-a")
    await first.send({"content": "my name is Ada"})
    await first.receive()
    first.close()
    second = await connect("conv-a")
    await second.send({"content": "what is my name?"})
    await second.receive()
    contents = [m["content"] for m in fake_agent.history[-1].messages]
    assert "my name is Ada" in contents
    other = await connect("conv-b")
    await other.send({"content": "fresh start"})
    await other.receive()
    contents = [m["content"] for m in fake_agent.history[-1].messages]
    assert "my name is Ada" not in contents


@pytest.mark.gen_test
async def test_same_client_id_of_another_user_is_another_conversation(connect, fake_agent):
    alice = await connect("shared-id", user="alice")
    await alice.send({"content": "alice's secret"})
    await alice.receive()
    bob = await connect("shared-id", user="bob")
    await bob.send({"content": "hello"})
    await bob.receive()
    contents = [m["content"] for m in fake_agent.history[-1].messages]
    assert "alice's secret" not in contents
