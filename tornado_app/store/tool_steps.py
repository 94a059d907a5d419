"""The tool calls of replies (tool_steps): saved with their reply, read back
with the history a prompt is built from."""

from __future__ import annotations

import json

from sqlalchemy import Integer, bindparam, select

from .models import ToolStep, utcnow

tool_steps = ToolStep.__table__

# Characters of a result kept in the transcript (and so in later prompts).
RESULT_CHARS = 4000
# Characters of a call id and of a tool name kept: the model writes both, and
# a long one is cut to its column rather than fail the reply's save.
CALL_ID_CHARS = 128
TOOL_CHARS = 64

_COLUMNS = [c.name for c in tool_steps.c if c.name != "id"]
INSERT = tool_steps.insert().values(
    {name: bindparam(name, type_=tool_steps.c[name].type) for name in _COLUMNS})

# The steps of a conversation's replies between two message ids (exclusive),
# in the order they were made: those of the history turns a prompt is built from.
BETWEEN = (
    select(tool_steps.c.message_id, tool_steps.c.turn, tool_steps.c.call_id,
           tool_steps.c.tool.label("name"), tool_steps.c.arguments, tool_steps.c.result)
    .where(tool_steps.c.conversation_id == bindparam("conversation_id", type_=Integer),
           tool_steps.c.message_id > bindparam("after_id", type_=Integer),
           tool_steps.c.message_id < bindparam("before_id", type_=Integer))
    .order_by(tool_steps.c.message_id, tool_steps.c.id)
)


# The steps of a user's conversation, for the history API: what was called and
# how it went, never the result (it may hold what the page should not show).
OF_CONVERSATION = (
    select(tool_steps.c.message_id, tool_steps.c.turn, tool_steps.c.call_id,
           tool_steps.c.tool.label("name"), tool_steps.c.arguments, tool_steps.c.status,
           tool_steps.c.latency_ms)
    .where(tool_steps.c.conversation_id == bindparam("conversation_id", type_=Integer))
    .order_by(tool_steps.c.message_id, tool_steps.c.id)
)


# One reply's steps (by messages.id), for a resume past the stream's window.
OF_REPLY = (
    select(tool_steps.c.call_id, tool_steps.c.tool.label("name"), tool_steps.c.arguments,
           tool_steps.c.status)
    .where(tool_steps.c.message_id == bindparam("message_id", type_=Integer))
    .order_by(tool_steps.c.id)
)


def rows(message_id: int, conversation_id: int, user_id: int, agent: str | None,
         steps) -> list[dict]:
    """Rows of a reply's steps (tool_loop.Step)."""
    now = utcnow()
    return [{"message_id": message_id, "conversation_id": conversation_id, "user_id": user_id,
             "agent": agent, "turn": step.turn, "call_id": step.call_id[:CALL_ID_CHARS],
             "tool": step.name[:TOOL_CHARS], "arguments": json.dumps(step.arguments, ensure_ascii=False),
             "result": step.result[:RESULT_CHARS], "status": step.status,
             "latency_ms": step.latency_ms, "created_at": now}
            for step in steps]


# Units of work

def save(db, message_id: int, conversation_id: int, user_id: int, agent: str | None,
         steps) -> None:
    if steps:
        db.execute(INSERT, rows(message_id, conversation_id, user_id, agent, steps))


def of_conversation(db, conversation_id: int) -> dict[int, list]:
    """{reply id: its steps (turn, call_id, name, arguments, status, latency_ms)}."""
    found: dict[int, list] = {}
    for row in db.execute(OF_CONVERSATION, {"conversation_id": conversation_id}).all():
        found.setdefault(row.message_id, []).append(row)
    return found


def of_reply(db, message_id: int) -> list:
    return db.execute(OF_REPLY, {"message_id": message_id}).all()


def between(db, conversation_id: int, after_id: int, before_id: int) -> dict[int, list]:
    """{reply id: its steps (turn, call_id, name, arguments, result)}."""
    found: dict[int, list] = {}
    values = {"conversation_id": conversation_id, "after_id": after_id, "before_id": before_id}
    for row in db.execute(BETWEEN, values).all():
        found.setdefault(row.message_id, []).append(row)
    return found
