"""A socket's copy of its conversation's latest turns, and their token counts.

Every message needs the conversation's history for its prompt. Reading the
latest ``HISTORY_LIMIT`` turns back and counting their tokens each time was
the largest cost of an exchange (docs/benchmarks.md). So each socket keeps
them: per message it reads only the turns saved since its previous one
(normally just its own last reply, one row through the index), and counts
tokens only for turns it has not counted with the current agent.

The copy follows the conversation's active branch (store/branches.py): the
turns are read up the new message's branch, parent by parent, back to the
copy's last message. When that message is not on the branch (a switch, an
edit, a regenerate, on this socket or another) the branch is read whole and
replaces the copy, so a prompt never holds a message of another branch.

The database stays the truth. Turns another socket writes to the same
conversation are read like any other new turn. Once a copy is older than
``REFRESH_SECONDS`` it is read again in full, so that turns purged by
retention leave it, and a turn another process committed out of id order
(PostgreSQL assigns ids before commit) is not missed for longer than that.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .agents import Agent
from .tool_loop import result_text, steps_messages
from .store.models import ROLE_ASSISTANT, ROLE_USER

# Most turns kept for a prompt; the agent's token budget then trims them
# further, oldest first.
HISTORY_LIMIT = 200
# Tokens counted for each tool call or result message of a turn (role markers).
TOKENS_PER_STEP = 4
# A copy older than this is read again in full.
REFRESH_SECONDS = 60.0


@dataclass(slots=True)
class Turn:
    id: int
    message: dict  # {"role": ..., "content": ...}, built once, as prompts hold it
    tokens: int | None = None  # by History.counted_by's count_tokens
    # A reply's tool calls and results, as prompt messages (tool_loop.steps_messages).
    steps: list | None = None

    @property
    def role(self) -> str:
        return self.message["role"]

    @property
    def content(self) -> str:
        return self.message["content"]


class History:
    """The latest turns of one conversation, oldest first (see the module).

    Every open socket has one (hence the slots).

    Per message: :meth:`read_from` says which turns to read, the exchange
    reads them as it saves the message (Store.admit), :meth:`add` takes them.
    """

    __slots__ = ("conversation_id", "client_id", "limit", "turns", "counted_by", "_last_id",
                 "_read_at")

    def __init__(self, conversation_id: int, limit: int = HISTORY_LIMIT, client_id: str = ""):
        self.conversation_id = conversation_id
        self.client_id = client_id
        self.limit = limit
        self.turns: deque[Turn] = deque(maxlen=limit)
        self.counted_by: Agent | None = None
        self._last_id = 0  # every turn up to this id has been read
        self._read_at: float | None = None

    def read_from(self) -> int:
        """The id after which turns are to be read (0: all, the copy is dropped)."""
        now = time.monotonic()
        if self._read_at is None or now - self._read_at > REFRESH_SECONDS:
            self.turns.clear()
            self._last_id, self._read_at = 0, now
        return self._last_id

    def add(self, rows: list, message_id: int, content: str,
            steps: dict | None = None, continues: bool = True) -> list[Turn]:
        """Take the turns read (id, role, content; oldest first), the tool
        steps of those that are replies ({message id: steps}), and the new
        user message; returns the turns before the message. ``continues``:
        the turns follow this copy's; otherwise they are the message's whole
        branch (another branch became active: a switch, an edit, a regenerate)
        and replace the copy."""
        if not continues:
            self.turns.clear()
        steps = steps or {}
        self.turns.extend(Turn(row.id, {"role": row.role, "content": row.content},
                               steps=steps_messages(steps[row.id]) if row.id in steps else None)
                          for row in rows)
        earlier = list(self.turns)
        self.turns.append(Turn(message_id, {"role": ROLE_USER, "content": content}))
        self._last_id = message_id
        return earlier

    def add_reply(self, message_id: int, reply_id: int, content: str, ok: bool) -> None:
        """The reply to the copy's last message, just saved by this process
        (without tool steps): the copy takes it, so that the next message
        reads no turn at all when the reply is still the branch's leaf (the
        common case). A failed or cancelled reply never joins a prompt
        (branches.prompt_turns), so only its id is taken."""
        if self._last_id != message_id:
            return  # the copy moved on meanwhile: the next read finds the reply
        if ok:
            self.turns.append(Turn(reply_id, {"role": ROLE_ASSISTANT, "content": content}))
        self._last_id = reply_id

    def count(self, agent: Agent, turns: list[Turn]) -> None:
        """Fill in ``turns``' token counts for ``agent`` (all of them again if
        the last counts were another agent's: a hot swap, a fallback)."""
        if agent is not self.counted_by:
            for turn in self.turns:
                turn.tokens = None
            self.counted_by = agent
        # Turns join the copy at its end, uncounted, and are counted in order:
        # the uncounted ones are the last, so they are found from the end
        # (per message: the new turns, not all 200).
        start = len(turns)
        while start and turns[start - 1].tokens is None:
            start -= 1
        for turn in turns[start:]:
            turn.tokens = agent.count_tokens(turn.content)
            for message in turn.steps or ():
                turn.tokens += agent.count_tokens(result_text(message)) + TOKENS_PER_STEP
