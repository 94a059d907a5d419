"""scripts/generate_chats.py fills an empty database of each kind with
realistic chats that the analytics reports can read."""

from __future__ import annotations

import sys

import pytest

from tornado_app.analytics import make_filters, run_report

from .servers import ROOT


@pytest.mark.gen_test(timeout=120)
async def test_the_generator_fills_an_empty_database(db_store, any_db_url):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate_chats
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    await generate_chats.generate(generate_chats.build_parser().parse_args(
        ["--url", any_db_url, "--messages", "3000", "--users", "20", "--days", "10"]))
    found = (await run_report(db_store.engine, "summary", make_filters())).as_json()["summary"]
    assert found["messages"] == 3000
    assert found["errors"] > 0 and found["latency_p95_ms"] > found["latency_p50_ms"] > 0
    kinds = (await run_report(db_store.engine, "errors", make_filters())).as_json()["by_kind"]
    assert {row["kind"] for row in kinds} <= {"local_model", "timeout", "rate_limited",
                                             "upstream", "connection", "bad_reply", "internal"}


@pytest.mark.gen_test(timeout=120)
async def test_generated_branches_and_feedback_match_the_feedback_report(db_store, any_db_url):
    """The generator's branches are well formed (every parent is an earlier message of the
    same conversation, a reply's is its message, each leaf is the conversation's newest
    message), and the feedback report's counts equal a count straight from the tables."""
    from sqlalchemy import text

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate_chats
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    await generate_chats.generate(generate_chats.build_parser().parse_args(
        ["--url", any_db_url, "--messages", "6000", "--users", "20", "--days", "10",
         "--seed", "3"]))
    async with db_store.engine.connect() as conn:
        async def scalar(sql):
            return (await conn.execute(text(sql))).scalar()

        assert await scalar(
            "SELECT count(*) FROM messages m LEFT JOIN messages p ON p.id = m.parent_id "
            "WHERE m.parent_id IS NOT NULL AND (p.id IS NULL OR p.id >= m.id "
            "OR p.conversation_id != m.conversation_id)") == 0
        assert await scalar("SELECT count(*) FROM messages WHERE role = 'assistant' "
                            "AND parent_id != reply_to_id") == 0
        assert await scalar("SELECT count(*) FROM conversations c WHERE active_leaf_id != "
                            "(SELECT max(id) FROM messages m "
                            "WHERE m.conversation_id = c.id)") == 0
        regenerated = await scalar("SELECT count(*) - count(DISTINCT reply_to_id) FROM messages "
                                   "WHERE role = 'assistant'")
        # Each regenerated reply is marked as such.
        assert await scalar("SELECT count(*) FROM messages WHERE regenerated") == regenerated
        expected = {(row.agent, row.model): tuple(row[2:]) for row in (await conn.execute(text(
            "SELECT m.agent, m.model, count(*), "
            "sum(CASE WHEN f.rating = 1 THEN 1 ELSE 0 END), "
            "sum(CASE WHEN f.rating = -1 THEN 1 ELSE 0 END) "
            "FROM message_feedback f JOIN messages m ON m.id = f.message_id "
            "GROUP BY m.agent, m.model"))).all()}
    assert regenerated > 0 and sum(rated for rated, _, _ in expected.values()) > 50
    body = (await run_report(db_store.engine, "feedback", make_filters())).as_json()
    found = {(row["agent"], row["model"]): (row["rated"], row["up"], row["down"])
             for row in body["feedback"] if row["rated"]}
    assert found == expected
    assert all(0 <= row["up_share"] <= 1 for row in body["feedback"] if row["rated"])
    rates = (await run_report(db_store.engine, "conversations", make_filters())).as_json()
    assert sum(row["regenerated"] for row in rates["regenerated"]) == regenerated
