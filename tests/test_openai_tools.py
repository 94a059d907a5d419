"""The ``openai`` plugin's native function calling, against a real loopback
Chat Completions server (tests/openai_upstream.py) that answers with tool
calls as OpenAI, vLLM and llama.cpp do: streamed ``delta.tool_calls``
fragments whose ``arguments`` arrive in pieces, or one whole message.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from plugins.openai_agent import OpenAIOptions, create_openai_agent
from tornado_app.agents import AgentError, AgentRequest
from tornado_app.tools import ToolCall

from .conftest import TEST_SECRET
from .helpers import saved_tool_steps
from .openai_upstream import FakeOpenAI, service_settings

TOOLS = [{"name": "lookup", "description": "Look a key up.",
          "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
CALLS = [("call_a", "lookup", '{"key": "first value"}'), ("call_b", "lookup", '{"key": "b"}')]


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        yield fake


def ask(fake: FakeOpenAI, tools=TOOLS, messages=MESSAGES, **options) -> list:
    values = {"base_url": fake.base_url, "api_key": "sk-test", "max_retries": 0,
              "timeout_seconds": 5, **options}
    agent = create_openai_agent(OpenAIOptions(**values), None)
    request = AgentRequest(list(messages), "alice", tools=list(tools))

    async def run():
        try:
            return [piece async for piece in agent.stream(request)], request.usage
        finally:
            await agent.close()

    return asyncio.run(run())


@pytest.mark.parametrize("stream", [True, False])
def test_several_tool_calls_in_one_turn(upstream, stream):
    upstream.tool_calls(CALLS, pieces=["Let me check."], usage=(20, 7))
    pieces, usage = ask(upstream, stream=stream)
    # Arguments arrive in 4-character pieces when streamed: joined whole.
    assert pieces == ["Let me check.", ToolCall(*CALLS[0]), ToolCall(*CALLS[1])]
    assert (usage.tokens_in, usage.tokens_out) == (20, 7)
    body = upstream.requests[0].json
    assert body["stream"] is stream
    assert body["tools"] == [{"type": "function", "function": TOOLS[0]}]


def test_no_tools_are_sent_when_the_host_offers_none(upstream):
    upstream.reply(["Hello"])
    pieces, _ = ask(upstream, tools=[])
    assert pieces == ["Hello"]
    assert "tools" not in upstream.requests[0].json


def test_tool_results_go_back_as_tool_messages_with_their_call_id(upstream):
    upstream.reply(["Done."])
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "lookup", "arguments": '{"key": "a"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"value": "A"}'},
    ]
    pieces, _ = ask(upstream, messages=history)
    assert pieces == ["Done."]
    assert upstream.requests[0].json["messages"] == history


def test_a_tool_call_without_a_name_is_a_bad_reply(upstream):
    upstream.tool_calls([("call_a", "", "{}")])
    with pytest.raises(AgentError) as info:
        ask(upstream)
    assert info.value.kind == "bad_reply"


def test_tools_false_in_the_options_turns_them_off(upstream):
    options = OpenAIOptions(base_url=upstream.base_url, api_key="sk-test", tools=False)
    assert create_openai_agent(options, None).supports_tools is False
    assert create_openai_agent(options.model_copy(update={"tools": True}),
                               None).supports_tools is True


# Through the service: the host runs the calls, the model reads the results


@pytest.fixture
def settings(tmp_path, db_url, upstream):
    return service_settings(upstream, tmp_path, db_url, TEST_SECRET, "[clock]")


@pytest.mark.gen_test(timeout=30)
async def test_the_clock_tool_through_the_openai_plugin(connect, upstream, store):
    upstream.tool_calls([("call_1", "clock", "{}")], usage=(50, 5))
    upstream.reply(["It is ", "Saturday."], usage=(80, 4))
    client = await connect("openai-tools", subprotocols=["ai-chat.v2"])
    await client.send({"content": "What day is it?", "stream": True})
    frames = await client.receive_until("ai_response")
    kinds = [f["type"] for f in frames]
    assert kinds == ["ack", "tool_call", "tool_result", "ai_response_chunk",
                     "ai_response_chunk", "ai_response"]
    assert frames[1]["name"] == "clock" and frames[2]["ok"] is True
    assert frames[-1]["message"] == "It is Saturday."
    first, second = (request.json for request in upstream.requests)
    assert [tool["function"]["name"] for tool in first["tools"]] == ["clock"]
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_1"
    result = second["messages"][-1]
    assert result["role"] == "tool" and result["tool_call_id"] == "call_1"
    assert set(json.loads(result["content"])) == {"utc", "weekday"}
    [step] = await saved_tool_steps(store)
    assert (step.tool, step.status, step.agent) == ("clock", "ok", "openai")


@pytest.mark.gen_test(timeout=30)
async def test_later_requests_carry_the_earlier_calls_from_the_transcript(connect, upstream):
    upstream.tool_calls([("call_9", "clock", "{}")], pieces=["Checking. "], usage=(5, 1))
    upstream.reply(["Saturday."], usage=(9, 1))
    upstream.reply(["Yes."], usage=(12, 1))
    client = await connect("openai-history")
    await client.send({"content": "What day is it?"})
    assert (await client.receive_type("ai_response"))["message"] == "Checking. Saturday."
    other = await connect("openai-history")  # a new socket: history from the database
    await other.send({"content": "Sure?"})
    assert (await other.receive_type("ai_response"))["message"] == "Yes."
    messages = upstream.requests[2].json["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant",
                                             "user"]
    assert messages[2]["tool_calls"] == [{"id": "call_9", "type": "function",
                                          "function": {"name": "clock", "arguments": "{}"}}]
    assert messages[3]["tool_call_id"] == "call_9" and "weekday" in messages[3]["content"]
    assert messages[4]["content"] == "Checking. Saturday."
