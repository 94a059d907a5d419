"""Analytics reports against hand-computed expectations, on SQLite and PostgreSQL.

A small fixed data set (``CHATS`` below: two users, four conversations, two
agents, an error of each kind, a cancelled reply, an unanswered message, an
exchange across midnight) is loaded, and every report is compared with figures
worked out by hand in the comments. The same reports are then computed with
and without rollups and must agree. Elsewhere: test_analytics_percentiles.py
(the percentiles against a Python reference), test_analytics_retention.py,
test_chat_turns.py (the view and its migration), test_generate_chats.py, and
test_analytics_api.py (the HTTP API and the CLI).
"""

from __future__ import annotations

import json
from datetime import date, datetime

import pytest
from sqlalchemy import delete, func, select

from tornado_app.analytics import make_filters, run_report
from tornado_app.analytics.render import render
from tornado_app.analytics.rollup import daily, daily_percentiles, roll_up, rollup_days
from tornado_app.store.models import Conversation, Message, User
from tornado_app.store.schema import ensure_schema

NOW = datetime(2025, 10, 10, 12, 0)  # "now" for these tests: 10-07..10-09 roll up, 10-10 not
A = ("openai", "gpt-x")
B = ("echo", "echo")


def at(day: int, hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2025, 10, day, hour, minute, second)


def reply(status, agent, latency, ttft, tokens_in, tokens_out, kind=None, ref=None) -> dict:
    return {"status": status, "agent": agent[0], "model": agent[1], "latency_ms": latency,
            "ttft_ms": ttft, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "error_kind": kind, "error_ref": ref, "cost": price(agent, tokens_in, tokens_out)}


def price(agent, tokens_in, tokens_out) -> float | None:
    """openai is priced at 1/256 per token in and 2/256 per token out (binary
    fractions: sums are exact in any order); echo has no price (NULL)."""
    return (tokens_in + 2 * tokens_out) / 256 if agent == A else None


CONVERSATIONS = {  # name: (user, client_id, created_at)
    "c1": ("alice", "chat-1", at(7, 9, 59)),
    "c2": ("alice", "chat-2", at(8, 8, 59)),
    "c3": ("bob", "chat-3", at(8, 23, 59)),
    "c4": ("bob", "chat-4", at(10, 8, 59)),
}
# (conversation, time, reply or None for a user message). A reply answers
# the user message before it in the same conversation.
CHATS = [
    ("c1", at(7, 10, 0), None),                                              # m1
    ("c1", at(7, 10, 0, 2), reply("ok", A, 100.0, 10.0, 10, 20)),             # m2
    ("c1", at(7, 10, 5), None),                                              # m3
    ("c1", at(7, 10, 5, 3), reply("ok", A, 200.0, 20.0, 30, 40)),             # m4
    ("c2", at(8, 9, 0), None),                                               # m5
    ("c2", at(8, 9, 0, 5), reply("error", A, 5000.0, None, 5, 0, "timeout", "aaaa1111")),
    ("c2", at(8, 9, 10), None),                                              # m7
    ("c2", at(8, 9, 10, 1), reply("ok", B, 300.0, 30.0, 1, 2)),               # m8
    ("c3", at(8, 23, 59, 50), None),                                         # m9
    ("c3", at(9, 0, 0, 5), reply("ok", B, 400.0, 40.0, 2, 3)),                # m10: next day
    ("c3", at(10, 8, 0), None),                                              # m11
    ("c3", at(10, 8, 0, 1), reply("cancelled", A, 50.0, 5.0, 3, 1)),         # m12
    ("c3", at(10, 8, 30), None),                                             # m13: unanswered
    ("c4", at(10, 9, 0), None),                                              # m14
    ("c4", at(10, 9, 0, 1), reply("ok", A, 500.0, 50.0, 4, 5)),               # m15
    ("c4", at(10, 9, 5), None),                                              # m16
    ("c4", at(10, 9, 5, 1), reply("error", A, 60.0, None, 6, 0, None, "bbbb2222")),  # no kind
]


async def load_chats(engine) -> dict[str, int]:
    """Create the schema and the data set (users alice, bob, carol); returns ids."""
    await ensure_schema(engine)
    ids: dict[str, int] = {}
    async with engine.begin() as conn:
        for name in ("alice", "bob", "carol"):
            ids[name] = (await conn.execute(User.__table__.insert().values(
                username=name, password_hash=None, is_admin=False, disabled=False,
                created_at=at(1, 0, 0)).returning(User.id))).scalar_one()
        for name, (user, client_id, created) in CONVERSATIONS.items():
            ids[name] = (await conn.execute(Conversation.__table__.insert().values(
                user_id=ids[user], client_id=client_id, created_at=created,
            ).returning(Conversation.id))).scalar_one()
        last_question: dict[str, int] = {}
        for conversation, created, fields in CHATS:
            values = {"conversation_id": ids[conversation], "created_at": created,
                      "user_id": ids[CONVERSATIONS[conversation][0]], "content": "text"}
            if fields is None:
                values.update(role="user", status="ok")
            else:
                values.update(role="assistant", reply_to_id=last_question[conversation],
                              **fields)
            new_id = (await conn.execute(
                Message.__table__.insert().values(**values).returning(Message.id))).scalar_one()
            if fields is None:
                last_question[conversation] = new_id
    return ids


@pytest.fixture
def engine(io_loop, db_store):
    io_loop.run_sync(lambda: load_chats(db_store.engine))
    return db_store.engine


async def report(engine, name, **filters) -> dict:
    """The report as its JSON text reads (what the API and --format json give)."""
    found = await run_report(engine, name, make_filters(now=NOW, **filters), now=NOW)
    return json.loads(render(found, "json"))


def approx(expected: dict) -> dict:
    return {key: pytest.approx(value) if isinstance(value, float) else value
            for key, value in expected.items()}


# Every report, everything in range

SUMMARY = {
    "users": 2, "conversations": 4, "messages": 17, "user_messages": 9, "replies": 8,
    "errors": 2, "cancelled": 1, "error_rate": 0.25, "tokens_in": 61, "tokens_out": 71,
    # openai's m2 m4 m6 m12 m15 m17: 50 + 110 + 5 + 5 + 14 + 6 = 190 (/256).
    "cost": 190 / 256,
    # Successful replies: latencies 100, 200, 300, 400, 500; TTFT 10..50.
    # p95: h = 4 * 0.95 = 3.8, so 400 + 0.8 * (500 - 400) = 480.
    "latency_avg_ms": 300.0, "latency_p50_ms": 300.0, "latency_p95_ms": 480.0,
    "ttft_p50_ms": 30.0, "ttft_p95_ms": 48.0,
    "first_at": "2025-10-07T10:00:00.000000", "last_at": "2025-10-10T09:05:01.000000",
}


@pytest.mark.gen_test
async def test_summary(engine):
    body = await report(engine, "summary")
    assert body["summary"] == approx(SUMMARY)
    assert body["filters"] == {"since": None, "until": None, "user": None, "agent": None,
                               "limit": 20}


@pytest.mark.gen_test
async def test_users(engine):
    rows = (await report(engine, "users"))["users"]
    # Most user messages first; carol sent none and is not listed.
    assert [row["username"] for row in rows] == ["bob", "alice"]
    bob, alice = rows
    assert bob == approx({
        "username": "bob", "conversations": 2, "messages": 9, "user_messages": 5, "replies": 4,
        "errors": 1, "error_rate": 0.25, "tokens_in": 15, "tokens_out": 9, "cost": 25 / 256,
        "latency_avg_ms": 450.0, "first_at": "2025-10-08T23:59:50.000000",
        "last_at": "2025-10-10T09:05:01.000000"})
    assert alice == approx({
        "username": "alice", "conversations": 2, "messages": 8, "user_messages": 4,
        "replies": 4, "errors": 1, "error_rate": 0.25, "tokens_in": 46, "tokens_out": 62,
        "cost": 165 / 256, "latency_avg_ms": 200.0, "first_at": "2025-10-07T10:00:00.000000",
        "last_at": "2025-10-08T09:10:01.000000"})


@pytest.mark.gen_test
async def test_users_limit(engine):
    rows = (await report(engine, "users", limit=1))["users"]
    assert [row["username"] for row in rows] == ["bob"]


DAILY = [
    # day, users, conversations, messages, user_messages, replies, errors, error_rate,
    # tokens in, tokens out, cost (/256), latency p50, p95, TTFT p50, p95
    ("2025-10-07", 1, 1, 4, 2, 2, 0, 0.0, 40, 60, 160 / 256, 150.0, 195.0, 15.0, 19.5),
    # m9 (23:59:50) is on the 8th, its reply m10 on the 9th.
    ("2025-10-08", 2, 2, 5, 3, 2, 1, 0.5, 6, 2, 5 / 256, 300.0, 300.0, 30.0, 30.0),
    ("2025-10-09", 1, 1, 1, 0, 1, 0, 0.0, 2, 3, 0.0, 400.0, 400.0, 40.0, 40.0),
    # Today: not rolled up, computed from the messages.
    ("2025-10-10", 1, 2, 7, 4, 3, 1, 1 / 3, 13, 6, 25 / 256, 500.0, 500.0, 50.0, 50.0),
]
DAILY_KEYS = ("day", "users", "conversations", "messages", "user_messages", "replies",
              "errors", "error_rate", "tokens_in", "tokens_out", "cost", "latency_p50_ms",
              "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms")


@pytest.mark.gen_test
async def test_daily(engine):
    rows = (await report(engine, "daily"))["daily"]
    assert rows == [approx(dict(zip(DAILY_KEYS, expected))) for expected in DAILY]


@pytest.mark.gen_test
async def test_agents(engine):
    rows = (await report(engine, "agents"))["agents"]
    assert rows == [
        # openai: 6 replies (m2 m4 m6 m12 m15 m17); ok latencies 100, 200, 500:
        # p95 h = 1.9 -> 200 + 0.9 * 300 = 470; TTFT 10, 20, 50 -> 47.
        approx({"agent": "openai", "model": "gpt-x", "users": 2, "conversations": 4,
                "replies": 6, "errors": 2, "cancelled": 1, "error_rate": 2 / 6,
                "tokens_in": 58, "tokens_out": 66, "cost": 190 / 256, "latency_avg_ms": 800 / 3,
                "latency_p50_ms": 200.0, "latency_p95_ms": 470.0, "ttft_p50_ms": 20.0,
                "ttft_p95_ms": 47.0}),
        # echo: m8 and m10; latencies 300, 400.
        approx({"agent": "echo", "model": "echo", "users": 2, "conversations": 2,
                "replies": 2, "errors": 0, "cancelled": 0, "error_rate": 0.0,
                "tokens_in": 3, "tokens_out": 5, "cost": 0.0, "latency_avg_ms": 350.0,
                "latency_p50_ms": 350.0, "latency_p95_ms": 395.0, "ttft_p50_ms": 35.0,
                "ttft_p95_ms": 39.5}),
    ]


@pytest.mark.gen_test
async def test_conversations(engine):
    body = await report(engine, "conversations")
    # c3 has 5 messages; the others 4 each, latest activity first among equals.
    assert [row["client_id"] for row in body["longest"]] == ["chat-3", "chat-4", "chat-2",
                                                             "chat-1"]
    assert [row["client_id"] for row in body["recent"]] == ["chat-4", "chat-3", "chat-2",
                                                            "chat-1"]
    chat3 = body["longest"][0]
    assert chat3 == {
        "conversation_id": chat3["conversation_id"], "client_id": "chat-3", "username": "bob",
        "messages": 5, "user_messages": 3, "replies": 2, "errors": 0, "tokens_in": 5,
        "tokens_out": 4, "first_at": "2025-10-08T23:59:50.000000",
        "last_at": "2025-10-10T08:30:00.000000"}
    limited = await report(engine, "conversations", limit=1)
    assert [r["client_id"] for r in limited["longest"] + limited["recent"]] == ["chat-3",
                                                                               "chat-4"]


@pytest.mark.gen_test
async def test_errors(engine):
    body = await report(engine, "errors")
    assert body["by_kind"] == [
        {"kind": "timeout", "errors": 1, "share": 0.5, "last_at": "2025-10-08T09:00:05.000000"},
        {"kind": "unknown", "errors": 1, "share": 0.5, "last_at": "2025-10-10T09:05:01.000000"},
    ]
    assert [(r["username"], r["client_id"], r["kind"], r["error_ref"], r["latency_ms"])
            for r in body["recent"]] == [("bob", "chat-4", "unknown", "bbbb2222", 60.0),
                                         ("alice", "chat-2", "timeout", "aaaa1111", 5000.0)]
    assert body["recent"][0]["agent"] == "openai"


# Filters


@pytest.mark.gen_test
async def test_since_until_dates_include_the_until_day(engine):
    summary = (await report(engine, "summary", since="2025-10-08", until="2025-10-09"))["summary"]
    # m5..m10: c2 and c3; latencies 300 (m8) and 400 (m10).
    assert summary == approx({
        **_summary_counts(users=2, conversations=2, user_messages=3, replies=3, errors=1,
                          cancelled=0, tokens_in=8, tokens_out=5, cost=5 / 256),
        "latency_p50_ms": 350.0, "latency_p95_ms": 395.0, "ttft_p50_ms": 35.0,
        "ttft_p95_ms": 39.5, "latency_avg_ms": 350.0,
        "first_at": "2025-10-08T09:00:00.000000", "last_at": "2025-10-09T00:00:05.000000"})


def _summary_counts(**counts) -> dict:
    counts["messages"] = counts["user_messages"] + counts["replies"]
    counts["error_rate"] = counts["errors"] / counts["replies"]
    return counts


@pytest.mark.gen_test
async def test_since_inside_a_day_reads_the_partial_day_from_messages(engine):
    summary = (await report(engine, "summary", since="2025-10-07T10:03:00"))["summary"]
    # m1 and m2 drop out; latencies 200, 300, 400, 500: p95 h = 2.85 -> 485.
    assert summary["user_messages"] == 8 and summary["replies"] == 7
    assert summary["latency_p50_ms"] == pytest.approx(350.0)
    assert summary["latency_p95_ms"] == pytest.approx(485.0)
    daily_rows = (await report(engine, "daily", since="2025-10-07T10:03:00"))["daily"]
    assert daily_rows[0] == approx(dict(zip(DAILY_KEYS, (
        "2025-10-07", 1, 1, 2, 1, 1, 0, 0.0, 30, 40, 110 / 256, 200.0, 200.0, 20.0, 20.0))))


@pytest.mark.gen_test
async def test_relative_since(engine):
    summary = (await report(engine, "summary", since="2d"))["summary"]
    # Since 10-08 12:00: bob's m9 onward.
    assert (summary["users"], summary["user_messages"], summary["replies"]) == (1, 5, 4)
    assert (await report(engine, "summary", since="2d"))["filters"]["since"] == (
        "2025-10-08T12:00:00.000000")


@pytest.mark.gen_test
async def test_user_filter(engine):
    summary = (await report(engine, "summary", user="bob"))["summary"]
    assert summary == approx({
        **_summary_counts(users=1, conversations=2, user_messages=5, replies=4, errors=1,
                          cancelled=1, tokens_in=15, tokens_out=9, cost=25 / 256),
        "latency_avg_ms": 450.0, "latency_p50_ms": 450.0, "latency_p95_ms": 495.0,
        "ttft_p50_ms": 45.0, "ttft_p95_ms": 49.5,
        "first_at": "2025-10-08T23:59:50.000000", "last_at": "2025-10-10T09:05:01.000000"})
    rows = (await report(engine, "daily", user="bob"))["daily"]
    assert [(r["day"], r["messages"], r["latency_p50_ms"]) for r in rows] == [
        ("2025-10-08", 1, None), ("2025-10-09", 1, 400.0), ("2025-10-10", 7, 500.0)]
    agents = (await report(engine, "agents", user="bob"))["agents"]
    assert [(r["agent"], r["replies"], r["latency_p50_ms"]) for r in agents] == [
        ("openai", 3, 500.0), ("echo", 1, 400.0)]
    assert [r["error_ref"] for r in (await report(engine, "errors", user="bob"))["recent"]] == [
        "bbbb2222"]


@pytest.mark.gen_test
async def test_agent_filter_takes_whole_exchanges(engine):
    summary = (await report(engine, "summary", agent="echo"))["summary"]
    # m7 -> m8 and m9 -> m10: the questions count with the agent that answered.
    assert summary == approx({
        **_summary_counts(users=2, conversations=2, user_messages=2, replies=2, errors=0,
                          cancelled=0, tokens_in=3, tokens_out=5, cost=0.0),
        "latency_avg_ms": 350.0, "latency_p50_ms": 350.0, "latency_p95_ms": 395.0,
        "ttft_p50_ms": 35.0, "ttft_p95_ms": 39.5,
        "first_at": "2025-10-08T09:10:00.000000", "last_at": "2025-10-09T00:00:05.000000"})
    rows = (await report(engine, "daily", agent="openai"))["daily"]
    assert [(r["day"], r["replies"], r["latency_p50_ms"]) for r in rows] == [
        ("2025-10-07", 2, 150.0), ("2025-10-08", 1, None), ("2025-10-10", 3, 500.0)]
    assert (await report(engine, "errors", agent="echo"))["by_kind"] == []


@pytest.mark.gen_test
async def test_unknown_user_and_bad_filters(engine):
    from tornado_app.analytics import ReportError, UnknownUser

    with pytest.raises(UnknownUser):
        await report(engine, "summary", user="nobody")
    for bad in ({"since": "yesterday"}, {"until": "2025-13-01"}, {"limit": "0"},
                {"since": "2025-10-09", "until": "2025-10-01"}):
        with pytest.raises(ReportError):
            make_filters(now=NOW, **bad)


@pytest.mark.gen_test
async def test_empty_range(engine):
    body = await report(engine, "summary", since="2024-01-01", until="2024-01-31")
    assert body["summary"]["messages"] == 0
    assert body["summary"]["latency_p50_ms"] is None and body["summary"]["error_rate"] is None
    for name, key in (("users", "users"), ("daily", "daily"), ("agents", "agents"),
                      ("conversations", "longest"), ("errors", "recent")):
        assert (await report(engine, name, since="2024-01-01", until="2024-01-31"))[key] == []


# Rollups


@pytest.mark.gen_test
async def test_rollups_cover_finished_days_only(engine):
    assert await roll_up(engine, NOW) == 3
    assert await roll_up(engine, NOW) == 0  # idempotent
    async with engine.connect() as conn:
        days = (await conn.execute(select(rollup_days.c.day).order_by(rollup_days.c.day)))
        assert list(days.scalars()) == [date(2025, 10, 7), date(2025, 10, 8), date(2025, 10, 9)]
        stored = (await conn.execute(select(daily_percentiles).where(
            daily_percentiles.c.agent == "").order_by(daily_percentiles.c.day))).all()
        assert [(r.day.day, r.latency_count, r.latency_p95_ms) for r in stored] == [
            (7, 2, 195.0), (8, 1, 300.0), (9, 1, 400.0)]


@pytest.mark.gen_test
@pytest.mark.parametrize("name", ["summary", "users", "daily", "agents", "conversations",
                                  "errors", "cost"])
async def test_rollups_give_the_same_answers_as_the_messages(engine, name):
    ranges = [{}, {"since": "2025-10-08"}, {"since": "2025-10-07T12:00:00", "until": "2025-10-09"},
              {"user": "alice"}, {"agent": "openai"}]
    early = datetime(2025, 10, 7, 0, 0)  # as seen then, nothing is over: all from messages
    from_messages = [render(await run_report(engine, name, make_filters(now=NOW, **r),
                                             now=early), "json") for r in ranges]
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(daily))).scalar() == 0
    rolled = [render(await run_report(engine, name, make_filters(now=NOW, **r), now=NOW), "json")
              for r in ranges]
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(daily))).scalar() > 0
    assert rolled == from_messages


@pytest.mark.gen_test
async def test_a_deleted_user_takes_their_rollups_along(engine):
    await roll_up(engine, NOW)
    async with engine.begin() as conn:
        await conn.execute(delete(User.__table__).where(User.__table__.c.username == "alice"))
    summary = (await report(engine, "summary"))["summary"]
    assert (summary["users"], summary["user_messages"], summary["replies"]) == (1, 5, 4)
