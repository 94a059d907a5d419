"""The exchange's writes on PostgreSQL in one statement each (data-modifying CTEs).

On PostgreSQL every statement is a round trip to the server, and each round
trip costs both processes a wake-up: more than the statements' own work. So
the writes that always go together run as one statement there, built from
the same tables and bind names as the separate statements SQLite runs:

- :data:`TAKE`: the rate limit taken, the conversation's leaf and agent,
  the history path up from the leaf and the user's memories (``Store.admit``
  of a new message; four statements elsewhere);
- :data:`OPEN`: the user's message, the conversation's new leaf and the
  reply's stream (``Store.admit``; three statements elsewhere);
- :data:`FINISH`: the reply's row, the leaf, the closed stream (its quota
  reservation ends with it), its chunks dropped, its usage added, and the
  ``NOTIFY`` for other instances (``Store.finish_reply``; up to six elsewhere).

The sub-statements touch different rows, and all see one snapshot, which is
all these writes need (PostgreSQL runs every one, referenced or not).
"""

from __future__ import annotations

from datetime import datetime

from collections import namedtuple

from sqlalchemy import DateTime, Float, Integer, String, Text, bindparam, false, func, literal, \
    select, true, update
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert

from . import branches, quotas, ratelimit
from . import memories as memory_rows
from .messages import INSERT_MESSAGE, conversations
from .models import QuotaUsage, ReplyChunk, ReplyStream, utcnow
from .streams import CHANNEL, lengths_text

streams = ReplyStream.__table__
chunks = ReplyChunk.__table__
usage = QuotaUsage.__table__
memories = memory_rows.memories

# Bind names of INSERT_MESSAGE (a column's name each), shared by the sub-statements.
_CONVERSATION = bindparam("conversation_id", type_=Integer)
_USER = bindparam("user_id", type_=Integer)
_PUBLIC_ID = bindparam("public_id", type_=String)


def _take():
    taken = ratelimit.upsert("postgresql").cte("taken")
    leaf = select(conversations.c.active_leaf_id).where(
        conversations.c.id == _CONVERSATION).scalar_subquery()
    path = branches.path_cte(leaf)
    # One row per path message (oldest first), or one with a NULL path when
    # there is none; the decision, the conversation's state and the user's
    # memories (as arrays, by key) on each.
    return (
        select(taken.c.tat, taken.c.granted, conversations.c.active_leaf_id,
               conversations.c.agent, *(_memories(name) for name in _MEMORY_COLUMNS),
               *(path.c[name] for name in _PATH_COLUMNS))
        .select_from(taken.outerjoin(conversations, conversations.c.id == _CONVERSATION)
                     .outerjoin(path, true()))
        .order_by(path.c.depth.desc())
    )


def _memories(name: str):
    """One column of the user's memories (memories.LIST) as an array."""
    return select(func.array_agg(aggregate_order_by(memories.c[name], memories.c.key))).where(
        memories.c.user_id == bindparam("user_id", type_=Integer)).scalar_subquery().label(
        f"memory_{name}")


_PATH_COLUMNS = [column.name for column in branches.PATH_UP.selected_columns
                 if column.name != "depth"]
_PATH_ROW = namedtuple("Row", _PATH_COLUMNS)._make
_MEMORY_COLUMNS = [column.name for column in memory_rows.LIST.selected_columns]
_MEMORY_ROW = namedtuple("Row", _MEMORY_COLUMNS)._make
# A TAKE row: tat, granted, leaf, agent, then the memory arrays, then the path.
_MEMORY_START = 4
_PATH_START = _MEMORY_START + len(_MEMORY_COLUMNS)


def _open():
    saved = INSERT_MESSAGE.cte("saved")
    leaf = update(conversations).where(conversations.c.id == _CONVERSATION).values(
        active_leaf_id=select(saved.c.id).scalar_subquery()).cte("leaf")
    stream = streams.insert().from_select(
        ["reply_id", "conversation_id", "user_id", "message_id", "instance", "lease_until",
         "last_seq", "cancel_requested", "created_at", "reserved_tokens", "reserved_cost"],
        select(bindparam("reply_id", type_=String), _CONVERSATION, _USER, saved.c.id,
               bindparam("instance", type_=String), bindparam("lease_until", type_=Float),
               literal(-1, Integer), false(), bindparam("created_at", type_=DateTime),
               bindparam("reserved_tokens", type_=Integer),
               bindparam("reserved_cost", type_=Float)),
    ).cte("stream")
    return select(saved.c.id).add_cte(leaf, stream)


def _finish():
    saved = INSERT_MESSAGE.cte("saved")
    # The reply becomes the leaf only if its message still is (branches.ADVANCE_LEAF).
    leaf = update(conversations).where(
        conversations.c.id == _CONVERSATION,
        conversations.c.active_leaf_id == bindparam("reply_to_id", type_=Integer),
    ).values(active_leaf_id=select(saved.c.id).scalar_subquery()).cte("leaf")
    closed = update(streams).where(streams.c.reply_id == _PUBLIC_ID).values(
        finished_at=bindparam("ended", type_=DateTime), last_seq=bindparam("seq", type_=Integer),
        chunk_lengths=bindparam("lengths", type_=Text),
        tool_events=bindparam("events", type_=Text)).cte("closed")
    dropped = chunks.delete().where(chunks.c.reply_id == _PUBLIC_ID).cte("dropped")
    spent = bindparam("spent", type_=Float)
    tokens = bindparam("tokens", type_=Integer)
    add = pg_insert(usage).from_select(
        ["user_id", "day", "tokens", "cost"],
        select(_USER, bindparam("today", type_=usage.c.day.type), tokens, spent)
        .where((tokens > 0) | (spent > 0)))
    added = add.on_conflict_do_update(
        index_elements=[usage.c.user_id, usage.c.day],
        set_={"tokens": usage.c.tokens + add.excluded.tokens,
              "cost": usage.c.cost + add.excluded.cost}).cte("added")
    notified = func.pg_notify(literal(CHANNEL), _PUBLIC_ID)
    return select(saved.c.id, notified.label("notified")).add_cte(
        leaf, closed, dropped, added)


TAKE = _take()
OPEN = _open()
FINISH = _finish()


# Units of work (store/executor.py), PostgreSQL only

def take(db, conversation_id: int, user_id: int, now: float, messages: int,
         per_seconds: float, after_id: int, history_limit: int):
    """The start of a new message's admission: ``(leaf, agent)`` of the
    conversation (None, None if there is none), the rate limit's decision
    (ratelimit.take), the path up from the leaf with whether it continues
    ``after_id`` (branches.path_up), and the user's memories (memories.LIST)."""
    values, tolerance = ratelimit.parameters(user_id, now, messages, per_seconds)
    values.update(conversation_id=conversation_id, after_id=after_id, limit=history_limit)
    rows = db.execute(TAKE, values).all()
    first = rows[0]
    decision = ratelimit.decision(first.tat, first.granted, tolerance, now)
    leaf = first.active_leaf_id
    path = [_PATH_ROW(row[_PATH_START:]) for row in rows if row.id is not None]
    saved = [_MEMORY_ROW(values) for values in zip(*(first[index] or ()
                                                     for index in range(_MEMORY_START,
                                                                        _PATH_START)))]
    continues = branches.continues(leaf, after_id, path)
    return (leaf, first.agent), decision, (path, continues), saved


def open_exchange(db, row: dict, reply_id: str, instance: str, lease_until: float,
                  reserved: quotas.Bound | None) -> int:
    """Save the user's message ``row`` (messages.user_message) as the leaf and
    open its reply's stream, holding its quota reservation (streams.open_stream);
    the message's row id."""
    return db.execute(OPEN, {**row, "reply_id": reply_id, "instance": instance,
                             "lease_until": lease_until,
                             **quotas.reservation(reserved)}).scalar()


def finish_reply(db, row: dict, pieces: list[str], tokens: int, cost: float,
                 tool_events: str | None) -> int:
    """Save the reply ``row`` (messages.reply_row; its ``public_id`` is the
    reply's id) and close its stream (keeping its ``tool_events``; its quota
    reservation ends), add the ``tokens`` and ``cost`` it spent to the user's
    usage, notify the watchers; its row id."""
    created: datetime = row["created_at"]
    values = {**row, "ended": utcnow(), "seq": len(pieces) - 1, "lengths": lengths_text(pieces),
              "events": tool_events, "today": created.date(), "tokens": tokens, "spent": cost}
    return db.execute(FINISH, values).scalar()
