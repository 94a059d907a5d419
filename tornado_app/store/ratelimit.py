"""The per-user rate limit as one atomic SQL statement (GCRA).

GCRA keeps one number per user, the theoretical arrival time ``tat``. With
``T = per_seconds / messages`` and burst tolerance ``tau = per_seconds - T``, a
message at time ``now`` passes when ``max(tat, now) - now <= tau``, and then
``tat`` becomes ``max(tat, now) + T``. Decision and update happen in a single
``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``, so concurrent senders on
any number of processes sharing the database can never both take the last
slot: the database serialises the row update.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import Float, Integer, bindparam, case

from .dialects import dialect_insert
from .models import RateLimit

# Floating point slack, so that a message exactly on the boundary passes.
EPSILON = 1e-6


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until the next message would pass; 0 if allowed


@functools.cache  # one statement per dialect, built once
def upsert(dialect: str):
    """The decision and the update as one statement, for the dialect, with
    the bind parameters of :func:`parameters`."""
    row = RateLimit.__table__.c
    now = bindparam("now", type_=Float)
    interval = bindparam("interval", type_=Float)
    start = case((row.tat > now, row.tat), else_=now)
    passes = start - now <= bindparam("slack", type_=Float)
    statement = dialect_insert(dialect)(RateLimit).values(
        user_id=bindparam("user_id", type_=Integer), tat=now + interval, granted=True
    )
    return statement.on_conflict_do_update(
        index_elements=[row.user_id],
        set_={"tat": case((passes, start + interval), else_=row.tat), "granted": passes},
    ).returning(row.tat, row.granted)


def parameters(user_id: int, now: float, messages: int, per_seconds: float) -> tuple[dict, float]:
    """The upsert's bind parameters, and the burst tolerance tau."""
    interval = per_seconds / messages
    tolerance = per_seconds - interval
    values = {"user_id": user_id, "now": now, "interval": interval,
              "slack": tolerance + EPSILON}
    return values, tolerance


def take(db, user_id: int, now: float, messages: int, per_seconds: float) -> Decision:
    """Take one message of ``messages`` per ``per_seconds``, inside a unit of
    work (store/executor.py)."""
    values, tolerance = parameters(user_id, now, messages, per_seconds)
    tat, granted = db.execute(upsert(db.dialect), values).first()
    return decision(tat, granted, tolerance, now)


def decision(tat: float, granted: bool, tolerance: float, now: float) -> Decision:
    """The decision the statement returned (the new ``tat`` and whether it passed)."""
    if granted:
        return Decision(True, 0.0)
    return Decision(False, max(0.0, tat - tolerance - now))
