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

from . import auth, metrics, quotas
from .agent_pool import AgentPool
from .agents import Agent, AgentRequest
from .config import Settings
from .connections import refusal
from .history import History, Turn
from .replies import Ending, LiveReply, Replies
from .store import Conflict, QuotaRequest, Store, StoreError
from .store.models import ROLE_USER, STATUS_ERROR

logger = logging.getLogger(__name__)

# Tokens counted per message for the chat template's role markers.
TOKENS_PER_MESSAGE = 4

# The error frame's text when a message or reply could not be saved.
STORE_UNAVAILABLE = "The service could not save your message; please try again shortly."


class RateLimited(Exception):
    """The user is over the rate limit; nothing was saved."""

    def __init__(self, retry_after: float):
        super().__init__(f"rate limited for {retry_after:.1f} s")
        self.retry_after = retry_after


class QuotaExceeded(Exception):
    """The reply would pass one of the user's quotas; nothing was saved. The
    text is the error frame's."""


class ChatService:
    def __init__(self, settings: Settings, store: Store, pool: AgentPool,
                 verifier: auth.TokenVerifier, replies: Replies):
        self.settings = settings
        self.store = store
        self.pool = pool
        self.verifier = verifier
        self.replies = replies
        self.pricing = quotas.Pricing(settings.pricing)
        self.limits = quotas.limits(settings.quota)

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

    async def admit(self, user, history: History, content: str):
        """Save the user's message and open its reply's stream, in one
        transaction with the rate limit and the quota reservation; returns the
        Admission and the history turns before the message. Raises
        :class:`RateLimited` or :class:`QuotaExceeded` (nothing saved) when the
        user is over the rate limit or would pass a quota.

        ``history`` is the socket's copy of its conversation (history.py).
        """
        limit = self.settings.rate_limit
        now = time.time()
        quota = self._quota_request(user, history, content, now)
        after_id = history.read_from()
        admission = await self.store.admit(
            history.conversation_id, user.id, content, now=now,
            messages=limit.messages, per_seconds=limit.per_seconds,
            after_id=after_id, history_limit=history.limit,
            instance=self.replies.instance, lease_seconds=self.settings.limits.lease_seconds,
            quota=quota)
        if not admission.decision.allowed:
            raise RateLimited(admission.decision.retry_after)
        if admission.over_quota is not None:
            raise QuotaExceeded(quotas.refusal(admission.over_quota, admission.reserved,
                                               quotas.Windows.at(now), self.pricing.currency))
        turns = history.add(admission.turns, admission.message_id, content)
        return admission, turns

    def _quota_request(self, user, history: History, content: str,
                       now: float) -> QuotaRequest | None:
        """What to reserve for the reply, or None when no quota applies to the
        user (none in the config, no override of their own, or unlimited).
        Called before ``history.read_from()``, which may drop the counted turns."""
        if getattr(user, "quota_unlimited", None) or not (
                self.settings.quota.any or quotas.has_override(user)):
            return None
        chain = self.pool.chain
        agent = chain[0]
        known = list(history.turns)
        # A loading model's counts are estimates: never cached in the history.
        if agent.ready:
            history.count(agent, known)
            counted = {turn.id: turn.tokens for turn in known}
        else:
            counted = {turn.id: agent.count_tokens(turn.content) for turn in known}
        system = self._system_prompt(user.username)

        def bound_of(rows: list) -> quotas.Bound:
            # Runs inside the transaction (on the SQLite batcher's thread): no
            # tokenizer here. Turns read now and never counted (normally just
            # the previous reply) count their UTF-8 bytes: a byte-level
            # tokenizer makes no token shorter than a byte.
            # Rows already counted: the copy was read again in full (read_from).
            reread = any(row.id in counted for row in rows)
            turns = {} if reread else dict(counted)
            for row in rows:
                turns[row.id] = counted.get(row.id, len(row.content.encode()))
            tokens = sum(turns.values()) + TOKENS_PER_MESSAGE * len(turns)
            return quotas.reply_bound(chain, base + min(tokens, room), self.pricing)

        base = quotas.prompt_base(agent, system, content)
        room = max(0, agent.context_tokens - agent.reply_tokens - base)
        return QuotaRequest(bound_of, self.limits, quotas.Windows.at(now).today)

    def start_reply(self, user, history: History, admission, turns: list[Turn],
                    content: str) -> LiveReply:
        """Generate the reply to an admitted message in a task of its own
        (replies.py): it goes on when the socket that asked closes."""
        live = LiveReply(admission.reply_id, admission.message_public_id, user.id,
                         history.conversation_id, admission.message_id)
        live.reserved = admission.reserved
        return self.replies.start(
            live, lambda live: self._answer(live, user.username, history, turns, content))

    async def _answer(self, live: LiveReply, username: str, history: History,
                      turns: list[Turn], content: str) -> None:
        """Get the reply from the agent chain, save it, and end it. Cancelling
        the task saves the partial reply as ``cancelled`` first."""
        reply = live.reply
        try:
            if live.cancel_pending:  # cancelled before the task first ran
                raise asyncio.CancelledError
            with self.pool.lease() as chain:
                await self._generate(chain, username, history, turns, content, live)
        except asyncio.CancelledError:
            reply.cancel()
            reply.finish()
            await asyncio.shield(self._save_and_end(live))
            raise
        live.complete = True  # from here on a cancel comes too late
        reply.finish()
        save = asyncio.ensure_future(self._save_and_end(live))
        try:
            await asyncio.shield(save)
        except asyncio.CancelledError:
            # The reply was complete: a cancel that arrives while it is being
            # saved comes too late. Finish the save and deliver it all the same.
            await save
            asyncio.current_task().uncancel()

    async def _save_and_end(self, live: LiveReply) -> None:
        reply = live.reply
        columns = reply.columns()
        columns["cost"] = self.pricing.cost(reply.agent, reply.model, reply.tokens_in,
                                            reply.tokens_out)
        if live.reserved is not None and (
                (reply.tokens_in or 0) + (reply.tokens_out or 0) > live.reserved.tokens):
            logger.warning("reply %s spent %s tokens, more than the %s reserved", live.reply_id,
                           (reply.tokens_in or 0) + (reply.tokens_out or 0), live.reserved.tokens)
        try:
            await self.store.finish_reply(
                live.reply_id, live.conversation_id, live.user_id, live.message_row_id,
                reply.pieces, live.saved_any or live.flushing, **columns)
        except StoreError:
            # Not saved: its stream is no longer renewed, so the sweep saves it
            # as interrupted with the chunks saved so far once the database is back.
            logger.exception("could not save reply %s", live.reply_id)
            metrics.errors.labels("database").inc()
            live.end(Ending(STATUS_ERROR, reply.text, STORE_UNAVAILABLE))
            return
        metrics.observe_reply(reply)
        live.end(Ending(reply.status, reply.text,
                        reply.error_text() if reply.status == STATUS_ERROR else None))

    async def _generate(self, chain, username, history, turns, content, live) -> None:
        reply = live.reply
        deadline = self.settings.agent.timeout_seconds
        for position, agent in enumerate(chain):
            reply.attempt(agent)
            request = AgentRequest([], username)
            prompt_tokens = None
            try:
                async with asyncio.timeout(deadline):
                    # Ready first: a loaded model counts tokens with its own tokenizer.
                    await agent.wait_ready()
                    request.messages, prompt_tokens = self._prompt(
                        agent, username, history, turns, content, live.reserved)
                    await self._stream(agent, request, live)
                reply.count_tokens(agent, request.usage, prompt_tokens)
                return
            except asyncio.CancelledError:
                # A stopped reply spent its prompt and its partial text (quotas count them).
                if prompt_tokens is not None:
                    reply.count_tokens(agent, request.usage, prompt_tokens)
                raise
            except Exception as exc:  # AgentError, TimeoutError, or a plugin's bug
                reply.fail(exc)
                if reply.pieces or position == len(chain) - 1:
                    if prompt_tokens is not None:
                        reply.count_tokens(agent, request.usage, prompt_tokens)
                    return  # fallbacks only take over before the first token
                logger.info("agent %s failed before its first token; trying %s",
                            agent.name, chain[position + 1].name)

    async def _stream(self, agent: Agent, request: AgentRequest, live: LiveReply) -> None:
        # aclosing: a cancel closes the agent's stream (an upstream HTTP
        # response, say) at once, not at garbage collection.
        async with contextlib.aclosing(agent.stream(request)) as pieces:
            async for piece in pieces:
                if piece:
                    live.take(piece)
                    # A yield point: an agent that yields without awaiting must
                    # not keep the event loop (and a cancel) waiting.
                    await asyncio.sleep(0)

    def _system_prompt(self, username: str) -> str:
        return self.settings.agent.system_prompt.replace("{username}", username)

    def _prompt(
        self, agent: Agent, username: str, history: History, turns: list[Turn], content: str,
        reserved: quotas.Bound | None = None,
    ) -> tuple[list[dict], int]:
        """System prompt, then as many of the latest turns as fit, then the
        message; and the prompt's tokens as the agent counts them. With a
        quota ``reserved``, the prompt also leaves room in it for the reply."""
        system = self._system_prompt(username)
        history.count(agent, turns)
        used = agent.count_tokens(system) + agent.count_tokens(content) + 2 * TOKENS_PER_MESSAGE
        budget = agent.context_tokens - agent.reply_tokens
        if reserved is not None:
            budget = min(budget, reserved.tokens - agent.reply_tokens)
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
