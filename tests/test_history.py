"""A socket's copy of its conversation (tornado_app.history): the same prompt
as a full read, for a fraction of the reads and token counts.

The unit tests drive History against the service's real store (SQLite and
PostgreSQL); the end-to-end ones go through real sockets.
"""

from __future__ import annotations

import pytest
from sqlalchemy import delete

from tornado_app import history as history_module
from tornado_app.history import History
from tornado_app.store.models import ROLE_USER, STATUS_ERROR, Message

from .conftest import offered
from .helpers import FakeAgent


class CountingAgent(FakeAgent):
    """A FakeAgent that records every text it is asked to count."""

    def __post_init__(self):
        super().__post_init__()
        self.counted: list[str] = []

    def count_tokens(self, text: str) -> int:
        self.counted.append(text)
        return super().count_tokens(text)


class RecordingStore:
    """The real store, with a note of each history read's ``after_id``."""

    def __init__(self, store):
        self.store = store
        self.after_ids: list[int] = []

    async def history(self, conversation_id, before_id, limit, after_id=0):
        self.after_ids.append(after_id)
        return await self.store.history(conversation_id, before_id, limit, after_id)


async def exchange(store, user, conversation, text, status="ok"):
    message_id = await store.add_user_message(conversation, user.id, text)
    await store.add_reply(conversation, user.id, message_id, content=f"re: {text}", status=status)
    return message_id


@pytest.mark.gen_test
async def test_each_prompt_equals_a_full_read_while_only_new_turns_are_read(store, make_user):
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    recording = RecordingStore(store)
    copy = History(recording, conversation, limit=5)
    for n in range(8):
        message_id = await store.add_user_message(conversation, user.id, f"q{n}")
        turns = await copy.before(message_id, f"q{n}", ROLE_USER)
        full = await store.history(conversation, message_id, 5)
        assert [(t.id, t.role, t.content) for t in turns] == [tuple(row) for row in full]
        # A failed reply is saved but never becomes context.
        status = STATUS_ERROR if n == 3 else "ok"
        await store.add_reply(conversation, user.id, message_id, content=f"a{n}", status=status)
    assert recording.after_ids[0] == 0
    assert all(after > 0 for after in recording.after_ids[1:])


@pytest.mark.gen_test
async def test_turns_another_socket_wrote_are_read(store, make_user):
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    mine = History(store, conversation)
    await exchange(store, user, conversation, "from here")
    message_id = await store.add_user_message(conversation, user.id, "second")
    await mine.before(message_id, "second", ROLE_USER)
    await store.add_reply(conversation, user.id, message_id, content="re: second")
    await exchange(store, user, conversation, "from another socket")
    last = await store.add_user_message(conversation, user.id, "third")
    turns = await mine.before(last, "third", ROLE_USER)
    assert [t.content for t in turns] == ["from here", "re: from here", "second", "re: second",
                                          "from another socket", "re: from another socket"]


@pytest.mark.gen_test
async def test_purged_turns_leave_the_copy_at_its_next_full_read(store, make_user, monkeypatch):
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    copy = History(store, conversation)
    purged = await exchange(store, user, conversation, "old")
    message_id = await store.add_user_message(conversation, user.id, "new")
    assert [t.content for t in await copy.before(message_id, "new", ROLE_USER)] == ["old", "re: old"]
    async with store.engine.begin() as conn:  # what retention does
        await conn.execute(delete(Message).where(Message.id <= purged + 1))
    monkeypatch.setattr(history_module, "REFRESH_SECONDS", 0.0)
    later = await store.add_user_message(conversation, user.id, "later")
    assert [t.content for t in await copy.before(later, "later", ROLE_USER)] == ["new"]


def test_token_counts_are_kept_per_agent_and_recounted_after_a_swap():
    first, second = CountingAgent(), CountingAgent()
    copy = History(store=None, conversation_id=1)
    copy.turns.extend(history_module.Turn(i, ROLE_USER, f"turn {i}") for i in range(3))
    turns = list(copy.turns)
    copy.count(first, turns)
    copy.count(first, turns)
    assert first.counted == ["turn 0", "turn 1", "turn 2"]
    copy.count(second, turns)
    assert second.counted == ["turn 0", "turn 1", "turn 2"]
    copy.count(first, turns)
    assert len(first.counted) == 6


@pytest.fixture
def counting_agent(settings):
    with offered("counting", CountingAgent()) as agent:
        settings.agent.backend = "counting"
        yield agent


@pytest.mark.gen_test
async def test_tokens_counted_per_message_do_not_grow_with_the_history(
    counting_agent, connect
):
    client = await connect()
    per_message = []
    for n in range(12):
        before = len(counting_agent.counted)
        await client.send({"content": f"message {n}"})
        assert (await client.receive())["type"] == "ai_response"
        per_message.append(len(counting_agent.counted) - before)
    # The system prompt, the message, the reply, and the two turns new since
    # the last message: the same for the 12th message as for the 3rd.
    assert per_message[2:] == [per_message[2]] * 10
    assert per_message[2] == 5
    prompt = counting_agent.history[-1].messages
    assert [m["content"] for m in prompt[1::2]][:3] == ["message 0", "message 1", "message 2"]
