"""The data side of conversation controls (issue 15), on SQLite and PostgreSQL:
migration 0008 (existing conversations become one straight branch; down and
up again with data), the feedback report against hand-computed figures, and
the feedback and regenerated columns of the export and the chat_turns view."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect, text

from tornado_app.analytics import export_lines, make_filters, run_report
from tornado_app.analytics.render import render
from tornado_app.store.models import Feedback, Message
from tornado_app.store.schema import current_revision, downgrade, upgrade

from .helpers import seed_old_schema
from .test_analytics import NOW, at, load_chats

# Migration 0008


async def rows(engine, sql: str) -> list[tuple]:
    async with engine.connect() as conn:
        return [tuple(row) for row in (await conn.execute(text(sql))).all()]


@pytest.mark.gen_test(timeout=60)
async def test_migration_0008_makes_each_conversation_one_branch_and_goes_down(db_store):
    engine = db_store.engine
    await upgrade(engine, "0004")
    async with engine.begin() as conn:
        await seed_old_schema(conn, client_ids=("c1", "c2", "c3"))
        # Interleaved conversations 1 and 2; conversation 3 has no message.
        for mid, cid, role, reply_to in ((1, 1, "user", "NULL"), (2, 2, "user", "NULL"),
                                         (3, 1, "assistant", "1"), (4, 2, "assistant", "2"),
                                         (5, 1, "user", "NULL"), (6, 1, "assistant", "5")):
            await conn.execute(text(
                "INSERT INTO messages (id, public_id, conversation_id, user_id, role, content, "
                "status, reply_to_id, created_at) VALUES "
                f"({mid}, 'p{mid}', {cid}, 1, '{role}', 'text {mid}', 'ok', {reply_to}, "
                "'2025-01-01 00:00:01')"))
    await upgrade(engine, "0008")
    assert await current_revision(engine) == "0008"
    assert await rows(engine, "SELECT id, parent_id FROM messages ORDER BY id") == [
        (1, None), (2, None), (3, 1), (4, 2), (5, 3), (6, 5)]
    assert await rows(engine, "SELECT id, active_leaf_id, agent FROM conversations "
                              "ORDER BY id") == [(1, 6, None), (2, 4, None), (3, None, None)]
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO message_feedback (message_id, user_id, rating, comment, created_at) "
            "VALUES (3, 1, -1, 'meh', '2025-01-02 00:00:00')"))
    assert await rows(engine, "SELECT message_id, reply_id, regenerated, feedback_rating, "
                              "feedback_comment FROM chat_turns ORDER BY message_id") == [
        (1, 3, 0, -1, "meh"), (2, 4, 0, None, None), (5, 6, 0, None, None)]

    await downgrade(engine, "0004")
    assert await current_revision(engine) == "0004"
    async with engine.connect() as conn:
        tables, message_columns, conversation_columns, views = await conn.run_sync(
            lambda c: (inspect(c).get_table_names(),
                       [col["name"] for col in inspect(c).get_columns("messages")],
                       [col["name"] for col in inspect(c).get_columns("conversations")],
                       inspect(c).get_view_names()))
    assert "message_feedback" not in tables and "chat_turns" in views
    assert "parent_id" not in message_columns
    assert not {"active_leaf_id", "agent"} & set(conversation_columns)
    assert await rows(engine, "SELECT message_id, reply_id FROM chat_turns "
                              "ORDER BY message_id") == [(1, 3), (2, 4), (5, 6)]
    assert len(await rows(engine, "SELECT id FROM messages")) == 6
    await upgrade(engine, "0008")
    assert (await rows(engine, "SELECT id, parent_id FROM messages ORDER BY id"))[-1] == (6, 5)


# The feedback report, on test_analytics' data set: replies m2, m4, m6, m12,
# m15, m17 by openai/gpt-x; m8, m10 by echo/echo (alice: m2..m8, bob: m10..).
FEEDBACK = [  # (message id, rating, comment, given at)
    (2, 1, "great", at(10, 11, 0)),
    (4, -1, None, at(10, 11, 5)),
    (15, 1, "nice", at(10, 11, 30)),
    (10, -1, "meh", at(10, 11, 15)),
]


@pytest.fixture
def engine(io_loop, db_store):
    async def load():
        ids = await load_chats(db_store.engine)
        async with db_store.engine.begin() as conn:
            for message_id, rating, comment, given in FEEDBACK:
                user = ids["alice"] if message_id < 9 else ids["bob"]
                await conn.execute(Feedback.__table__.insert().values(
                    message_id=message_id, user_id=user, rating=rating, comment=comment,
                    created_at=given))
            # m2 regenerated: a second reply to m1.
            await conn.execute(Message.__table__.insert().values(
                conversation_id=ids["c1"], user_id=ids["alice"], role="assistant",
                content="again", status="ok", reply_to_id=1, parent_id=1, agent="openai",
                model="gpt-x", created_at=at(7, 10, 1), regenerated=True))

    io_loop.run_sync(load)
    return db_store.engine


async def feedback(engine, **filters) -> dict:
    found = await run_report(engine, "feedback", make_filters(now=NOW, **filters), now=NOW)
    return json.loads(render(found, "json"))


@pytest.mark.gen_test
async def test_feedback_report_counts_exactly(engine):
    body = await feedback(engine)
    assert body["feedback"] == [
        {"agent": "openai", "model": "gpt-x", "replies": 7, "rated": 3, "up": 2, "down": 1,
         "up_share": pytest.approx(2 / 3)},
        {"agent": "echo", "model": "echo", "replies": 2, "rated": 1, "up": 0, "down": 1,
         "up_share": 0.0},
    ]
    assert [(c["username"], c["client_id"], c["agent"], c["rating"], c["comment"])
            for c in body["comments"]] == [
        ("bob", "chat-4", "openai", 1, "nice"), ("bob", "chat-3", "echo", -1, "meh"),
        ("alice", "chat-1", "openai", 1, "great")]


@pytest.mark.gen_test
async def test_feedback_report_filters(engine):
    alice = (await feedback(engine, user="alice"))["feedback"]
    assert [(r["agent"], r["replies"], r["rated"], r["up"], r["down"], r["up_share"])
            for r in alice] == [("openai", 4, 2, 1, 1, 0.5), ("echo", 1, 0, 0, 0, None)]
    recent = (await feedback(engine, since="2025-10-09"))["feedback"]
    assert [(r["agent"], r["replies"], r["rated"], r["up"], r["down"]) for r in recent] == [
        ("openai", 3, 1, 1, 0), ("echo", 1, 1, 0, 1)]
    only_echo = await feedback(engine, agent="echo", limit="1")
    assert [r["agent"] for r in only_echo["feedback"]] == ["echo"]
    assert [c["comment"] for c in only_echo["comments"]] == ["meh"]
    table = render(await run_report(engine, "feedback", make_filters(now=NOW), now=NOW),
                   "table")
    assert "UP_SHARE" in table and "nice" in table


@pytest.mark.gen_test
async def test_export_and_chat_turns_carry_feedback_and_regenerated(engine):
    lines = [json.loads(line) async for chunk in export_lines(engine, make_filters(now=NOW),
                                                              "json")
             for line in chunk.splitlines()]
    by_id = {line["id"]: line for line in lines}
    assert (by_id[2]["feedback_rating"], by_id[2]["feedback_comment"]) == (1, "great")
    assert (by_id[4]["feedback_rating"], by_id[4]["feedback_comment"]) == (-1, None)
    assert by_id[8]["feedback_rating"] is None
    assert by_id[18]["parent_id"] == 1
    turns = await rows(engine, "SELECT reply_id, regenerated, feedback_rating "
                               "FROM chat_turns WHERE message_id = 1 ORDER BY reply_id")
    assert turns == [(2, 0, 1), (18, 1, None)]


@pytest.mark.gen_test
async def test_conversations_report_gives_the_regenerate_rate_per_agent(engine):
    found = await run_report(engine, "conversations", make_filters(now=NOW), now=NOW)
    body = json.loads(render(found, "json"))
    assert body["regenerated"] == [
        {"agent": "openai", "replies": 7, "regenerated": 1,
         "regenerate_rate": pytest.approx(1 / 7)},
        {"agent": "echo", "replies": 2, "regenerated": 0, "regenerate_rate": 0.0}]
    bob = await run_report(engine, "conversations", make_filters(now=NOW, user="bob"), now=NOW)
    assert [row["regenerated"] for row in json.loads(render(bob, "json"))["regenerated"]] == [
        0, 0]
