"""Feedback on replies: a rating (1 up, -1 down) and an optional comment, one
per reply, given by the reply's own user. Statements and units of work."""

from __future__ import annotations

import functools

from sqlalchemy import DateTime, Integer, String, Text, bindparam, delete, select

from .dialects import dialect_insert
from .messages import messages
from .models import ROLE_ASSISTANT, Feedback, utcnow

feedback = Feedback.__table__

# The user's own reply, by its public id.
OWN_REPLY = select(messages.c.id).where(
    messages.c.public_id == bindparam("public_id", type_=String),
    messages.c.user_id == bindparam("user_id", type_=Integer),
    messages.c.role == ROLE_ASSISTANT,
)
REMOVE = delete(feedback).where(feedback.c.message_id == bindparam("message_id", type_=Integer))


@functools.cache
def upsert(dialect: str):
    """Sending feedback again replaces the earlier one."""
    insert = dialect_insert(dialect)(feedback).values(
        message_id=bindparam("message_id", type_=Integer),
        user_id=bindparam("user_id", type_=Integer),
        rating=bindparam("rating", type_=Integer),
        comment=bindparam("comment", type_=Text),
        created_at=bindparam("created_at", type_=DateTime),
    )
    return insert.on_conflict_do_update(
        index_elements=["message_id"],
        set_={"rating": insert.excluded.rating, "comment": insert.excluded.comment,
              "created_at": insert.excluded.created_at})


def set_feedback(db, user_id: int, reply_id: str, rating: int, comment: str | None) -> bool:
    """Save (rating 1 or -1) or remove (0) the user's feedback on a reply of
    theirs. False: no such reply of the user's, nothing saved."""
    message_id = db.execute(OWN_REPLY, {"public_id": reply_id, "user_id": user_id}).scalar()
    if message_id is None:
        return False
    if rating == 0:
        db.execute(REMOVE, {"message_id": message_id})
    else:
        db.execute(upsert(db.dialect), {"message_id": message_id, "user_id": user_id,
                                        "rating": rating, "comment": comment,
                                        "created_at": utcnow()})
    return True
