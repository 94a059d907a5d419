"""The ``cost`` report: what the replies of a range cost, per user, agent and
model and UTC day, with totals, and the models that have no price.

Each reply's cost is stored with it when it is saved (pricing in the config;
tornado_app/quotas.py), so the report sums it; a later change of prices does
not rewrite history. Read from the facts like every report (rollup.py): the
rollups carry cost and the unpriced replies, so replies purged by the
retention still count, and a 90-day range reads no message. One pass over
the facts: the unpriced models are summed here from the per-day rows.
"""

from __future__ import annotations

from sqlalchemy import func, select

from ..store.models import User

users = User.__table__

COST_COLUMNS = ("day", "username", "agent", "model", "replies", "tokens_in", "tokens_out",
                "cost")
TOTAL_COLUMNS = ("replies", "tokens_in", "tokens_out", "cost", "unpriced_replies")
UNPRICED_COLUMNS = ("agent", "model", "replies", "tokens_in", "tokens_out")
_SUMMED = ("replies", "tokens_in", "tokens_out", "cost", "unpriced_replies",
           "unpriced_tokens_in", "unpriced_tokens_out")


async def cost(ctx) -> list:
    from .reports import Section  # reports.py lists this report

    f, _plan = await ctx.facts()
    replies = func.sum(f.c.replies)
    per_day = (
        select(f.c.day, f.c.user_id, f.c.agent, f.c.model,
               *(func.sum(f.c[name]).label(name) for name in _SUMMED))
        .group_by(f.c.day, f.c.user_id, f.c.agent, f.c.model)
        .having(replies > 0)  # user messages without a reply cost nothing
        .subquery("per_day"))
    # Tens of thousands of rows for 90 days: built straight from the tuples.
    result = await ctx.conn.execute(
        select(per_day.c.day, users.c.username, per_day.c.agent, per_day.c.model,
               *(per_day.c[name] for name in _SUMMED))
        .select_from(per_day.join(users, users.c.id == per_day.c.user_id))
        .order_by(per_day.c.day, users.c.username, per_day.c.agent, per_day.c.model))
    rows, unpriced = [], {}
    for (day, username, agent, model, answered, tokens_in, tokens_out, spent,
         unpriced_replies, unpriced_in, unpriced_out) in result:
        # The facts' '' is a reply without an agent or model.
        rows.append({"day": str(day)[:10], "username": username, "agent": agent or None,
                     "model": model or None, "replies": int(answered),
                     "tokens_in": int(tokens_in), "tokens_out": int(tokens_out),
                     "cost": float(spent)})
        if unpriced_replies and agent:
            group = unpriced.setdefault((agent, model), [0, 0, 0])
            group[0] += int(unpriced_replies)
            group[1] += int(unpriced_in)
            group[2] += int(unpriced_out)
    total = {name: sum(row[name] for row in rows) for name in TOTAL_COLUMNS[:4]}
    total["cost"] = float(total["cost"])
    unpriced_rows = sorted(
        (dict(zip(UNPRICED_COLUMNS, (agent, model or None, *sums)))
         for (agent, model), sums in unpriced.items()),
        key=lambda row: (-row["replies"], row["agent"], row["model"] or ""))
    total["unpriced_replies"] = sum(row["replies"] for row in unpriced_rows)
    return [Section("totals", TOTAL_COLUMNS, [total], single=True),
            Section("by_day", COST_COLUMNS, rows),
            Section("unpriced", UNPRICED_COLUMNS, unpriced_rows)]
