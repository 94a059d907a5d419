"""The transcript as a tree: each message's parent, each conversation's active
leaf, and the agent a conversation answers with.

A message's parent is the message before it on its branch (a reply's is the
user message it answers). Regenerating a reply adds a sibling reply; editing
a message adds a sibling user message. The conversation's ``active_leaf_id``
is where its active branch ends: the next message's parent, and where the
prompt's path is read from (upwards, parent by parent).

Statements with bind parameters, and units of work (store/executor.py).
"""

from __future__ import annotations

from sqlalchemy import Integer, String, bindparam, literal, select, update

from . import tool_steps
from .feedback import feedback
from .messages import conversations, messages
from .models import ROLE_ASSISTANT, ROLE_USER, STATUS_OK

# Most messages a path is read along (the history API's and a switch's).
PATH_LIMIT = 10_000

_CONVERSATION = bindparam("conversation_id", type_=Integer)
# In UPDATEs, bind names must differ from the table's column names.
_WHICH = bindparam("which", type_=Integer)

CONVERSATION_STATE = select(conversations.c.active_leaf_id, conversations.c.agent).where(
    conversations.c.id == _CONVERSATION)
SET_LEAF = update(conversations).where(conversations.c.id == _WHICH).values(
    active_leaf_id=bindparam("leaf", type_=Integer))
# A reply becomes the leaf only if its message still is (no switch meanwhile).
ADVANCE_LEAF = update(conversations).where(
    conversations.c.id == _WHICH,
    conversations.c.active_leaf_id == bindparam("asked", type_=Integer),
).values(active_leaf_id=bindparam("leaf", type_=Integer))
SET_AGENT = update(conversations).where(conversations.c.id == _WHICH).values(
    agent=bindparam("name", type_=String))

_MESSAGE_COLUMNS = (messages.c.id, messages.c.public_id, messages.c.parent_id,
                    messages.c.role, messages.c.content, messages.c.status,
                    messages.c.reply_to_id)
MESSAGE_BY_PUBLIC_ID = select(*_MESSAGE_COLUMNS).where(
    messages.c.public_id == bindparam("public_id", type_=String),
    messages.c.conversation_id == _CONVERSATION)
MESSAGE_BY_ID = select(*_MESSAGE_COLUMNS).where(
    messages.c.id == bindparam("id", type_=Integer))


def path_cte(start=None):
    """The path from message ``start`` (a bind parameter, or an expression)
    up to (not including) ``after_id``, or to the root, or ``limit``
    messages long, as a CTE with each row's ``depth`` (1 at ``start``)."""
    up = messages.alias("up")
    base = select(*_MESSAGE_COLUMNS, literal(1, Integer).label("depth")).where(
        messages.c.id == (bindparam("start", type_=Integer) if start is None else start),
        messages.c.id != bindparam("after_id", type_=Integer),
    ).cte("path", recursive=True)
    step = select(up.c.id, up.c.public_id, up.c.parent_id, up.c.role, up.c.content,
                  up.c.status, up.c.reply_to_id, base.c.depth + 1).where(
        up.c.id == base.c.parent_id,
        base.c.parent_id != bindparam("after_id", type_=Integer),
        base.c.depth < bindparam("limit", type_=Integer),
    )
    return base.union_all(step)


def _path_up():
    """The path from message ``start`` (path_cte), oldest first."""
    path = path_cte()
    return select(path).order_by(path.c.depth.desc())


PATH_UP = _path_up()


# A conversation's messages from ``start`` on, oldest first: among them are
# all of its descendants (children are newer than their parents).
LATER_MESSAGES = select(messages.c.id, messages.c.parent_id).where(
    messages.c.conversation_id == _CONVERSATION,
    messages.c.id >= bindparam("start", type_=Integer),
).order_by(messages.c.id)

# The whole tree of a conversation, for the history API, with the feedback.
TREE = (
    select(messages.c.id, messages.c.public_id, messages.c.parent_id, messages.c.role,
           messages.c.content, messages.c.status, messages.c.created_at,
           feedback.c.rating, feedback.c.comment)
    .outerjoin(feedback, feedback.c.message_id == messages.c.id)
    .where(messages.c.conversation_id == _CONVERSATION)
    .order_by(messages.c.id)
)


CONVERSATION_BY_CLIENT = select(conversations.c.id, conversations.c.active_leaf_id).where(
    conversations.c.user_id == bindparam("user_id", type_=Integer),
    conversations.c.client_id == bindparam("client_id", type_=conversations.c.client_id.type))


# Units of work and their helpers

def state(db, conversation_id: int):
    """The conversation's active leaf and chosen agent."""
    return db.execute(CONVERSATION_STATE, {"conversation_id": conversation_id}).first()


def set_leaf(db, conversation_id: int, leaf_id: int) -> None:
    db.execute(SET_LEAF, {"which": conversation_id, "leaf": leaf_id})


def advance_leaf(db, conversation_id: int, asked_id: int, reply_id: int) -> None:
    """A saved reply becomes the leaf, if its message still is one."""
    db.execute(ADVANCE_LEAF, {"which": conversation_id, "asked": asked_id, "leaf": reply_id})


def set_agent(db, conversation_id: int, name: str | None) -> None:
    db.execute(SET_AGENT, {"which": conversation_id, "name": name})


def find(db, conversation_id: int, public_id: str):
    """A message of this conversation by its public id, or None."""
    return db.execute(MESSAGE_BY_PUBLIC_ID, {"public_id": public_id,
                                             "conversation_id": conversation_id}).first()


def last_user_message(db, leaf_id: int | None):
    """The active branch's last user message, or None."""
    current = leaf_id
    while current is not None:
        row = db.execute(MESSAGE_BY_ID, {"id": current}).first()
        if row is None or row.role == ROLE_USER:
            return row
        current = row.parent_id
    return None


def path_up(db, start: int | None, after_id: int, limit: int) -> tuple[list, bool]:
    """The messages from ``start`` up its branch, oldest first, stopping
    before ``after_id``; and whether they continue ``after_id`` (so a copy
    that ends there needs only them)."""
    if start is None or start == after_id:  # nothing to read (the copy ends at the leaf)
        return [], continues(start, after_id, [])
    rows = db.execute(PATH_UP, {"start": start, "after_id": after_id, "limit": limit}).all()
    return rows, continues(start, after_id, rows)


def continues(start: int | None, after_id: int, rows: list) -> bool:
    """Whether ``rows``, the path read up from ``start`` (PATH_UP, oldest
    first), continues ``after_id``: the copy that ends there needs only them."""
    if start is None:
        return False
    if not rows:
        return start == after_id
    return after_id != 0 and rows[0].parent_id == after_id


def prompt_turns(rows: list) -> list:
    """What a prompt keeps of a path: user messages, and delivered replies
    only (an error text never becomes part of the model's context)."""
    return [row for row in rows if row.role == ROLE_USER or row.status == STATUS_OK]


def newest_descendant(db, conversation_id: int, start: int) -> int:
    """The newest message under ``start`` (itself if it has none), a leaf:
    one pass over the conversation's later messages, through its index
    (messages have no index on parent_id, which each insert would pay for)."""
    under = {start}
    for row in db.execute(LATER_MESSAGES, {"conversation_id": conversation_id,
                                           "start": start}).all():
        if row.parent_id in under:
            under.add(row.id)
    return max(under)


def switch(db, conversation_id: int, public_id: str) -> list[str] | None:
    """Make the branch through a message active (its newest descendant the
    leaf); the active path's public ids, oldest first. None: no such message."""
    target = find(db, conversation_id, public_id)
    if target is None:
        return None
    leaf = newest_descendant(db, conversation_id, target.id)
    set_leaf(db, conversation_id, leaf)
    rows, _ = path_up(db, leaf, 0, PATH_LIMIT)
    return [row.public_id for row in rows]


def tree(db, user_id: int, client_id: str) -> tuple[int | None, list, dict[int, list]]:
    """A conversation's active leaf, all its messages (oldest first) and their
    tool steps by reply (tool_steps.of_conversation). The steps are read after
    the messages: a step is saved with its reply, so every reply read has its
    steps, even where each statement sees its own snapshot (PostgreSQL's read
    committed)."""
    conversation = db.execute(CONVERSATION_BY_CLIENT, {"user_id": user_id,
                                                       "client_id": client_id}).first()
    if conversation is None:
        return None, [], {}
    rows = db.execute(TREE, {"conversation_id": conversation.id}).all()
    return conversation.active_leaf_id, rows, tool_steps.of_conversation(db, conversation.id)


def is_reply(row) -> bool:
    return row is not None and row.role == ROLE_ASSISTANT
