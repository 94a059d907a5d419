"""The Store: every SQL statement the service runs, behind small async methods.

It uses SQLAlchemy Core on an async engine (aiosqlite or asyncpg): each method
is one short transaction, so a reply is durable before it is sent. An
exchange is two of them: :meth:`Store.admit` (rate limit, the user's message,
the new history turns) and :meth:`Store.add_reply`.

On a SQLite file, the exchange's statements go through :class:`SqliteBatcher`
instead: one thread, one connection, group commit. Through aiosqlite and
SQLAlchemy each of them cost about 1.2 ms (eight thread hand-offs per
transaction) and the pool's connections queued on SQLite's write lock in
busy-handler sleeps; see docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy import Integer, bindparam, event, exists, select, text, update
from sqlalchemy.dialects import sqlite as sqlite_dialects
from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import leases, ratelimit, revocations
from .models import (
    ROLE_ASSISTANT,
    ROLE_USER,
    STATUS_OK,
    Conversation,
    Message,
    User,
    utcnow,
)

logger = logging.getLogger(__name__)

users = User.__table__
conversations = Conversation.__table__
messages = Message.__table__

# SQLite: WAL lets readers run beside the writer; synchronous=NORMAL in WAL
# mode never loses a committed transaction when the process dies (kill -9),
# only, at worst, the last ones on a power cut. busy_timeout makes writers
# from several processes queue instead of failing with "database is locked".
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)
# database.timeout_seconds: how long to wait for the database at most.
DEFAULT_TIMEOUT = 10.0


def sqlite_pragmas(timeout: float) -> tuple[str, ...]:
    return (*SQLITE_PRAGMAS, f"PRAGMA busy_timeout={int(timeout * 1000)}")


class StoreError(Exception):
    """A request the data does not allow (a duplicate user name, say)."""


def create_engine(url: str, echo: bool = False, timeout: float = DEFAULT_TIMEOUT) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # A lost route to the server (no reset) must not hang a request for ever.
        connect_args = {"timeout": timeout, "command_timeout": timeout}
        if parsed.get_driver_name() != "asyncpg":
            connect_args = {}
        return create_async_engine(
            parsed, echo=echo, pool_pre_ping=True, pool_timeout=timeout, connect_args=connect_args
        )
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed, echo=echo)

    @event.listens_for(engine.sync_engine, "connect")
    def _set_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        for pragma in sqlite_pragmas(timeout):
            cursor.execute(pragma)
        cursor.close()

    return engine


class Store:
    def __init__(self, engine: AsyncEngine, timeout: float = DEFAULT_TIMEOUT):
        self.engine = engine
        self.timeout = timeout
        database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        self.sqlite_file = database if database not in (None, "", ":memory:") else None
        # A second connection to ":memory:" would be another, empty database.
        self.batcher = SqliteBatcher(database, timeout) if self.sqlite_file else None

    @classmethod
    def from_url(cls, url: str, echo: bool = False, timeout: float = DEFAULT_TIMEOUT) -> "Store":
        return cls(create_engine(url, echo, timeout), timeout)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        await self.engine.dispose()

    async def ping(self) -> None:
        """Raise if the database cannot take a write now (for /readyz)."""
        if self.sqlite_file is not None:
            # SELECT 1 needs no lock: ask for the write lock, briefly.
            try:
                await asyncio.to_thread(_probe_sqlite_write_lock, self.sqlite_file)
            except sqlite3.Error as exc:
                raise _as_sqlalchemy_error(exc) from None
            return
        async with asyncio.timeout(self.timeout):
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

    # Users

    async def create_user(
        self, username: str, password_hash: str | None, is_admin: bool = False
    ) -> Row:
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    users.insert()
                    .values(
                        username=username,
                        password_hash=password_hash,
                        is_admin=is_admin,
                        disabled=False,
                        created_at=utcnow(),
                    )
                    .returning(*users.c)
                )
                return result.one()
        except IntegrityError:
            raise StoreError(f"user {username!r} already exists") from None

    async def get_user(self, username: str) -> Row | None:
        async with self.engine.connect() as conn:
            result = await conn.execute(select(users).where(users.c.username == username))
            return result.one_or_none()

    async def token_holder(self, username: str, jti: str) -> Row | None:
        """The user a token names, with ``jti_revoked``: whether that one token
        was revoked (one statement: this runs for every socket that opens)."""
        jti_revoked = exists().where(revocations.revoked.c.jti == jti).label("jti_revoked")
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(users, jti_revoked).where(users.c.username == username))
            return result.one_or_none()

    async def list_users(self) -> list[Row]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(select(users).order_by(users.c.username)))

    async def set_disabled(self, username: str, disabled: bool = True) -> bool:
        """Returns False when there is no such user."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users).where(users.c.username == username).values(disabled=disabled)
            )
            return result.rowcount == 1

    # Conversations and messages

    async def open_conversation(self, user_id: int, client_id: str) -> int:
        """The conversation of (user, client_id), created on first use.

        INSERT .. ON CONFLICT DO NOTHING keeps two sockets that open the same
        conversation at once from failing on the unique constraint.
        """
        if self.batcher is not None:
            values = {"user_id": user_id, "client_id": client_id, "created_at": utcnow()}
            rows = await self.batcher.execute(
                _INSERT_CONVERSATION, _CONVERSATION_ID, values=values)
            return rows[0][0]
        async with self.engine.begin() as conn:
            insert = ratelimit.dialect_insert(conn)(conversations)
            await conn.execute(
                insert.values(user_id=user_id, client_id=client_id, created_at=utcnow())
                .on_conflict_do_nothing(index_elements=["user_id", "client_id"])
            )
            result = await conn.execute(
                select(conversations.c.id).where(
                    conversations.c.user_id == user_id,
                    conversations.c.client_id == client_id,
                )
            )
            return result.scalar_one()

    # Connection slots (leases.py); on SQLite through the batcher, so that
    # they never wait for the write lock in the busy handler's sleeps.

    async def acquire_lease(
        self, user_id: int, instance: str, now: float, ttl: float, cap: int
    ) -> str | None:
        """A new lease id, or None when the user already holds ``cap`` live ones."""
        values = leases.acquire_values(user_id, instance, now, ttl, cap)
        if self.batcher is not None:
            rows = await self.batcher.execute(leases.ACQUIRE, values=values)
            return rows[0][0] if rows else None
        async with self.engine.begin() as conn:
            return await leases.acquire(conn, values)

    async def release_lease(self, lease_id: str) -> None:
        values = {"lease_id": lease_id}
        if self.batcher is not None:
            await self.batcher.execute(leases.RELEASE, values=values)
            return
        async with self.engine.begin() as conn:
            await conn.execute(leases.RELEASE, values)

    async def renew_leases(self, instance: str, now: float, ttl: float) -> None:
        """Extend this instance's leases; forget long-expired ones of any instance."""
        values = leases.renew_values(instance, now, ttl)
        if self.batcher is not None:
            await self.batcher.execute(leases.RENEW, leases.FORGET, values=values)
            return
        async with self.engine.begin() as conn:
            await leases.renew(conn, values)

    async def add_user_message(self, conversation_id: int, user_id: int, content: str) -> int:
        return await self._insert_message(_message_row(
            {"conversation_id": conversation_id, "user_id": user_id, "role": ROLE_USER,
             "content": content}))

    async def admit(
        self, conversation_id: int, user_id: int, content: str, *, now: float, messages: int,
        per_seconds: float, after_id: int, history_limit: int,
    ) -> "Admission":
        """The start of an exchange, in one transaction: take the rate limit
        (``messages`` per ``per_seconds``) and, if it allows, save the user's
        message and read the history turns between ``after_id`` and it (see
        :func:`_history_query`). One round trip instead of three.
        """
        if self.batcher is not None:
            return await self.batcher.admit(
                conversation_id, user_id, content, now, messages, per_seconds, after_id,
                history_limit)
        async with self.engine.begin() as conn:
            decision = await ratelimit.take(conn, user_id, now, messages, per_seconds)
            if not decision.allowed:
                return Admission(decision)
            message_id = (await conn.execute(_INSERT_MESSAGE, _message_row(
                {"conversation_id": conversation_id, "user_id": user_id, "role": ROLE_USER,
                 "content": content}))).scalar_one()
            turns = list(await conn.execute(
                _history_query(conversation_id, message_id, history_limit, after_id)))
        turns.reverse()
        return Admission(decision, message_id, turns)

    async def add_reply(
        self, conversation_id: int, user_id: int, reply_to_id: int, **fields
    ) -> int:
        """Save a reply (or the record of a failed or cancelled one).

        ``fields`` are Message columns: content, status, agent, model,
        tokens_in, tokens_out, latency_ms, ttft_ms, error_ref.
        """
        return await self._insert_message(_message_row(
            {"conversation_id": conversation_id, "user_id": user_id,
             "reply_to_id": reply_to_id, "role": ROLE_ASSISTANT, **fields}))

    async def _insert_message(self, row: dict) -> int:
        if self.batcher is not None:
            return (await self.batcher.execute(_INSERT_MESSAGE, values=row))[0][0]
        async with self.engine.begin() as conn:
            return (await conn.execute(_INSERT_MESSAGE, row)).scalar_one()

    async def conversation_messages(self, conversation_id: int) -> list[Row]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(messages)
                .where(messages.c.conversation_id == conversation_id)
                .order_by(messages.c.id)
            )
            return list(result)

    # Rate limit

    async def take_rate_limit(
        self, user_id: int, now: float, limit: int, per_seconds: float
    ) -> ratelimit.Decision:
        if self.batcher is not None:
            values, tolerance = ratelimit.parameters(user_id, now, limit, per_seconds)
            [(tat, granted)] = await self.batcher.execute(_SQLITE_RATE_LIMIT, values=values)
            return ratelimit.decision(tat, granted, tolerance, now)
        async with self.engine.begin() as conn:
            return await ratelimit.take(conn, user_id, now, limit, per_seconds)


@dataclass(frozen=True)
class Admission:
    """What :meth:`Store.admit` decided: the rate limit's decision and, when it
    allowed the message, the message's id and the history turns before it."""

    decision: ratelimit.Decision
    message_id: int | None = None
    turns: list = field(default_factory=list)


def _history_query(conversation_id, before_id, limit, after_id):
    """A conversation's newest ``limit`` turns between two message ids
    (exclusive), as (id, role, content), newest first.

    User messages are all kept; of the replies only the delivered ones, so
    that an error text never becomes part of the model's context. With bind
    parameters for values, it is also the SQLite batcher's statement.
    """
    return (
        select(messages.c.id, messages.c.role, messages.c.content)
        .where(
            messages.c.conversation_id == conversation_id,
            messages.c.id < before_id,
            messages.c.id > after_id,
            (messages.c.role == ROLE_USER) | (messages.c.status == STATUS_OK),
        )
        .order_by(messages.c.id.desc())
        .limit(limit)
    )


# The SQLite fast path


class _Compiled:
    """A Core statement compiled once for SQLite, run on a plain sqlite3 cursor.

    Bind parameters are converted by the same type processors SQLAlchemy uses
    (DateTime becomes the same text), so rows read back through the engine
    are identical to rows it wrote itself.
    """

    _dialect = pysqlite.dialect()

    def __init__(self, statement):
        compiled = statement.compile(dialect=self._dialect)
        self.sql = str(compiled)
        self.names = list(compiled.positiontup)
        self.defaults = {name: bind.effective_value for name, bind in compiled.binds.items()}
        self.processors = [
            compiled.binds[name].type.dialect_impl(self._dialect).bind_processor(self._dialect)
            for name in self.names
        ]

    def parameters(self, values: dict) -> tuple:
        defaults = self.defaults
        return tuple(
            (values[name] if name in values else defaults[name]) if process is None
            else process(values[name] if name in values else defaults[name])
            for name, process in zip(self.names, self.processors)
        )

    def run(self, cursor: sqlite3.Cursor, values: dict) -> list[tuple]:
        return cursor.execute(self.sql, self.parameters(values)).fetchall()


_MESSAGE_COLUMNS = [c.name for c in messages.c if c.name != "id"]
_INSERT_MESSAGE = messages.insert().values(
    {name: bindparam(name, type_=messages.c[name].type) for name in _MESSAGE_COLUMNS}
).returning(messages.c.id)
_HISTORY = _history_query(*(bindparam(name, type_=Integer) for name in
                             ("conversation_id", "before_id", "limit", "after_id")))
HistoryRow = namedtuple("HistoryRow", "id role content")
_SQLITE_RATE_LIMIT = ratelimit.upsert(sqlite_dialects.insert)
_INSERT_CONVERSATION = sqlite_dialects.insert(conversations).values(
    user_id=bindparam("user_id", type_=Integer),
    client_id=bindparam("client_id", type_=conversations.c.client_id.type),
    created_at=bindparam("created_at", type_=conversations.c.created_at.type),
).on_conflict_do_nothing(index_elements=["user_id", "client_id"])
_CONVERSATION_ID = select(conversations.c.id).where(
    conversations.c.user_id == bindparam("user_id", type_=Integer),
    conversations.c.client_id == bindparam("client_id", type_=conversations.c.client_id.type),
)

_STOP = object()


def _run_all(cursor: sqlite3.Cursor, work: tuple) -> list[tuple]:
    compiled, values = work
    for statement in compiled:
        rows = statement.run(cursor, values)
    return rows


def _admit(cursor: sqlite3.Cursor, work: tuple) -> tuple:
    """Store.admit on the batcher's thread: the message only if the limit allows it."""
    (rate_limit, insert_message, history), values = work
    [(tat, granted)] = rate_limit.run(cursor, values)
    if not granted:
        return tat, granted, None, []
    message_id = insert_message.run(cursor, values["message"])[0][0]
    values["before_id"] = message_id
    return tat, granted, message_id, history.run(cursor, values)


def _message_row(values: dict) -> dict:
    """A messages row for the INSERT: every column, NULL unless given, status ok."""
    row = dict.fromkeys(_MESSAGE_COLUMNS)
    row["status"] = STATUS_OK
    row.update(values, created_at=utcnow())
    return row


def _turns(rows: list) -> list:
    """History rows, newest first as read, as HistoryRows oldest first."""
    rows.reverse()
    return list(map(HistoryRow._make, rows))  # half the time of HistoryRow(*row)


class SqliteBatcher:
    """The exchange's statements on a SQLite file: one thread, group commit.

    Callers on the event loop queue an operation and await its future. The
    thread takes everything queued (up to ``max_batch``), runs it in one
    transaction (``BEGIN IMMEDIATE``, each operation in its own savepoint so
    that one failing statement fails only its caller), commits, and only then
    resolves the futures, with one wake-up of the event loop per batch. So a
    caller never sees a write that is not committed, and under load one
    commit (and one wait for the write lock, when other processes share the
    file) serves many exchanges. Errors reach callers as SQLAlchemy
    exceptions, like those of the engine.
    """

    max_batch = 512

    def __init__(self, database: str, timeout: float = DEFAULT_TIMEOUT):
        self.database = database
        self.timeout = timeout
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._compiled: dict = {}  # statement -> _Compiled, filled on first use

    def _compile(self, statement) -> "_Compiled":
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = _Compiled(statement)
        return compiled

    # The operations (run on the thread; ``cursor`` is inside the transaction)

    async def execute(self, *statements, values: dict) -> list[tuple]:
        """Run Core statements with bind parameters (module constants: each is
        compiled once) as one write operation; the last one's rows."""
        work = ([self._compile(statement) for statement in statements], values)
        return await self._submit(_run_all, work, write=True)

    async def admit(self, conversation_id: int, user_id: int, content: str, now: float,
                    messages: int, per_seconds: float, after_id: int,
                    history_limit: int) -> Admission:
        values, tolerance = ratelimit.parameters(user_id, now, messages, per_seconds)
        message = _message_row({"conversation_id": conversation_id, "user_id": user_id,
                                "role": ROLE_USER, "content": content})
        values.update(message=message, conversation_id=conversation_id, after_id=after_id,
                      limit=history_limit)
        statements = [self._compile(s) for s in (_SQLITE_RATE_LIMIT, _INSERT_MESSAGE, _HISTORY)]
        tat, granted, message_id, rows = await self._submit(
            _admit, (statements, values), write=True)
        decision = ratelimit.decision(tat, granted, tolerance, now)
        if not granted:
            return Admission(decision)
        return Admission(decision, message_id, _turns(rows))

    # Machinery

    def _submit(self, operation: Callable, values: dict, write: bool) -> asyncio.Future:
        if self._thread is None:
            self._start()
        future = asyncio.get_running_loop().create_future()
        self._queue.put((operation, values, write, future))
        return future

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="sqlite-batcher", daemon=True)
                thread.start()
                self._thread = thread

    async def close(self) -> None:
        """Finish what is queued, then stop the thread and close the connection."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._thread = None

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: the transactions are the batcher's own BEGIN/COMMIT.
        conn = sqlite3.connect(self.database, isolation_level=None, check_same_thread=False)
        for pragma in sqlite_pragmas(self.timeout):
            conn.execute(pragma)
        return conn

    def _run(self) -> None:
        conn = None
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if not batch:
                continue
            try:
                if conn is None:
                    conn = self._connect()
                outcomes = self._run_batch(conn, batch)
            except BaseException as exc:  # the connection itself failed
                logger.warning("sqlite batch failed: %s", exc)
                outcomes = [(future, None, _as_sqlalchemy_error(exc)) for *_, future in batch]
                if conn is not None:
                    conn.close()
                    conn = None
            _deliver(outcomes)
        if conn is not None:
            conn.close()

    @staticmethod
    def _run_batch(conn: sqlite3.Connection, batch: list) -> list:
        cursor = conn.cursor()
        writes = any(write for _op, _values, write, _future in batch)
        outcomes = []
        if writes:
            cursor.execute("BEGIN IMMEDIATE")
        try:
            for operation, values, _write, future in batch:
                if writes:
                    cursor.execute("SAVEPOINT operation")
                try:
                    result = operation(cursor, values)
                except Exception as exc:  # sqlite3.Error, or a value the driver cannot bind
                    if writes:
                        cursor.execute("ROLLBACK TO operation")
                        cursor.execute("RELEASE operation")
                    outcomes.append((future, None, _as_sqlalchemy_error(exc)))
                    continue
                if writes:
                    cursor.execute("RELEASE operation")
                outcomes.append((future, result, None))
            if writes:
                cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        finally:
            cursor.close()
        return outcomes


def _probe_sqlite_write_lock(path: str) -> None:
    conn = sqlite3.connect(path, timeout=1.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _as_sqlalchemy_error(exc: BaseException) -> Exception:
    """sqlite3 errors as the engine would raise them; anything else as it is
    (a lone surrogate's UnicodeEncodeError, say, like through aiosqlite)."""
    if isinstance(exc, sqlite3.Error):
        return DBAPIError.instance(None, None, exc, sqlite3.Error)
    return exc if isinstance(exc, Exception) else RuntimeError(repr(exc))


def _deliver(outcomes: list) -> None:
    """Resolve the futures, one call into each event loop."""
    by_loop: dict = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:
            pass  # that loop is closed: nobody waits any more


def _resolve(items: list) -> None:
    for future, result, error in items:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
