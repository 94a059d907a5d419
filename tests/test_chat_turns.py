"""The ``chat_turns`` view on both databases: migration 0003 adds it (and goes
down and up again keeping the messages), it joins each question to its reply,
and the README's ad-hoc queries run on it."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import inspect, text

from tornado_app.store.schema import current_revision, downgrade, upgrade

from .helpers import seed_old_schema
from .servers import ROOT
from .test_analytics import load_chats


@pytest.mark.gen_test(timeout=60)
async def test_migration_0003_up_and_down_keeps_the_messages(db_store):
    engine = db_store.engine
    await upgrade(engine, "0002")
    async with engine.begin() as conn:
        await seed_old_schema(conn)
        await conn.execute(text(
            "INSERT INTO messages (id, conversation_id, user_id, role, content, status, "
            "created_at) VALUES (1, 1, 1, 'user', 'kept', 'ok', '2025-01-01 00:00:01')"))
    await upgrade(engine, "0003")
    assert await current_revision(engine) == "0003"
    async with engine.connect() as conn:
        turns = (await conn.execute(text("SELECT question, status FROM chat_turns"))).all()
    assert [tuple(t) for t in turns] == [("kept", None)]
    await downgrade(engine, "0002")
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: (inspect(c).get_table_names(),
                                               inspect(c).get_view_names(),
                                               [col["name"] for col in
                                                inspect(c).get_columns("messages")]))
        content = (await conn.execute(text("SELECT content FROM messages"))).scalar()
    tables, views, columns = names
    assert not any(name.startswith("analytics_") for name in tables)
    assert "chat_turns" not in views and "error_kind" not in columns
    assert content == "kept"
    await upgrade(engine, "0003")
    assert await current_revision(engine) == "0003"


@pytest.mark.gen_test
async def test_chat_turns_joins_each_question_to_its_reply(db_store):
    await load_chats(db_store.engine)
    async with db_store.engine.connect() as conn:
        turns = (await conn.execute(text(
            "SELECT username, client_id, status, agent, latency_ms, tokens_out, error_kind "
            "FROM chat_turns ORDER BY message_id"))).all()
    assert len(turns) == 9  # one per user message
    assert tuple(turns[0]) == ("alice", "chat-1", "ok", "openai", 100.0, 20, None)
    assert tuple(turns[2]) == ("alice", "chat-2", "error", "openai", 5000.0, 0, "timeout")
    assert tuple(turns[6]) == ("bob", "chat-3", None, None, None, None, None)  # unanswered


def readme_queries() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Ad-hoc SQL"):]
    return re.findall(r"```sql\n(.*?)```", section, re.S)[:3]


@pytest.mark.gen_test
async def test_the_readme_queries_run_on_both_databases(db_store):
    await load_chats(db_store.engine)
    queries = readme_queries()
    assert len(queries) == 3
    async with db_store.engine.connect() as conn:
        for query in queries:
            assert (await conn.execute(text(query))).all(), query
