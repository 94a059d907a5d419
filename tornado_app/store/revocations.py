"""Revoked tokens: one token by its ``jti`` (log out), or all of a user's
tokens issued before a time (log out everywhere, ``users revoke``)."""

from __future__ import annotations

import functools
from datetime import datetime

from sqlalchemy import DateTime, Integer, String, bindparam, delete, update

from .dialects import dialect_insert
from .models import RevokedToken, User, utcnow

revoked = RevokedToken.__table__
users = User.__table__


@functools.cache
def _insert(dialect: str):
    return dialect_insert(dialect)(revoked).values(
        jti=bindparam("jti", type_=String), user_id=bindparam("user_id", type_=Integer),
        expires_at=bindparam("expires_at", type_=DateTime),
        revoked_at=bindparam("revoked_at", type_=DateTime),
    ).on_conflict_do_nothing(index_elements=["jti"])


_REVOKE_ALL = update(users).where(users.c.username == bindparam("name", type_=String)).values(
    tokens_revoked_before=bindparam("now", type_=DateTime))
_PURGE = delete(revoked).where(revoked.c.expires_at < bindparam("now", type_=DateTime))


# Units of work (store/executor.py)

def revoke_token(db, jti: str, user_id: int, expires_at: datetime) -> None:
    db.execute(_insert(db.dialect), {"jti": jti, "user_id": user_id, "expires_at": expires_at,
                                     "revoked_at": utcnow()})


def revoke_all(db, username: str) -> bool:
    """Refuse every token of the user issued until now. False: no such user."""
    return db.execute(_REVOKE_ALL, {"name": username, "now": utcnow()}).rowcount == 1


def purge_expired(db) -> int:
    """Forget revocations of tokens that have expired anyway."""
    return db.execute(_PURGE, {"now": utcnow()}).rowcount
