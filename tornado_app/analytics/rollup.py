"""Daily rollups, and the "facts" every report aggregates.

A fact is one row per (UTC day, conversation, agent, model) with additive
counters: messages, replies, errors, tokens, latency sums, cost. The rollup table
``analytics_daily`` holds them for finished days; for everything else (today,
yesterday within the grace period, the partial days at the edges of a range)
the same row is computed from the messages on the fly. A report reads the
union of both, so a 90-day report reads ~one row per conversation-day instead
of every message, and the answer is the same as from the raw rows.

Nothing is written on the message path. A day is rolled up once it is over
(plus a grace period for replies committed just after midnight), by the
service's periodic task or by the first report that finds it missing; a
claim row in ``analytics_rollup_days`` makes that safe when several processes
try at once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from sqlalchemy import (
    Date,
    and_,
    case,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..store.models import DailyPercentiles, DailyRollup, Message, RollupDay, utcnow
from ..store.dialects import dialect_insert
from .percentiles import METRICS, summarize

logger = logging.getLogger(__name__)

DAY = timedelta(days=1)
# A day is rolled up this long after it ends: a reply timed just before
# midnight may be committed a little after it.
GRACE = timedelta(minutes=10)

messages = Message.__table__
daily = DailyRollup.__table__
daily_percentiles = DailyPercentiles.__table__
rollup_days = RollupDay.__table__

FACT_COLUMNS = (
    "day", "conversation_id", "user_id", "agent", "model", "user_messages", "replies", "errors",
    "cancelled", "tokens_in", "tokens_out", "latency_ms_sum", "latency_count", "ttft_ms_sum",
    "ttft_count", "regenerated", "first_at", "last_at", "cost", "unpriced_replies",
    "unpriced_tokens_in", "unpriced_tokens_out",
)

Window = tuple[datetime | None, datetime | None]  # [start, end) of raw rows
Block = tuple[date, date]  # [first day, end day) read from the rollups


def midnight(day: date) -> datetime:
    return datetime.combine(day, time())


def constant(value: str):
    # Constants as literals: PostgreSQL only matches a GROUP BY expression to
    # the SELECT one when they are spelled alike, and parameters never are.
    return literal_column(f"'{value}'")


def in_windows(column, windows: list[Window]):
    clauses = []
    for start, end in windows:
        parts = []
        if start is not None:
            parts.append(column >= start)
        if end is not None:
            parts.append(column < end)
        clauses.append(and_(*parts) if parts else column.is_not(None))
    return or_(*clauses) if clauses else false()


def first_reply(m):
    """The id of the first reply to user message ``m`` (a correlated subquery):
    a message counts once, under the agent of its first reply, however many
    times it was regenerated."""
    other = messages.alias("first")
    return (select(func.min(other.c.id))
            .where(other.c.reply_to_id == m.c.id, other.c.role == constant("assistant"))
            .correlate(m).scalar_subquery())


def _of_first_reply(m, column: str):
    reply = messages.alias(f"r_{column}")
    return select(reply.c[column]).where(reply.c.id == first_reply(m)).scalar_subquery()


def raw_facts(windows: list[Window], user_id: int | None = None):
    """Fact rows computed from the messages inside ``windows``."""
    m = messages.alias("m")
    is_user = m.c.role == constant("user")
    is_reply = m.c.role == constant("assistant")
    ok_reply = and_(is_reply, m.c.status == constant("ok"))
    # A reply by an agent whose model had no price when it was saved.
    unpriced = and_(is_reply, m.c.agent.is_not(None), m.c.cost.is_(None))
    # A user message belongs to the agent that answered it. Read by scalar
    # subqueries (an index lookup each, for user messages only), not by a join:
    # PostgreSQL hashes the whole messages table for such a join.
    agent = func.coalesce(case((is_user, _of_first_reply(m, "agent")), else_=m.c.agent),
                          constant(""))
    model = func.coalesce(case((is_user, _of_first_reply(m, "model")), else_=m.c.model),
                          constant(""))

    def count_if(condition):
        return func.sum(case((condition, literal_column("1")), else_=literal_column("0")))

    query = (
        select(
            func.date(m.c.created_at, type_=Date).label("day"),
            m.c.conversation_id,
            m.c.user_id,
            agent.label("agent"),
            model.label("model"),
            count_if(is_user).label("user_messages"),
            count_if(is_reply).label("replies"),
            count_if(and_(is_reply, m.c.status == constant("error"))).label("errors"),
            count_if(and_(is_reply, m.c.status == constant("cancelled"))).label("cancelled"),
            func.coalesce(func.sum(m.c.tokens_in), literal_column("0")).label("tokens_in"),
            func.coalesce(func.sum(m.c.tokens_out), literal_column("0")).label("tokens_out"),
            func.coalesce(func.sum(case((ok_reply, m.c.latency_ms))),
                          literal_column("0.0")).label("latency_ms_sum"),
            func.count(case((ok_reply, m.c.latency_ms))).label("latency_count"),
            func.coalesce(func.sum(case((ok_reply, m.c.ttft_ms))),
                          literal_column("0.0")).label("ttft_ms_sum"),
            func.count(case((ok_reply, m.c.ttft_ms))).label("ttft_count"),
            count_if(and_(is_reply, m.c.regenerated.is_(True))).label("regenerated"),
            func.min(m.c.created_at).label("first_at"),
            func.max(m.c.created_at).label("last_at"),
            func.coalesce(func.sum(m.c.cost), literal_column("0.0")).label("cost"),
            count_if(unpriced).label("unpriced_replies"),
            func.coalesce(func.sum(case((unpriced, m.c.tokens_in))),
                          literal_column("0")).label("unpriced_tokens_in"),
            func.coalesce(func.sum(case((unpriced, m.c.tokens_out))),
                          literal_column("0")).label("unpriced_tokens_out"),
        )
        .select_from(m)
        .where(in_windows(m.c.created_at, windows))
        .group_by(literal_column("1"), literal_column("2"), literal_column("3"),
                  literal_column("4"), literal_column("5"))
    )
    if user_id is not None:
        query = query.where(m.c.user_id == user_id)
    return query


def rolled_facts(blocks: list[Block], user_id: int | None = None):
    """Fact rows read from the rollups of the days in ``blocks``."""
    query = select(*(daily.c[name] for name in FACT_COLUMNS)).where(
        or_(*(and_(daily.c.day >= first, daily.c.day < end) for first, end in blocks))
    )
    if user_id is not None:
        query = query.where(daily.c.user_id == user_id)
    return query


@dataclass(frozen=True)
class Plan:
    blocks: list[Block]  # read from the rollups
    windows: list[Window]  # computed from the messages
    purged: bool  # some rolled-up day in range has had its messages purged


async def plan(conn: AsyncConnection, since: datetime | None, until: datetime | None) -> Plan:
    """Split [since, until) into rolled-up whole days and raw windows around them."""
    # Whole days: from the first midnight at or after since, to the day of until.
    first = None if since is None else (since + DAY - timedelta(microseconds=1)).date()
    end = None if until is None else until.date()
    query = select(rollup_days.c.day, rollup_days.c.purged_at).order_by(rollup_days.c.day)
    if first is not None:
        query = query.where(rollup_days.c.day >= first)
    if end is not None:
        query = query.where(rollup_days.c.day < end)
    blocks: list[Block] = []
    purged = False
    for day, purged_at in await conn.execute(query):
        purged = purged or purged_at is not None
        if blocks and blocks[-1][1] == day:
            blocks[-1] = (blocks[-1][0], day + DAY)
        else:
            blocks.append((day, day + DAY))
    windows: list[Window] = []
    cursor = since
    for block_first, block_end in blocks:
        if cursor is None or cursor < midnight(block_first):
            windows.append((cursor, midnight(block_first)))
        cursor = midnight(block_end)
    if until is None or cursor is None or cursor < until:
        windows.append((cursor, until))
    return Plan(blocks, windows, purged)


async def facts(conn: AsyncConnection, since, until, user_id=None, agent=None):
    """The fact rows of a range as a subquery (rollups + raw rows), and its plan."""
    found = await plan(conn, since, until)
    parts = [raw_facts(found.windows, user_id)]
    if found.blocks:
        parts.insert(0, rolled_facts(found.blocks, user_id))
    subquery = union_all(*parts).subquery("facts")
    if agent is not None:
        subquery = select(subquery).where(subquery.c.agent == agent).subquery("agent_facts")
    return subquery, found


# Rolling up


async def roll_up(engine: AsyncEngine, now: datetime | None = None) -> int:
    """Roll up every finished day that is not yet; returns how many were."""
    last = ((now or utcnow()) - GRACE).date()  # days before this one are over
    async with engine.connect() as conn:
        oldest = (await conn.execute(select(func.min(messages.c.created_at)))).scalar()
        if oldest is None:
            return 0
        done = set((await conn.execute(
            select(rollup_days.c.day).where(rollup_days.c.day >= oldest.date(),
                                            rollup_days.c.day < last)
        )).scalars())
    rolled = 0
    day = oldest.date()
    while day < last:
        if day in done:
            day += DAY
            continue
        busy = await _next_day_with_messages(engine, day, last)
        if busy > day:  # days without messages: only their markers, in one go
            rolled += await _mark_empty_days(engine, day, busy, done)
            day = busy
            continue
        rolled += await roll_up_day(engine, day)
        day += DAY
    if rolled:
        logger.info("analytics: rolled up %d day(s)", rolled)
        await _refresh_statistics(engine)
    return rolled


async def _next_day_with_messages(engine: AsyncEngine, day: date, last: date) -> date:
    """The first day from ``day`` on that has a message (``last`` if none)."""
    async with engine.connect() as conn:
        found = (await conn.execute(select(func.min(messages.c.created_at)).where(
            messages.c.created_at >= midnight(day)))).scalar()
    return last if found is None else min(found.date(), last)


async def _mark_empty_days(engine: AsyncEngine, first: date, end: date, done: set) -> int:
    days = []
    while first < end:
        if first not in done:
            days.append({"day": first, "rolled_at": utcnow()})
        first += DAY
    if days:
        async with engine.begin() as conn:
            insert_days = dialect_insert(conn.dialect.name)(rollup_days).on_conflict_do_nothing(
                index_elements=["day"])
            await conn.execute(insert_days, days)
    return len(days)


async def _refresh_statistics(engine: AsyncEngine) -> None:
    """PostgreSQL plans the reports' joins from table statistics: fresh rollup
    rows with none (autovacuum has not come by yet) get nested loops over
    tens of thousands of rows. SQLite keeps no statistics unless asked."""
    if engine.dialect.name == "postgresql":
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "ANALYZE analytics_daily, analytics_daily_percentiles, analytics_rollup_days")


async def roll_up_day(engine: AsyncEngine, day: date) -> bool:
    """Write one day's rollups, unless another process has claimed the day."""
    async with engine.begin() as conn:
        claim = dialect_insert(conn.dialect.name)(rollup_days).values(day=day, rolled_at=utcnow())
        result = await conn.execute(claim.on_conflict_do_nothing(index_elements=["day"]))
        if result.rowcount != 1:
            return False
        window = [(midnight(day), midnight(day + DAY))]
        await conn.execute(insert(daily).from_select(FACT_COLUMNS, raw_facts(window)))
        rows = await _day_percentiles(conn, day, window)
        if rows:
            await conn.execute(insert(daily_percentiles), rows)
    return True


async def _day_percentiles(conn: AsyncConnection, day: date, window) -> list[dict]:
    """One row per agent, plus '' for all agents, of the day's successful replies."""
    result = await conn.execute(
        select(messages.c.agent, messages.c.latency_ms, messages.c.ttft_ms).where(
            messages.c.role == constant("assistant"), messages.c.status == constant("ok"),
            in_windows(messages.c.created_at, window))
    )
    by_agent: dict[str, list] = defaultdict(list)
    for agent, latency, ttft in result:
        by_agent[""].append((latency, ttft))
        if agent:
            by_agent[agent].append((latency, ttft))
    rows = []
    for agent, values in by_agent.items():
        row = {"day": day, "agent": agent}
        for position, metric in enumerate(METRICS):
            column = [pair[position] for pair in values]
            row[f"{metric.name}_count"] = sum(v is not None for v in column)
            row.update(summarize(column, metric))
        rows.append(row)
    return rows
