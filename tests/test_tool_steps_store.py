"""The tool_steps table: migration 0005 up and down with data in it, and the
Store saving a reply's steps and reading them back with the history, on
SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from tornado_app.store.schema import current_revision, downgrade, upgrade
from tornado_app.store.tool_steps import RESULT_CHARS
from tornado_app.tool_loop import Step

from .helpers import ADMIT, saved_tool_steps, seed_old_schema


@pytest.mark.gen_test(timeout=60)
async def test_migration_0005_up_and_down_with_data(db_store):
    engine = db_store.engine
    await upgrade(engine, "0004")
    async with engine.begin() as conn:
        await seed_old_schema(conn)
        await conn.execute(text(
            "INSERT INTO messages (id, conversation_id, user_id, role, content, status, "
            "created_at, public_id) VALUES (1, 1, 1, 'assistant', 'kept', 'ok', "
            "'2025-01-01 00:00:01', 'p1')"))
    await upgrade(engine, "0005")
    assert await current_revision(engine) == "0005"
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO tool_steps (message_id, conversation_id, user_id, agent, turn, "
            "call_id, tool, arguments, result, status, latency_ms, created_at) VALUES "
            "(1, 1, 1, 'fake', 0, 'c1', 'clock', '{}', 'r', 'ok', 1.5, '2025-01-01 00:00:01')"))
        steps = (await conn.execute(text("SELECT tool, status FROM tool_steps"))).all()
    assert [tuple(step) for step in steps] == [("clock", "ok")]
    await downgrade(engine, "0004")
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        content = (await conn.execute(text("SELECT content FROM messages"))).scalar()
    assert "tool_steps" not in tables and content == "kept"
    await upgrade(engine, "0005")
    assert await current_revision(engine) == "0005"


def step(turn, call_id, result="ok", status="ok"):
    return Step(turn, call_id, "lookup", {"key": call_id}, result, status, 2.5)


@pytest.mark.gen_test(timeout=60)
async def test_steps_are_saved_with_the_reply_and_read_with_the_history(db_store):
    await db_store.ensure_schema()
    user = await db_store.create_user("alice", None)
    conversation = await db_store.open_conversation(user.id, "c1")
    first = await db_store.admit(conversation, user.id, "question", now=0.0, messages=100,
                                 per_seconds=1, after_id=0, history_limit=10, **ADMIT)
    steps = [step(0, "a", "x" * (RESULT_CHARS + 10)), step(0, "b", status="timeout"),
             step(1, "c"), Step(1, "d" * 300, "n" * 100, {}, "error: no such tool", "error", 0.1)]
    reply_row = await db_store.finish_reply(
        first.reply_id, conversation, user.id, first.message_id, ["answer"], False,
        steps=steps, content="answer", status="ok", agent="fake")
    saved = await saved_tool_steps(db_store)
    assert [(s.call_id, s.turn, s.status, s.message_id, s.agent) for s in saved[:3]] == [
        ("a", 0, "ok", reply_row, "fake"), ("b", 0, "timeout", reply_row, "fake"),
        ("c", 1, "ok", reply_row, "fake")]
    assert len(saved[0].result) == RESULT_CHARS  # cut to the documented size
    # What the model wrote is cut to its column, not a failed save.
    assert (saved[3].call_id, saved[3].tool) == ("d" * 128, "n" * 64)
    second = await db_store.admit(conversation, user.id, "again", now=1.0, messages=100,
                                  per_seconds=1, after_id=0, history_limit=10, **ADMIT)
    assert [turn.role for turn in second.turns] == ["user", "assistant"]
    assert list(second.steps) == [reply_row]
    assert [(s.call_id, s.turn, s.name) for s in second.steps[reply_row]][:3] == [
        ("a", 0, "lookup"), ("b", 0, "lookup"), ("c", 1, "lookup")]
    # Read from after the reply: nothing of it comes back.
    third = await db_store.admit(conversation, user.id, "more", now=2.0, messages=100,
                                 per_seconds=1, after_id=second.message_id, history_limit=10,
                                 **ADMIT)
    assert third.steps == {}
