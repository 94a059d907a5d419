"""The statements of users' memories (the ``memories`` table).

Values arrive and leave encrypted: the Store never sees a memory in plain
text (tornado_app/memory.py encrypts and decrypts).
"""

from __future__ import annotations

import functools

from sqlalchemy import DateTime, Integer, LargeBinary, String, bindparam, delete, func, select

from .dialects import dialect_insert
from .models import Memory, User, utcnow

memories = Memory.__table__
users = User.__table__

_USER = memories.c.user_id == bindparam("user_id", type_=Integer)
_KEY = memories.c.key == bindparam("key", type_=String)

LIST = select(memories.c.key, memories.c.value, memories.c.updated_at).where(_USER).order_by(
    memories.c.key)
_EXISTS = select(memories.c.key).where(_USER, _KEY)
_COUNT = select(func.count()).select_from(memories).where(_USER)
_DELETE = delete(memories).where(_USER, _KEY)
_DELETE_ALL = delete(memories).where(_USER)
_USER_ID = select(users.c.id).where(users.c.username == bindparam("username", type_=String))
# PostgreSQL: concurrent saves of one user's new keys queue here, so that the
# count below holds (SQLite's writes are one at a time anyway).
_LOCK_USER = select(users.c.id).where(
    users.c.id == bindparam("user_id", type_=Integer)).with_for_update()


@functools.cache
def _upsert(dialect: str):
    insert = dialect_insert(dialect)(memories).values(
        user_id=bindparam("user_id", type_=Integer), key=bindparam("key", type_=String),
        value=bindparam("value", type_=LargeBinary),
        created_at=bindparam("now", type_=DateTime), updated_at=bindparam("now", type_=DateTime))
    return insert.on_conflict_do_update(
        index_elements=["user_id", "key"],
        set_={"value": insert.excluded.value, "updated_at": insert.excluded.updated_at})


# Units of work (store/executor.py)

def save(db, user_id: int, key: str, value: bytes, max_items: int) -> bool:
    """Save or replace a memory. False (nothing saved) when the key is new and
    the user already has ``max_items`` memories."""
    values = {"user_id": user_id, "key": key}
    if db.dialect == "postgresql":
        db.execute(_LOCK_USER, values)
    if db.execute(_EXISTS, values).first() is None:
        if db.execute(_COUNT, values).scalar() >= max_items:
            return False
    db.execute(_upsert(db.dialect), {**values, "value": value, "now": utcnow()})
    return True


def remove(db, user_id: int, key: str) -> bool:
    return db.execute(_DELETE, {"user_id": user_id, "key": key}).rowcount == 1


def forget(db, username: str) -> int | None:
    """Delete every memory of a user: how many, or None when there is no such user."""
    user_id = db.execute(_USER_ID, {"username": username}).scalar()
    if user_id is None:
        return None
    return db.execute(_DELETE_ALL, {"user_id": user_id}).rowcount
