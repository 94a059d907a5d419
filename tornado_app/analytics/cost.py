"""The ``cost`` report: what the replies of a range cost, per user, agent and
model and UTC day, with totals, and the models that have no price.

Each reply's cost is stored with it when it is saved (pricing in the config;
tornado_app/quotas.py), so the report sums it; a later change of prices does
not rewrite history. Read from the facts like every report (rollup.py): the
rollups carry cost and the unpriced replies, so replies purged by the
retention still count, and a 90-day range reads no message.
"""

from __future__ import annotations

from sqlalchemy import func, select

from ..store.models import User
from .rollup import constant

users = User.__table__

COST_COLUMNS = ("day", "username", "agent", "model", "replies", "tokens_in", "tokens_out",
                "cost")
TOTAL_COLUMNS = ("replies", "tokens_in", "tokens_out", "cost", "unpriced_replies")
UNPRICED_COLUMNS = ("agent", "model", "replies", "tokens_in", "tokens_out")


async def cost(ctx) -> list:
    from .reports import Section  # reports.py lists this report

    f, _plan = await ctx.facts()
    replies = func.sum(f.c.replies)
    per_day = (
        select(f.c.day, f.c.user_id, f.c.agent, f.c.model, replies.label("replies"),
               func.sum(f.c.tokens_in).label("tokens_in"),
               func.sum(f.c.tokens_out).label("tokens_out"), func.sum(f.c.cost).label("cost"))
        .group_by(f.c.day, f.c.user_id, f.c.agent, f.c.model)
        .having(replies > 0)  # user messages without a reply cost nothing
        .subquery("per_day"))
    rows = await ctx.rows(
        select(per_day.c.day, users.c.username, per_day.c.agent, per_day.c.model,
               per_day.c.replies, per_day.c.tokens_in, per_day.c.tokens_out, per_day.c.cost)
        .select_from(per_day.join(users, users.c.id == per_day.c.user_id))
        .order_by(per_day.c.day, users.c.username, per_day.c.agent, per_day.c.model))
    for row in rows:
        row["day"] = str(row["day"])[:10]
        row["cost"] = float(row["cost"])
        for key in ("agent", "model"):
            row[key] = row[key] or None  # the facts' '' for a reply without one
    total = {name: sum(row[name] for row in rows) for name in TOTAL_COLUMNS[:4]}
    total["cost"] = float(total["cost"])
    unpriced_replies = func.sum(f.c.unpriced_replies)
    unpriced = await ctx.rows(
        select(f.c.agent, f.c.model, unpriced_replies.label("replies"),
               func.sum(f.c.unpriced_tokens_in).label("tokens_in"),
               func.sum(f.c.unpriced_tokens_out).label("tokens_out"))
        .where(f.c.agent != constant(""))
        .group_by(f.c.agent, f.c.model)
        .having(unpriced_replies > 0)
        .order_by(unpriced_replies.desc(), f.c.agent, f.c.model))
    for row in unpriced:
        row["model"] = row["model"] or None
    total["unpriced_replies"] = sum(row["replies"] for row in unpriced)
    return [Section("totals", TOTAL_COLUMNS, [total], single=True),
            Section("by_day", COST_COLUMNS, rows),
            Section("unpriced", UNPRICED_COLUMNS, unpriced)]
