"""One exchange, from a user's message to a saved reply: the host's bookkeeping.

The agent only yields text. Here the host saves the user's message before the
agent is called, builds the prompt from the conversation's history, applies
the deadline, tries fallbacks, and saves the reply (or the error, or the
cancelled partial reply) before the caller sends it on. The reply itself
(reply.py) keeps its timing, tokens and failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

from . import auth, metrics
from .agent_pool import AgentPool
from .agents import Agent, AgentRequest
from .config import Settings
from .connections import refusal
from .history import History, Turn
from .reply import Reply
from .store import Conflict, Store
from .store.models import ROLE_USER

logger = logging.getLogger(__name__)

# Tokens counted per message for the chat template's role markers.
TOKENS_PER_MESSAGE = 4

OnChunk = Callable[[str], Awaitable[None]]


class RateLimited(Exception):
    """The user is over the rate limit; nothing was saved."""

    def __init__(self, retry_after: float):
        super().__init__(f"rate limited for {retry_after:.1f} s")
        self.retry_after = retry_after


class ChatService:
    def __init__(
        self, settings: Settings, store: Store, pool: AgentPool, verifier: auth.TokenVerifier
    ):
        self.settings = settings
        self.store = store
        self.pool = pool
        self.verifier = verifier

    async def authenticate(self, token: str | None) -> tuple[object, auth.Claims] | None:
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
        close = refusal(user, claims.jti, claims.issued_at_naive, revoked)
        if close is not None:
            logger.info("websocket refused: %s", close.reason.lower())
            return None
        return user, claims

    async def _create_external_user(self, username: str) -> bool:
        """A user named by the other issuer's token: no password, no admin flag.
        False if the name cannot be a user's."""
        if not auth.valid_username(username):
            return False
        try:
            await self.store.create_user(username, None)
            logger.info("created user %s on first sight of an external token", username)
        except Conflict:
            pass  # another socket created it a moment ago
        return True

    async def answer(
        self, user, history: History, content: str, on_chunk: OnChunk | None = None
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
            reply.cancel()
            reply.finish()
            await asyncio.shield(self._save(conversation_id, user.id, message_id, reply))
            metrics.observe_reply(reply)
            raise
        reply.finish()
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
            reply.attempt(agent)
            request = AgentRequest([], username)
            try:
                async with asyncio.timeout(deadline):
                    # Ready first: a loaded model counts tokens with its own tokenizer.
                    await agent.wait_ready()
                    request.messages, prompt_tokens = self._prompt(
                        agent, username, history, turns, content)
                    await self._stream(agent, request, reply, on_chunk)
                reply.count_tokens(agent, request.usage, prompt_tokens)
                return
            except Exception as exc:  # AgentError, TimeoutError, or a plugin's bug
                reply.fail(exc)
                if reply.pieces or position == len(chain) - 1:
                    return  # fallbacks only take over before the first token
                logger.info("agent %s failed before its first token; trying %s",
                            agent.name, chain[position + 1].name)

    async def _stream(self, agent: Agent, request: AgentRequest, reply: Reply, on_chunk) -> None:
        # aclosing: a cancel that lands while a chunk is being sent closes the
        # agent's stream (an upstream HTTP response, say) at once, not at GC.
        async with contextlib.aclosing(agent.stream(request)) as pieces:
            async for piece in pieces:
                if not piece:
                    continue
                reply.take(piece)
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

    async def _save(self, conversation_id: int, user_id: int, message_id: int, reply: Reply) -> None:
        await self.store.add_reply(conversation_id, user_id, message_id, **reply.columns())

