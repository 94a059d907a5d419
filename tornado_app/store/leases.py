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

from sqlalchemy import delete, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import ConnectionLease, User

leases = ConnectionLease.__table__
users = User.__table__


async def acquire(
    engine: AsyncEngine, user_id: int, instance: str, now: float, ttl: float, cap: int
) -> str | None:
    """A new lease id, or None when the user already holds ``cap`` live leases."""
    lease_id = uuid.uuid4().hex
    live = (
        select(func.count())
        .select_from(leases)
        .where(leases.c.user_id == user_id, leases.c.expires_at > now)
        .scalar_subquery()
    )
    insert = leases.insert().from_select(
        ["id", "user_id", "instance", "expires_at"],
        select(literal(lease_id), literal(user_id), literal(instance), literal(now + ttl)).where(
            live < cap
        ),
    )
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(select(users.c.id).where(users.c.id == user_id).with_for_update())
        result = await conn.execute(insert)
    return lease_id if result.rowcount == 1 else None


async def release(engine: AsyncEngine, lease_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(leases).where(leases.c.id == lease_id))


async def renew(engine: AsyncEngine, instance: str, now: float, ttl: float) -> None:
    """Extend every lease of this instance, and drop long-expired ones of any."""
    async with engine.begin() as conn:
        await conn.execute(
            update(leases).where(leases.c.instance == instance).values(expires_at=now + ttl)
        )
        await conn.execute(delete(leases).where(leases.c.expires_at < now - ttl))


async def live_count(engine: AsyncEngine, user_id: int, now: float) -> int:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(func.count()).select_from(leases).where(
                leases.c.user_id == user_id, leases.c.expires_at > now
            )
        )
        return result.scalar_one()


