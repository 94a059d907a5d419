"""The feedback report: per agent and model, the replies of the range, how many
were rated, up, down and the share of up; and the latest comments.

Replies are counted from the facts (rollups for whole days, messages for the
rest: rollup.py), like the agents report; the ratings from the feedback table
joined to the replies it rates, which is small. So the report stays fast on
millions of messages. A rating counts in the range of the reply it rates.
"""

from __future__ import annotations

from sqlalchemy import case, func, select

from ..store.models import Conversation, Feedback, Message, User
from .rollup import constant, in_windows

feedback = Feedback.__table__
messages = Message.__table__
users = User.__table__
conversations = Conversation.__table__

FEEDBACK_COLUMNS = ("agent", "model", "replies", "rated", "up", "down", "up_share")
COMMENT_COLUMNS = ("at", "username", "client_id", "agent", "model", "rating", "comment")


def _conditions(ctx) -> list:
    conditions = [in_windows(messages.c.created_at, [(ctx.filters.since, ctx.filters.until)])]
    if ctx.user_id is not None:
        conditions.append(messages.c.user_id == ctx.user_id)
    if ctx.filters.agent is not None:
        # Not through an index on agent: the few rated replies are the rows to
        # start from, not the agent's hundreds of thousands of replies.
        conditions.append(func.coalesce(messages.c.agent, constant("")) == ctx.filters.agent)
    return conditions


async def feedback_sections(ctx) -> list[tuple[str, tuple, list]]:
    """The report's sections as (name, columns, rows); ``ctx`` is a reports.Context."""
    f, _plan = await ctx.facts()
    replies = await ctx.rows(
        select(f.c.agent, f.c.model, func.sum(f.c.replies).label("replies"))
        .where(f.c.agent != constant(""))
        .group_by(f.c.agent, f.c.model))
    ratings = await ctx.rows(
        select(messages.c.agent, messages.c.model, func.count().label("rated"),
               func.sum(case((feedback.c.rating > 0, 1), else_=0)).label("up"),
               func.sum(case((feedback.c.rating < 0, 1), else_=0)).label("down"))
        .select_from(feedback.join(messages, messages.c.id == feedback.c.message_id))
        .where(*_conditions(ctx))
        .group_by(messages.c.agent, messages.c.model))
    groups = {(row["agent"], row["model"]): {**row, "rated": 0, "up": 0, "down": 0}
              for row in replies}
    for row in ratings:
        group = groups.setdefault((row["agent"], row["model"]), {
            "agent": row["agent"], "model": row["model"], "replies": 0})
        group.update(rated=row["rated"], up=row["up"] or 0, down=row["down"] or 0)
    rows = []
    for group in groups.values():
        group["replies"] = int(group["replies"] or 0)
        group["up_share"] = group["up"] / group["rated"] if group["rated"] else None
        rows.append({name: group[name] for name in FEEDBACK_COLUMNS})
    rows.sort(key=lambda row: (-row["replies"], row["agent"] or "", row["model"] or ""))
    comments = await ctx.rows(
        select(feedback.c.created_at.label("at"), users.c.username, conversations.c.client_id,
               messages.c.agent, messages.c.model, feedback.c.rating, feedback.c.comment)
        .select_from(feedback.join(messages, messages.c.id == feedback.c.message_id)
                     .join(users, users.c.id == messages.c.user_id)
                     .join(conversations, conversations.c.id == messages.c.conversation_id))
        .where(feedback.c.comment.is_not(None), *_conditions(ctx))
        .order_by(feedback.c.created_at.desc(), feedback.c.message_id.desc())
        .limit(ctx.filters.limit))
    return [("feedback", FEEDBACK_COLUMNS, rows), ("comments", COMMENT_COLUMNS, comments)]
