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
from .agents import Agent
from .config import Settings
from .connections import refusal
from .history import History, Turn
from .memory import Memories, memory_section, system_prompt
from .replies import Ending, LiveReply, Replies, marks_json
from .tool_loop import Caller, Tokens, converse
from .toolbox import Toolbox
from .store import Conflict, QuotaRequest, Store, StoreError
from .store.store import Branching
from .store.models import ROLE_USER, STATUS_ERROR, STATUS_OK

logger = logging.getLogger(__name__)

# Tokens counted per message for the chat template's role markers.
TOKENS_PER_MESSAGE = 4
# When the history stops fitting the prompt, its cut moves on by at least
# this share of the budget (cut_history). The next prompts then keep the same
# first turn until they fill it again, so each starts as the one before did,
# and a prompt cache (the local model's, a provider's) finds that start: a
# 1,349-token prompt whose start was cached took 85 ms to its first token
# with the bundled model, one whose cut had moved by one exchange 950 ms.
CUT_SLACK = 0.25

# The error frame's text when a message or reply could not be saved.
STORE_UNAVAILABLE = "The service could not save your message; please try again shortly."


def cut_history(turns: list, used: int, budget: int) -> tuple[int, int]:
    """The index of the first turn a prompt keeps, and the tokens then used
    (``used``: those of the rest of the prompt). All turns when they fit (the
    common case, found by list comprehensions: up to HISTORY_LIMIT turns per
    message, on the loop).

    Otherwise the cut is at one of a chain of user turns: the first turn, then
    each time the first user turn at least CUT_SLACK of the budget after the
    one before. The earliest of them whose rest fits is kept. The chain depends
    on the turns alone, and a new turn only adds to its end, so every socket
    (a reconnected page too) cuts the same way, a cut stays put until its rest
    no longer fits, and it then moves on by at least that slack.
    """
    per_turn = TOKENS_PER_MESSAGE
    history = sum([turn.tokens for turn in turns]) + per_turn * len(turns)
    if used + history <= budget:
        return 0, used + history
    step = max(1, int(budget * CUT_SLACK))
    offset, next_cut = 0, 0
    for index, turn in enumerate(turns):
        if offset >= next_cut and turn.role == ROLE_USER:
            if used + history - offset <= budget:
                return index, used + history - offset
            next_cut = offset + step
        offset += turn.tokens + per_turn
    return len(turns), used


def _utf8_bytes(text: str) -> int:
    """An upper bound of a text's tokens for byte-level tokenizers."""
    return len(text.encode())


class RateLimited(Exception):
    """The user is over the rate limit; nothing was saved."""

    def __init__(self, retry_after: float):
        super().__init__(f"rate limited for {retry_after:.1f} s")
        self.retry_after = retry_after


class QuotaExceeded(Exception):
    """The reply would pass one of the user's quotas; nothing was saved. The
    text is the error frame's."""


class UnknownTarget(Exception):
    """An edit's message or a regenerate's reply is not in the conversation
    (or there is nothing to regenerate); nothing was saved or taken."""


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

    async def admit(self, user, history: History, content: str,
                    branching: Branching | None = None):
        """Save the user's message and open its reply's stream, in one
        transaction with the rate limit and the quota reservation; returns the
        Admission and the history turns before the message. Raises
        :class:`RateLimited` or :class:`QuotaExceeded` (nothing saved) when the
        user is over the rate limit or would pass a quota, :class:`UnknownTarget`
        when an edit or regenerate (``branching``) names no message of the
        conversation.

        ``history`` is the socket's copy of its conversation (history.py).
        """
        limit = self.settings.rate_limit
        now = time.time()
        quota = self._quota_request(user, history, content, now, branching)
        after_id = history.read_from()
        admission = await self.store.admit(
            history.conversation_id, user.id, content, now=now,
            messages=limit.messages, per_seconds=limit.per_seconds,
            after_id=after_id, history_limit=history.limit,
            instance=self.replies.instance, lease_seconds=self.settings.limits.lease_seconds,
            quota=quota, branching=branching)
        if admission.decision is None:
            raise UnknownTarget()
        if not admission.decision.allowed:
            raise RateLimited(admission.decision.retry_after)
        if admission.over_quota is not None:
            raise QuotaExceeded(quotas.refusal(admission.over_quota, admission.reserved,
                                               quotas.Windows.at(now), self.pricing.currency))
        turns = history.add(admission.turns, admission.message_id, admission.content,
                            admission.steps, admission.continues)
        return admission, turns

    def _quota_request(self, user, history: History, content: str, now: float,
                       branching: Branching | None) -> QuotaRequest | None:
        """What to reserve for the reply, or None when no quota applies to the
        user (none in the config, no override of their own, or unlimited).
        Called before ``history.read_from()``, which may drop the counted turns."""
        if getattr(user, "quota_unlimited", None) or not (
                self.settings.quota.any or quotas.has_override(user)):
            return None
        # Any agent the conversation may have chosen could answer.
        chain = self.pool.every_agent()
        agent = chain[0]
        # With tools, each further model call of the loop is reserved for too.
        tool_steps = self.settings.agent.max_tool_steps if self.settings.agent.tools else 0
        memory_budget = self._memory_budget(agent) if self.memories is not None else 0
        known = list(history.turns)
        # A loading model's counts are estimates: never cached in the history.
        if agent.ready:
            history.count(agent, known)
            counts = [turn.tokens for turn in known]
        else:
            counts = [agent.count_tokens(turn.content) for turn in known]
        known_tokens = sum(counts) + TOKENS_PER_MESSAGE * len(counts)
        system = system_prompt(self.settings.agent.system_prompt, user.username, "")

        def bound_of(rows: list, saved_memories: list) -> quotas.Bound:
            if branching is not None:
                # An edit or a regenerate answers another branch than the copy's:
                # reserve for the fullest prompt the agent takes.
                prompt = agent.context_tokens - agent.reply_tokens + memory_budget
                return quotas.reply_bound(chain, prompt, self.pricing, tool_steps)
            # Runs inside the transaction (on the SQLite batcher's thread): no
            # tokenizer here. Turns read now and never counted (normally just
            # the previous reply) count their UTF-8 bytes: a byte-level
            # tokenizer makes no token shorter than a byte.
            tokens = known_tokens
            if rows:  # none, normally: the copy took the previous reply (add_reply)
                counted = dict(zip([turn.id for turn in known], counts))
                # Rows already counted: the copy was read again in full (read_from).
                if any(row.id in counted for row in rows):
                    tokens = 0
                tokens += sum(counted.get(row.id, len(row.content.encode())) for row in rows)
                tokens += TOKENS_PER_MESSAGE * len(rows)
            # The memory section (read in the same transaction), by its bytes
            # too, and never more than its share of the prompt.
            remembered = 0
            if saved_memories and memory_budget:
                section = memory_section(self.memories.readable(user.id, saved_memories),
                                         memory_budget * 8, _utf8_bytes)
                remembered = min(memory_budget, len(("\n\n" + section).encode()))
            return quotas.reply_bound(chain, base + remembered + min(tokens, room),
                                      self.pricing, tool_steps)

        base = quotas.prompt_base(agent, system, content)
        room = max(0, agent.context_tokens - agent.reply_tokens - base)
        return QuotaRequest(bound_of, self.limits, quotas.Windows.at(now).today)

    # The agent per conversation (agent.selectable)

    def agent_name(self, chosen: str | None) -> str:
        """The agent a conversation answers with: its choice, if still selectable."""
        if chosen is not None and chosen in self.settings.agent.choices():
            return chosen
        return self.settings.agent.backend

    async def drop_unavailable_agent(self, conversation_id: int, chosen: str | None) -> bool:
        """A conversation whose chosen agent a reload removed goes back to
        agent.backend; True if it did (the socket says so)."""
        if chosen is None or chosen in self.settings.agent.choices():
            return False
        try:
            await self.store.set_conversation_agent(conversation_id, None)
        except StoreError:
            # The reply is admitted and must start: it uses the backend anyway
            # (agent_name), and the next message tries to forget the choice again.
            logger.exception("could not reset the agent of conversation %s", conversation_id)
        return True

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
        live.reserved = admission.reserved
        live.reply.regenerated = admission.regenerated
        agent = self.agent_name(admission.agent)
        return self.replies.start(
            live, lambda live: self._answer(live, caller, history, turns, content, remembered,
                                            agent))

    async def _answer(self, live: LiveReply, caller: Caller, history: History,
                      turns: list[Turn], content: str, remembered: list = (),
                      agent: str | None = None) -> None:
        """Get the reply from the agent chain, save it, and end it. Cancelling
        the task saves the partial reply as ``cancelled`` first."""
        reply = live.reply
        try:
            if live.cancel_pending:  # cancelled before the task first ran
                raise asyncio.CancelledError
            with self.pool.lease(agent) as chain, self._tools() as tools:
                await self._generate(chain, tools, caller, history, turns, content, live,
                                     remembered)
        except asyncio.CancelledError:
            reply.cancel()
            reply.finish()
            await asyncio.shield(self._save_and_end(live, history))
            raise
        live.complete = True  # from here on a cancel comes too late
        reply.finish()
        save = asyncio.ensure_future(self._save_and_end(live, history))
        try:
            await asyncio.shield(save)
        except asyncio.CancelledError:
            # The reply was complete: a cancel that arrives while it is being
            # saved comes too late. Finish the save and deliver it all the same.
            await save
            asyncio.current_task().uncancel()

    async def _save_and_end(self, live: LiveReply, history: History) -> None:
        reply = live.reply
        columns = reply.columns()
        columns["cost"] = self.pricing.cost(reply.agent, reply.model, reply.tokens_in,
                                            reply.tokens_out)
        if live.reserved is not None and (
                (reply.tokens_in or 0) + (reply.tokens_out or 0) > live.reserved.tokens):
            logger.warning("reply %s spent %s tokens, more than the %s reserved", live.reply_id,
                           (reply.tokens_in or 0) + (reply.tokens_out or 0), live.reserved.tokens)
        try:
            reply_row_id = await self.store.finish_reply(
                live.reply_id, live.conversation_id, live.user_id, live.message_row_id,
                reply.pieces, live.saved_any or live.flushing, steps=reply.steps,
                tool_events=marks_json(live.marks), **columns)
        except StoreError:
            # Not saved: its stream is no longer renewed, so the sweep saves it
            # as interrupted with the chunks saved so far once the database is back.
            logger.exception("could not save reply %s", live.reply_id)
            metrics.errors.labels("database").inc()
            live.end(Ending(STATUS_ERROR, reply.text, STORE_UNAVAILABLE))
            return
        if not reply.steps:
            # The socket's copy takes the reply as saved (steps are read back
            # from the database instead): its next message reads no turn.
            history.add_reply(live.message_row_id, reply_row_id, columns["content"],
                              reply.status == STATUS_OK)
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
            tokens = Tokens()
            try:
                async with asyncio.timeout(agent_settings.timeout_seconds) as scope:
                    # Ready first: a loaded model counts tokens with its own tokenizer.
                    await agent.wait_ready()
                    messages, prompt_tokens = self._prompt(
                        agent, caller.username, history, turns, content, remembered,
                        live.reserved)
                    await converse(
                        agent, messages, prompt_tokens, caller.username, live, tools, caller,
                        agent_settings.max_tool_steps, self.settings.tools.timeout_seconds,
                        tokens, scope.when())
                reply.count_tokens(tokens)
                return
            except asyncio.CancelledError:
                # A stopped reply spent its prompts and its partial text (quotas count them).
                reply.count_tokens(tokens)
                raise
            except Exception as exc:  # AgentError, TimeoutError, or a plugin's bug
                reply.fail(exc)
                if reply.pieces or reply.steps or position == len(chain) - 1:
                    reply.count_tokens(tokens)
                    return  # fallbacks only take over before the first token or tool call
                logger.info("agent %s failed before its first token; trying %s",
                            agent.name, chain[position + 1].name)

    def _memory_budget(self, agent: Agent) -> int:
        """The most tokens the memory section may take in a prompt to ``agent``."""
        budget = agent.context_tokens - agent.reply_tokens
        return int(budget * self.settings.memory.prompt_share)

    def _prompt(
        self, agent: Agent, username: str, history: History, turns: list[Turn], content: str,
        remembered: list = (), reserved: quotas.Bound | None = None,
    ) -> tuple[list[dict], int]:
        """System prompt (with the user's memories, within ``memory.prompt_share``
        of the budget), then as many of the latest turns as fit, then the
        message; and the prompt's tokens as the agent counts them. With a quota
        ``reserved``, the prompt stays within the prompt that was reserved for."""
        section = memory_section(remembered, self._memory_budget(agent), agent.count_tokens)
        system = system_prompt(self.settings.agent.system_prompt, username, section)
        history.count(agent, turns)
        used = agent.count_tokens(system) + agent.count_tokens(content) + 2 * TOKENS_PER_MESSAGE
        budget = agent.context_tokens - agent.reply_tokens
        if reserved is not None and reserved.prompt_tokens:
            budget = min(budget, reserved.prompt_tokens)
        start, used = cut_history(turns, used, budget)
        # The turns' own dicts: agents read a request's messages, never change them.
        messages = [{"role": "system", "content": system}]
        kept = turns[start:] if start else turns
        if any([turn.steps for turn in kept]):
            for turn in kept:
                if turn.steps:  # the reply's tool calls and results, before its text
                    messages += turn.steps
                messages.append(turn.message)
        else:
            messages += [turn.message for turn in kept]
        messages.append({"role": "user", "content": content})
        return messages, used
