"""The statements of users and of the checks on their tokens."""

from __future__ import annotations

from sqlalchemy import Boolean, DateTime, String, bindparam, exists, select, update

from .models import User
from .revocations import revoked

users = User.__table__

INSERT_USER = users.insert().values(
    username=bindparam("username", type_=String),
    password_hash=bindparam("password_hash", type_=String),
    is_admin=bindparam("is_admin", type_=Boolean),
    disabled=False,
    created_at=bindparam("created_at", type_=DateTime),
).returning(*users.c)

BY_NAME = select(users).where(users.c.username == bindparam("username", type_=String))

# The user a token names, with ``jti_revoked``: whether that one token was
# revoked (one statement: this runs for every socket that opens).
TOKEN_HOLDER = select(
    users, exists().where(revoked.c.jti == bindparam("jti", type_=String)).label("jti_revoked")
).where(users.c.username == bindparam("username", type_=String))

ALL_USERS = select(users).order_by(users.c.username)


def set_flag(column: str):
    """UPDATE users SET <column> = :value WHERE username = :name."""
    return update(users).where(users.c.username == bindparam("name", type_=String)).values(
        {column: bindparam("value", type_=Boolean)})


SET_DISABLED = set_flag("disabled")
SET_ADMIN = set_flag("is_admin")


def token_states(user_ids, jtis):
    """What the periodic re-check of open sockets reads: their users' flags,
    and which of their tokens are revoked (two statements, one read)."""
    return (
        select(users.c.id, users.c.disabled, users.c.tokens_revoked_before)
        .where(users.c.id.in_(user_ids)),
        select(revoked.c.jti).where(revoked.c.jti.in_(jtis)),
    )
