"""One exchange, from a user's message to a saved reply: the host's bookkeeping.

The agent only yields text. Here the host saves the user's message before the
agent is called, builds the prompt from the conversation's history, applies
the deadline, tries fallbacks, measures latency and time to first token,
counts tokens, and saves the reply (or the error, or the cancelled partial
reply) before the caller sends it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import traceback
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from sqlalchemy.engine import Row

from . import auth, metrics
from .agent_pool import AgentPool
from .agents import Agent, AgentError, AgentRequest
from .config import Settings
from .connections import refusal
from .history import History, Turn
from .store import Store, StoreError
from .store.models import ROLE_USER, STATUS_CANCELLED, STATUS_ERROR, STATUS_OK

logger = logging.getLogger(__name__)

# Tokens counted per message for the chat template's role markers.
TOKENS_PER_MESSAGE = 4

OnChunk = Callable[[str], Awaitable[None]]


class RateLimited(Exception):
    """The user is over the rate limit; nothing was saved."""

    def __init__(self, retry_after: float):
        super().__init__(f"rate limited for {retry_after:.1f} s")
        self.retry_after = retry_after


@dataclass
class Reply:
    """The outcome of one exchange, as saved in the messages table."""

    # The pieces as they came; joined once (a long reply would make += quadratic).
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
    started: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def columns(self) -> dict:
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
        }


class ChatService:
    def __init__(
        self, settings: Settings, store: Store, pool: AgentPool, verifier: auth.TokenVerifier
    ):
        self.settings = settings
        self.store = store
        self.pool = pool
        self.verifier = verifier

    async def authenticate(self, token: str | None) -> tuple[Row, auth.Claims] | None:
        """The active user a token names and its claims, or None (the reason is logged)."""
        try:
            claims = self.verifier.decode(token or "")
        except auth.AuthError as exc:
            logger.info("websocket refused: %s", exc)
            return None
        user = await self.store.token_holder(claims.username, claims.jti)
        if user is None and claims.external and self.settings.auth.auto_create_users:
            if await self._create_external_user(claims.username):
                user = await self.store.token_holder(claims.username, claims.jti)
        if user is None:
            logger.info("websocket refused: unknown user")
            return None
        revoked = {claims.jti} if user.jti_revoked else set()
        reason = refusal(user, claims.jti, claims.issued_at_naive, revoked)
        if reason is not None:
            logger.info("websocket refused: %s", reason.lower())
            return None
        return user, claims

    async def _create_external_user(self, username: str) -> bool:
        """A user named by the other issuer's token: no password, no admin flag.
        False if the name cannot be a user's."""
        if not username or len(username) > 64 or not username.isprintable():
            return False
        try:
            await self.store.create_user(username, None)
            logger.info("created user %s on first sight of an external token", username)
        except StoreError:
            pass  # another socket created it a moment ago
        return True

    async def answer(
        self, user: Row, history: History, content: str, on_chunk: OnChunk | None = None
    ) -> Reply:
        """Save the message, get and save the reply, and return it.

        ``history`` is the socket's copy of its conversation (history.py).
        Raises :class:`RateLimited` (nothing saved) when the user is over the
        rate limit. Cancelling the task that runs this saves the partial reply
        as ``cancelled`` before the cancellation goes on.
        """
        conversation_id = history.conversation_id
        limit = self.settings.rate_limit
        admission = await self.store.admit(
            conversation_id, user.id, content, now=time.time(), messages=limit.messages,
            per_seconds=limit.per_seconds, after_id=history.read_from(),
            history_limit=history.limit)
        if not admission.decision.allowed:
            raise RateLimited(admission.decision.retry_after)
        message_id = admission.message_id
        turns = history.add(admission.turns, message_id, content)
        reply = Reply()
        try:
            with self.pool.lease() as chain:
                await self._generate(chain, user.username, history, turns, content, reply,
                                     on_chunk)
        except asyncio.CancelledError:
            reply.status = STATUS_CANCELLED
            self._finish(reply)
            await asyncio.shield(self._save(conversation_id, user.id, message_id, reply))
            metrics.observe_reply(reply)
            raise
        self._finish(reply)
        save = asyncio.ensure_future(self._save(conversation_id, user.id, message_id, reply))
        try:
            await asyncio.shield(save)
        except asyncio.CancelledError:
            # The reply was complete: a cancel that arrives while it is being
            # saved comes too late. Finish the save and deliver it all the same.
            await save
            asyncio.current_task().uncancel()
        metrics.observe_reply(reply)
        return reply

    async def _generate(self, chain, username, history, turns, content, reply, on_chunk) -> None:
        deadline = self.settings.agent.timeout_seconds
        for position, agent in enumerate(chain):
            reply.agent, reply.model = agent.name, agent.model
            reply.status, reply.error_ref, reply.error_kind = STATUS_OK, None, None
            request = AgentRequest([], username)
            try:
                async with asyncio.timeout(deadline):
                    # Ready first: a loaded model counts tokens with its own tokenizer.
                    await agent.wait_ready()
                    request.messages, prompt_tokens = self._prompt(
                        agent, username, history, turns, content)
                    await self._stream(agent, request, reply, on_chunk)
                self._count_tokens(agent, request, prompt_tokens, reply)
                return
            except Exception as exc:  # AgentError, TimeoutError, or a plugin's bug
                self._fail(reply, agent, exc)
                if reply.pieces or position == len(chain) - 1:
                    return  # fallbacks only take over before the first token
                logger.info("agent %s failed before its first token; trying %s",
                            agent.name, chain[position + 1].name)

    async def _stream(self, agent: Agent, request: AgentRequest, reply: Reply, on_chunk) -> None:
        # aclosing: a cancel that lands while a chunk is being sent closes the
        # agent's stream (an upstream HTTP response, say) at once, not at GC.
        async with contextlib.aclosing(agent.stream(request)) as pieces:
            async for piece in pieces:
                await self._take_piece(piece, reply, on_chunk)

    @staticmethod
    async def _take_piece(piece: str, reply: Reply, on_chunk) -> None:
        if not piece:
            return
        if reply.ttft_ms is None:
            reply.ttft_ms = (time.perf_counter() - reply.started) * 1000
        reply.pieces.append(piece)
        if on_chunk is not None:
            await on_chunk(piece)

    def _prompt(
        self, agent: Agent, username: str, history: History, turns: list[Turn], content: str
    ) -> tuple[list[dict], int]:
        """System prompt, then as many of the latest turns as fit, then the
        message; and the prompt's tokens as the agent counts them."""
        system = self.settings.agent.system_prompt.replace("{username}", username)
        history.count(agent, turns)
        used = agent.count_tokens(system) + agent.count_tokens(content) + 2 * TOKENS_PER_MESSAGE
        budget = agent.context_tokens - agent.reply_tokens
        start = len(turns)
        while start > 0 and used + turns[start - 1].tokens + TOKENS_PER_MESSAGE <= budget:
            start -= 1
            used += turns[start].tokens + TOKENS_PER_MESSAGE
        # A cut can leave a reply first; models expect a user turn after the system prompt.
        while start < len(turns) and turns[start].role != ROLE_USER:
            used -= turns[start].tokens + TOKENS_PER_MESSAGE
            start += 1
        # The turns' own dicts: agents read a request's messages, never change them.
        messages = [{"role": "system", "content": system}]
        messages += [turn.message for turn in turns[start:]]
        messages.append({"role": "user", "content": content})
        return messages, used

    @staticmethod
    def _count_tokens(
        agent: Agent, request: AgentRequest, prompt_tokens: int, reply: Reply
    ) -> None:
        usage = request.usage
        reply.tokens_in = usage.tokens_in if usage.tokens_in is not None else prompt_tokens
        reply.tokens_out = usage.tokens_out
        if reply.tokens_out is None:
            reply.tokens_out = agent.count_tokens(reply.text) if reply.text else 0

    @staticmethod
    def _fail(reply: Reply, agent: Agent, exc: BaseException) -> None:
        reply.status = STATUS_ERROR
        reply.error_ref = secrets.token_hex(4)
        if isinstance(exc, AgentError):
            reply.error_kind = exc.kind
            logger.warning("agent %s failed (%s, ref %s): %s", agent.name, exc.kind, reply.error_ref, exc)
        elif isinstance(exc, TimeoutError):
            reply.error_kind = "timeout"
            logger.warning("agent %s timed out (ref %s)", agent.name, reply.error_ref)
        else:
            reply.error_kind = "internal"
            # The type only: an exception's text may quote upstream bodies or keys.
            logger.error("agent %s raised %s (ref %s)", agent.name, type(exc).__name__, reply.error_ref)
            # Where it happened, for the plugin's author; never the message text.
            logger.debug("agent %s raised %s (ref %s) at:\n%s", agent.name, type(exc).__name__,
                         reply.error_ref, "".join(traceback.format_tb(exc.__traceback__)))

    @staticmethod
    def _finish(reply: Reply) -> None:
        reply.latency_ms = (time.perf_counter() - reply.started) * 1000

    async def _save(self, conversation_id: int, user_id: int, message_id: int, reply: Reply) -> None:
        await self.store.add_reply(conversation_id, user_id, message_id, **reply.columns())


def error_text(reply: Reply) -> str:
    """The fixed, safe text of the error frame for a failed reply."""
    if reply.error_kind == "timeout":
        return f"The AI agent did not answer in time (reference {reply.error_ref})."
    if reply.error_kind == "rate_limited":
        return f"The AI agent is busy; please try again shortly (reference {reply.error_ref})."
    return f"An error occurred while processing your message (reference {reply.error_ref})."
