"""The Store: every SQL statement the service runs, behind small async methods.

It uses SQLAlchemy Core on an async engine (aiosqlite or asyncpg): each method
is one short transaction, so a reply is durable before it is sent.

On a SQLite file, the four statements of every exchange (rate limit, the
user's message, the history, the reply) go through :class:`SqliteBatcher`
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
from pathlib import Path
from typing import Callable

from sqlalchemy import Float, Integer, bindparam, case, event, select, text, update
from sqlalchemy.dialects import sqlite as sqlite_dialects
from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import ratelimit
from .models import (
    ROLE_ASSISTANT,
    ROLE_USER,
    STATUS_OK,
    Conversation,
    Message,
    User,
    RateLimit,
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
            return await self.batcher.open_conversation(user_id, client_id)
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

    async def add_user_message(self, conversation_id: int, user_id: int, content: str) -> int:
        if self.batcher is not None:
            return await self.batcher.insert_message(
                conversation_id=conversation_id, user_id=user_id, role=ROLE_USER,
                content=content, status=STATUS_OK)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                messages.insert()
                .values(
                    conversation_id=conversation_id,
                    user_id=user_id,
                    role=ROLE_USER,
                    content=content,
                    status=STATUS_OK,
                    created_at=utcnow(),
                )
                .returning(messages.c.id)
            )
            return result.scalar_one()

    async def add_reply(
        self, conversation_id: int, user_id: int, reply_to_id: int, **fields
    ) -> int:
        """Save a reply (or the record of a failed or cancelled one).

        ``fields`` are Message columns: content, status, agent, model,
        tokens_in, tokens_out, latency_ms, ttft_ms, error_ref.
        """
        if self.batcher is not None:
            return await self.batcher.insert_message(
                conversation_id=conversation_id, user_id=user_id, reply_to_id=reply_to_id,
                role=ROLE_ASSISTANT, **fields)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                messages.insert()
                .values(
                    conversation_id=conversation_id,
                    user_id=user_id,
                    reply_to_id=reply_to_id,
                    role=ROLE_ASSISTANT,
                    created_at=utcnow(),
                    **fields,
                )
                .returning(messages.c.id)
            )
            return result.scalar_one()

    async def history(
        self, conversation_id: int, before_id: int, limit: int, after_id: int = 0
    ) -> list[Row]:
        """The latest ``limit`` turns between two messages (ids, exclusive),
        oldest first, as (id, role, content).

        User messages are all kept; of the replies only the delivered ones, so
        that an error text never becomes part of the model's context.
        """
        if self.batcher is not None:
            return await self.batcher.history(conversation_id, before_id, limit, after_id)
        query = (
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
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        rows.reverse()
        return rows

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
            return await self.batcher.take_rate_limit(user_id, now, limit, per_seconds)
        async with self.engine.begin() as conn:
            return await ratelimit.take(conn, user_id, now, limit, per_seconds)


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


def _rate_limit_statement():
    """ratelimit.take's GCRA upsert, with bind parameters instead of values."""
    row = RateLimit.__table__.c
    now = bindparam("now", type_=Float)
    interval = bindparam("interval", type_=Float)
    start = case((row.tat > now, row.tat), else_=now)
    passes = start - now <= bindparam("slack", type_=Float)
    insert = sqlite_dialects.insert(RateLimit).values(
        user_id=bindparam("user_id", type_=Integer), tat=now + interval, granted=True
    )
    return insert.on_conflict_do_update(
        index_elements=[row.user_id],
        set_={"tat": case((passes, start + interval), else_=row.tat), "granted": passes},
    ).returning(row.tat, row.granted)


_MESSAGE_COLUMNS = [c.name for c in messages.c if c.name != "id"]
_INSERT_MESSAGE = messages.insert().values(
    {name: bindparam(name, type_=messages.c[name].type) for name in _MESSAGE_COLUMNS}
).returning(messages.c.id)
_HISTORY = (
    select(messages.c.id, messages.c.role, messages.c.content)
    .where(
        messages.c.conversation_id == bindparam("conversation_id", type_=Integer),
        messages.c.id < bindparam("before_id", type_=Integer),
        messages.c.id > bindparam("after_id", type_=Integer),
        (messages.c.role == ROLE_USER) | (messages.c.status == STATUS_OK),
    )
    .order_by(messages.c.id.desc())
    .limit(bindparam("limit", type_=Integer))
)
HistoryRow = namedtuple("HistoryRow", "id role content")
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
        self._insert_message = _Compiled(_INSERT_MESSAGE)
        self._history = _Compiled(_HISTORY)
        self._rate_limit = _Compiled(_rate_limit_statement())
        self._insert_conversation = _Compiled(_INSERT_CONVERSATION)
        self._conversation_id = _Compiled(_CONVERSATION_ID)

    # The operations (run on the thread; ``cursor`` is inside the transaction)

    async def insert_message(self, **values) -> int:
        row = {name: None for name in _MESSAGE_COLUMNS}
        row["status"] = STATUS_OK
        row.update(values, created_at=utcnow())
        rows = await self._submit(self._insert_message.run, row, write=True)
        return rows[0][0]

    async def open_conversation(self, user_id: int, client_id: str) -> int:
        values = {"user_id": user_id, "client_id": client_id, "created_at": utcnow()}
        return await self._submit(self._open_conversation, values, write=True)

    def _open_conversation(self, cursor: sqlite3.Cursor, values: dict) -> int:
        self._insert_conversation.run(cursor, values)
        return self._conversation_id.run(cursor, values)[0][0]

    async def history(self, conversation_id: int, before_id: int, limit: int,
                      after_id: int = 0) -> list:
        values = {"conversation_id": conversation_id, "before_id": before_id, "limit": limit,
                  "after_id": after_id}
        rows = await self._submit(self._history.run, values, write=False)
        rows.reverse()
        return list(map(HistoryRow._make, rows))  # half the time of HistoryRow(*row)

    async def take_rate_limit(
        self, user_id: int, now: float, messages: int, per_seconds: float
    ) -> ratelimit.Decision:
        interval = per_seconds / messages
        tolerance = per_seconds - interval
        values = {"user_id": user_id, "now": now, "interval": interval,
                  "slack": tolerance + ratelimit.EPSILON}
        [(tat, granted)] = await self._submit(self._rate_limit.run, values, write=True)
        if granted:
            return ratelimit.Decision(True, 0.0)
        return ratelimit.Decision(False, max(0.0, tat - tolerance - now))

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
