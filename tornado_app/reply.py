"""A reply in the making: the host's record of one answer, as the messages table keeps it.

Like llm's ``Response``, the reply owns its bookkeeping. The agent only yields
text; the reply takes each piece (timing the first), records a failure with a
short reference for the log, finishes (latency) and counts tokens. The chat
service (chat.py) drives it; the socket reads it.
"""

from __future__ import annotations

import logging
import secrets
import time
import traceback
from dataclasses import dataclass, field

from .agents import Agent, AgentError
from .store.models import STATUS_CANCELLED, STATUS_ERROR, STATUS_OK

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    # The pieces as they came; joined when read (a long reply would make += quadratic).
    pieces: list[str] = field(default_factory=list)
    status: str = STATUS_OK
    agent: str | None = None
    model: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    error_ref: str | None = None
    error_kind: str | None = None
    # The tool calls made on the way (tool_loop.Step), saved with the reply.
    steps: list = field(default_factory=list)
    regenerated: bool = False  # made by regenerate: another reply to the same message
    started: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def attempt(self, agent: Agent) -> None:
        """A (new) try with ``agent``: the first one, or a fallback's."""
        self.agent, self.model = agent.name, agent.model
        self.status, self.error_ref, self.error_kind = STATUS_OK, None, None

    def take(self, piece: str) -> None:
        """One more piece of the text (not empty)."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000
        self.pieces.append(piece)

    def fail(self, exc: BaseException) -> None:
        """Record why the agent failed; the log line carries the reference the
        user is shown, and never an exception's text unless it is an AgentError
        (whose text is safe by contract)."""
        self.status = STATUS_ERROR
        self.error_ref = secrets.token_hex(4)
        if isinstance(exc, AgentError):
            self.error_kind = exc.kind
            logger.warning("agent %s failed (%s, ref %s): %s", self.agent, exc.kind,
                           self.error_ref, exc)
        elif isinstance(exc, TimeoutError):
            self.error_kind = "timeout"
            logger.warning("agent %s timed out (ref %s)", self.agent, self.error_ref)
        else:
            self.error_kind = "internal"
            # The type only: an exception's text may quote upstream bodies or keys.
            logger.error("agent %s raised %s (ref %s)", self.agent, type(exc).__name__,
                         self.error_ref)
            # Where it happened, for the plugin's author; never the message text.
            logger.debug("agent %s raised %s (ref %s) at:\n%s", self.agent, type(exc).__name__,
                         self.error_ref, "".join(traceback.format_tb(exc.__traceback__)))

    def cancel(self) -> None:
        self.status = STATUS_CANCELLED

    def finish(self) -> None:
        self.latency_ms = (time.perf_counter() - self.started) * 1000

    def count_tokens(self, tokens) -> None:
        """The tokens of every model call (tool_loop.Tokens)."""
        self.tokens_in, self.tokens_out = tokens.tokens_in, tokens.tokens_out

    def columns(self) -> dict:
        """The messages row's columns."""
        return {
            "content": self.text,
            "status": self.status,
            "agent": self.agent,
            "model": self.model,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "error_ref": self.error_ref,
            "error_kind": self.error_kind,
            "regenerated": self.regenerated,
        }

    def error_text(self) -> str:
        """The fixed, safe text of the error frame for a failed reply."""
        if self.error_kind == "timeout":
            return f"The AI agent did not answer in time (reference {self.error_ref})."
        if self.error_kind == "rate_limited":
            return f"The AI agent is busy; please try again shortly (reference {self.error_ref})."
        return f"An error occurred while processing your message (reference {self.error_ref})."
