"""Replies in flight, as the database keeps them for any instance to resume
(see tornado_app/replies.py for the design): the stream rows, their chunks,
and PostgreSQL's notifications.

Units of work (store/executor.py) and the statements they run.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    bindparam,
    delete,
    func,
    literal,
    select,
    update,
)

from . import branches, quotas
from .messages import INSERT_MESSAGE, messages
from .models import ReplyChunk, ReplyStream, utcnow

streams = ReplyStream.__table__
chunks = ReplyChunk.__table__

# PostgreSQL: one channel for every change a resuming socket or a cancelling
# instance may wait for; the payload is the reply ids, comma-separated. The
# notification is sent when the transaction commits.
CHANNEL = "ai_chat_replies"
_NOTIFY = select(func.pg_notify(literal(CHANNEL), bindparam("payload", type_=String)))
_PAYLOAD_LIMIT = 7900  # bytes; PostgreSQL's limit is 8000

_REPLY_ID = bindparam("reply_id", type_=String)
# In UPDATEs, bind names must differ from the table's column names.
_WHICH = bindparam("which", type_=String)

_OPEN = streams.insert().values(
    reply_id=_REPLY_ID,
    conversation_id=bindparam("conversation_id", type_=Integer),
    user_id=bindparam("user_id", type_=Integer),
    message_id=bindparam("message_id", type_=Integer),
    instance=bindparam("instance", type_=String),
    lease_until=bindparam("lease_until", type_=Float),
    last_seq=-1,
    cancel_requested=False,
    created_at=bindparam("created_at", type_=DateTime),
    reserved_tokens=bindparam("reserved_tokens", type_=Integer),
    reserved_cost=bindparam("reserved_cost", type_=Float),
)
_INSERT_CHUNK = chunks.insert().values(
    reply_id=_REPLY_ID, seq=bindparam("seq", type_=Integer), text=bindparam("text", type_=Text))
_SET_LAST_SEQ = update(streams).where(streams.c.reply_id == _WHICH).values(
    last_seq=bindparam("seq", type_=Integer))
# Not once the reply is saved: its save wrote the whole list.
_SET_TOOL_EVENTS = update(streams).where(
    streams.c.reply_id == _WHICH, streams.c.finished_at.is_(None),
).values(tool_events=bindparam("events", type_=Text))
_CANCELS = select(streams.c.reply_id).where(
    streams.c.instance == bindparam("instance", type_=String),
    streams.c.finished_at.is_(None),
    streams.c.cancel_requested.is_(True),
)
_FINISH = update(streams).where(streams.c.reply_id == _WHICH).values(
    finished_at=bindparam("now", type_=DateTime),
    last_seq=bindparam("seq", type_=Integer),
    chunk_lengths=bindparam("lengths", type_=Text),
    tool_events=bindparam("events", type_=Text),
)
_DROP_CHUNKS = delete(chunks).where(chunks.c.reply_id == _REPLY_ID)
_REQUEST_CANCEL = update(streams).where(
    streams.c.reply_id == _WHICH,
    streams.c.user_id == bindparam("whose", type_=Integer),
    streams.c.finished_at.is_(None),
).values(cancel_requested=bindparam("yes", type_=Boolean))
_RENEW = update(streams).where(streams.c.reply_id == _WHICH).values(
    lease_until=bindparam("until", type_=Float))
_EXPIRED = select(streams.c.reply_id, streams.c.conversation_id, streams.c.user_id,
                  streams.c.message_id).where(
    streams.c.finished_at.is_(None), streams.c.lease_until < bindparam("now", type_=Float),
).limit(100)
# Claimed only while still expired and unfinished: two sweeping instances
# cannot both save it.
_CLAIM = update(streams).where(
    streams.c.reply_id == _WHICH, streams.c.finished_at.is_(None),
    streams.c.lease_until < bindparam("now", type_=Float),
).values(finished_at=bindparam("at", type_=DateTime))
_SAVED_CHUNKS = select(chunks.c.seq, chunks.c.text).where(
    chunks.c.reply_id == _REPLY_ID).order_by(chunks.c.seq)
_CHUNKS_AFTER = select(chunks.c.seq, chunks.c.text).where(
    chunks.c.reply_id == _REPLY_ID, chunks.c.seq > bindparam("after", type_=Integer),
).order_by(chunks.c.seq)
_SET_LENGTHS = update(streams).where(streams.c.reply_id == _WHICH).values(
    chunk_lengths=bindparam("lengths", type_=Text), last_seq=bindparam("seq", type_=Integer))
_FORGET = delete(streams).where(streams.c.created_at < bindparam("before", type_=DateTime),
                                streams.c.finished_at.is_not(None))

_asked = messages.alias("asked")
_answer = messages.alias("answer")
# Everything a resume needs to know of one reply: whose, which message it
# answers, how far it got, and (once saved) its row.
_STATE = (
    select(streams.c.reply_id, streams.c.user_id, streams.c.instance, streams.c.last_seq,
           streams.c.finished_at, streams.c.chunk_lengths, streams.c.tool_events,
           _asked.c.public_id.label("message_id"),
           _answer.c.content, _answer.c.status, _answer.c.error_ref, _answer.c.error_kind)
    .join(_asked, _asked.c.id == streams.c.message_id)
    .outerjoin(_answer, _answer.c.public_id == streams.c.reply_id)
)
STATE = _STATE.where(streams.c.reply_id == _REPLY_ID)
LIVE_IN_CONVERSATION = _STATE.where(
    streams.c.conversation_id == bindparam("conversation_id", type_=Integer),
    streams.c.finished_at.is_(None),
).order_by(streams.c.created_at)
# A reply whose stream row is gone (past the resume window): its saved row.
SAVED_REPLY = select(
    messages.c.id, messages.c.user_id, messages.c.content, messages.c.status, messages.c.error_ref,
    messages.c.error_kind, _asked.c.public_id.label("message_id"),
).join(_asked, _asked.c.id == messages.c.reply_to_id).where(messages.c.public_id == _REPLY_ID)


def notify(db, reply_ids) -> None:
    """Tell every instance listening (PostgreSQL only) that these replies changed."""
    if db.dialect != "postgresql" or not reply_ids:
        return
    payload = ""
    for reply_id in reply_ids:
        if len(payload) + len(reply_id) + 1 > _PAYLOAD_LIMIT:
            db.execute(_NOTIFY, {"payload": payload})
            payload = ""
        payload = f"{payload},{reply_id}" if payload else reply_id
    db.execute(_NOTIFY, {"payload": payload})


def lengths_text(pieces: list[str]) -> str:
    return ",".join(str(len(piece)) for piece in pieces)


def cut(text: str, lengths: str | None) -> list[str]:
    """A saved reply's text cut into its chunks again."""
    if not lengths:
        return [text] if text else []
    pieces, start = [], 0
    for length in map(int, lengths.split(",")):
        pieces.append(text[start:start + length])
        start += length
    return pieces


# Units of work

def open_stream(db, reply_id: str, conversation_id: int, user_id: int, message_id: int,
                instance: str, lease_until: float, reserved: quotas.Bound | None) -> None:
    """Open a reply's stream, leased to ``instance``, holding its quota
    reservation (``reserved``, checked by quotas.reserve; None: no quota)."""
    db.execute(_OPEN, {"reply_id": reply_id, "conversation_id": conversation_id,
                       "user_id": user_id, "message_id": message_id, "instance": instance,
                       "lease_until": lease_until, "created_at": utcnow(),
                       **quotas.reservation(reserved)})


def flush(db, new_chunks: list[dict], last_seqs: list[dict], instance: str,
          tool_events: list[dict] = ()) -> list[str]:
    """Save chunks (reply_id, seq, text), each reply's last seq and the tool
    events (which, events) of replies that have new ones; returns the ids of
    this instance's replies that someone asked to cancel."""
    if new_chunks:
        db.execute(_INSERT_CHUNK, new_chunks)
        db.execute(_SET_LAST_SEQ, last_seqs)
    if tool_events:
        db.execute(_SET_TOOL_EVENTS, list(tool_events))
    notify(db, list(dict.fromkeys(row["which"] for row in [*last_seqs, *tool_events])))
    return db.execute(_CANCELS, {"instance": instance}).scalars()


def cancel_requests(db, instance: str) -> list[str]:
    return db.execute(_CANCELS, {"instance": instance}).scalars()


def finish(db, reply_id: str, row: dict, pieces: list[str], flushed: bool,
           tool_events: str | None = None) -> int:
    """Save the reply's row and close its stream (keeping where its chunks
    began, and its tool events; its quota reservation ends), in one transaction."""
    reply_row_id = db.execute(INSERT_MESSAGE, row).scalar()
    branches.advance_leaf(db, row["conversation_id"], row["reply_to_id"], reply_row_id)
    db.execute(_FINISH, {"which": reply_id, "now": utcnow(), "seq": len(pieces) - 1,
                         "lengths": lengths_text(pieces), "events": tool_events})
    if flushed:
        db.execute(_DROP_CHUNKS, {"reply_id": reply_id})
    notify(db, [reply_id])
    return reply_row_id


def request_cancel(db, reply_id: str, user_id: int) -> bool:
    """Ask the instance generating the reply to cancel it; False if it is not
    the user's or has ended."""
    asked = db.execute(_REQUEST_CANCEL, {"which": reply_id, "whose": user_id,
                                         "yes": True}).rowcount == 1
    if asked:
        notify(db, [reply_id])
    return asked


def renew(db, reply_ids: list[str], lease_until: float) -> None:
    """Extend the leases of these replies (this process's, in flight), and so
    their quota reservations. By id, not by instance: a reply whose save
    failed must stop being renewed."""
    if reply_ids:
        db.execute(_RENEW, [{"which": reply_id, "until": lease_until}
                            for reply_id in reply_ids])


def sweep(db, now: float, message_row, forget_before: datetime) -> list[str]:
    """Save the replies whose instance stopped renewing their lease as failed
    (``interrupted``, with the text saved so far); forget streams that ended
    before ``forget_before``. ``message_row(expired, text)`` builds the row.
    Returns the ids of the replies saved."""
    saved = []
    for expired in db.execute(_EXPIRED, {"now": now}).all():
        values = {"reply_id": expired.reply_id, "which": expired.reply_id, "now": now,
                  "at": utcnow()}
        if db.execute(_CLAIM, values).rowcount != 1:
            continue  # another instance got there first
        pieces = [row.text for row in db.execute(_SAVED_CHUNKS, values).all()]
        row = message_row(expired, "".join(pieces))
        reply_row_id = db.execute(INSERT_MESSAGE, row).scalar()
        branches.advance_leaf(db, row["conversation_id"], row["reply_to_id"], reply_row_id)
        db.execute(_SET_LENGTHS, {"which": expired.reply_id, "seq": len(pieces) - 1,
                                  "lengths": lengths_text(pieces)})
        db.execute(_DROP_CHUNKS, values)
        saved.append(expired.reply_id)
    notify(db, saved)
    db.execute(_FORGET, {"before": forget_before})
    return saved


def state(db, reply_id: str):
    return db.execute(STATE, {"reply_id": reply_id}).first()


def saved_reply(db, reply_id: str):
    return db.execute(SAVED_REPLY, {"reply_id": reply_id}).first()


def chunks_after(db, reply_id: str, after: int) -> list:
    return db.execute(_CHUNKS_AFTER, {"reply_id": reply_id, "after": after}).all()


def live_in_conversation(db, conversation_id: int) -> list:
    return db.execute(LIVE_IN_CONVERSATION, {"conversation_id": conversation_id}).all()
