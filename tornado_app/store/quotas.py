"""Token and cost quotas: reserve, then settle (tornado_app/quotas.py has the rules).

Before a reply is generated its upper bound is *reserved* with one
``INSERT ... SELECT ... WHERE <it fits>``: a reservation row is written only
if the user's saved usage of the window, plus the live reservations, plus this
bound stays within every limit that applies. When the reply is saved, its
reservation is deleted and its real tokens and cost are added to
``quota_usage``, in the transaction that saves the reply. So at every
moment ``used + reserved`` bounds what the saved replies will add up to, on
every process and instance sharing the database.

Atomicity as for connection leases (leases.py): on SQLite the conditional
INSERT is one write statement (inside the batcher's BEGIN IMMEDIATE), and
SQLite runs writes one at a time; on PostgreSQL the user's row is locked
first, so that two reservations of one user queue instead of both counting
the same room. Other users never wait.

A reservation lives as long as its reply's lease: renewed with it, ignored
once expired (a killed process stops renewing), forgotten later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import (
    Boolean,
    Date,
    Float,
    Integer,
    String,
    bindparam,
    case,
    delete,
    func,

    or_,
    select,
    update,
)

from .dialects import dialect_insert
from .leases import _LOCK_USER
from .models import QuotaReservation, QuotaUsage, User

usage = QuotaUsage.__table__
reservations = QuotaReservation.__table__
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
_live = (reservations.c.user_id == _USER, reservations.c.expires_at > _NOW)
_RESERVED = _zero(select(func.sum(reservations.c.tokens)).where(*_live))
_RESERVED_COST = _zero(select(func.sum(reservations.c.cost)).where(*_live))


def _limit(column, default: str, type_):
    """The user's override, else the config's; none at all when unlimited."""
    return case((users.c.quota_unlimited.is_(True), None),
                else_=func.coalesce(column, bindparam(default, type_=type_)))


_LIMIT_DAY = _limit(users.c.quota_tokens_per_day, "default_day", Integer)
_LIMIT_MONTH = _limit(users.c.quota_tokens_per_month, "default_month", Integer)
_LIMIT_COST = _limit(users.c.quota_cost_per_month, "default_cost", Float)
_BOUND = bindparam("bound_tokens", type_=Integer)
_BOUND_COST = bindparam("bound_cost", type_=Float)
# Floating point slack for sums of prices.
EPSILON = 1e-9

_RESERVE = reservations.insert().from_select(
    ["reply_id", "user_id", "tokens", "cost", "expires_at"],
    select(bindparam("rid", type_=String), users.c.id, _BOUND, _BOUND_COST,
           bindparam("until", type_=Float))
    .where(
        users.c.id == _USER,
        or_(_LIMIT_DAY.is_(None), _USED_DAY + _RESERVED + _BOUND <= _LIMIT_DAY),
        or_(_LIMIT_MONTH.is_(None), _USED_MONTH + _RESERVED + _BOUND <= _LIMIT_MONTH),
        or_(_LIMIT_COST.is_(None),
            _COST_MONTH + _RESERVED_COST + _BOUND_COST <= _LIMIT_COST + EPSILON),
    ),
).returning(reservations.c.reply_id)

# A user's standing: usage, reservations in flight, and the limits that apply.
_STANDING = select(
    _USED_DAY.label("tokens_today"), _USED_MONTH.label("tokens_month"),
    _COST_MONTH.label("cost_month"), _RESERVED.label("reserved_tokens"),
    _RESERVED_COST.label("reserved_cost"), _LIMIT_DAY.label("tokens_per_day"),
    _LIMIT_MONTH.label("tokens_per_month"), _LIMIT_COST.label("cost_per_month"),
).where(users.c.id == _USER)

_RELEASE = delete(reservations).where(reservations.c.reply_id == bindparam("rid", type_=String))
_RENEW = update(reservations).where(
    reservations.c.reply_id == bindparam("which", type_=String)).values(
    expires_at=bindparam("until", type_=Float))
_FORGET = delete(reservations).where(reservations.c.expires_at < bindparam("before", type_=Float))


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


@dataclass(frozen=True)
class Bound:
    """What one reply may spend at most: tokens and cost."""

    tokens: int
    cost: float = 0.0
    # The first model call's prompt it was computed for (chat._prompt keeps to it).
    prompt_tokens: int = 0


def _windows(today: date) -> dict:
    return {"today": today, "month_start": today.replace(day=1)}


# Units of work (store/executor.py)

def reserve(db, reply_id: str, user_id: int, bound: Bound, limits: Limits, now: float,
            today: date, until: float):
    """Reserve ``bound`` for the reply; None if it fits, else the user's
    standing (a row of _STANDING) to say which limit it would pass."""
    if db.dialect == "postgresql":
        db.execute(_LOCK_USER, {"user_id": user_id})
    values = {"rid": reply_id, "uid": user_id, "bound_tokens": bound.tokens,
              "bound_cost": bound.cost, "until": until, "now": now, **_windows(today),
              **limits.values()}
    if db.execute(_RESERVE, values).scalar() is not None:
        return None
    return db.execute(_STANDING, values).first()


def settle(db, reply_id: str, user_id: int, day: date, tokens: int, cost: float,
           reserved: bool = True) -> None:
    """Replace the reply's reservation (if it had one: ``reserved``) by what it spent."""
    if reserved:
        db.execute(_RELEASE, {"rid": reply_id})
    if tokens or cost:
        db.execute(_ADD_USAGE[db.dialect], {"uid": user_id, "today": day, "tokens": tokens,
                                            "spent": cost})


def release(db, reply_id: str) -> None:
    db.execute(_RELEASE, {"rid": reply_id})


def renew(db, reply_ids: list[str], now: float, ttl: float) -> None:
    """Extend the reservations of these replies (in flight here); forget
    reservations of any instance that expired a while ago."""
    if reply_ids:
        db.execute(_RENEW, [{"which": reply_id, "until": now + ttl} for reply_id in reply_ids])
    db.execute(_FORGET, {"before": now - ttl})


def standing(db, user_id: int, limits: Limits, now: float, today: date):
    values = {"uid": user_id, "now": now, **_windows(today), **limits.values()}
    return db.execute(_STANDING, values).first()


def set_overrides(db, username: str, per_day, per_month, cost_month, unlimited) -> bool:
    return db.execute(_SET_OVERRIDES, {"name": username, "per_day": per_day,
                                       "per_month": per_month, "cost_month": cost_month,
                                       "unlimited": unlimited}).rowcount == 1


def overrides(db, username: str):
    return db.execute(_OVERRIDES, {"name": username}).first()



