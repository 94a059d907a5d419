"""The Store: every SQL statement the service runs, behind small async methods.

Each method is one unit of work (a plain function of a ``db``, see
executor.py) run in one transaction by an executor: the reads by the
engine's, the writes by the SQLite batcher on a SQLite file
(sqlite_batcher.py) and by the engine's otherwise. So a reply is durable
before it is sent. An exchange is two writes: :meth:`Store.admit` (rate
limit, the user's message, the new history turns) and :meth:`Store.add_reply`.

Handlers, the chat service and the CLI only call these methods; they never
see SQLAlchemy. Failures come as :class:`StoreUnavailable` (unreachable,
locked) or :class:`Conflict` (a constraint).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Callable

from sqlalchemy import select

from . import (branches, feedback, leases, memories, message_search, messages, pg_exchange,
               quotas, ratelimit, revocations, schema, streams, tool_steps, users)
from .engine import DEFAULT_TIMEOUT, create_engine, probe_sqlite_write_lock, sqlite_file
from .executor import Conflict, EngineExecutor, Executor, store_errors
from .models import ROLE_USER, STATUS_ERROR, utcnow
from .notifications import Notifications
from .asyncpg_executor import AsyncpgExecutor
from .sqlite_batcher import SqliteBatcher

_SELECT_ONE = select(1)


@dataclass(frozen=True)
class Admission:
    """What :meth:`Store.admit` decided: the rate limit's decision and, when it
    allowed the message, the message's row id and public id, the reply's
    public id (its stream is open), and the history turns before the message
    (rows with ``id``, ``role`` and ``content``, oldest first), and the user's
    memories for the prompt (``key``, ``value`` encrypted, ``updated_at``)."""

    decision: ratelimit.Decision | None  # None: the edit's or regenerate's target is unknown
    message_id: int | None = None
    message_public_id: str | None = None
    reply_id: str | None = None
    turns: list = field(default_factory=list)
    memories: list = field(default_factory=list)
    # The tool steps of the replies among ``turns``: {message id: steps}.
    steps: dict = field(default_factory=dict)
    # The reply's quota reservation (None: no quota applied).
    reserved: quotas.Bound | None = None
    # When the quotas refused the message: the user's standing (store/quotas.py).
    over_quota: object | None = None
    # Whether ``turns`` continue the socket's copy (after_id); else they replace it.
    continues: bool = False
    content: str | None = None  # the message answered (a regenerate's is the saved one)
    agent: str | None = None  # the conversation's chosen agent (None: agent.backend)
    regenerated: bool = False  # a regenerate: the message had a reply already


@dataclass(frozen=True)
class QuotaRequest:
    """What :meth:`Store.admit` reserves against the quotas (store/quotas.py).

    ``bound_of(turns, memories)`` gives the reply's bound from the history
    turns read (rows with id, role and content, oldest first) and the user's
    memories (encrypted rows): the prompt is only known once they are. It runs
    inside the transaction, so it must be quick."""

    bound_of: Callable[[list, list], quotas.Bound]
    limits: quotas.Limits
    today: date  # the UTC day of the message


@dataclass(frozen=True)
class Branching:
    """How an admitted message joins the tree (store/branches.py): ``edit``
    (a new sibling of the user message ``target``) or ``regenerate`` (a new
    reply to the user message of reply ``target``, or of the active branch's
    last user message when ``target`` is None)."""

    kind: str  # "edit" or "regenerate"
    target: str | None = None  # a public id


class Store:
    def __init__(self, engine, timeout: float = DEFAULT_TIMEOUT):
        self.engine = engine  # for analytics and schema management only
        self.timeout = timeout
        self.sqlite_file = sqlite_file(engine)
        self.reader: Executor = EngineExecutor(engine)
        # The writes skip the engine's per-statement machinery: on a SQLite file
        # the group-commit batcher (a second connection to ":memory:" would be
        # another, empty database), on PostgreSQL asyncpg's own connections.
        self.writer: Executor = self.reader
        if self.sqlite_file:
            self.writer = SqliteBatcher(self.sqlite_file, timeout)
        elif engine.url.get_driver_name() == "asyncpg":
            self.writer = AsyncpgExecutor(engine, timeout)

    @classmethod
    def from_url(cls, url: str, echo: bool = False, timeout: float = DEFAULT_TIMEOUT) -> "Store":
        return cls(create_engine(url, echo, timeout), timeout)

    async def close(self) -> None:
        if self.writer is not self.reader:
            await self.writer.close()
        await self.reader.close()

    async def ping(self) -> None:
        """Raise StoreUnavailable if the database cannot take a write now (/readyz)."""
        with store_errors():
            if self.sqlite_file is not None:
                await asyncio.to_thread(probe_sqlite_write_lock, self.sqlite_file)
                return
            async with asyncio.timeout(self.timeout):
                await self.reader.run(_select_one, write=False)

    # Schema (Alembic; see schema.py)

    async def ensure_schema(self) -> str:
        """Create the schema of an empty database ("created"), accept the
        current one ("current"), refuse any other with SchemaError."""
        return await self._schema(schema.ensure_schema(self.engine))

    async def schema_revision(self) -> str | None:
        return await self._schema(schema.current_revision(self.engine))

    async def upgrade_schema(self) -> None:
        await self._schema(schema.upgrade(self.engine))

    @staticmethod
    async def _schema(step):
        with store_errors():
            return await step

    # Users

    async def create_user(self, username: str, password_hash: str | None,
                          is_admin: bool = False):
        values = {"username": username, "password_hash": password_hash, "is_admin": is_admin,
                  "created_at": utcnow()}
        try:
            return await self.writer.run(_first, users.INSERT_USER, values)
        except Conflict:
            raise Conflict(f"user {username!r} already exists") from None

    async def get_user(self, username: str):
        return await self.reader.run(_first, users.BY_NAME, {"username": username}, write=False)

    async def token_holder(self, username: str, jti: str):
        """The user a token names, with ``jti_revoked``: whether that one token
        was revoked (one statement: this runs for every socket that opens)."""
        return await self.reader.run(_first, users.TOKEN_HOLDER,
                                     {"username": username, "jti": jti}, write=False)

    async def list_users(self) -> list:
        return await self.reader.run(_all, users.ALL_USERS, None, write=False)

    async def set_disabled(self, username: str, disabled: bool = True) -> bool:
        """Returns False when there is no such user."""
        return await self.writer.run(_changed_one, users.SET_DISABLED,
                                     {"name": username, "value": disabled})

    async def set_admin(self, username: str, is_admin: bool = True) -> bool:
        """Returns False when there is no such user."""
        return await self.writer.run(_changed_one, users.SET_ADMIN,
                                     {"name": username, "value": is_admin})

    # Tokens

    async def revoke_token(self, jti: str, user_id: int, expires_at: datetime) -> None:
        await self.writer.run(revocations.revoke_token, jti, user_id, expires_at)

    async def revoke_all_tokens(self, username: str) -> bool:
        """Refuse every token of the user issued until now. False: no such user."""
        return await self.writer.run(revocations.revoke_all, username)

    async def purge_revocations(self) -> int:
        """Forget the revocations of tokens that have expired anyway."""
        return await self.writer.run(revocations.purge_expired)

    async def token_states(self, user_ids: set[int], jtis: set[str]) -> tuple[dict, set[str]]:
        """For the re-check of open sockets: {user id: (id, disabled,
        tokens_revoked_before)} and the revoked ones of ``jtis``."""
        return await self.reader.run(_token_states, user_ids, jtis, write=False)

    # Conversations and messages

    async def open_conversation(self, user_id: int, client_id: str) -> int:
        """The conversation of (user, client_id), created on first use."""
        return await self.writer.run(_open_conversation, user_id, client_id)

    async def admit(
        self, conversation_id: int, user_id: int, content: str, *, now: float, messages: int,
        per_seconds: float, after_id: int, history_limit: int, instance: str,
        lease_seconds: float, quota: QuotaRequest | None = None,
        branching: Branching | None = None,
    ) -> Admission:
        """The start of an exchange, in one transaction: take the rate limit
        (``messages`` per ``per_seconds``), reserve the reply's ``quota``
        bound, and if both allow, save the user's message as the active leaf's
        child (or as ``branching`` says), open its reply's stream (leased to
        ``instance``), and read the history turns of its branch, back to
        ``after_id`` (the socket's copy) if it is on it, and the user's memories.
        """
        return await self.writer.run(_admit, conversation_id, user_id, content, now, messages,
                                     per_seconds, after_id, history_limit, instance,
                                     now + lease_seconds, quota, branching, lock_key=user_id)

    # Branches, the agent per conversation, feedback (branches.py, feedback.py)

    async def switch_branch(self, conversation_id: int, message_id: str) -> list[str] | None:
        """Make the branch through a message active; its path's public ids,
        oldest first (None: no such message in the conversation)."""
        return await self.writer.run(branches.switch, conversation_id, message_id)

    async def conversation_tree(self, user_id: int, client_id: str
                                ) -> tuple[int | None, list, dict[int, list]]:
        """A user's conversation, in one read: its active leaf's row id, every
        message (id, public_id, parent_id, role, content, status, created_at,
        rating, comment), oldest first, and the tool steps of its replies by
        messages.id ((turn, call_id, name, arguments, status, latency_ms), in
        order)."""
        return await self.reader.run(branches.tree, user_id, client_id, write=False)

    async def set_conversation_agent(self, conversation_id: int, name: str | None) -> None:
        await self.writer.run(branches.set_agent, conversation_id, name)

    async def conversation_agent(self, conversation_id: int) -> str | None:
        state = await self.reader.run(branches.state, conversation_id, write=False)
        return None if state is None else state.agent

    async def set_feedback(self, user_id: int, reply_id: str, rating: int,
                           comment: str | None) -> bool:
        """Save, replace (rating 1 / -1) or remove (0) the user's feedback on
        a reply of theirs; False when it is no reply of theirs."""
        return await self.writer.run(feedback.set_feedback, user_id, reply_id, rating, comment)

    async def finish_reply(self, reply_id: str, conversation_id: int, user_id: int,
                           reply_to_id: int, pieces: list[str], flushed: bool,
                           steps=(), tool_events: str | None = None, **columns) -> int:
        """Save a reply (or the record of a failed or cancelled one) and close
        its stream, in one transaction. ``pieces`` are its chunks (for a later
        resume); ``flushed``: whether any of them were saved on the way;
        ``steps`` its tool calls (tool_loop.Step); ``tool_events`` their
        events as a resume replays them (JSON, replies.py).

        ``columns`` are Message columns: content, status, agent, model,
        tokens_in, tokens_out, latency_ms, ttft_ms, error_ref, error_kind,
        cost. Its tokens and cost are added to the user's usage; its quota
        reservation ends with its stream (quotas.py).
        """
        row = messages.reply_row(conversation_id, user_id, reply_to_id, reply_id, **columns)
        return await self.writer.run(_finish_reply, reply_id, row, pieces, flushed, list(steps),
                                     tool_events, lock_key=user_id)

    # Replies in flight (streams.py; the design is in tornado_app/replies.py)

    async def flush_chunks(self, new_chunks: list[dict], last_seqs: list[dict],
                           instance: str, tool_events: list[dict] = ()) -> list[str]:
        """Save chunks (and tool events) of replies in flight; the ids of this
        instance's replies someone asked to cancel."""
        return await self.writer.run(streams.flush, new_chunks, last_seqs, instance,
                                     list(tool_events))

    async def cancel_requests(self, instance: str) -> list[str]:
        return await self.reader.run(streams.cancel_requests, instance, write=False)

    async def request_cancel(self, reply_id: str, user_id: int) -> bool:
        """Ask whichever instance generates the reply to cancel it. False: not
        the user's reply, or not in flight."""
        return await self.writer.run(streams.request_cancel, reply_id, user_id)

    async def sweep_replies(self, now: float, forget_before: datetime) -> list[str]:
        """Save replies whose instance died as interrupted; forget old streams."""
        return await self.writer.run(streams.sweep, now, _interrupted_row, forget_before)

    async def reply_state(self, reply_id: str):
        """A reply's stream (and its saved row, once saved), or None."""
        return await self.reader.run(streams.state, reply_id, write=False)

    async def saved_reply(self, reply_id: str):
        """A saved reply's row (user_id, content, status, error_ref, error_kind,
        message_id), or None."""
        return await self.reader.run(streams.saved_reply, reply_id, write=False)

    async def reply_tool_steps(self, message_id: int) -> list:
        """A saved reply's tool steps (call_id, name, arguments, status), in order."""
        return await self.reader.run(tool_steps.of_reply, message_id, write=False)

    async def reply_chunks_after(self, reply_id: str, after: int) -> list:
        return await self.reader.run(streams.chunks_after, reply_id, after, write=False)

    def reply_notifications(self, on_notify, on_state) -> Notifications | None:
        """PostgreSQL's notifications of changed replies (None on SQLite, which
        has none: watchers poll)."""
        if self.reader.dialect != "postgresql":
            return None
        return Notifications(self.engine, self.timeout, on_notify, on_state)

    async def live_replies(self, conversation_id: int) -> list:
        """The replies of a conversation in flight, on any instance."""
        return await self.reader.run(streams.live_in_conversation, conversation_id, write=False)

    async def transcript(self, user_id: int, client_id: str, limit: int) -> list:
        """The newest ``limit`` delivered turns of a user's conversation
        (role, content, status, created_at), oldest first."""
        rows = await self.reader.run(_all, messages.TRANSCRIPT,
                                     {"user_id": user_id, "client_id": client_id,
                                      "limit": limit}, write=False)
        rows.reverse()
        return rows

    # Memories (memories.py; values encrypted by tornado_app/memory.py) and recall

    async def list_memories(self, user_id: int) -> list:
        """(key, value, updated_at) rows of a user's memories, by key; values encrypted."""
        return await self.reader.run(_all, memories.LIST, {"user_id": user_id}, write=False)

    async def save_memory(self, user_id: int, key: str, value: bytes, max_items: int) -> bool:
        """Save or replace; False when the key is new and the user has ``max_items``."""
        return await self.writer.run(memories.save, user_id, key, value, max_items)

    async def delete_memory(self, user_id: int, key: str) -> bool:
        return await self.writer.run(memories.remove, user_id, key)

    async def forget_memories(self, username: str) -> int | None:
        """Delete all of a user's memories: how many; None when there is no such user."""
        return await self.writer.run(memories.forget, username)

    async def search_messages(self, user_id: int, query: str, limit: int) -> list:
        """A user's messages holding every word of ``query``, newest first:
        (conversation, role, content, created_at) rows."""
        if self.reader.dialect == "sqlite":  # it fills the index first (message_search.py)
            return await self.writer.run(message_search.search, user_id, query, limit)
        return await self.reader.run(message_search.search, user_id, query, limit, write=False)

    async def fill_search_index(self) -> None:
        """Index the messages saved since the last fill, for recall (SQLite)."""
        if self.reader.dialect == "sqlite":
            await self.writer.run(message_search.fill)

    # Connection slots (leases.py)

    async def acquire_lease(
        self, user_id: int, instance: str, now: float, ttl: float, cap: int
    ) -> str | None:
        """A new lease id, or None when the user already holds ``cap`` live ones."""
        return await self.writer.run(leases.acquire, user_id, instance, now, ttl, cap)

    async def release_lease(self, lease_id: str) -> None:
        await self.writer.run(leases.release, lease_id)

    # Quotas (quotas.py)

    async def quota_standing(self, user_id: int, limits: quotas.Limits, now: float, today):
        """A user's usage today and this month, reservations in flight, and
        the limits that apply to them; None if there is no such user."""
        return await self.reader.run(quotas.standing, user_id, limits, now, today, write=False)

    async def set_quota(self, username: str, tokens_per_day: int | None,
                        tokens_per_month: int | None, cost_per_month: float | None,
                        unlimited: bool | None) -> bool:
        """Set a user's quota overrides (None: the config's). False: no such user."""
        return await self.writer.run(quotas.set_overrides, username, tokens_per_day,
                                     tokens_per_month, cost_per_month, unlimited)

    async def quota_overrides(self, username: str):
        """A user's id and quota overrides, or None."""
        return await self.reader.run(quotas.overrides, username, write=False)

    async def renew_leases(self, instance: str, now: float, ttl: float,
                           reply_ids: list[str] = ()) -> None:
        """Extend this instance's connection slots and the leases of its
        replies in flight; forget long-expired slots of any instance."""
        await self.writer.run(_renew, instance, now, ttl, list(reply_ids))


# Units of work (run by an executor; see executor.py)

def _select_one(db) -> None:
    db.execute(_SELECT_ONE)


def _first(db, statement, values):
    return db.execute(statement, values).first()


def _all(db, statement, values) -> list:
    return db.execute(statement, values).all()


def _scalar(db, statement, values):
    return db.execute(statement, values).scalar()


def _changed_one(db, statement, values) -> bool:
    return db.execute(statement, values).rowcount == 1


def _token_states(db, user_ids, jtis) -> tuple[dict, set[str]]:
    if not user_ids:
        return {}, set()
    user_query, revoked_query = users.token_states(list(user_ids), list(jtis))
    states = {row.id: row for row in db.execute(user_query).all()}
    return states, set(db.execute(revoked_query).scalars())


def _open_conversation(db, user_id: int, client_id: str) -> int:
    values = {"user_id": user_id, "client_id": client_id, "created_at": utcnow()}
    db.execute(messages.insert_conversation(db.dialect), values)
    return db.execute(messages.CONVERSATION_ID, values).scalar()


def _admit(db, conversation_id, user_id, content, now, limit, per_seconds, after_id,
           history_limit, instance, lease_until, quota, branching) -> Admission:
    # No such conversation: its message's foreign key fails below (Conflict).
    path = saved = None
    if branching is None and db.dialect == "postgresql":  # one round trip (pg_exchange.py)
        (leaf, agent), decision, path, saved = pg_exchange.take(
            db, conversation_id, user_id, now, limit, per_seconds, after_id, history_limit)
        parent, existing = leaf, None
    else:
        leaf, agent = branches.state(db, conversation_id) or (None, None)
        parent, existing = leaf, None
        if branching is not None:
            target = _branch_target(db, conversation_id, leaf, branching)
            if target is None:
                return Admission(None)  # checked before the rate limit: nothing is taken
            parent = target.parent_id
            if branching.kind == "regenerate":
                existing, content = target, target.content
        decision = ratelimit.take(db, user_id, now, limit, per_seconds)
    if not decision.allowed:
        return Admission(decision)
    reply_id = messages.new_public_id()
    rows, continues = path or branches.path_up(db, parent, after_id, history_limit)
    turns = branches.prompt_turns(rows)
    # In the same transaction: the prompt needs them (and so does the quota's
    # bound), and a read of its own would cost every exchange another round trip.
    if saved is None:
        saved = db.execute(memories.LIST, {"user_id": user_id}).all()
    bound = None
    if quota is not None:
        bound = quota.bound_of(turns, saved)
        # Checked here, held by the reply's stream (opened below with the bound).
        refused = quotas.reserve(db, user_id, bound, quota.limits, now, quota.today)
        if refused is not None:
            return Admission(decision, reserved=bound, over_quota=refused)
    if existing is None and db.dialect == "postgresql":  # one round trip (pg_exchange.py)
        public_id = messages.new_public_id()
        row = messages.user_message(conversation_id, user_id, content, public_id, parent)
        message_id = pg_exchange.open_exchange(db, row, reply_id, instance, lease_until, bound)
    else:
        if existing is None:
            public_id = messages.new_public_id()
            row = messages.user_message(conversation_id, user_id, content, public_id, parent)
            message_id = db.execute(messages.INSERT_MESSAGE, row).scalar()
        else:
            message_id, public_id = existing.id, existing.public_id
        branches.set_leaf(db, conversation_id, message_id)
        streams.open_stream(db, reply_id, conversation_id, user_id, message_id, instance,
                            lease_until, bound)
    steps = {}
    if any(turn.role != ROLE_USER for turn in turns):
        steps = tool_steps.between(db, conversation_id, turns[0].id - 1, message_id)
    return Admission(decision, message_id, public_id, reply_id, turns, memories=saved,
                     steps=steps, reserved=bound, continues=continues, content=content,
                     agent=agent, regenerated=existing is not None)


def _branch_target(db, conversation_id, leaf_id, branching: Branching):
    """The user message an edit replaces or a regenerate answers again, or None."""
    if branching.kind == "edit":
        row = branches.find(db, conversation_id, branching.target)
        return row if row is not None and not branches.is_reply(row) else None
    if branching.target is None:
        return branches.last_user_message(db, leaf_id)
    reply = branches.find(db, conversation_id, branching.target)
    if not branches.is_reply(reply) or reply.reply_to_id is None:
        return None
    return db.execute(branches.MESSAGE_BY_ID, {"id": reply.reply_to_id}).first()


def _finish_reply(db, reply_id: str, row: dict, pieces: list[str], flushed: bool,
                  steps: list, tool_events: str | None) -> int:
    tokens, cost = (row["tokens_in"] or 0) + (row["tokens_out"] or 0), row["cost"] or 0.0
    if db.dialect == "postgresql":  # one round trip, the usage included (pg_exchange.py)
        reply_row_id = pg_exchange.finish_reply(db, row, pieces, tokens, cost, tool_events)
    else:
        reply_row_id = streams.finish(db, reply_id, row, pieces, flushed, tool_events)
        quotas.settle(db, row["user_id"], row["created_at"].date(), tokens, cost)
    tool_steps.save(db, reply_row_id, row["conversation_id"], row["user_id"], row["agent"], steps)
    return reply_row_id


def _renew(db, instance: str, now: float, ttl: float, reply_ids: list[str]) -> None:
    leases.renew(db, instance, now, ttl)
    streams.renew(db, reply_ids, now + ttl)  # their quota reservations with them


def _interrupted_row(expired, text: str) -> dict:
    """The saved row of a reply whose instance died while generating it."""
    return messages.reply_row(
        expired.conversation_id, expired.user_id, expired.message_id, expired.reply_id,
        content=text, status=STATUS_ERROR, error_kind="interrupted",
        error_ref=secrets.token_hex(4))
