"""Issue 14's end to end, on both databases: the ``openai`` plugin against a
loopback Chat Completions server whose "model" reads its prompt and calls the
``memory`` and ``recall`` tools. "Remember that my birthday is March 15" in
one conversation, "when is my birthday?" in a new one: the reply is built
from the saved value; another user gets nothing; the saved memory is not in
the database in plain text, and one added only through /api/memories is
nowhere in it."""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import text
from tornado.httpclient import AsyncHTTPClient


from .conftest import openai_settings
from .openai_upstream import Behaviour, FakeOpenAI
from .test_memory import raw_database, raw_postgres


def model(body: dict) -> Behaviour:
    """A tiny model: it calls a tool for what it is asked, then answers from
    the tool's result (the last message) and nothing else."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        result = json.loads(last["content"])
        if "saved" in result:
            return Behaviour("reply", pieces=["I will ", "remember that."])
        if "matches" in result:
            said = [match["content"] for match in result["matches"] if match["role"] == "user"]
            return Behaviour("reply", pieces=["You said: " + " | ".join(said) if said
                                              else "You never told me."])
        value = result.get("value")
        return Behaviour("reply", pieces=[f"Your birthday is {value}." if value
                                          else "I do not know your birthday."])
    text = last["content"]
    if match := re.search(r"remember that my birthday is (.+)", text):
        arguments = {"action": "set", "key": "birthday", "value": match.group(1)}
        return Behaviour("tool_calls", calls=[("call_set", "memory", json.dumps(arguments))])
    if "when is my birthday" in text:
        arguments = {"action": "get", "key": "birthday"}
        return Behaviour("tool_calls", calls=[("call_get", "memory", json.dumps(arguments))])
    arguments = {"query": "birthday", "limit": 5}
    return Behaviour("tool_calls", calls=[("call_recall", "recall", json.dumps(arguments))])


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        fake.respond(model, times=100)
        yield fake


@pytest.fixture
def settings(tmp_path, db_url, upstream):
    return openai_settings(tmp_path, db_url, upstream, TORNADO_APP_AGENT__TOOLS="[memory, recall]")


async def ask(connect, client_id: str, user: str, content: str) -> str:
    client = await connect(client_id, user=user, subprotocols=["ai-chat.v2"])
    try:
        await client.send({"content": content, "stream": True})
        frames = await client.receive_until("ai_response")
    finally:
        client.close()
    assert [f["type"] for f in frames if f["type"].startswith("tool_")] == [
        "tool_call", "tool_result"]
    assert [f["ok"] for f in frames if f["type"] == "tool_result"] == [True]
    return frames[-1]["message"]


@pytest.mark.gen_test(timeout=60)
async def test_remember_in_one_conversation_recall_in_another(
        connect, upstream, store, base_url, token_for):
    assert await ask(connect, "first", "alice",
                     "remember that my birthday is March 15") == "I will remember that."
    assert await ask(connect, "second", "alice", "when is my birthday?") == (
        "Your birthday is March 15.")
    # The new conversation's prompt held the memory too (for models without tools).
    [asked] = [r.json for r in upstream.requests
               if r.json["messages"][-1]["content"] == "when is my birthday?"]
    assert asked["messages"][0]["content"].endswith("- birthday: March 15")
    assert await ask(connect, "third", "alice", "what did I say?") == (
        "You said: when is my birthday? | remember that my birthday is March 15")

    # Another user: no memory, no messages of alice's.
    assert await ask(connect, "first", "bob", "when is my birthday?") == (
        "I do not know your birthday.")
    assert await ask(connect, "other", "bob", "what did I say?") == (
        "You said: when is my birthday?")
    [bobs] = [r.json for r in upstream.requests
              if r.json["messages"][-1].get("content") == "when is my birthday?"
              and "March 15" not in r.json["messages"][0]["content"]]
    assert "birthday:" not in bobs["messages"][0]["content"]

    # A memory added only through the API is nowhere in the database in plain
    # text; the saved birthday is not in the memories table in plain text.
    response = await AsyncHTTPClient().fetch(
        f"{base_url}/api/memories/city", method="PUT", body=json.dumps({"value": "Zanzibar-7731"}),
        headers={"Authorization": f"Bearer {token_for('alice')}"})
    assert response.code == 200
    if store.sqlite_file:
        raw = raw_database(store)
        assert b"Zanzibar-7731" not in raw
    else:
        dump = await raw_postgres(store)
        assert "Zanzibar-7731" not in dump and b"Zanzibar-7731".hex() not in dump
    async with store.engine.connect() as conn:
        values = (await conn.execute(text("SELECT value FROM memories"))).scalars().all()
    assert len(values) == 2
    assert not [value for value in values if b"March 15" in bytes(value)]
