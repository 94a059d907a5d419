"""The host's tool loop (tornado_app/tool_loop.py) through a real service, on
SQLite and PostgreSQL: validation, timeouts, raising tools, several calls in
one turn, max steps, cancel, fallbacks, tokens, the transcript and the
history, and the v2 frames (v1 clients see nothing new).

The agent is the scripted FakeAgent (tests/helpers.py), which yields
ToolCall requests among its pieces; the tools are real plugins offered
through the plugin manager.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tornado_app import tool_loop
from tornado_app.tools import Tool, ToolCall, ToolError

from .helpers import KeyArguments, offering, saved_messages, saved_tool_steps

V2 = ["ai-chat.v2"]
SPEC_FIELDS = {"type", "message", "timestamp"}


class Lookup(Tool):
    description = "Look a key up."
    Arguments = KeyArguments

    def __init__(self):
        self.contexts = []

    async def call(self, arguments, context):
        self.contexts.append(context)
        return {"value": arguments.key.upper()}


class Meet(Tool):
    """Returns only once ``expected`` calls are running at the same time."""

    description = "Wait for the others."
    Arguments = KeyArguments

    def __init__(self, expected=2):
        self.expected = expected
        self.running = 0
        self.all_here = asyncio.Event()

    async def call(self, arguments, context):
        self.running += 1
        if self.running >= self.expected:
            self.all_here.set()
        await self.all_here.wait()
        return f"met {arguments.key}"


class Slow(Tool):
    """Never answers on its own; says when it started and whether it was cancelled."""

    description = "Take for ever."
    Arguments = KeyArguments

    def __init__(self):
        self.started = asyncio.Event()
        self.cancelled = False

    async def call(self, arguments, context):
        self.started.set()
        self.deadline = context.deadline
        self.started_at = asyncio.get_running_loop().time()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Broken(Tool):
    description = "Fail."
    Arguments = KeyArguments

    def validate(self, arguments):
        if arguments.get("key") == "bug":
            raise TypeError("SECRET-INTERNAL-DETAIL")
        return super().validate(arguments)

    async def call(self, arguments, context):
        if arguments.key == "safe":
            raise ToolError("no such record")
        raise RuntimeError("SECRET-INTERNAL-DETAIL")


@pytest.fixture
def tools():
    with offering({"lookup": Lookup(), "meet": Meet(), "slow": Slow(),
                   "broken": Broken()}) as tools:
        yield tools


@pytest.fixture
def settings(settings, tools, fake_agent):
    fake_agent.supports_tools = True
    settings.rate_limit.messages = 1000
    settings.agent.tools = list(tools)
    settings.tools.timeout_seconds = 0.5
    return settings


def call(name, arguments, call_id="call-1"):
    return ToolCall(call_id, name, arguments)


def model_messages(request) -> list[dict]:
    """What the model was given after the prompt's first two messages."""
    return request.messages[2:]


async def exchange(client, content="hi", stream=True) -> list[dict]:
    await client.send({"content": content, "stream": stream})
    frames = []
    while True:
        frame = await client.receive()
        frames.append(frame)
        if frame["type"] in ("ai_response", "error") or (
                frame["type"] == "system" and "cancelled" in frame["message"]):
            return frames


@pytest.mark.gen_test(timeout=30)
async def test_a_call_and_its_result_reach_the_model_the_client_and_the_transcript(
        connect, fake_agent, tools, store):
    fake_agent.enqueue("Let me look. ", call("lookup", {"key": "abc"}), usage=(10, 4))
    fake_agent.enqueue("The value is ABC.", usage=(30, 5))
    client = await connect("tools-1", subprotocols=V2)
    frames = await exchange(client)
    reply_id = frames[0]["reply_id"]
    assert [f["type"] for f in frames] == [
        "ack", "ai_response_chunk", "tool_call", "tool_result", "ai_response_chunk",
        "ai_response"]
    assert frames[2] == {"type": "tool_call", "name": "lookup", "arguments": {"key": "abc"},
                         "call_id": "call-1", "reply_id": reply_id}
    assert frames[3] == {"type": "tool_result", "name": "lookup", "call_id": "call-1",
                         "ok": True, "reply_id": reply_id}
    assert frames[-1]["message"] == "Let me look. The value is ABC."

    first, second = fake_agent.history
    assert [t["name"] for t in first.tools] == ["lookup", "meet", "slow", "broken"]
    assert first.tools[0]["parameters"]["properties"]["key"]["maxLength"] == 10
    assert model_messages(second) == [
        {"role": "assistant", "content": "Let me look. ", "tool_calls": [
            {"id": "call-1", "type": "function",
             "function": {"name": "lookup", "arguments": '{"key": "abc"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": '{"value": "ABC"}'},
    ]
    context = tools["lookup"].contexts[0]
    assert (context.username, context.conversation) == ("alice", "tools-1")
    # The memory feature's: this user's memories and messages only.
    assert context.memories.user_id == context.user_id == context.messages.user_id

    [step] = await saved_tool_steps(store)
    rows = await saved_messages(store, step.conversation_id)
    assert step.message_id == rows[-1].id and rows[-1].public_id == reply_id
    assert (step.tool, step.status, step.call_id, step.turn, step.agent) == (
        "lookup", "ok", "call-1", 0, "fake")
    assert json.loads(step.arguments) == {"key": "abc"}
    assert step.result == '{"value": "ABC"}' and step.latency_ms >= 0
    # Tokens: the sum over both model calls, as the agent reported them.
    assert (rows[-1].tokens_in, rows[-1].tokens_out) == (40, 9)


@pytest.mark.gen_test(timeout=30)
async def test_v1_clients_see_no_tool_frames(connect, fake_agent):
    fake_agent.enqueue(call("lookup", {"key": "abc"}))
    fake_agent.enqueue("Done ", "here.")
    client = await connect("tools-v1")
    frames = await exchange(client)
    assert [f["type"] for f in frames] == [
        "ai_response_chunk", "ai_response_chunk", "ai_response"]
    for frame in frames:
        assert set(frame) == SPEC_FIELDS


@pytest.mark.gen_test(timeout=30)
async def test_v2_without_stream_gets_no_tool_frames(connect, fake_agent):
    fake_agent.enqueue(call("lookup", {"key": "abc"}))
    fake_agent.enqueue("Done.")
    client = await connect("tools-nostream", subprotocols=V2)
    frames = await exchange(client, stream=False)
    assert [f["type"] for f in frames] == ["ack", "ai_response"]


@pytest.mark.gen_test(timeout=30)
async def test_invalid_arguments_and_unknown_tools_are_error_results(
        connect, fake_agent, store):
    fake_agent.enqueue(call("lookup", {"key": ""}, "a"), call("lookup", {"nope": 1}, "b"),
                       call("lookup", "{not json", "c"), call("lookup", "[1]", "d"),
                       call("missing", {}, "e"))
    fake_agent.enqueue("Sorry.")
    client = await connect("tools-bad", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1] == {**frames[-1], "type": "ai_response", "message": "Sorry."}
    results = [f for f in frames if f["type"] == "tool_result"]
    assert [r["ok"] for r in results] == [False] * 5
    calls = {f["call_id"]: f["arguments"] for f in frames if f["type"] == "tool_call"}
    assert calls == {"a": {"key": ""}, "b": {"nope": 1}, "c": {}, "d": {}, "e": {}}
    told = {m["tool_call_id"]: m["content"] for m in model_messages(fake_agent.history[1])
            if m["role"] == "tool"}
    assert told["a"].startswith("error: invalid arguments: key: String should have at least")
    assert "key: Field required" in told["b"] and "nope: Extra inputs" in told["b"]
    assert told["c"] == told["d"] == tool_loop.NOT_AN_OBJECT
    assert told["e"] == ("error: there is no tool named missing; "
                         "use one of: lookup, meet, slow, broken")
    # The raw text the model wrote goes back to it as it was.
    assistant = model_messages(fake_agent.history[1])[0]
    assert assistant["tool_calls"][2]["function"]["arguments"] == "{not json"
    assert [s.status for s in await saved_tool_steps(store)] == ["error"] * 5


@pytest.mark.gen_test(timeout=30)
async def test_the_calls_of_one_turn_run_concurrently(connect, fake_agent, store):
    # Each "meet" call returns only once both run at once: run one after the
    # other, the first would time out.
    fake_agent.enqueue(call("meet", {"key": "x"}, "a"), call("meet", {"key": "y"}, "b"))
    fake_agent.enqueue("Both met.")
    client = await connect("tools-many", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1]["message"] == "Both met."
    steps = await saved_tool_steps(store)
    assert [(s.call_id, s.status, s.result) for s in steps] == [
        ("a", "ok", "met x"), ("b", "ok", "met y")]
    assert [m.get("tool_call_id") for m in model_messages(fake_agent.history[1])] == [
        None, "a", "b"]


@pytest.mark.gen_test(timeout=30)
async def test_a_tool_that_times_out_or_raises_gives_the_model_a_fixed_error(
        connect, fake_agent, store, caplog):
    fake_agent.enqueue(call("slow", {"key": "x"}, "a"), call("broken", {"key": "x"}, "b"),
                       call("broken", {"key": "safe"}, "c"), call("broken", {"key": "bug"}, "d"))
    fake_agent.enqueue("I could not find out.")
    client = await connect("tools-fail", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1]["type"] == "ai_response"
    assert frames[-1]["message"] == "I could not find out."
    told = {m["tool_call_id"]: m["content"] for m in model_messages(fake_agent.history[1])
            if m["role"] == "tool"}
    assert told == {"a": tool_loop.TIMED_OUT, "b": tool_loop.FAILED,
                    "c": "error: no such record", "d": tool_loop.FAILED}
    steps = await saved_tool_steps(store)
    assert [s.status for s in steps] == ["timeout", "error", "error", "error"]
    assert steps[0].latency_ms >= 500  # tools.timeout_seconds
    assert "SECRET-INTERNAL-DETAIL" not in caplog.text + json.dumps(frames)
    assert "tool broken raised RuntimeError" in caplog.text
    assert "tool broken: validate raised TypeError" in caplog.text


@pytest.mark.gen_test(timeout=30)
async def test_after_max_tool_steps_the_model_answers_without_tools(
        connect, fake_agent, settings, store):
    settings.agent.max_tool_steps = 2
    for index in range(3):
        fake_agent.enqueue(call("lookup", {"key": f"k{index}"}, f"c{index}"))
    client = await connect("tools-max", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1]["type"] == "ai_response" and frames[-1]["message"] == ""
    assert [len(r.tools) > 0 for r in fake_agent.history] == [True, True, False]
    # The third turn's call (made without tools) is not run.
    assert [s.call_id for s in await saved_tool_steps(store)] == ["c0", "c1"]
    assert [s.turn for s in await saved_tool_steps(store)] == [0, 1]


@pytest.mark.gen_test(timeout=30)
async def test_cancel_in_the_middle_of_a_tool_call(connect, fake_agent, settings, tools, store):
    settings.tools.timeout_seconds = 30
    fake_agent.enqueue("Checking. ", call("lookup", {"key": "a"}, "a"))
    fake_agent.enqueue(call("slow", {"key": "b"}, "b"))
    client = await connect("tools-cancel", subprotocols=V2)
    await client.send({"content": "hi", "stream": True})
    await asyncio.wait_for(tools["slow"].started.wait(), 10)
    await client.send({"action": "cancel"})
    frames = await client.receive_until("system")
    assert frames[-1]["message"] == "The reply was cancelled."
    assert tools["slow"].cancelled
    [step] = await saved_tool_steps(store)  # the finished call only
    assert step.call_id == "a"
    rows = await saved_messages(store, step.conversation_id)
    assert (rows[-1].status, rows[-1].content) == ("cancelled", "Checking. ")


@pytest.mark.gen_test(timeout=30)
async def test_the_reply_deadline_covers_the_tool_calls(connect, fake_agent, settings, tools):
    settings.tools.timeout_seconds = 30
    settings.agent.timeout_seconds = 0.5
    fake_agent.enqueue(call("slow", {"key": "b"}))
    client = await connect("tools-deadline", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1]["type"] == "error"
    assert "did not answer in time" in frames[-1]["message"]
    # The tool was told the reply's deadline, not its own 30 s.
    assert tools["slow"].deadline - tools["slow"].started_at <= 0.5


@pytest.fixture
def with_fallback(settings, second_agent):
    settings.agent.fallbacks = ["fake2"]
    return second_agent


@pytest.mark.gen_test(timeout=30)
async def test_a_fallback_takes_over_before_the_first_tool_call(
        with_fallback, connect, fake_agent):
    from tornado_app.agents import AgentError

    fake_agent.enqueue(error=AgentError("upstream", "down"))
    client = await connect("tools-fallback", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1]["message"] == "fake reply to: hi"
    # fake2 does not support tools: it is offered none.
    assert with_fallback.history[0].tools == []


@pytest.mark.gen_test(timeout=30)
async def test_no_fallback_after_a_tool_call(with_fallback, connect, fake_agent):
    from tornado_app.agents import AgentError

    fake_agent.enqueue(call("lookup", {"key": "a"}))
    fake_agent.enqueue(error=AgentError("upstream", "down"))
    client = await connect("tools-nofallback", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1]["type"] == "error"
    assert with_fallback.history == []


@pytest.mark.gen_test(timeout=30)
async def test_later_prompts_hold_the_tool_steps_from_the_transcript(
        connect, fake_agent, settings):
    fake_agent.enqueue(call("lookup", {"key": "abc"}, "c1"))
    fake_agent.enqueue("It is ABC.")
    client = await connect("tools-history", subprotocols=V2)
    await exchange(client, "what is abc?")
    await exchange(client, "and again?")
    expected = [
        {"role": "user", "content": "what is abc?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "lookup", "arguments": '{"key": "abc"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"value": "ABC"}'},
        {"role": "assistant", "content": "It is ABC."},
        {"role": "user", "content": "and again?"},
    ]
    assert fake_agent.history[2].messages[1:] == expected
    # A new socket reads the same from the database.
    other = await connect("tools-history", subprotocols=V2)
    await exchange(other, "third?")
    assert fake_agent.history[3].messages[1:] == expected + [
        {"role": "assistant", "content": "fake reply to: and again?"},
        {"role": "user", "content": "third?"}]


@pytest.mark.gen_test(timeout=30)
async def test_trimming_drops_a_turn_with_its_tool_steps(connect, fake_agent, tools):
    # The steps count towards the turn's tokens, and go with it.
    fake_agent.context_tokens, fake_agent.reply_tokens = 300, 10
    fake_agent.enqueue(call("lookup", {"key": "a" * 10}, "c1"))
    fake_agent.enqueue("ok")
    client = await connect("tools-trim", subprotocols=V2)
    await exchange(client, "first")
    await exchange(client, "x " * 400)  # almost the whole context
    # Without its steps' tokens the earlier exchange would fit (about 10 tokens).
    assert [m["role"] for m in fake_agent.history[2].messages] == ["system", "user"]


@pytest.mark.gen_test(timeout=30)
async def test_an_agent_without_tool_support_is_offered_none(connect, fake_agent):
    fake_agent.supports_tools = False
    client = await connect("tools-none", subprotocols=V2)
    frames = await exchange(client)
    assert frames[-1]["message"] == "fake reply to: hi"
    assert fake_agent.history[0].tools == []
