"""Exact percentiles of latency and time to first token, on SQLite and PostgreSQL.

Definition (one, everywhere): linear interpolation between the two closest
ranks, i.e. numpy's default and PostgreSQL's ``percentile_cont``. For n sorted
values v[0..n-1] and a fraction p, with h = (n - 1) * p and k = floor(h):

    P(p) = v[k] + (h - k) * (v[k + 1] - v[k])        (just v[k] when k = n - 1)

Only successful replies count (status ``ok``): a timeout or an upstream error
would otherwise mix its own clock into "how fast does it answer".

In SQL, both databases do the same thing: count the values, then read
``LIMIT 2 OFFSET k`` along a partial index of successful replies that is
already in value order (see migration 0003), so nothing is sorted and the
table itself is not read. The queries are written out as SQL because SQLite
must be told which index to walk (``INDEXED BY``): without statistics its
planner would pick the created_at index and sort half a million rows. One
user's replies (``--user``) are instead read by the user index and sorted in
Python, with the same definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import DateTime, text
from sqlalchemy.ext.asyncio import AsyncConnection

from .filters import Filters

FRACTIONS = {"p50": 0.5, "p95": 0.95}


@dataclass(frozen=True)
class Metric:
    name: str  # "latency" or "ttft": report fields are <name>_p50_ms, <name>_p95_ms
    column: str
    index: str  # successful replies in value order
    agent_index: str  # the same, per agent


LATENCY = Metric("latency", "latency_ms", "ix_messages_ok_latency", "ix_messages_ok_agent_latency")
TTFT = Metric("ttft", "ttft_ms", "ix_messages_ok_ttft", "ix_messages_ok_agent_ttft")
METRICS = (LATENCY, TTFT)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The percentile of already sorted values (the definition above)."""
    if not values:
        return None
    h = (len(values) - 1) * fraction
    k = math.floor(h)
    low = values[k]
    if k + 1 == len(values):
        return low
    return low + (h - k) * (values[k + 1] - low)


def summarize(values: Iterable[float | None], metric: Metric) -> dict:
    """``{latency_p50_ms: ..., latency_p95_ms: ...}`` of unsorted values (None skipped)."""
    ordered = sorted(v for v in values if v is not None)
    return {f"{metric.name}_{key}_ms": percentile(ordered, fraction)
            for key, fraction in FRACTIONS.items()}


def empty(metric: Metric) -> dict:
    return {f"{metric.name}_{key}_ms": None for key in FRACTIONS}


def _filter_conditions(filters: Filters) -> tuple[list[str], dict]:
    """SQL conditions and parameters for the filters' time range and agent."""
    where: list[str] = []
    params: dict = {}
    if filters.since is not None:
        where.append("created_at >= :since")
        params["since"] = filters.since
    if filters.until is not None:
        where.append("created_at < :until")
        params["until"] = filters.until
    if filters.agent is not None:
        where.append("agent = :agent")
        params["agent"] = filters.agent
    return where, params


class _Query:
    """The WHERE clause and parameters shared by the count and the offset reads."""

    def __init__(self, metric: Metric, filters: Filters, dialect: str):
        self.metric = metric
        col = metric.column
        # Literal role/status: a partial index is only used when the query
        # repeats its predicate word for word (a bound parameter would not do).
        where, params = _filter_conditions(filters)
        where = ["role = 'assistant'", "status = 'ok'", f"{col} IS NOT NULL", *where]
        self.where, self.params, self.dialect = where, params, dialect

    def sql(self, select: str, extra: Sequence[str] = (), tail: str = "",
            per_agent: bool = False) -> str:
        source = "messages"
        if self.dialect == "sqlite":
            index = self.metric.agent_index if per_agent else self.metric.index
            source = f"messages INDEXED BY {index}"
        conditions = " AND ".join([*self.where, *extra])
        return f"SELECT {select} FROM {source} WHERE {conditions} {tail}"


async def range_percentiles(
    conn: AsyncConnection, metric: Metric, filters: Filters, count: int | None = None
) -> dict:
    """p50 and p95 of ``metric`` over the filtered successful replies.

    ``count`` is how many there are, when the caller knows it from the
    rollups; otherwise it is counted here (one more pass over the index).
    With --agent the walk along the value index skips other agents' entries
    (the agent is in the index): at worst one pass over the index.
    """
    query = _Query(metric, filters, conn.dialect.name)
    if count is None:
        count = await _count(conn, query)
    found = await _at_ranks(conn, query, count, (), {})
    if found is None:  # the count was stale (rows deleted since): count them
        found = await _at_ranks(conn, query, await _count(conn, query), (), {})
    return found or empty(metric)


async def _count(conn: AsyncConnection, query: _Query) -> int:
    return (await conn.execute(text(query.sql("count(*)")), query.params)).scalar_one()


async def agent_percentiles(
    conn: AsyncConnection, metric: Metric, filters: Filters,
    counts: dict[tuple[str, str], int] | None = None,
) -> dict[tuple[str, str], dict]:
    """p50 and p95 of ``metric`` per (agent, model), along the per-agent index.

    ``counts`` per (agent, model) as in range_percentiles().
    """
    query = _Query(metric, filters, conn.dialect.name)
    if counts is None:
        found = await conn.execute(text(query.sql(
            "agent, model, count(*)", tail="GROUP BY agent, model", per_agent=True)),
            query.params)
        counts = {(agent, model): count for agent, model, count in found}
    result = {}
    for (agent, model), count in counts.items():
        extra = ("agent = :group_agent", "model = :group_model")
        params = {"group_agent": agent, "group_model": model}
        values = await _at_ranks(conn, query, count, extra, params, per_agent=True)
        if values is None:  # a stale count: count this group
            count = (await conn.execute(text(query.sql("count(*)", extra, per_agent=True)),
                                        {**query.params, **params})).scalar_one()
            values = await _at_ranks(conn, query, count, extra, params, per_agent=True)
        result[(agent, model)] = values or empty(metric)
    return result


async def _at_ranks(conn, query: _Query, count: int, extra, params,
                    per_agent=False) -> dict | None:
    """The percentiles from reads at their ranks; None when a read finds fewer
    rows than ``count`` promised."""
    if not count:
        return empty(query.metric)
    values = {}
    for key, fraction in FRACTIONS.items():
        h = (count - 1) * fraction
        k = math.floor(h)
        pair = await _pair(conn, query, count, k, extra, params, per_agent)
        if pair is None:
            return None
        low, high = pair
        values[f"{query.metric.name}_{key}_ms"] = low + (h - k) * (high - low)
    return values


async def _pair(conn, query: _Query, count: int, k: int, extra, params, per_agent):
    """v[k] and v[k + 1] (v[k] twice at the top), read from the nearer end of
    the index: a p95 walks past 5% of the entries, not 95%."""
    column = query.metric.column
    top = min(k + 1, count - 1)
    if k <= count - 1 - top:
        order, offset = column, k
    else:
        order, offset = f"{column} DESC", count - 1 - top
    sql = text(query.sql(column, extra, f"ORDER BY {order} LIMIT :rows OFFSET :offset",
                         per_agent))
    rows = top - k + 1
    found = (await conn.execute(
        sql, {**query.params, **params, "rows": rows, "offset": offset})).scalars().all()
    if len(found) < rows:
        return None
    found = sorted(found)
    return found[0], found[-1]


async def user_replies(conn: AsyncConnection, filters: Filters, user_id: int) -> list:
    """One user's successful replies (time, agent, model, latency, ttft), for Python.

    A user's replies are few next to everyone's: reading them from the index
    made for this (no table rows) and sorting here beats walking a value
    index past every other user's entries.
    """
    where, params = _filter_conditions(filters)
    where = ["user_id = :user_id", "role = 'assistant'", "status = 'ok'", *where]
    params["user_id"] = user_id
    source = "messages INDEXED BY ix_messages_ok_user" if (
        conn.dialect.name == "sqlite") else "messages"
    sql = (f"SELECT created_at, agent, model, latency_ms, ttft_ms FROM {source} "
           f"WHERE {' AND '.join(where)}")
    return list(await conn.execute(text(sql).columns(created_at=DateTime()), params))


def summarize_all(rows: Iterable) -> dict:
    """Both metrics of rows with ``latency_ms`` and ``ttft_ms`` attributes."""
    rows = list(rows)
    return {**summarize((row.latency_ms for row in rows), LATENCY),
            **summarize((row.ttft_ms for row in rows), TTFT)}
