"""The ``openai`` agent plugin against a real Chat Completions server on loopback.

The real SDK talks over real sockets to tests/openai_upstream.FakeOpenAI;
nothing is patched. Each test runs its own event loop (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import openai
import pytest

import plugins.openai_agent as openai_agent
from plugins.openai_agent import OpenAIAgent, OpenAIOptions, create_openai_agent
from tornado_app.agents import (
    AgentError,
    AgentRequest,
    available_agents,
    create_agent,
    get_plugin_manager,
    validate_agent_settings,
)
from tornado_app.config import ConfigError, Settings, load_settings

from .openai_upstream import FakeOpenAI

KEY = "sk-test-0123456789abcdefSECRET"
BODY_MARKER = "UPSTREAM-BODY-MUST-NOT-LEAK"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant talking with alice."},
    {"role": "user", "content": "Say hello"},
]
# The fake asks the SDK to wait 10 ms before a retry (instead of 0.5 s and up).
FAST_RETRY = {"retry-after-ms": "10"}


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def no_env_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def debug_logs(caplog):
    """Capture every logger at DEBUG (the SDK's and the transport's included)."""
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx2", "httpcore2", "httpx", "httpcore", "plugins"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def make_agent(fake: FakeOpenAI, **overrides) -> OpenAIAgent:
    values = {"base_url": fake.base_url, "api_key": KEY, "max_retries": 0, "timeout_seconds": 5}
    return create_openai_agent(OpenAIOptions(**{**values, **overrides}), None)


def ask(agent: OpenAIAgent, request: AgentRequest | None = None) -> list[str]:
    """The pieces of one reply; the agent is closed afterwards."""
    request = request or AgentRequest(list(MESSAGES), "alice")

    async def run():
        try:
            return [piece async for piece in agent.stream(request)]
        finally:
            await agent.close()

    return asyncio.run(run())


def failure(agent: OpenAIAgent) -> AgentError:
    with pytest.raises(AgentError) as info:
        ask(agent)
    return info.value


def assert_no_leak(error: AgentError, caplog) -> None:
    texts = [str(error), repr(error.args)] + [r.getMessage() for r in caplog.records]
    texts.append(caplog.text)
    for text in texts:
        assert KEY not in text
        assert BODY_MARKER not in text
    # No chained upstream exception for a traceback to print.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


# A streamed reply


def test_streamed_reply_fills_usage_and_sends_the_request(upstream, debug_logs):
    upstream.reply(["Hel", "lo", "!"], usage=(12, 3))
    request = AgentRequest(list(MESSAGES), "alice")
    agent = make_agent(upstream, model="test-model", max_tokens=64, temperature=0.25)

    assert ask(agent, request) == ["Hel", "lo", "!"]
    assert (request.usage.tokens_in, request.usage.tokens_out) == (12, 3)
    [sent] = upstream.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json["model"] == "test-model"
    assert sent.json["messages"] == MESSAGES
    assert sent.json["max_tokens"] == 64
    assert sent.json["temperature"] == 0.25
    assert sent.json["stream"] is True
    assert sent.json["stream_options"] == {"include_usage": True}
    assert KEY not in debug_logs.text


def test_agent_attributes_come_from_the_options(upstream):
    agent = make_agent(upstream, model="m", context_tokens=4096, max_tokens=300)
    assert (agent.model, agent.context_tokens, agent.reply_tokens) == ("m", 4096, 300)
    assert agent.ready
    asyncio.run(agent.close())
    assert agent.client.is_closed()


def test_reply_without_usage_leaves_counting_to_the_host(upstream):
    upstream.reply(["Hi"])
    request = AgentRequest(list(MESSAGES), "alice")
    assert ask(make_agent(upstream), request) == ["Hi"]
    assert (request.usage.tokens_in, request.usage.tokens_out) == (None, None)


def test_a_server_refusing_stream_options_is_asked_again_without(upstream, caplog):
    refusal = {"error": {"message": f"Unrecognized request argument supplied: stream_options {BODY_MARKER}"}}
    upstream.status(400, body=refusal)
    upstream.reply(["first"])
    upstream.reply(["second"])
    agent = make_agent(upstream)

    async def two_replies():
        try:
            first = [p async for p in agent.stream(AgentRequest(list(MESSAGES), "alice"))]
            second = [p async for p in agent.stream(AgentRequest(list(MESSAGES), "alice"))]
            return first, second
        finally:
            await agent.close()

    assert asyncio.run(two_replies()) == (["first"], ["second"])
    assert [("stream_options" in r.json) for r in upstream.requests] == [True, False, False]
    assert BODY_MARKER not in caplog.text


def test_another_400_is_an_upstream_error(upstream):
    upstream.status(400, body={"error": {"message": f"bad model {BODY_MARKER}"}})
    error = failure(make_agent(upstream))
    assert error.kind == "upstream" and "400" in str(error)
    assert len(upstream.requests) == 1


def test_the_fake_also_answers_without_streaming(upstream):
    # Not used by the agent, but the fake speaks the whole API.
    upstream.reply(["Hel", "lo"], usage=(5, 2))

    async def plain():
        async with openai.AsyncOpenAI(api_key=KEY, base_url=upstream.base_url) as client:
            return await client.chat.completions.create(model="m", messages=MESSAGES)

    completion = asyncio.run(plain())
    assert completion.choices[0].message.content == "Hello"
    assert completion.usage.prompt_tokens == 5


# Failures: the right kind, a fixed text, nothing leaked


@pytest.mark.parametrize(
    "script, kind",
    [
        (lambda fake: fake.status(429, body={"error": {"message": BODY_MARKER}}), "rate_limited"),
        (lambda fake: fake.status(500, body=f"<html>{BODY_MARKER}</html>"), "upstream"),
        (lambda fake: fake.status(503, body={"error": {"message": BODY_MARKER}}), "upstream"),
        (lambda fake: fake.status(401, body={"error": {"message": f"bad key {KEY} {BODY_MARKER}"}}), "upstream"),
        (lambda fake: fake.garbage("json"), "bad_reply"),
        (lambda fake: fake.garbage("no_choices"), "bad_reply"),
        (lambda fake: fake.garbage("not_sse"), "bad_reply"),
    ],
    ids=["429", "500", "503", "401", "invalid-json", "no-choices", "not-sse"],
)
def test_failures_map_to_safe_agent_errors(upstream, debug_logs, script, kind):
    script(upstream)
    error = failure(make_agent(upstream))
    assert error.kind == kind
    assert_no_leak(error, debug_logs)
    assert len(upstream.requests) == 1


def test_an_error_event_mid_stream_ends_the_reply(upstream, debug_logs):
    upstream.stream_error(["Hel"], message=BODY_MARKER)
    agent = make_agent(upstream)
    received: list[str] = []

    async def run():
        try:
            async for piece in agent.stream(AgentRequest(list(MESSAGES), "alice")):
                received.append(piece)
        finally:
            await agent.close()

    with pytest.raises(AgentError) as info:
        asyncio.run(run())
    assert received == ["Hel"]  # the host keeps the partial reply
    assert info.value.kind == "upstream"
    assert_no_leak(info.value, debug_logs)


def test_a_hung_server_times_out_within_the_timeout(upstream, debug_logs):
    upstream.hang(5)
    started = time.monotonic()
    error = failure(make_agent(upstream, timeout_seconds=0.3))
    elapsed = time.monotonic() - started
    assert error.kind == "timeout"
    assert 0.25 <= elapsed < 1.5
    assert_no_leak(error, debug_logs)
    assert len(upstream.requests) == 1


def test_a_server_stalling_mid_stream_times_out(upstream, debug_logs):
    upstream.reply(["Hel", "lo"], delay=2)  # headers at once, then nothing
    started = time.monotonic()
    error = failure(make_agent(upstream, timeout_seconds=0.3))
    assert error.kind == "timeout"
    assert time.monotonic() - started < 1.5
    assert_no_leak(error, debug_logs)


def test_connection_refused(debug_logs):
    with socket.socket() as sock:  # a port that was free a moment ago, now closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = OpenAIOptions(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    error = failure(create_openai_agent(options, None))
    assert error.kind == "connection"
    assert_no_leak(error, debug_logs)


@pytest.mark.parametrize("code, kind", [(500, "upstream"), (429, "rate_limited")])
def test_retries_are_bounded(upstream, debug_logs, code, kind):
    upstream.status(code, body={"error": {"message": BODY_MARKER}}, headers=FAST_RETRY, times=10)
    error = failure(make_agent(upstream, max_retries=1))
    assert error.kind == kind
    assert len(upstream.requests) == 2
    assert_no_leak(error, debug_logs)


def test_a_retry_can_succeed(upstream):
    upstream.status(502, headers=FAST_RETRY)
    upstream.reply(["ok"])
    assert ask(make_agent(upstream, max_retries=2)) == ["ok"]
    assert len(upstream.requests) == 2


# Cancel


def test_cancel_mid_stream_closes_the_upstream_connection(upstream):
    upstream.reply(["Hel"] + ["lo"] * 200, delay=0.02)
    agent = make_agent(upstream)
    received: list[str] = []

    async def cancel_after_first_piece():
        first = asyncio.Event()

        async def consume():
            async for piece in agent.stream(AgentRequest(list(MESSAGES), "alice")):
                received.append(piece)
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await agent.close()

    asyncio.run(cancel_after_first_piece())
    assert received and received[0] == "Hel"
    assert upstream.wait_for_disconnect(timeout=3)
    assert len(upstream.requests) == 1 and not upstream.requests[0].completed


def test_closing_the_reply_early_closes_the_upstream_connection(upstream):
    # What the host does when it is cancelled between two pieces (aclose()).
    upstream.reply(["Hel"] + ["lo"] * 200, delay=0.02)
    agent = make_agent(upstream)

    async def take_one_then_close():
        pieces = agent.stream(AgentRequest(list(MESSAGES), "alice"))
        first = await anext(pieces)
        await pieces.aclose()
        await agent.close()
        return first

    assert asyncio.run(take_one_then_close()) == "Hel"
    assert upstream.wait_for_disconnect(timeout=3)
    assert not upstream.requests[0].completed


# Keys and options


def test_missing_key_with_the_default_base_url_stops_start_up(no_env_key):
    with pytest.raises(ConfigError) as info:
        create_openai_agent(OpenAIOptions(), None)
    message = str(info.value)
    assert "\n" not in message
    assert "OPENAI_API_KEY" in message and "TORNADO_APP_AGENT__OPENAI__API_KEY" in message


def test_a_custom_base_url_needs_no_key(upstream, no_env_key):
    upstream.reply(["local"])
    agent = create_openai_agent(OpenAIOptions(base_url=upstream.base_url), None)
    assert ask(agent) == ["local"]
    assert upstream.requests[0].headers["authorization"] == "Bearer not-needed"


def test_the_key_comes_from_openai_api_key(upstream, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    upstream.reply(["hi"])
    assert ask(create_openai_agent(OpenAIOptions(base_url=upstream.base_url), None)) == ["hi"]
    assert upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_options_key_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    options = OpenAIOptions(api_key=KEY)
    assert openai_agent.resolve_api_key(options) == KEY
    assert openai_agent.resolve_api_key(OpenAIOptions(api_key="")) == "sk-from-the-environment"


def test_options_validation():
    assert OpenAIOptions(base_url="  ").base_url is None
    with pytest.raises(ValueError, match="http"):
        OpenAIOptions(base_url="ftp://example.com/v1")
    with pytest.raises(ValueError, match="max_tokens"):
        OpenAIOptions(max_tokens=4096, context_tokens=1024)
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIOptions(max_retries=50)


# Through the real plugin manager and settings


def _openai_spec():
    manager = get_plugin_manager()
    if not manager.is_registered(openai_agent):  # until DEFAULT_PLUGINS lists it
        manager.register(openai_agent, name="plugins.openai_agent")
    return available_agents(manager)


def test_registered_through_the_plugin_manager(upstream, no_env_key):
    specs = _openai_spec()
    assert specs["openai"].options is OpenAIOptions
    environ = {
        "TORNADO_APP_AGENT__BACKEND": "openai",
        "TORNADO_APP_AGENT__OPENAI__BASE_URL": upstream.base_url,
        "TORNADO_APP_AGENT__OPENAI__API_KEY": KEY,
        "TORNADO_APP_AGENT__OPENAI__MODEL": "served-model",
        "TORNADO_APP_AUTH__JWT_SECRET": "s" * 40,
    }
    settings = load_settings(None, environ)
    validate_agent_settings(settings, specs)
    agent = create_agent(settings, specs["openai"])
    assert (agent.name, agent.model) == ("openai", "served-model")
    upstream.reply(["via ", "pluggy"])
    assert ask(agent) == ["via ", "pluggy"]
    assert upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert upstream.requests[0].json["model"] == "served-model"


def test_plugin_manager_reports_config_errors(no_env_key):
    specs = _openai_spec()
    settings = Settings.model_validate({"agent": {"backend": "openai", "openai": {"modle": "x"}}})
    with pytest.raises(ConfigError, match=r"agent\.openai\.modle: unknown key"):
        validate_agent_settings(settings, specs)
    settings = Settings.model_validate({"agent": {"backend": "openai"}})
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        create_agent(settings, specs["openai"])
