"""Analytics, continued: percentiles against a Python reference, retention,
migration 0003, the chat_turns view and the data generator, on both databases."""

from __future__ import annotations

import random
import re
import statistics
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text

from tornado_app.analytics import AnalyticsTask, make_filters, purge, run_report
from tornado_app.analytics.rollup import daily, rollup_days
from tornado_app.store import Store
from tornado_app.store.models import Conversation, Message, User
from tornado_app.store.schema import current_revision, downgrade, ensure_schema, upgrade

from .test_analytics import NOW, load_chats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(io_loop, any_db_url):
    store = Store.from_url(any_db_url)
    yield store
    io_loop.run_sync(store.close)


# Percentiles: the database's against Python's statistics.quantiles, which
# implements the same definition (method="inclusive": numpy's "linear").


def reference(values: list[float]) -> tuple[float | None, float | None]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[94]


AGENTS = [("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("transformers", "smol")]


async def load_random_replies(engine, seed: int = 7) -> list[dict]:
    """~600 replies over six days by three users and three agent/models, with
    ties (whole milliseconds), missing TTFTs, errors and cancellations."""
    rng = random.Random(seed)
    await ensure_schema(engine)
    rows: list[dict] = []
    async with engine.begin() as conn:
        for n in range(3):
            user_id = (await conn.execute(User.__table__.insert().values(
                username=f"u{n}", password_hash=None, is_admin=False, disabled=False,
                created_at=NOW - timedelta(days=30)).returning(User.id))).scalar_one()
            conversation_id = (await conn.execute(Conversation.__table__.insert().values(
                user_id=user_id, client_id="c", created_at=NOW - timedelta(days=30),
            ).returning(Conversation.id))).scalar_one()
            for _ in range(200):
                agent, model = rng.choice(AGENTS[: 2 + n % 2])
                asked = NOW - timedelta(minutes=rng.randrange(6 * 24 * 60))
                status = rng.choices(["ok", "error", "cancelled"], [90, 6, 4])[0]
                latency = float(rng.randrange(50, 3000) // 7 * 7)  # ties on purpose
                ttft = None if status == "error" or rng.random() < 0.1 else float(
                    rng.randrange(1, 400))
                question = (await conn.execute(Message.__table__.insert().values(
                    conversation_id=conversation_id, user_id=user_id, role="user",
                    content="q", status="ok", created_at=asked).returning(Message.id))).scalar_one()
                row = {"user": f"u{n}", "agent": agent, "model": model, "status": status,
                       "latency_ms": latency, "ttft_ms": ttft,
                       "created_at": asked + timedelta(milliseconds=latency)}
                await conn.execute(Message.__table__.insert().values(
                    conversation_id=conversation_id, user_id=user_id, role="assistant",
                    content="a", reply_to_id=question, status=status, agent=agent, model=model,
                    latency_ms=latency, ttft_ms=ttft, created_at=row["created_at"]))
                rows.append(row)
    return rows


def expected(rows, **match) -> dict:
    chosen = [r for r in rows if r["status"] == "ok"
              and all(r[k] == v for k, v in match.items() if k not in ("since",))
              and r["created_at"] >= match.get("since", datetime.min)]
    p50, p95 = reference([r["latency_ms"] for r in chosen])
    t50, t95 = reference([r["ttft_ms"] for r in chosen])
    return {"latency_p50_ms": p50, "latency_p95_ms": p95, "ttft_p50_ms": t50, "ttft_p95_ms": t95}


def percentiles_of(row: dict) -> dict:
    return {k: row[k] for k in ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms")}


def close(found: dict, wanted: dict) -> bool:
    return found.keys() == wanted.keys() and all(
        (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-6)
        for a, b in ((found[k], wanted[k]) for k in found))


@pytest.mark.gen_test(timeout=60)
async def test_percentiles_match_the_python_reference(store):
    rows = await load_random_replies(store.engine)

    async def run(name, **filters):
        return (await run_report(store.engine, name, make_filters(now=NOW, **filters),
                                 now=NOW)).as_json()

    assert close(percentiles_of((await run("summary"))["summary"]), expected(rows))
    since = NOW - timedelta(hours=50)  # a partial day at the start
    assert close(percentiles_of((await run("summary", since="50h"))["summary"]),
                 expected(rows, since=since))
    assert close(percentiles_of((await run("summary", user="u1"))["summary"]),
                 expected(rows, user="u1"))
    assert close(percentiles_of((await run("summary", agent="openai"))["summary"]),
                 expected(rows, agent="openai"))
    for row in (await run("agents"))["agents"]:
        assert close(percentiles_of(row), expected(rows, agent=row["agent"], model=row["model"]))
    for row in (await run("agents", user="u0", since="3d"))["agents"]:
        assert close(percentiles_of(row), expected(
            rows, agent=row["agent"], model=row["model"], user="u0",
            since=NOW - timedelta(days=3)))
    for row in (await run("daily"))["daily"]:
        day = [r for r in rows if r["created_at"].date() == row["day"]]
        assert close(percentiles_of(row), expected(day)), row["day"]


# Retention


@pytest.mark.gen_test(timeout=60)
async def test_purge_deletes_old_transcripts_and_keeps_the_rollups(store):
    await load_chats(store.engine)
    before = await run_report(store.engine, "users", make_filters(), now=NOW)
    result = await purge(store.engine, retention_days=2, now=NOW)
    # Everything before 10-08 00:00: c1's four messages, then c1 itself.
    assert (result.cutoff, result.messages, result.conversations) == (
        datetime(2025, 10, 8), 4, 1)
    async with store.engine.connect() as conn:
        kept = (await conn.execute(select(func.min(Message.created_at)))).scalar()
        assert kept >= datetime(2025, 10, 8)
        assert (await conn.execute(select(func.count()).select_from(daily))).scalar() > 0
        purged = (await conn.execute(select(rollup_days.c.day).where(
            rollup_days.c.purged_at.is_not(None)))).scalars().all()
        assert [d.isoformat() for d in purged] == ["2025-10-07"]
    after = await run_report(store.engine, "users", make_filters(), now=NOW)
    assert after.as_json() == before.as_json()  # counts come from the rollups
    summary = (await run_report(store.engine, "summary", make_filters(), now=NOW)).as_json()
    assert summary["summary"]["user_messages"] == 9
    # Percentiles only see the kept replies: 300, 400, 500.
    assert summary["summary"]["latency_p50_ms"] == pytest.approx(400.0)
    longest = (await run_report(store.engine, "conversations", make_filters(),
                                now=NOW)).as_json()["longest"]
    assert {row["client_id"] for row in longest} == {"chat-2", "chat-3", "chat-4", None}


@pytest.mark.gen_test(timeout=60)
async def test_purge_keeps_a_reply_whose_question_it_deleted(store):
    await load_chats(store.engine)
    result = await purge(store.engine, retention_days=1, now=NOW)
    assert result.messages == 9  # m1..m9; m10 (10-09 00:00:05) stays, its question gone
    async with store.engine.connect() as conn:
        orphan = (await conn.execute(select(Message.reply_to_id, Message.latency_ms).where(
            Message.created_at < datetime(2025, 10, 9, 1)))).all()
    assert [tuple(r) for r in orphan] == [(None, 400.0)]
    summary = (await run_report(store.engine, "summary", make_filters(), now=NOW)).as_json()
    assert (summary["summary"]["user_messages"], summary["summary"]["replies"]) == (9, 8)


@pytest.mark.gen_test(timeout=60)
async def test_the_service_task_rolls_up_and_purges(store):
    await load_chats(store.engine)
    task = AnalyticsTask(store.engine, retention_days=3650, interval=3600)
    await task.run_once()  # nothing is that old: rolls up, deletes nothing
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Message))).scalar() == 17
        assert (await conn.execute(select(func.count()).select_from(rollup_days))).scalar() >= 4
    task.retention_days = 1  # now everything before yesterday goes
    await task.run_once()
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Message))).scalar() == 0
        assert (await conn.execute(select(func.count()).select_from(daily))).scalar() > 0


# Migration 0003 and the chat_turns view


@pytest.mark.gen_test(timeout=60)
async def test_migration_0003_up_and_down_keeps_the_messages(store):
    engine = store.engine
    await upgrade(engine, "0002")
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO users (id, username, is_admin, disabled, created_at) "
            "VALUES (1, 'old', false, false, '2025-01-01 00:00:00')"))
        await conn.execute(text(
            "INSERT INTO conversations (id, user_id, client_id, created_at) "
            "VALUES (1, 1, 'c', '2025-01-01 00:00:00')"))
        await conn.execute(text(
            "INSERT INTO messages (id, conversation_id, user_id, role, content, status, "
            "created_at) VALUES (1, 1, 1, 'user', 'kept', 'ok', '2025-01-01 00:00:01')"))
    await upgrade(engine)
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
    await upgrade(engine)
    assert await current_revision(engine) == "0003"


@pytest.mark.gen_test
async def test_chat_turns_joins_each_question_to_its_reply(store):
    await load_chats(store.engine)
    async with store.engine.connect() as conn:
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
async def test_the_readme_queries_run_on_both_databases(store):
    await load_chats(store.engine)
    queries = readme_queries()
    assert len(queries) == 3
    async with store.engine.connect() as conn:
        for query in queries:
            assert (await conn.execute(text(query))).all(), query


# The generator


@pytest.mark.gen_test(timeout=120)
async def test_the_generator_fills_an_empty_database(store, any_db_url):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate_chats
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    await generate_chats.generate(generate_chats.build_parser().parse_args(
        ["--url", any_db_url, "--messages", "3000", "--users", "20", "--days", "10"]))
    found = (await run_report(store.engine, "summary", make_filters())).as_json()["summary"]
    assert found["messages"] == 3000
    assert found["errors"] > 0 and found["latency_p95_ms"] > found["latency_p50_ms"] > 0
    kinds = (await run_report(store.engine, "errors", make_filters())).as_json()["by_kind"]
    assert {row["kind"] for row in kinds} <= {"local_model", "timeout", "rate_limited",
                                             "upstream", "connection", "bad_reply", "internal"}
