"""The history API gives each reply's tool steps (name, arguments, ok and
status, turn, latency; never the result), on SQLite and PostgreSQL, through a
real service: GET /api/conversations/{client_id}/messages."""

from __future__ import annotations

import json

import pytest

from tornado_app.tools import Tool, ToolCall

from .helpers import KeyArguments, get, offering

V2 = ["ai-chat.v2"]
SECRET = "RESULT-THE-PAGE-MUST-NOT-SEE"


class Lookup(Tool):
    description = "Look a key up."
    Arguments = KeyArguments

    async def call(self, arguments, context):
        return {"value": SECRET}


@pytest.fixture
def settings(settings, fake_agent):
    fake_agent.supports_tools = True
    settings.agent.tools = ["lookup"]
    with offering({"lookup": Lookup()}):
        yield settings


async def history(base_url, token, client_id="c1") -> list[dict]:
    response = await get(f"{base_url}/api/conversations/{client_id}/messages",
                         Authorization=f"Bearer {token}")
    assert response.code == 200, response.body
    return json.loads(response.body)["messages"]


@pytest.mark.gen_test(timeout=30)
async def test_the_history_gives_each_replys_tool_steps_without_results(
        connect, fake_agent, base_url, token_for):
    fake_agent.enqueue(ToolCall("call-1", "lookup", {"key": "abc"}),
                       ToolCall("call-2", "lookup", {"key": "far too long a key"}))
    fake_agent.enqueue("Done.")
    fake_agent.enqueue("No tools this time.")
    client = await connect("c1", subprotocols=V2)
    for content in ("look it up", "and now?"):
        await client.send({"content": content})
        await client.receive_until("ai_response")

    body = await history(base_url, token_for("alice"))
    assert [m["role"] for m in body] == ["user", "assistant", "user", "assistant"]
    assert "tool_steps" not in body[0] and "tool_steps" not in body[2]
    steps = body[1]["tool_steps"]
    assert [{k: v for k, v in step.items() if k != "latency_ms"} for step in steps] == [
        {"call_id": "call-1", "name": "lookup", "arguments": {"key": "abc"}, "ok": True,
         "status": "ok", "turn": 0},
        {"call_id": "call-2", "name": "lookup", "arguments": {"key": "far too long a key"},
         "ok": False, "status": "error", "turn": 0}]
    assert all(isinstance(step["latency_ms"], float) and step["latency_ms"] >= 0
               for step in steps)
    assert body[3]["tool_steps"] == []
    assert SECRET not in json.dumps(body)  # results are never given

    # Another user's conversation of the same client_id: none of these steps.
    await connect("c1", user="bob")
    assert await history(base_url, token_for("bob")) == []
