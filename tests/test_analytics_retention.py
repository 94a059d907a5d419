"""Retention on both databases: ``purge`` deletes old transcripts and keeps the
rollups, and the server's analytics task rolls up and purges."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import func, select

from tornado_app.analytics import AnalyticsTask, make_filters, purge, run_report
from tornado_app.analytics.rollup import daily, rollup_days
from tornado_app.store.models import Message

from .test_analytics import NOW, load_chats


@pytest.mark.gen_test(timeout=60)
async def test_purge_deletes_old_transcripts_and_keeps_the_rollups(db_store):
    await load_chats(db_store.engine)
    before = await run_report(db_store.engine, "users", make_filters(), now=NOW)
    result = await purge(db_store.engine, retention_days=2, now=NOW)
    # Everything before 10-08 00:00: c1's four messages, then c1 itself.
    assert (result.cutoff, result.messages, result.conversations) == (
        datetime(2025, 10, 8), 4, 1)
    async with db_store.engine.connect() as conn:
        kept = (await conn.execute(select(func.min(Message.created_at)))).scalar()
        assert kept >= datetime(2025, 10, 8)
        assert (await conn.execute(select(func.count()).select_from(daily))).scalar() > 0
        purged = (await conn.execute(select(rollup_days.c.day).where(
            rollup_days.c.purged_at.is_not(None)))).scalars().all()
        assert [d.isoformat() for d in purged] == ["2025-10-07"]
    after = await run_report(db_store.engine, "users", make_filters(), now=NOW)
    assert after.as_json() == before.as_json()  # counts come from the rollups
    summary = (await run_report(db_store.engine, "summary", make_filters(), now=NOW)).as_json()
    assert summary["summary"]["user_messages"] == 9
    # Percentiles only see the kept replies: 300, 400, 500.
    assert summary["summary"]["latency_p50_ms"] == pytest.approx(400.0)
    longest = (await run_report(db_store.engine, "conversations", make_filters(),
                                now=NOW)).as_json()["longest"]
    assert {row["client_id"] for row in longest} == {"chat-2", "chat-3", "chat-4", None}


@pytest.mark.gen_test(timeout=60)
async def test_purge_keeps_a_reply_whose_question_it_deleted(db_store):
    await load_chats(db_store.engine)
    result = await purge(db_store.engine, retention_days=1, now=NOW)
    assert result.messages == 9  # m1..m9; m10 (10-09 00:00:05) stays, its question gone
    async with db_store.engine.connect() as conn:
        orphan = (await conn.execute(select(Message.reply_to_id, Message.latency_ms).where(
            Message.created_at < datetime(2025, 10, 9, 1)))).all()
    assert [tuple(r) for r in orphan] == [(None, 400.0)]
    summary = (await run_report(db_store.engine, "summary", make_filters(), now=NOW)).as_json()
    assert (summary["summary"]["user_messages"], summary["summary"]["replies"]) == (9, 8)


@pytest.mark.gen_test(timeout=60)
async def test_the_service_task_rolls_up_and_purges(db_store):
    await load_chats(db_store.engine)
    task = AnalyticsTask(db_store.engine, retention_days=3650, interval=3600)
    await task.run_once()  # nothing is that old: rolls up, deletes nothing
    async with db_store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Message))).scalar() == 17
        assert (await conn.execute(select(func.count()).select_from(rollup_days))).scalar() >= 4
    task.retention_days = 1  # now everything before yesterday goes
    await task.run_once()
    async with db_store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Message))).scalar() == 0
        assert (await conn.execute(select(func.count()).select_from(daily))).scalar() > 0
