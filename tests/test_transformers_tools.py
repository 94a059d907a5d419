"""The ``transformers`` agent with tools: a chat template that takes them gets
them through apply_chat_template(tools=...), and ``<tool_call>{json}</tool_call>``
in the model's text becomes ToolCall requests. Uses the tiny test model
(tests/tiny_model.py) with a tools-aware ChatML template."""

from __future__ import annotations

import asyncio

import pytest

from plugins.tool_calls import ToolCallParser, template_takes_tools, to_template_messages
from plugins.transformers_agent import TransformersAgent, TransformersOptions
from tornado_app.agents import AgentRequest
from tornado_app.config import Settings
from tornado_app.tools import ToolCall

from .tiny_model import CHAT_TEMPLATE, TOOLS_TEMPLATE, build_tokenizer, save_tiny_model

CLOCK = {"name": "clock", "description": "The time.",
         "parameters": {"type": "object", "properties": {}}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What day is it?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "clock", "arguments": '{"zone": "UTC"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"weekday": "Saturday"}'},
]


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-tools") / "tiny-tools")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def feed_all(pieces):
    parser = ToolCallParser(prefix="call_")
    out = [item for piece in pieces for item in parser.feed(piece)]
    return out + parser.close()


def test_the_parser_finds_calls_split_anywhere():
    text = ('Let me see. <tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>\n'
            '<tool_call>{"name": "lookup", "arguments": {"key": "a<b"}}</tool_call>Done')
    for size in (1, 3, 7, len(text)):
        out = feed_all([text[i:i + size] for i in range(0, len(text), size)])
        texts = "".join(item for item in out if isinstance(item, str))
        calls = [item for item in out if isinstance(item, ToolCall)]
        assert texts == "Let me see. Done", size
        assert calls == [ToolCall("call_1", "clock", {}),
                         ToolCall("call_2", "lookup", {"key": "a<b"})], size


def test_the_parser_keeps_text_that_only_looks_like_a_tag():
    assert "".join(feed_all(["a <tool", "s> b <"])) == "a <tools> b <"
    # A malformed call reaches the host as a call of no tool (an error result).
    assert feed_all(["<tool_call>not json</tool_call>"]) == [ToolCall("call_1", "", "not json")]
    unclosed = '{"name": "clock"'
    assert feed_all(["<tool_call>" + unclosed]) == [ToolCall("call_1", "", unclosed)]


def test_call_ids_differ_between_model_turns():
    first, second = ToolCallParser(), ToolCallParser()
    call = '<tool_call>{"name": "clock", "arguments": {}}</tool_call>'
    assert first.feed(call)[0].call_id != second.feed(call)[0].call_id


def test_template_detection():
    tokenizer = build_tokenizer()
    assert tokenizer.chat_template == CHAT_TEMPLATE and not template_takes_tools(tokenizer)
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert template_takes_tools(tokenizer)


def test_host_messages_become_template_messages():
    converted = to_template_messages(HISTORY)
    assert converted[2]["content"] == ""
    assert converted[2]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
    assert HISTORY[2]["content"] is None  # the host's copy is untouched


def test_a_template_with_tools_gets_them_and_the_steps(tools_model_dir, tmp_path):
    async def body():
        agent = TransformersAgent(TransformersOptions(model_path=str(tools_model_dir),
                                                      temperature=0, max_new_tokens=8),
                                  Settings(data_dir=str(tmp_path)))
        assert agent.supports_tools is False  # not known before the model is loaded
        await agent.start()
        try:
            assert agent.supports_tools is True
            prompt = agent.tokenizer.decode(agent.encode_prompt(HISTORY, [CLOCK]))
            assert '"name": "clock"' in prompt and "<tools>" in prompt
            assert '<tool_call>\n{"name": "clock", "arguments": {"zone": "UTC"}}' in prompt
            assert '<tool_response>\n{"weekday": "Saturday"}' in prompt
            request = AgentRequest(list(HISTORY), "alice", tools=[CLOCK])
            pieces = [piece async for piece in agent.stream(request)]
            assert request.usage.tokens_in == len(agent.encode_prompt(HISTORY, [CLOCK]))
            assert request.usage.tokens_out == 8 and "".join(
                p for p in pieces if isinstance(p, str))
        finally:
            await agent.close()

    asyncio.run(body())


def test_the_default_template_is_used_without_tools(tmp_path, tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-plain") / "tiny")

    async def body():
        agent = TransformersAgent(TransformersOptions(model_path=str(folder), temperature=0,
                                                      max_new_tokens=4),
                                  Settings(data_dir=str(tmp_path)))
        await agent.start()
        try:
            assert agent.supports_tools is False
            request = AgentRequest([{"role": "user", "content": "hi"}], "alice", tools=[CLOCK])
            # Offered tools anyway (the host would not): the prompt has none of them.
            pieces = [piece async for piece in agent.stream(request)]
            assert all(isinstance(p, str) for p in pieces)
            assert request.usage.tokens_in == len(agent.encode_prompt(request.messages))
        finally:
            await agent.close()

    asyncio.run(body())
