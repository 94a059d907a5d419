"""Revoked tokens: one token by its ``jti`` (log out), or all of a user's
tokens issued before a time (log out everywhere, ``users revoke``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import RevokedToken, User, utcnow
from .ratelimit import dialect_insert

revoked = RevokedToken.__table__
users = User.__table__


async def revoke_token(engine: AsyncEngine, jti: str, user_id: int, expires_at: datetime) -> None:
    async with engine.begin() as conn:
        insert = dialect_insert(conn)(revoked).values(
            jti=jti, user_id=user_id, expires_at=expires_at, revoked_at=utcnow()
        )
        await conn.execute(insert.on_conflict_do_nothing(index_elements=["jti"]))


async def revoke_all(engine: AsyncEngine, username: str) -> bool:
    """Refuse every token of the user issued until now. False: no such user."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(users).where(users.c.username == username).values(
                tokens_revoked_before=utcnow()
            )
        )
        return result.rowcount == 1


async def revoked_jtis(engine: AsyncEngine, jtis: list[str]) -> set[str]:
    if not jtis:
        return set()
    async with engine.connect() as conn:
        result = await conn.execute(select(revoked.c.jti).where(revoked.c.jti.in_(jtis)))
        return set(result.scalars())


async def purge_expired(engine: AsyncEngine) -> int:
    """Forget revocations of tokens that have expired anyway."""
    async with engine.begin() as conn:
        result = await conn.execute(delete(revoked).where(revoked.c.expires_at < utcnow()))
        return result.rowcount
