"""A socket's copy of its conversation (tornado_app.history): the same prompt
as a full read, for a fraction of the reads and token counts.

The unit tests drive History against the service's real store (SQLite and
PostgreSQL); the end-to-end ones go through real sockets.
"""

from __future__ import annotations

import time
from collections import namedtuple

import pytest
from sqlalchemy import delete

from tornado_app import history as history_module
from tornado_app.history import History
from tornado_app.store.models import ROLE_USER, STATUS_ERROR, STATUS_OK, Message

from .conftest import offered
from .helpers import ADMIT, FakeAgent, add_reply, saved_messages


Row = namedtuple("Row", "id role content")


class CountingAgent(FakeAgent):
    """A FakeAgent that records every text it is asked to count."""

    def __post_init__(self):
        super().__post_init__()
        self.counted: list[str] = []

    def count_tokens(self, text: str) -> int:
        self.counted.append(text)
        return super().count_tokens(text)


async def admit(store, copy: History, user, content: str):
    """What an exchange does first: Store.admit with the copy's read_from, then add."""
    admission = await store.admit(copy.conversation_id, user.id, content, now=time.time(),
                                  messages=1000, per_seconds=1.0, after_id=copy.read_from(),
                                  history_limit=copy.limit, **ADMIT)
    return admission, copy.add(admission.turns, admission.message_id, content)


async def full_read(store, conversation_id: int, before_id: int, limit: int) -> list[tuple]:
    """The history as the whole conversation gives it: no copy, no shortcut."""
    rows = await saved_messages(store, conversation_id)
    turns = [(row.id, row.role, row.content) for row in rows if row.id < before_id
             and (row.role == ROLE_USER or row.status == STATUS_OK)]
    return turns[-limit:]


@pytest.mark.gen_test
async def test_each_prompt_equals_a_full_read_while_only_new_turns_are_read(store, make_user):
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    copy = History(conversation, limit=5)
    for n in range(8):
        after_id = copy.read_from()
        admission, turns = await admit(store, copy, user, f"q{n}")
        # Only what was saved since the last message was read (its reply, normally).
        assert len(admission.turns) == (0 if n in (0, 4) else 1)
        assert all(turn.id > after_id for turn in admission.turns)
        expected = await full_read(store, conversation, admission.message_id, 5)
        assert [(t.id, t.role, t.content) for t in turns] == expected
        # A failed reply is saved but never becomes context.
        status = STATUS_ERROR if n == 3 else STATUS_OK
        await add_reply(store, conversation, user.id, admission.message_id, content=f"a{n}",
                              status=status)


@pytest.mark.gen_test
async def test_turns_another_socket_wrote_are_read(store, make_user):
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    mine, other = History(conversation), History(conversation)
    for copy, text in ((mine, "from here"), (other, "from another socket")):
        admission, _ = await admit(store, copy, user, text)
        await add_reply(store, conversation, user.id, admission.message_id, content=f"re: {text}")
    _, turns = await admit(store, mine, user, "third")
    assert [t.content for t in turns] == ["from here", "re: from here",
                                          "from another socket", "re: from another socket"]


@pytest.mark.gen_test
async def test_purged_turns_leave_the_copy_at_its_next_full_read(store, make_user, monkeypatch):
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    copy = History(conversation)
    old, _ = await admit(store, copy, user, "old")
    await add_reply(store, conversation, user.id, old.message_id, content="re: old")
    _, turns = await admit(store, copy, user, "new")
    assert [t.content for t in turns] == ["old", "re: old"]
    async with store.engine.begin() as conn:  # what retention does
        await conn.execute(delete(Message).where(Message.id <= old.message_id + 1))
    _, turns = await admit(store, copy, user, "soon")
    assert [t.content for t in turns] == ["old", "re: old", "new"]  # not re-read yet
    monkeypatch.setattr(history_module, "REFRESH_SECONDS", 0.0)
    _, turns = await admit(store, copy, user, "later")
    assert [t.content for t in turns] == ["new", "soon"]


@pytest.mark.gen_test
async def test_a_message_over_the_rate_limit_is_neither_saved_nor_added(store, make_user):
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    copy = History(conversation)
    limit = {"now": 100.0, "messages": 1, "per_seconds": 60.0, "history_limit": 10, **ADMIT}
    first = await store.admit(conversation, user.id, "one", after_id=0, **limit)
    second = await store.admit(conversation, user.id, "two", after_id=0, **limit)
    assert first.decision.allowed and not second.decision.allowed
    assert second.message_id is None and second.turns == []
    assert 59.0 < second.decision.retry_after <= 60.0
    assert [row.content for row in await saved_messages(store, conversation)] == ["one"]
    assert not copy.turns


def test_token_counts_are_kept_per_agent_and_recounted_after_a_swap():
    first, second = CountingAgent(), CountingAgent()
    copy = History(conversation_id=1)
    copy.add([Row(i, ROLE_USER, f"turn {i}") for i in range(3)], 3, "the message")
    turns = list(copy.turns)[:3]
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


@pytest.mark.gen_test
async def test_a_reply_taken_by_the_copy_spares_the_next_read(store, make_user):
    """The exchange hands its saved reply to the copy (History.add_reply): the
    next message reads no turn while the reply is the leaf, and the prompt is
    still the full read's. Another socket's turns, or a failed reply, too."""
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c1")
    copy, other = History(conversation), History(conversation)
    for n in range(4):
        admission, turns = await admit(store, copy, user, f"q{n}")
        assert admission.turns == [] and (admission.continues or n == 0)
        assert [(t.id, t.role, t.content) for t in turns] == await full_read(
            store, conversation, admission.message_id, 200)
        status = STATUS_ERROR if n == 1 else STATUS_OK
        reply = await add_reply(store, conversation, user.id, admission.message_id,
                                content=f"a{n}", status=status)
        copy.add_reply(admission.message_id, reply, f"a{n}", status == STATUS_OK)
    # Another socket writes to the conversation: its turns are read as before.
    theirs, _ = await admit(store, other, user, "from elsewhere")
    await add_reply(store, conversation, user.id, theirs.message_id, content="re: elsewhere")
    admission, turns = await admit(store, copy, user, "last")
    assert [row.content for row in admission.turns] == ["from elsewhere", "re: elsewhere"]
    assert [(t.id, t.role, t.content) for t in turns] == await full_read(
        store, conversation, admission.message_id, 200)
    # A reply to a message the copy no longer ends at is not taken.
    copy.add_reply(theirs.message_id, 10**9, "stale", True)
    assert copy.read_from() == admission.message_id


@pytest.mark.gen_test
async def test_the_next_message_of_a_socket_reads_no_turn(service, connect, monkeypatch):
    admissions = []
    admit_for_real = service.store.admit

    async def recording(*args, **kwargs):
        admissions.append(await admit_for_real(*args, **kwargs))
        return admissions[-1]

    monkeypatch.setattr(service.store, "admit", recording)
    client = await connect()
    for n in range(3):
        await client.send({"content": f"message {n}"})
        assert (await client.receive())["type"] == "ai_response"
    assert [len(a.turns) for a in admissions] == [0, 0, 0]
    assert all(a.continues for a in admissions[1:])
