"""Token and cost quotas: reserve, then settle (tornado_app/quotas.py has the rules).

Before a reply is generated its upper bound is *reserved*: the user's saved
usage of the window, plus the live reservations, plus this bound must stay
within every limit that applies, and then the reply's stream row is written
carrying the bound (``reply_streams.reserved_tokens`` and ``reserved_cost``,
streams.py), in the admit transaction. When the reply is saved, the finish
that closes its stream ends the reservation and its real tokens and cost are
added to ``quota_usage``, in the transaction that saves the reply. So at
every moment ``used + reserved`` bounds what the saved replies will add up
to, on every process and instance sharing the database.

Atomicity as for connection leases (leases.py): on SQLite the check and the
stream's insert are in one unit of the batcher, inside its BEGIN IMMEDIATE,
and SQLite runs writers one at a time; on PostgreSQL the user's row is locked
first, so that two reservations of one user queue instead of both counting
the same room. Other users never wait.

A reservation lives as long as its reply's stream is live: unfinished and
its lease not run out. It is renewed with the lease, and a killed process's
reservations stop counting when their leases do (the sweep then saves those
replies as interrupted).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date
from typing import NamedTuple

from sqlalchemy import Boolean, Date, Float, Integer, String, bindparam, case, func, select, update

from .dialects import dialect_insert
from .leases import _LOCK_USER
from .models import QuotaUsage, ReplyStream, User

usage = QuotaUsage.__table__
streams = ReplyStream.__table__
users = User.__table__

_USER = bindparam("uid", type_=Integer)
_NOW = bindparam("now", type_=Float)
_DAY = bindparam("today", type_=Date)
_MONTH = bindparam("month_start", type_=Date)


def _zero(expression):
    return func.coalesce(expression.scalar_subquery(), 0)


_USED_DAY = _zero(select(usage.c.tokens).where(usage.c.user_id == _USER, usage.c.day == _DAY))
_USED_MONTH = _zero(select(func.sum(usage.c.tokens)).where(
    usage.c.user_id == _USER, usage.c.day >= _MONTH))
_COST_MONTH = _zero(select(func.sum(usage.c.cost)).where(
    usage.c.user_id == _USER, usage.c.day >= _MONTH))
# With the terms of ix_reply_streams_live_reserved's WHERE, so that SQLite uses it.
_live = (streams.c.user_id == _USER, streams.c.finished_at.is_(None),
         streams.c.reserved_tokens.is_not(None), streams.c.lease_until > _NOW)
_RESERVED = _zero(select(func.sum(streams.c.reserved_tokens)).where(*_live))
_RESERVED_COST = _zero(select(func.sum(streams.c.reserved_cost)).where(*_live))


def _limit(column, default: str, type_):
    """The user's override, else the config's; none at all when unlimited."""
    return case((users.c.quota_unlimited.is_(True), None),
                else_=func.coalesce(column, bindparam(default, type_=type_)))


_LIMIT_DAY = _limit(users.c.quota_tokens_per_day, "default_day", Integer)
_LIMIT_MONTH = _limit(users.c.quota_tokens_per_month, "default_month", Integer)
_LIMIT_COST = _limit(users.c.quota_cost_per_month, "default_cost", Float)
# Floating point slack for sums of prices.
EPSILON = 1e-9

# A user's standing: usage, reservations in flight, and the limits that apply.
_STANDING = select(
    _USED_DAY.label("tokens_today"), _USED_MONTH.label("tokens_month"),
    _COST_MONTH.label("cost_month"), _RESERVED.label("reserved_tokens"),
    _RESERVED_COST.label("reserved_cost"), _LIMIT_DAY.label("tokens_per_day"),
    _LIMIT_MONTH.label("tokens_per_month"), _LIMIT_COST.label("cost_per_month"),
).where(users.c.id == _USER)


def _add_usage(dialect: str):
    statement = dialect_insert(dialect)(usage).values(
        user_id=_USER, day=_DAY, tokens=bindparam("tokens", type_=Integer),
        cost=bindparam("spent", type_=Float))
    return statement.on_conflict_do_update(
        index_elements=[usage.c.user_id, usage.c.day],
        set_={"tokens": usage.c.tokens + statement.excluded.tokens,
              "cost": usage.c.cost + statement.excluded.cost})


_ADD_USAGE = {dialect: _add_usage(dialect) for dialect in ("sqlite", "postgresql")}

_SET_OVERRIDES = update(users).where(users.c.username == bindparam("name", type_=String)).values(
    quota_tokens_per_day=bindparam("per_day", type_=Integer),
    quota_tokens_per_month=bindparam("per_month", type_=Integer),
    quota_cost_per_month=bindparam("cost_month", type_=Float),
    quota_unlimited=bindparam("unlimited", type_=Boolean),
)
_OVERRIDES = select(users.c.id, users.c.quota_tokens_per_day, users.c.quota_tokens_per_month,
                    users.c.quota_cost_per_month, users.c.quota_unlimited).where(
    users.c.username == bindparam("name", type_=String))


@dataclass(frozen=True)
class Limits:
    """The config's limits (None: no limit)."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_per_month: float | None = None

    def values(self) -> dict:
        return {"default_day": self.tokens_per_day, "default_month": self.tokens_per_month,
                "default_cost": self.cost_per_month}


class Bound(NamedTuple):
    """What one reply may spend at most: tokens and cost. (A tuple: one is
    made per message, on the batcher's thread; a frozen dataclass costs more.)"""

    tokens: int
    cost: float = 0.0
    # The first model call's prompt it was computed for (chat._prompt keeps to it).
    prompt_tokens: int = 0


@functools.lru_cache(maxsize=4)
def _windows(today: date) -> dict:
    """The windows' bind values (the caller copies them: ``**``)."""
    return {"today": today, "month_start": today.replace(day=1)}


def reservation(bound: Bound | None) -> dict:
    """The stream row's reservation columns for a reply reserved ``bound``
    (None: no quota applied)."""
    if bound is None:
        return {"reserved_tokens": None, "reserved_cost": None}
    return {"reserved_tokens": bound.tokens, "reserved_cost": bound.cost}


def passed_limit(standing, bound: Bound) -> str | None:
    """The first limit of the user's ``standing`` (a row of _STANDING) that
    ``bound`` would pass, the live reservations counted: ``"day"``,
    ``"month"`` or ``"cost"``; None when it fits them all."""
    tokens = standing.reserved_tokens + bound.tokens
    if standing.tokens_per_day is not None and (
            standing.tokens_today + tokens > standing.tokens_per_day):
        return "day"
    if standing.tokens_per_month is not None and (
            standing.tokens_month + tokens > standing.tokens_per_month):
        return "month"
    if standing.cost_per_month is not None and (
            standing.cost_month + standing.reserved_cost + bound.cost
            > standing.cost_per_month + EPSILON):
        return "cost"
    return None


# Units of work (store/executor.py)

def reserve(db, user_id: int, bound: Bound, limits: Limits, now: float, today: date):
    """Whether ``bound`` may be reserved for a reply of the user: None if it
    fits (the caller then opens the reply's stream with it, in the same
    transaction), else the user's standing (a row of _STANDING) to say which
    limit it would pass."""
    if db.dialect == "postgresql":
        db.execute(_LOCK_USER, {"user_id": user_id})
    found = standing(db, user_id, limits, now, today)
    return None if found is None or passed_limit(found, bound) is None else found


def settle(db, user_id: int, day: date, tokens: int, cost: float) -> None:
    """Add what a saved reply spent to the user's usage (its reservation
    ended with its stream)."""
    if tokens or cost:
        db.execute(_ADD_USAGE[db.dialect], {"uid": user_id, "today": day, "tokens": tokens,
                                            "spent": cost})


def standing(db, user_id: int, limits: Limits, now: float, today: date):
    values = {"uid": user_id, "now": now, **_windows(today), **limits.values()}
    return db.execute(_STANDING, values).first()


def set_overrides(db, username: str, per_day, per_month, cost_month, unlimited) -> bool:
    return db.execute(_SET_OVERRIDES, {"name": username, "per_day": per_day,
                                       "per_month": per_month, "cost_month": cost_month,
                                       "unlimited": unlimited}).rowcount == 1


def overrides(db, username: str):
    return db.execute(_OVERRIDES, {"name": username}).first()
