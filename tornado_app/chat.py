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

from . import auth, metrics
from .agent_pool import AgentPool
from .agents import Agent
from .config import Settings
from .connections import refusal
from .history import History, Turn
from .memory import Memories, memory_section, system_prompt
from .replies import Ending, LiveReply, Replies
from .tool_loop import Caller, converse
from .toolbox import Toolbox
from .store import Conflict, Store, StoreError
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


class ChatService:
    def __init__(self, settings: Settings, store: Store, pool: AgentPool,
                 verifier: auth.TokenVerifier, replies: Replies, toolbox: Toolbox | None = None,
                 memories: Memories | None = None):
        self.settings = settings
        self.memories = memories
        self.store = store
        self.pool = pool
        self.verifier = verifier
        self.replies = replies
        self.toolbox = toolbox

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
        transaction with the rate limit; returns the Admission and the history
        turns before the message. Raises :class:`RateLimited` (nothing saved)
        when the user is over the rate limit.

        ``history`` is the socket's copy of its conversation (history.py).
        """
        limit = self.settings.rate_limit
        admission = await self.store.admit(
            history.conversation_id, user.id, content, now=time.time(),
            messages=limit.messages, per_seconds=limit.per_seconds,
            after_id=history.read_from(), history_limit=history.limit,
            instance=self.replies.instance, lease_seconds=self.settings.limits.lease_seconds)
        if not admission.decision.allowed:
            raise RateLimited(admission.decision.retry_after)
        turns = history.add(admission.turns, admission.message_id, content, admission.steps)
        return admission, turns

    def start_reply(self, user, history: History, admission, turns: list[Turn],
                    content: str) -> LiveReply:
        """Generate the reply to an admitted message in a task of its own
        (replies.py): it goes on when the socket that asked closes."""
        live = LiveReply(admission.reply_id, admission.message_public_id, user.id,
                         history.conversation_id, admission.message_id)
        caller = Caller(user.id, user.username, history.client_id)
        remembered = []
        if self.memories is not None:
            # The tools reach this user's memories and messages, and nobody else's.
            caller.memories = self.memories.of(user.id)
            caller.messages = self.memories.messages_of(user.id)
            remembered = self.memories.readable(user.id, admission.memories)
        return self.replies.start(
            live, lambda live: self._answer(live, caller, history, turns, content, remembered))

    async def _answer(self, live: LiveReply, caller: Caller, history: History,
                      turns: list[Turn], content: str, remembered: list = ()) -> None:
        """Get the reply from the agent chain, save it, and end it. Cancelling
        the task saves the partial reply as ``cancelled`` first."""
        reply = live.reply
        try:
            if live.cancel_pending:  # cancelled before the task first ran
                raise asyncio.CancelledError
            with self.pool.lease() as chain, self._tools() as tools:
                await self._generate(chain, tools, caller, history, turns, content, live,
                                     remembered)
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
        try:
            await self.store.finish_reply(
                live.reply_id, live.conversation_id, live.user_id, live.message_row_id,
                reply.pieces, live.saved_any or live.flushing, steps=reply.steps,
                **reply.columns())
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

    def _tools(self):
        """The tools in use now, kept open for one reply (none without a toolbox)."""
        return self.toolbox.lease() if self.toolbox is not None else contextlib.nullcontext({})

    async def _generate(self, chain, tools, caller: Caller, history, turns, content,
                        live, remembered=()) -> None:
        reply = live.reply
        agent_settings = self.settings.agent
        for position, agent in enumerate(chain):
            reply.attempt(agent)
            try:
                async with asyncio.timeout(agent_settings.timeout_seconds) as scope:
                    # Ready first: a loaded model counts tokens with its own tokenizer.
                    await agent.wait_ready()
                    messages, prompt_tokens = self._prompt(
                        agent, caller.username, history, turns, content, remembered)
                    tokens = await converse(
                        agent, messages, prompt_tokens, caller.username, live, tools, caller,
                        agent_settings.max_tool_steps, self.settings.tools.timeout_seconds,
                        scope.when())
                reply.count_tokens(tokens)
                return
            except Exception as exc:  # AgentError, TimeoutError, or a plugin's bug
                reply.fail(exc)
                if reply.pieces or reply.steps or position == len(chain) - 1:
                    return  # fallbacks only take over before the first token or tool call
                logger.info("agent %s failed before its first token; trying %s",
                            agent.name, chain[position + 1].name)

    def _prompt(
        self, agent: Agent, username: str, history: History, turns: list[Turn], content: str,
        remembered: list = (),
    ) -> tuple[list[dict], int]:
        """System prompt (with the user's memories, within ``memory.prompt_share``
        of the budget), then as many of the latest turns as fit, then the
        message; and the prompt's tokens as the agent counts them."""
        budget = agent.context_tokens - agent.reply_tokens
        section = memory_section(remembered, int(budget * self.settings.memory.prompt_share),
                                 agent.count_tokens)
        system = system_prompt(self.settings.agent.system_prompt, username, section)
        history.count(agent, turns)
        used = agent.count_tokens(system) + agent.count_tokens(content) + 2 * TOKENS_PER_MESSAGE
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
        for turn in turns[start:]:
            if turn.steps:  # the reply's tool calls and results, before its text
                messages += turn.steps
            messages.append(turn.message)
        messages.append({"role": "user", "content": content})
        return messages, used
