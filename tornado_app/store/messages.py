"""The statements of conversations and messages, built once with bind parameters."""

from __future__ import annotations

import functools
import secrets
import time

from sqlalchemy import Integer, bindparam, select

from .dialects import dialect_insert
from .models import (
    ROLE_ASSISTANT,
    ROLE_USER,
    STATUS_CANCELLED,
    STATUS_OK,
    Conversation,
    Message,
    utcnow,
)

conversations = Conversation.__table__
messages = Message.__table__

_COLUMNS = [c.name for c in messages.c if c.name != "id"]
INSERT_MESSAGE = messages.insert().values(
    {name: bindparam(name, type_=messages.c[name].type) for name in _COLUMNS}
).returning(messages.c.id)


def new_public_id() -> str:
    """A message's id for clients: 32 hex digits, the time in milliseconds then
    80 random bits. Time first, so that new ids go to the end of their index
    (cheap inserts) and no two collide in practice."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def message_row(**values) -> dict:
    """A messages row for INSERT_MESSAGE: every column, NULL unless given, status ok."""
    row = dict.fromkeys(_COLUMNS)
    row["status"] = STATUS_OK
    row["regenerated"] = False
    row.update(values, created_at=utcnow())
    return row


def user_message(conversation_id: int, user_id: int, content: str, public_id: str,
                 parent_id: int | None = None) -> dict:
    return message_row(conversation_id=conversation_id, user_id=user_id, role=ROLE_USER,
                       content=content, public_id=public_id, parent_id=parent_id)


def reply_row(conversation_id: int, user_id: int, reply_to_id: int, public_id: str,
              **columns) -> dict:
    # A reply's parent is the message it answers (its branch; store/branches.py).
    return message_row(conversation_id=conversation_id, user_id=user_id,
                       reply_to_id=reply_to_id, parent_id=reply_to_id, role=ROLE_ASSISTANT,
                       public_id=public_id, **columns)


@functools.cache
def insert_conversation(dialect: str):
    """INSERT .. ON CONFLICT DO NOTHING: two sockets that open the same
    conversation at once must not fail on the unique constraint."""
    return dialect_insert(dialect)(conversations).values(
        user_id=bindparam("user_id", type_=Integer),
        client_id=bindparam("client_id", type_=conversations.c.client_id.type),
        created_at=bindparam("created_at", type_=conversations.c.created_at.type),
    ).on_conflict_do_nothing(index_elements=["user_id", "client_id"])


CONVERSATION_ID = select(conversations.c.id).where(
    conversations.c.user_id == bindparam("user_id", type_=Integer),
    conversations.c.client_id == bindparam("client_id", type_=conversations.c.client_id.type),
)

# What the chat page shows of a conversation: the delivered turns (user
# messages, finished or stopped replies), newest first.
TRANSCRIPT = (
    select(messages.c.public_id.label("id"), messages.c.role, messages.c.content,
           messages.c.status, messages.c.created_at)
    .join(conversations, conversations.c.id == messages.c.conversation_id)
    .where(
        conversations.c.user_id == bindparam("user_id", type_=Integer),
        conversations.c.client_id == bindparam("client_id", type_=conversations.c.client_id.type),
        messages.c.role.in_((ROLE_USER, ROLE_ASSISTANT)),
        messages.c.status.in_((STATUS_OK, STATUS_CANCELLED)),
    )
    .order_by(messages.c.id.desc())
    .limit(bindparam("limit", type_=Integer))
)
