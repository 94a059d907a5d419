"""The built-in ``memory`` and ``recall`` tools (plugins/memory_tools.py),
called with a real ToolContext built from tornado_app.memory's classes, on
both databases: exact arguments and results, and one user's data only."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from plugins import memory_tools
from tornado_app.memory import Memories, MemoryCipher, MemoryFull
from tornado_app.tools import Tool, ToolContext

from .helpers import add_user_message


def registered_tools() -> dict[str, Tool]:
    tools = {}

    def register(name, factory, options=None):
        tool = factory(options.model_validate({}) if options else None, None)
        tool.name = name
        tools[name] = tool

    memory_tools.register_tools(register=register)
    return tools


def context_for(memories: Memories, user_id: int, username: str) -> ToolContext:
    return ToolContext(user_id=user_id, username=username, conversation="c1",
                       deadline=asyncio.get_running_loop().time() + 10,
                       memories=memories.of(user_id), messages=memories.messages_of(user_id))


async def run(tool: Tool, arguments: dict, context: ToolContext):
    """As the host does: validate against the tool's model, then call."""
    return await tool.call(tool.Arguments.model_validate(arguments), context)


@pytest.fixture
def tools():
    return registered_tools()


@pytest.mark.gen_test(timeout=60)
async def test_memory_tool_set_get_list_delete(db_store, tools):
    await db_store.ensure_schema()
    alice = (await db_store.create_user("alice", None)).id
    bob = (await db_store.create_user("bob", None)).id
    memories = Memories(db_store, MemoryCipher("s" * 40), max_items=2)
    mine, theirs = context_for(memories, alice, "alice"), context_for(memories, bob, "bob")
    memory = tools["memory"]

    assert await run(memory, {"action": "set", "key": "birthday", "value": "March 15"},
                     mine) == {"saved": "birthday"}
    assert await run(memory, {"action": "get", "key": "birthday"}, mine) == {
        "key": "birthday", "value": "March 15"}
    assert await run(memory, {"action": "get", "key": "nothing"}, mine) == {
        "key": "nothing", "value": None}
    await run(memory, {"action": "set", "key": "city", "value": "Lyon"}, mine)
    assert await run(memory, {"action": "list"}, mine) == {"keys": ["birthday", "city"]}
    # Another user's calls see nothing of it.
    assert await run(memory, {"action": "list"}, theirs) == {"keys": []}
    assert await run(memory, {"action": "get", "key": "birthday"}, theirs) == {
        "key": "birthday", "value": None}
    assert await run(memory, {"action": "delete", "key": "birthday"}, theirs) == {
        "deleted": "birthday"}
    assert (await memories.of(alice).get("birthday")) == "March 15"
    # memory.max_items: a failure the model can read (a ToolError).
    with pytest.raises(MemoryFull, match="at most 2"):
        await run(memory, {"action": "set", "key": "third", "value": "x"}, mine)
    assert await run(memory, {"action": "delete", "key": "birthday"}, mine) == {
        "deleted": "birthday"}
    assert await run(memory, {"action": "list"}, mine) == {"keys": ["city"]}


@pytest.mark.parametrize("arguments", [
    {"action": "forget", "key": "x"},
    {"action": "set", "key": "x"},
    {"action": "set", "value": "v"},
    {"action": "get"},
    {"action": "get", "key": "x", "value": "v"},
    {"action": "set", "key": "", "value": "v"},
    {"action": "set", "key": "k" * 65, "value": "v"},
    {"action": "set", "key": "k", "value": "v" * 1001},
    {"action": "list", "extra": 1},
])
def test_memory_arguments_are_validated(tools, arguments):
    with pytest.raises(ValidationError):
        tools["memory"].Arguments.model_validate(arguments)


def test_schemas_name_the_documented_arguments(tools):
    memory = tools["memory"].schema()
    assert set(memory["properties"]) == {"action", "key", "value"}
    assert memory["required"] == ["action"]
    assert set(memory["properties"]["action"]["enum"]) == {"set", "get", "delete", "list"}
    recall = tools["recall"].schema()
    assert set(recall["properties"]) == {"query", "limit"}
    assert recall["properties"]["limit"]["default"] == 5
    assert tools["memory"].description and tools["recall"].description
    for arguments in ({"query": "x", "limit": 0}, {"query": "x", "limit": 21}, {"query": ""},
                      {"limit": 3}):
        with pytest.raises(ValidationError):
            tools["recall"].Arguments.model_validate(arguments)


@pytest.mark.gen_test(timeout=60)
async def test_recall_tool_searches_the_callers_messages_only(db_store, tools):
    await db_store.ensure_schema()
    alice = (await db_store.create_user("alice", None)).id
    bob = (await db_store.create_user("bob", None)).id
    for user, client_id, text in [(alice, "old-chat", "my birthday is March 15"),
                                  (alice, "new-chat", "plan the birthday dinner"),
                                  (bob, "bobs-chat", "my birthday is June 1")]:
        conversation = await db_store.open_conversation(user, client_id)
        await add_user_message(db_store, conversation, user, text)
    memories = Memories(db_store, MemoryCipher("s" * 40), 10)

    result = await run(tools["recall"], {"query": "birthday"}, context_for(memories, alice, "a"))
    assert [(m["conversation"], m["role"], m["content"]) for m in result["matches"]] == [
        ("new-chat", "user", "plan the birthday dinner"),
        ("old-chat", "user", "my birthday is March 15")]
    assert set(result["matches"][0]) == {"conversation", "role", "content", "timestamp"}
    one = await run(tools["recall"], {"query": "birthday", "limit": 1},
                    context_for(memories, alice, "a"))
    assert len(one["matches"]) == 1
    theirs = await run(tools["recall"], {"query": "March"}, context_for(memories, bob, "b"))
    assert theirs == {"matches": []}


@pytest.mark.gen_test(timeout=60)
async def test_recall_finds_the_same_messages_through_the_window_and_the_index(
        db_store, monkeypatch):
    """PostgreSQL reads a user's newest messages first, testing each for the
    query's lexemes as substrings before parsing it (store/message_search.py);
    then the GIN index. Both find the same messages, whatever the case,
    punctuation or script; another user's never."""
    from tornado_app.store import message_search

    await db_store.ensure_schema()
    alice = (await db_store.create_user("alice", None)).id
    bob = (await db_store.create_user("bob", None)).id
    texts = ["My BIRTHDAY is March 15!", "see https://Example.com/a_b?x=50%25 now",
             "snake_case and e-mail, 100% sure", "Ärger über Straße", "back\\slash path",
             "nothing to see"]
    conversation = await db_store.open_conversation(alice, "c1")
    for text in texts:
        await add_user_message(db_store, conversation, alice, text)
    theirs = await db_store.open_conversation(bob, "c2")
    await add_user_message(db_store, theirs, bob, "My birthday, and snake_case too")
    queries = ["birthday", "march BIRTHDAY", "example.com", "snake_case", "e-mail", "100",
               "ärger", "STRASSE", "straße", "slash", "a_b", "50", "missing"]

    async def found() -> dict[str, list[str]]:
        # Limit 1: the window's answer stands when it finds that many.
        return {(query, limit): [row.content for row in
                                 await db_store.search_messages(alice, query, limit)]
                for query in queries for limit in (1, 5)}

    window = await found()
    monkeypatch.setattr(message_search, "RECENT_WINDOW", 0)  # the index alone
    assert await found() == window
    assert window["march BIRTHDAY", 5] == [texts[0]]
    assert window["snake_case", 5] == [texts[2]] and window["missing", 5] == []
    assert window["straße", 1] == [texts[3]]
