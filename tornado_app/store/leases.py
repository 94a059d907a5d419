"""Per-user connection slots as lease rows, shared by every process and instance.

A socket holds one row with an expiry; its process renews all of its rows in
one statement every few seconds. When a process dies (even by ``kill -9``)
its rows stop being renewed and expire, so the slots free themselves.

Taking a slot must be atomic across processes. On SQLite the conditional
INSERT is one statement, and SQLite runs write statements one at a time. On
PostgreSQL two transactions could both count ``cap - 1`` and both insert, so
the user's row is locked first (``SELECT ... FOR UPDATE``), which makes slot
takers of the same user queue behind each other.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Float, Integer, String, bindparam, delete, func, select, update

from .models import ConnectionLease, User

leases = ConnectionLease.__table__
users = User.__table__

_live = (
    select(func.count())
    .select_from(leases)
    .where(leases.c.user_id == bindparam("user_id", type_=Integer),
           leases.c.expires_at > bindparam("now", type_=Float))
    .scalar_subquery()
)
_ACQUIRE = leases.insert().from_select(
    ["id", "user_id", "instance", "expires_at"],
    select(bindparam("lease_id", type_=String), bindparam("user_id", type_=Integer),
           bindparam("holder", type_=String), bindparam("until", type_=Float))
    .where(_live < bindparam("cap", type_=Integer)),
).returning(leases.c.id)
_LOCK_USER = select(users.c.id).where(
    users.c.id == bindparam("user_id", type_=Integer)).with_for_update()
_RELEASE = delete(leases).where(leases.c.id == bindparam("lease_id", type_=String))
_RENEW = update(leases).where(leases.c.instance == bindparam("holder", type_=String)).values(
    expires_at=bindparam("until", type_=Float))
_FORGET = delete(leases).where(leases.c.expires_at < bindparam("before", type_=Float))


# Units of work (store/executor.py)

def acquire(db, user_id: int, instance: str, now: float, ttl: float, cap: int) -> str | None:
    """A new lease id, or None when the user already holds ``cap`` live leases."""
    if db.dialect == "postgresql":
        db.execute(_LOCK_USER, {"user_id": user_id})
    values = {"lease_id": uuid.uuid4().hex, "user_id": user_id, "holder": instance,
              "until": now + ttl, "now": now, "cap": cap}
    return db.execute(_ACQUIRE, values).scalar()


def release(db, lease_id: str) -> None:
    db.execute(_RELEASE, {"lease_id": lease_id})


def renew(db, instance: str, now: float, ttl: float) -> None:
    """Extend this instance's leases; forget long-expired ones of any instance."""
    db.execute(_RENEW, {"holder": instance, "until": now + ttl})
    db.execute(_FORGET, {"before": now - ttl})
