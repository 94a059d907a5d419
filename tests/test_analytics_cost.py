"""Cost in analytics, on SQLite and PostgreSQL: the ``cost`` report from the
facts (rollups carry cost), cost in the export with its full digits, cost
after a purge, and migration 0009 (analytics_daily gains cost; rollups made
before it are redone). The data set is test_analytics.py's: openai replies
priced at (tokens_in + 2 tokens_out) / 256, echo unpriced. Cost in summary,
users, daily and agents is checked there, with every other figure.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime

import pytest
from sqlalchemy import func, select, text

from tornado_app.analytics import export_lines, make_filters, purge, run_report
from tornado_app.analytics.render import render
from tornado_app.analytics.rollup import daily, rollup_days

from .helpers import seed_old_schema
from .test_analytics import NOW, load_chats


@pytest.fixture
def engine(io_loop, db_store):
    io_loop.run_sync(lambda: load_chats(db_store.engine))
    return db_store.engine


async def cost_report(engine, now=NOW, **filters) -> dict:
    found = await run_report(engine, "cost", make_filters(now=NOW, **filters), now=now)
    return json.loads(render(found, "json"))


BY_DAY = [  # day, user, agent, model, replies, tokens in, tokens out, cost
    ("2025-10-07", "alice", "openai", "gpt-x", 2, 40, 60, 160 / 256),  # m2 m4
    ("2025-10-08", "alice", "echo", "echo", 1, 1, 2, 0.0),  # m8: unpriced
    ("2025-10-08", "alice", "openai", "gpt-x", 1, 5, 0, 5 / 256),  # m6, failed: still spent
    # bob's m9 (the 8th) has its reply on the 9th: no row of its own on the 8th.
    ("2025-10-09", "bob", "echo", "echo", 1, 2, 3, 0.0),  # m10
    ("2025-10-10", "bob", "openai", "gpt-x", 3, 13, 6, 25 / 256),  # m12 m15 m17
]
COST_KEYS = ("day", "username", "agent", "model", "replies", "tokens_in", "tokens_out", "cost")


@pytest.mark.gen_test
async def test_the_cost_report_per_day_user_and_model(engine):
    body = await cost_report(engine)
    assert body["totals"] == {"replies": 8, "tokens_in": 61, "tokens_out": 71,
                              "cost": 190 / 256, "unpriced_replies": 2}
    assert body["by_day"] == [dict(zip(COST_KEYS, row)) for row in BY_DAY]
    assert body["unpriced"] == [{"agent": "echo", "model": "echo", "replies": 2,
                                 "tokens_in": 3, "tokens_out": 5}]
    bob = await cost_report(engine, user="bob", since="2025-10-10")
    assert (bob["totals"]["cost"], bob["totals"]["unpriced_replies"]) == (25 / 256, 0)
    echo = await cost_report(engine, agent="echo")
    assert (echo["totals"]["replies"], echo["totals"]["cost"]) == (2, 0.0)


@pytest.mark.gen_test
async def test_the_cost_report_reads_the_rollups_for_finished_days(engine):
    early = datetime(2025, 10, 7, 0, 0)  # nothing is over yet: all from the messages
    from_messages = await cost_report(engine, now=early)
    assert (await count(engine, daily)) == 0
    rolled = await cost_report(engine)
    async with engine.connect() as conn:
        stored = (await conn.execute(select(func.sum(daily.c.cost),
                                            func.sum(daily.c.unpriced_replies)))).one()
    # 10-07 .. 10-09 are rolled up: 160 + 5 (/256), and echo's m8 and m10.
    assert (stored[0], stored[1]) == (165 / 256, 2)
    assert rolled == from_messages


async def count(engine, table) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(table))).scalar()


@pytest.mark.gen_test
async def test_purged_replies_still_count_in_cost(engine):
    await purge(engine, 1, now=datetime(2025, 10, 20))  # every message is older
    body = await cost_report(engine, now=datetime(2025, 10, 20))
    assert body["totals"]["cost"] == 190 / 256
    assert body["unpriced"][0]["replies"] == 2
    summary = await run_report(engine, "summary", make_filters(), now=datetime(2025, 10, 20))
    assert summary.as_json()["summary"]["cost"] == 190 / 256


@pytest.mark.gen_test
async def test_the_export_carries_each_replys_cost_with_its_digits(engine):
    text_csv = "".join([line async for line in export_lines(engine, make_filters(), "csv")])
    rows = list(csv.DictReader(io.StringIO(text_csv)))
    # m6 (5/256 = 0.01953125) keeps all eight decimals; echo and questions: empty.
    assert [row["cost"] for row in rows[:8]] == [
        "", "0.1953125", "", "0.4296875", "", "0.01953125", "", ""]
    lines = [json.loads(line) async for chunk in export_lines(engine, make_filters(), "json")
             for line in chunk.splitlines()]
    assert [line["cost"] for line in lines if line["agent"] == "openai"] == [
        50 / 256, 110 / 256, 5 / 256, 5 / 256, 14 / 256, 6 / 256]


@pytest.mark.gen_test
async def test_report_formats_show_cost(engine):
    found = await run_report(engine, "users", make_filters(), now=NOW)
    table = render(found, "table").splitlines()
    assert "COST" in table[0].split()
    assert "0.644531" in table[2]  # alice: 165/256, money() keeps six decimals at most
    rows = list(csv.DictReader(io.StringIO(render(found, "csv"))))
    assert [(row["username"], row["cost"]) for row in rows] == [
        ("bob", "0.09765625"), ("alice", "0.64453125")]


# Migration 0009


@pytest.mark.gen_test(timeout=60)
async def test_migration_0009_redoes_the_rollups_that_have_their_messages(db_store):
    from sqlalchemy import inspect

    from tornado_app.store.schema import downgrade, upgrade

    engine = db_store.engine
    await upgrade(engine, "0008")
    kept, purged = date(2025, 1, 1), date(2025, 1, 2)
    async with engine.begin() as conn:
        await seed_old_schema(conn, "alice")
        for row_id, role, cost in ((1, "user", None), (2, "assistant", 0.25)):
            await conn.execute(text(
                "INSERT INTO messages (id, public_id, conversation_id, user_id, role, content,"
                " status, reply_to_id, agent, model, tokens_in, tokens_out, cost, created_at)"
                " VALUES (:id, :pid, 1, 1, :role, 'x', 'ok', :to, :agent, 'm', 1, 1, :cost,"
                " :at)"),
                {"id": row_id, "pid": f"p{row_id}", "role": role, "cost": cost,
                 "to": 1 if cost else None, "agent": "openai" if cost else None,
                 "at": datetime(2025, 1, 1, 12, row_id)})
        for day, purged_at in ((kept, None), (purged, datetime(2025, 2, 1))):
            await conn.execute(text(
                "INSERT INTO analytics_daily (day, conversation_id, agent, model, user_id,"
                " user_messages, replies, errors, cancelled, tokens_in, tokens_out,"
                " latency_ms_sum, latency_count, ttft_ms_sum, ttft_count, first_at, last_at)"
                " VALUES (:day, 1, 'openai', 'm', 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, :at, :at)"),
                {"day": day, "at": datetime(2025, 1, 1, 12)})
            await conn.execute(text(
                "INSERT INTO analytics_rollup_days (day, rolled_at, purged_at)"
                " VALUES (:day, :at, :purged_at)"),
                {"day": day, "at": datetime(2025, 1, 3), "purged_at": purged_at})
    await upgrade(engine, "0009")
    async with engine.connect() as conn:
        left = (await conn.execute(select(daily.c.day, daily.c.cost))).all()
        claims = (await conn.execute(select(rollup_days.c.day))).scalars().all()
    assert [tuple(row) for row in left] == [(purged, 0.0)]  # its messages are gone
    assert claims == [purged]
    body = await cost_report(engine, now=datetime(2025, 3, 1))  # rolls 2025-01-01 up again
    assert body["totals"]["cost"] == 0.25
    async with engine.connect() as conn:
        redone = (await conn.execute(select(daily.c.cost).where(daily.c.day == kept))).scalar()
    assert redone == 0.25
    await downgrade(engine, "0008")
    async with engine.connect() as conn:
        columns = await conn.run_sync(
            lambda sync: {c["name"] for c in inspect(sync).get_columns("analytics_daily")})
    assert not {"cost", "unpriced_replies", "unpriced_tokens_in"} & columns


@pytest.mark.gen_test
async def test_reports_run_without_jit_on_postgresql(engine, monkeypatch):
    """Compiling the facts' per-message subqueries cost ~1 s a query (docs/analytics.md)."""
    from tornado_app.analytics import reports

    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's JIT")

    async def jit_setting(ctx):
        value = (await ctx.conn.exec_driver_sql("SHOW jit")).scalar()
        return [reports.Section("jit", ("jit",), [{"jit": value}], single=True)]

    monkeypatch.setitem(reports.REPORTS, "jit", jit_setting)
    found = await run_report(engine, "jit", make_filters(), now=NOW)
    assert found.as_json()["jit"] == {"jit": "off"}
