"""The ``cost`` report: what the replies of a range cost, per user, agent and
model and UTC day, with totals, and the models that have no price.

Each reply's cost is stored with it when it is saved (pricing in the config;
tornado_app/quotas.py), so the report sums it; a later change of prices does
not rewrite history. Read from the messages (the rollups do not carry cost):
replies purged by the retention are no longer counted.
"""

from __future__ import annotations

from sqlalchemy import Date, func, literal_column, select

from ..store.models import Message, User
from .rollup import constant, in_windows

messages = Message.__table__
users = User.__table__

COST_COLUMNS = ("day", "username", "agent", "model", "replies", "tokens_in", "tokens_out",
                "cost")
TOTAL_COLUMNS = ("replies", "tokens_in", "tokens_out", "cost", "unpriced_replies")
UNPRICED_COLUMNS = ("agent", "model", "replies", "tokens_in", "tokens_out")


def _conditions(ctx) -> list:
    f = ctx.filters
    found = [messages.c.role == constant("assistant"),
             in_windows(messages.c.created_at, [(f.since, f.until)])]
    if ctx.user_id is not None:
        found.append(messages.c.user_id == ctx.user_id)
    if f.agent is not None:
        found.append(messages.c.agent == f.agent)
    return found


def _sums():
    return [func.count().label("replies"),
            func.coalesce(func.sum(messages.c.tokens_in), 0).label("tokens_in"),
            func.coalesce(func.sum(messages.c.tokens_out), 0).label("tokens_out")]


async def cost(ctx) -> list:
    from .reports import Section  # reports.py lists this report

    conditions = _conditions(ctx)
    day = func.date(messages.c.created_at, type_=Date).label("day")
    rows = await ctx.rows(
        select(day, users.c.username, messages.c.agent, messages.c.model, *_sums(),
               func.coalesce(func.sum(messages.c.cost), 0.0).label("cost"))
        .select_from(messages.join(users, users.c.id == messages.c.user_id))
        .where(*conditions)
        .group_by(*(literal_column(str(n)) for n in range(1, 5)))
        .order_by(literal_column("1"), literal_column("2"), literal_column("3"),
                  literal_column("4")))
    for row in rows:
        row["day"] = str(row["day"])[:10]
    total = {name: sum(row[name] for row in rows) for name in TOTAL_COLUMNS[:4]}
    unpriced = await ctx.rows(
        select(messages.c.agent, messages.c.model, *_sums())
        .where(*conditions, messages.c.cost.is_(None), messages.c.agent.is_not(None))
        .group_by(literal_column("1"), literal_column("2"))
        .order_by(literal_column("3").desc()))
    total["unpriced_replies"] = sum(row["replies"] for row in unpriced)
    return [Section("totals", TOTAL_COLUMNS, [total], single=True),
            Section("by_day", COST_COLUMNS, rows),
            Section("unpriced", UNPRICED_COLUMNS, unpriced)]
