"""The export: the messages themselves, filtered, streamed as CSV or JSON lines.

Rows come from a server-side cursor (asyncpg) or in fetchmany() batches
(SQLite) and are written as they arrive, so an export of millions of messages
holds one batch in memory, never the whole result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy import and_, case, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ..store.models import Conversation, Feedback, Message, User
from .filters import Filters
from .render import csv_line, csv_lines, json_line, plain
from .reports import user_id_of
from .rollup import constant, first_reply, in_windows

EXPORT_COLUMNS = (
    "id", "created_at", "username", "conversation_id", "client_id", "role", "status", "agent",
    "model", "tokens_in", "tokens_out", "cost", "latency_ms", "ttft_ms", "error_kind",
    "error_ref", "reply_to_id", "parent_id", "feedback_rating", "feedback_comment", "content",
)
FORMATS = ("csv", "json")
BATCH_ROWS = 1000


def export_query(filters: Filters, user_id: int | None):
    m = Message.__table__.alias("m")
    users = User.__table__
    conversations = Conversation.__table__
    feedback = Feedback.__table__
    source = (m.join(users, users.c.id == m.c.user_id)
              .join(conversations, conversations.c.id == m.c.conversation_id)
              .outerjoin(feedback, feedback.c.message_id == m.c.id))
    query = select(
        m.c.id, m.c.created_at, users.c.username, m.c.conversation_id, conversations.c.client_id,
        m.c.role, m.c.status, m.c.agent, m.c.model, m.c.tokens_in, m.c.tokens_out, m.c.cost,
        m.c.latency_ms, m.c.ttft_ms, m.c.error_kind, m.c.error_ref, m.c.reply_to_id,
        m.c.parent_id, feedback.c.rating, feedback.c.comment, m.c.content,
    ).where(in_windows(m.c.created_at, [(filters.since, filters.until)]))
    if user_id is not None:
        query = query.where(m.c.user_id == user_id)
    if filters.agent is not None:
        # As in the reports: a user message goes with the agent that answered it.
        reply = Message.__table__.alias("r")
        source = source.outerjoin(reply, and_(m.c.role == constant("user"),
                                              reply.c.id == first_reply(m)))
        agent = case((m.c.role == constant("user"), reply.c.agent), else_=m.c.agent)
        query = query.where(agent == filters.agent)
    return query.select_from(source).order_by(m.c.created_at, m.c.id)


async def export_rows(engine: AsyncEngine, filters: Filters) -> AsyncIterator[list]:
    """The filtered messages, oldest first, in batches of rows (tuples in
    EXPORT_COLUMNS order). An unknown user raises before the first batch."""
    async with engine.connect() as conn:
        user_id = await user_id_of(conn, filters.user)
        result = await conn.stream(
            export_query(filters, user_id).execution_options(yield_per=BATCH_ROWS)
        )
        async for partition in result.partitions(BATCH_ROWS):
            yield partition


async def export_lines(engine: AsyncEngine, filters: Filters, fmt: str) -> AsyncIterator[str]:
    """The export as text, a batch of lines at a time: a CSV header and rows,
    or one JSON object per line.

    Nothing is yielded before the filters are checked (an unknown user
    raises first), so an HTTP handler can still answer with an error status.
    """
    header = fmt == "csv"
    async for rows in export_rows(engine, filters):
        if fmt == "csv":
            chunk = csv_lines([[plain(value, name) for name, value in zip(EXPORT_COLUMNS, row)]
                               for row in rows])
            if header:
                chunk = csv_line(EXPORT_COLUMNS) + chunk
                header = False
            yield chunk
        else:
            yield "".join(json_line(dict(zip(EXPORT_COLUMNS, row))) for row in rows)
    if header:
        yield csv_line(EXPORT_COLUMNS)
