"""The reports: summary, users, daily, agents, conversations, errors.

Each one aggregates the facts of the range (rollups for whole rolled-up days,
messages for the rest: see rollup.py) and, where it shows them, adds exact
percentiles (percentiles.py). Definitions, shared by every report:

- messages = user_messages + replies; a user message counts under the agent
  that answered it, so ``--agent`` filters whole exchanges;
- errors and cancelled count replies by status; error_rate = errors / replies;
- tokens are summed over every reply, failed ones included (they were spent);
- cost is the sum of the replies' stored cost (0 for unpriced ones);
- latency_avg_ms and the percentiles are over successful replies only;
- users and conversations are distinct counts of those with a message in range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import distinct, false, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..store.models import Conversation, Message, ToolStep, User
from . import percentiles
from .feedback import feedback_sections
from .filters import Filters, ReportError, UnknownUser
from .percentiles import METRICS
from .rollup import constant, daily_percentiles, facts, in_windows, roll_up

users = User.__table__
conversations = Conversation.__table__
messages = Message.__table__
tool_steps = ToolStep.__table__

PERCENTILE_COLUMNS = ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms")
COUNT_COLUMNS = ("conversations", "messages", "user_messages", "replies", "errors")
TOKEN_COLUMNS = ("tokens_in", "tokens_out")
SUMMARY_COLUMNS = ("users", *COUNT_COLUMNS, "cancelled", "error_rate", *TOKEN_COLUMNS, "cost",
                   "latency_avg_ms", *PERCENTILE_COLUMNS, "first_at", "last_at")
USER_COLUMNS = ("username", *COUNT_COLUMNS, "error_rate", *TOKEN_COLUMNS, "cost",
                "latency_avg_ms", "first_at", "last_at")
DAILY_COLUMNS = ("day", "users", *COUNT_COLUMNS, "error_rate", *TOKEN_COLUMNS, "cost",
                 *PERCENTILE_COLUMNS)
AGENT_COLUMNS = ("agent", "model", "users", "conversations", "replies", "errors", "cancelled",
                 "error_rate", *TOKEN_COLUMNS, "cost", "latency_avg_ms", *PERCENTILE_COLUMNS)
CONVERSATION_COLUMNS = ("conversation_id", "client_id", "username", "messages",
                        "user_messages", "replies", "errors", *TOKEN_COLUMNS, "first_at",
                        "last_at")
ERROR_KIND_COLUMNS = ("kind", "errors", "share", "last_at")
REGENERATE_COLUMNS = ("agent", "replies", "regenerated", "regenerate_rate")
REPORT_WORK_MEM = "64MB"
RECENT_ERROR_COLUMNS = ("at", "username", "client_id", "agent", "model", "kind", "error_ref",
                        "latency_ms")


@dataclass
class Section:
    name: str
    columns: tuple[str, ...]
    rows: list[dict]
    single: bool = False  # one record (the summary), not a list


@dataclass
class Report:
    name: str
    filters: Filters
    sections: list[Section] = field(default_factory=list)

    def as_json(self) -> dict:
        body: dict = {"report": self.name, "filters": self.filters.as_dict()}
        for section in self.sections:
            body[section.name] = section.rows[0] if section.single else section.rows
        return body


class Context:
    """What a report function gets: the connection, the filters, the user's id."""

    def __init__(self, conn: AsyncConnection, filters: Filters, user_id: int | None):
        self.conn, self.filters, self.user_id = conn, filters, user_id

    async def facts(self):
        f = self.filters
        return await facts(self.conn, f.since, f.until, self.user_id, f.agent)

    async def user_replies(self) -> list:
        return await percentiles.user_replies(self.conn, self.filters, self.user_id)

    async def rows(self, query) -> list[dict]:
        return [_plain(row._asdict()) for row in await self.conn.execute(query)]


def _plain(row: dict) -> dict:
    # PostgreSQL sums bigints into NUMERIC; reports want plain numbers.
    for key, value in row.items():
        if isinstance(value, Decimal):
            row[key] = int(value) if value == value.to_integral_value() else float(value)
    return row


def _totals(f) -> list:
    """Aggregates over fact rows; _finish() turns them into report columns."""
    return [
        func.count(distinct(f.c.conversation_id)).label("conversations"),
        func.sum(f.c.user_messages).label("user_messages"),
        func.sum(f.c.replies).label("replies"),
        func.sum(f.c.errors).label("errors"),
        func.sum(f.c.cancelled).label("cancelled"),
        func.sum(f.c.tokens_in).label("tokens_in"),
        func.sum(f.c.tokens_out).label("tokens_out"),
        func.sum(f.c.cost).label("cost"),
        func.sum(f.c.latency_ms_sum).label("latency_ms_sum"),
        func.sum(f.c.latency_count).label("latency_count"),
        func.sum(f.c.ttft_count).label("ttft_count"),
        func.min(f.c.first_at).label("first_at"),
        func.max(f.c.last_at).label("last_at"),
    ]


def _finish(row: dict, columns: tuple[str, ...]) -> dict:
    for key in ("user_messages", "replies", "errors", "cancelled", "tokens_in", "tokens_out",
                "latency_count", "conversations", "users"):
        row[key] = row.get(key) or 0
    row["messages"] = row["user_messages"] + row["replies"]
    row["cost"] = float(row.get("cost") or 0.0)
    row["error_rate"] = _ratio(row["errors"], row["replies"])
    row["latency_avg_ms"] = _ratio(row.get("latency_ms_sum") or 0.0, row["latency_count"])
    return {name: row.get(name) for name in columns}


def _ratio(part, whole) -> float | None:
    return part / whole if whole else None


async def summary(ctx: Context) -> list[Section]:
    f, plan = await ctx.facts()
    query = select(func.count(distinct(f.c.user_id)).label("users"), *_totals(f))
    row = (await ctx.rows(query))[0]
    if ctx.user_id is not None:
        row.update(percentiles.summarize_all(await ctx.user_replies()))
    else:
        for metric in METRICS:
            # The rollups' counts match the messages unless some were purged.
            count = None if plan.purged else row[f"{metric.name}_count"] or 0
            row.update(await percentiles.range_percentiles(ctx.conn, metric, ctx.filters, count))
    return [Section("summary", SUMMARY_COLUMNS, [_finish(row, SUMMARY_COLUMNS)], single=True)]


async def users_report(ctx: Context) -> list[Section]:
    f, _plan = await ctx.facts()
    totals = _totals(f)
    per_user = select(f.c.user_id, *totals).group_by(f.c.user_id).subquery("per_user")
    query = (
        select(users.c.username, per_user)
        .select_from(per_user.join(users, users.c.id == per_user.c.user_id))
        .order_by(per_user.c.user_messages.desc(), users.c.username)
        .limit(ctx.filters.limit)
    )
    rows = [_finish(row, USER_COLUMNS) for row in await ctx.rows(query)]
    return [Section("users", USER_COLUMNS, rows)]


async def daily(ctx: Context) -> list[Section]:
    f, plan = await ctx.facts()
    query = (
        select(f.c.day, func.count(distinct(f.c.user_id)).label("users"), *_totals(f))
        .group_by(f.c.day)
        .order_by(f.c.day)
    )
    rows = await ctx.rows(query)
    by_day = await _daily_percentiles(ctx, plan.blocks, plan.windows)
    for row in rows:
        row["day"] = _as_date(row["day"])
        row.update(by_day.get(row["day"], _no_percentiles()))
    return [Section("daily", DAILY_COLUMNS, [_finish(row, DAILY_COLUMNS) for row in rows])]


def _as_date(value) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, str):
        return date.fromisoformat(value[:10])
    return value


def _no_percentiles() -> dict:
    return dict.fromkeys(PERCENTILE_COLUMNS)


async def _daily_percentiles(ctx: Context, blocks, windows) -> dict[date, dict]:
    """Per day: stored for rolled-up days, computed from messages for the rest.

    The stored ones exist per agent but not per user: with --user every day
    is computed from that user's replies.
    """
    if ctx.user_id is not None:
        return _by_day(await ctx.user_replies())
    stored = daily_percentiles
    query = select(stored).where(stored.c.agent == (ctx.filters.agent or ""),
                                 in_windows(stored.c.day, blocks))
    result = {_as_date(row["day"]): {name: row[name] for name in PERCENTILE_COLUMNS}
              for row in await ctx.rows(query)}
    query = select(messages.c.created_at, messages.c.latency_ms, messages.c.ttft_ms).where(
        messages.c.role == constant("assistant"), messages.c.status == constant("ok"),
        in_windows(messages.c.created_at, windows))
    if ctx.filters.agent is not None:
        query = query.where(messages.c.agent == ctx.filters.agent)
    result.update(_by_day(await ctx.conn.execute(query)))
    return result


def _by_day(replies) -> dict[date, dict]:
    days: dict[date, list] = {}
    for reply in replies:
        days.setdefault(reply.created_at.date(), []).append(reply)
    return {day: percentiles.summarize_all(found) for day, found in days.items()}


async def agents(ctx: Context) -> list[Section]:
    f, plan = await ctx.facts()
    totals = _totals(f)
    replies = totals[2]
    query = (
        select(f.c.agent, f.c.model, func.count(distinct(f.c.user_id)).label("users"), *totals)
        .where(f.c.agent != constant(""))  # user messages without a reply
        .group_by(f.c.agent, f.c.model)
        .order_by(replies.desc(), f.c.agent, f.c.model)
    )
    rows = await ctx.rows(query)
    by_group: dict = {}
    if ctx.user_id is not None:
        replies_of: dict = {}
        for reply in await ctx.user_replies():
            replies_of.setdefault((reply.agent, reply.model), []).append(reply)
        by_group = {group: percentiles.summarize_all(found)
                    for group, found in replies_of.items()}
    else:
        for metric in METRICS:
            counts = None if plan.purged else {
                (row["agent"], row["model"]): row[f"{metric.name}_count"] or 0 for row in rows}
            found = await percentiles.agent_percentiles(ctx.conn, metric, ctx.filters, counts)
            for group, values in found.items():
                by_group.setdefault(group, {}).update(values)
    for row in rows:
        row.update(by_group.get((row["agent"], row["model"]), _no_percentiles()))
    return [Section("agents", AGENT_COLUMNS, [_finish(row, AGENT_COLUMNS) for row in rows])]


async def conversations_report(ctx: Context) -> list[Section]:
    """The longest conversations of the range, and the most recently active.

    First a narrow pass ranks every conversation twice (by size, by last
    activity) and keeps those in either top N; then the full figures of
    those few. Sorting narrow rows is what keeps this fast on SQLite.
    """
    f, _plan = await ctx.facts()
    size = (func.sum(f.c.user_messages) + func.sum(f.c.replies)).label("size")
    grouped = (
        select(f.c.conversation_id, size, func.max(f.c.last_at).label("last_at"))
        .group_by(f.c.conversation_id)
        .subquery("per_conversation")
    )
    by_recency = (grouped.c.last_at.desc(), grouped.c.conversation_id.desc())
    ranked = select(
        grouped.c.conversation_id,
        func.row_number().over(order_by=(grouped.c.size.desc(), *by_recency)).label("by_size"),
        func.row_number().over(order_by=by_recency).label("by_recency"),
    ).subquery("ranked")
    limit = ctx.filters.limit
    ranks = {row.conversation_id: row for row in await ctx.conn.execute(
        select(ranked).where((ranked.c.by_size <= limit) | (ranked.c.by_recency <= limit)))}
    details = await _conversation_details(ctx, f, list(ranks))
    sections = []
    for name, rank in (("longest", "by_size"), ("recent", "by_recency")):
        chosen = sorted((cid for cid, row in ranks.items() if getattr(row, rank) <= limit),
                        key=lambda cid: getattr(ranks[cid], rank))
        sections.append(Section(name, CONVERSATION_COLUMNS, [details[cid] for cid in chosen]))
    sections.append(Section("regenerated", REGENERATE_COLUMNS, await _regenerated(ctx)))
    return sections


async def _regenerated(ctx: Context) -> list[dict]:
    """Per agent: its replies of the range and how many were regenerated
    ones (made by regenerate), from the facts like every count."""
    f, _plan = await ctx.facts()
    replies = func.sum(f.c.replies).label("replies")
    rows = await ctx.rows(
        select(f.c.agent, replies, func.sum(f.c.regenerated).label("regenerated"))
        .where(f.c.agent != constant("")).group_by(f.c.agent)
        .order_by(replies.desc(), f.c.agent))
    return [{"agent": row["agent"], "replies": row["replies"] or 0,
             "regenerated": row["regenerated"] or 0,
             "regenerate_rate": _ratio(row["regenerated"] or 0, row["replies"])}
            for row in rows]


async def _conversation_details(ctx: Context, f, ids: list[int]) -> dict[int, dict]:
    chosen = f.c.conversation_id.in_(ids) if ids else false()
    per_conversation = (
        select(f.c.conversation_id, f.c.user_id, *_totals(f)[1:])
        .where(chosen)
        .group_by(f.c.conversation_id, f.c.user_id)
        .subquery("chosen")
    )
    query = (
        select(per_conversation, conversations.c.client_id, users.c.username)
        .select_from(per_conversation
                     .outerjoin(conversations,
                                conversations.c.id == per_conversation.c.conversation_id)
                     .join(users, users.c.id == per_conversation.c.user_id))
    )
    return {row["conversation_id"]: _finish(row, CONVERSATION_COLUMNS)
            for row in await ctx.rows(query)}


async def errors(ctx: Context) -> list[Section]:
    """Failed replies of the range by kind, and the latest ones.

    Read from the messages (rollups count errors but not their kinds), so
    failures older than the retention period are no longer listed.
    """
    kind = func.coalesce(messages.c.error_kind, constant("unknown")).label("kind")
    conditions = [messages.c.role == constant("assistant"), messages.c.status == constant("error"),
                  in_windows(messages.c.created_at,
                              [(ctx.filters.since, ctx.filters.until)])]
    if ctx.user_id is not None:
        conditions.append(messages.c.user_id == ctx.user_id)
    if ctx.filters.agent is not None:
        conditions.append(messages.c.agent == ctx.filters.agent)
    count = func.count().label("errors")
    by_kind = await ctx.rows(
        select(kind, count, func.max(messages.c.created_at).label("last_at"))
        .where(*conditions).group_by(literal_column("1")).order_by(count.desc(), kind)
    )
    total = sum(row["errors"] for row in by_kind)
    for row in by_kind:
        row["share"] = row["errors"] / total
    recent = await ctx.rows(
        select(messages.c.created_at.label("at"), users.c.username, conversations.c.client_id,
               messages.c.agent, messages.c.model, kind, messages.c.error_ref,
               messages.c.latency_ms)
        .select_from(messages.join(users, users.c.id == messages.c.user_id)
                     .join(conversations, conversations.c.id == messages.c.conversation_id))
        .where(*conditions)
        .order_by(messages.c.created_at.desc(), messages.c.id.desc())
        .limit(ctx.filters.limit)
    )
    return [
        Section("by_kind", ERROR_KIND_COLUMNS,
                [{name: row[name] for name in ERROR_KIND_COLUMNS} for row in by_kind]),
        Section("recent", RECENT_ERROR_COLUMNS, recent),
    ]


TOOL_COLUMNS = ("calls", "errors", "timeouts", "error_rate", "latency_p50_ms", "latency_p95_ms")


async def tools(ctx: Context) -> list[Section]:
    """Tool calls per tool and per agent: calls, errors (timeouts included),
    timeouts, and the latency percentiles of every call.

    Read from the tool steps (no rollups), so calls older than the retention
    period are gone with their replies.
    """
    conditions = [in_windows(tool_steps.c.created_at, [(ctx.filters.since, ctx.filters.until)])]
    if ctx.user_id is not None:
        conditions.append(tool_steps.c.user_id == ctx.user_id)
    if ctx.filters.agent is not None:
        conditions.append(tool_steps.c.agent == ctx.filters.agent)
    found = (await ctx.conn.execute(
        select(tool_steps.c.tool, tool_steps.c.agent, tool_steps.c.status,
               tool_steps.c.latency_ms).where(*conditions))).all()
    return [Section(key, (key[:-1], *TOOL_COLUMNS), _tool_rows(found, key[:-1]))
            for key in ("tools", "agents")]


def _tool_rows(steps: list, by: str) -> list[dict]:
    groups: dict[str, list] = {}
    for step in steps:
        groups.setdefault(getattr(step, by) or "", []).append(step)
    rows = []
    for name, group in groups.items():
        latencies = sorted(step.latency_ms for step in group)
        failed = sum(step.status != "ok" for step in group)
        rows.append({by: name, "calls": len(group), "errors": failed,
                     "timeouts": sum(step.status == "timeout" for step in group),
                     "error_rate": failed / len(group),
                     "latency_p50_ms": percentiles.percentile(latencies, 0.5),
                     "latency_p95_ms": percentiles.percentile(latencies, 0.95)})
    return sorted(rows, key=lambda row: (-row["calls"], row[by]))
async def feedback_report(ctx: Context) -> list[Section]:
    """Ratings per agent and model, and the latest comments (feedback.py)."""
    return [Section(*parts) for parts in await feedback_sections(ctx)]

from .cost import cost  # noqa: E402 (it builds this module's Sections)

REPORTS = {
    "summary": summary,
    "users": users_report,
    "daily": daily,
    "agents": agents,
    "conversations": conversations_report,
    "errors": errors,
    "tools": tools,
    "feedback": feedback_report,
    "cost": cost,
}


async def user_id_of(conn: AsyncConnection, username: str | None) -> int | None:
    if username is None:
        return None
    found = (await conn.execute(select(users.c.id).where(users.c.username == username))).scalar()
    if found is None:
        raise UnknownUser(f"no user named {username!r}")
    return found


async def run_report(
    engine: AsyncEngine, name: str, filters: Filters, now: datetime | None = None
) -> Report:
    """Roll up what is missing, then build the report ``name``."""
    if name not in REPORTS:
        raise ReportError(f"unknown report {name!r}; available: {', '.join(REPORTS)}")
    await roll_up(engine, now)
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # One snapshot: a percentile's count and its offset read agree.
            await conn.execution_options(isolation_level="REPEATABLE READ")
            # Grouping tens of thousands of conversations spills to disk at the
            # default 4MB; an admin's report may use more, for this transaction.
            await conn.exec_driver_sql(f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'")
            # The planner's estimates of the per-message subqueries pass the
            # JIT's thresholds; compiling then costs more than the query (~1 s).
            await conn.exec_driver_sql("SET LOCAL jit = off")
        user_id = await user_id_of(conn, filters.user)
        sections = await REPORTS[name](Context(conn, filters, user_id))
    return Report(name, filters, sections)
