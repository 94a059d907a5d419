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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .models import ConnectionLease, User

leases = ConnectionLease.__table__
users = User.__table__

# The statements, with bind parameters, so that the Store runs them through
# the engine or (on a SQLite file) its batcher alike.
_live = (
    select(func.count())
    .select_from(leases)
    .where(leases.c.user_id == bindparam("user_id", type_=Integer),
           leases.c.expires_at > bindparam("now", type_=Float))
    .scalar_subquery()
)
ACQUIRE = leases.insert().from_select(
    ["id", "user_id", "instance", "expires_at"],
    select(bindparam("lease_id", type_=String), bindparam("user_id", type_=Integer),
           bindparam("holder", type_=String), bindparam("until", type_=Float))
    .where(_live < bindparam("cap", type_=Integer)),
).returning(leases.c.id)
RELEASE = delete(leases).where(leases.c.id == bindparam("lease_id", type_=String))
RENEW = update(leases).where(leases.c.instance == bindparam("holder", type_=String)).values(
    expires_at=bindparam("until", type_=Float))
FORGET = delete(leases).where(leases.c.expires_at < bindparam("before", type_=Float))


def acquire_values(user_id: int, instance: str, now: float, ttl: float, cap: int) -> dict:
    return {"lease_id": uuid.uuid4().hex, "user_id": user_id, "holder": instance,
            "until": now + ttl, "now": now, "cap": cap}


def renew_values(instance: str, now: float, ttl: float) -> dict:
    """RENEW's and FORGET's: extend this instance's leases, drop long-expired ones of any."""
    return {"holder": instance, "until": now + ttl, "before": now - ttl}


async def acquire(conn: AsyncConnection, values: dict) -> str | None:
    """A new lease id, or None when the user already holds ``cap`` live leases."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            select(users.c.id).where(users.c.id == values["user_id"]).with_for_update())
    return (await conn.execute(ACQUIRE, values)).scalar_one_or_none()


async def renew(conn: AsyncConnection, values: dict) -> None:
    await conn.execute(RENEW, values)
    await conn.execute(FORGET, values)


async def live_count(engine: AsyncEngine, user_id: int, now: float) -> int:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(func.count()).select_from(leases).where(
                leases.c.user_id == user_id, leases.c.expires_at > now
            )
        )
        return result.scalar_one()
