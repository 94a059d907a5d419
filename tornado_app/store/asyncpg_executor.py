"""The Store's writes on PostgreSQL: units of work on asyncpg's own connections.

Through SQLAlchemy's async engine, each statement of an exchange costs more
CPU on the event loop (execution context, result objects, adaptation) than
PostgreSQL takes to run it; an exchange runs about seven. So the writes run
as the SQLite batcher's do: each statement compiled once (compiled.py), its
values and rows processed the way SQLAlchemy does, on a connection of an
asyncpg pool. The unit of work stays a plain function: it runs in a greenlet
(SQLAlchemy's own ``greenlet_spawn``/``await_only``), one transaction per
unit, so the Store's code is the same on both databases
(docs/benchmarks.md has the measurements).

The exchange's writes (those given a ``lock_key``: the user's id) are
group-committed by :class:`~tornado_app.store.pg_batcher.PgBatcher`, many
units in one transaction; the other writes run one transaction each, run
again if PostgreSQL rolled them back to break a deadlock.

Reads stay on the engine (they are few per exchange, and some use SQLAlchemy
features this path does not have, such as expanding ``IN`` lists).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only, greenlet_spawn

from .compiled import StatementCache
from .executor import Conflict, Rows, StoreError, StoreUnavailable, Work
from .pg_batcher import PgBatcher, retrying

# Connections of this pool per process (the engine keeps its own for reads).
POOL_SIZE = 10


# URL query keys that SQLAlchemy's asyncpg dialect takes for itself.
_DIALECT_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func",
                 "async_fallback")


def connect_args(engine: AsyncEngine) -> dict[str, Any]:
    """asyncpg's ``connect()`` arguments for the engine's URL: the engine's own
    reading of it (host, port, ``ssl=``...), less what only SQLAlchemy's dialect
    understands (asyncpg would send unknown keys to the server as settings)."""
    _, args = engine.dialect.create_connect_args(engine.url)
    for key in _DIALECT_ONLY:
        args.pop(key, None)
    return args


def _dialect():
    dialect = asyncpg_dialect.dialect()
    dialect.paramstyle = "numeric_dollar"  # $1, $2...: positional, as asyncpg wants
    return dialect


class _Connection:
    """A unit's ``db`` on an asyncpg connection (inside the unit's greenlet)."""

    __slots__ = ("conn", "statements")
    dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection, statements: StatementCache):
        self.conn = conn
        self.statements = statements

    def execute(self, statement, values: dict | list | None = None) -> Rows:
        compiled = self.statements.get(statement)
        if isinstance(values, list):  # executemany: no rows come back
            await_only(self.conn.executemany(compiled.sql, map(compiled.parameters, values)))
            return Rows([], len(values))
        parameters = compiled.parameters(values)
        if compiled.returns_rows:
            records = await_only(self.conn.fetch(compiled.sql, *parameters))
            return Rows(compiled.rows(records), len(records))
        status = await_only(self.conn.execute(compiled.sql, *parameters))  # e.g. "UPDATE 3"
        count = status.rsplit(" ", 1)[-1]
        return Rows([], int(count) if count.isdigit() else -1)


class AsyncpgExecutor:
    """Units of work on asyncpg, one transaction each."""

    dialect = "postgresql"

    def __init__(self, engine: AsyncEngine, timeout: float):
        self.connect_args = connect_args(engine)
        self.timeout = timeout
        self._statements = StatementCache(_dialect(), native_results=True)
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None
        self.batcher = PgBatcher(self._acquire, self._database, as_store_error)

    async def run(self, work: Work, *args: Any, write: bool = True,
                  lock_key: int | None = None) -> Any:
        """Run ``work(db, *args)`` in a transaction; with a ``lock_key`` (a
        write of one user's rows), group-committed with others."""
        if self._pool is None:
            await self._open()
        if write and lock_key is not None:
            return await self.batcher.run(work, args, lock_key)

        async def attempt():
            async with self._acquire() as conn:
                async with conn.transaction(readonly=not write):
                    return await greenlet_spawn(work, self._database(conn), *args)

        try:
            return await retrying(attempt)
        except Exception as exc:
            error = as_store_error(exc)
            if error is exc:
                raise
            raise error from exc

    def _acquire(self):
        return self._pool.acquire(timeout=self.timeout)

    def _database(self, conn: asyncpg.Connection) -> _Connection:
        return _Connection(conn, self._statements)

    async def _open(self) -> asyncpg.Pool:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    **self.connect_args, min_size=1, max_size=POOL_SIZE, timeout=self.timeout,
                    command_timeout=self.timeout, init=_set_codecs, reset=_keep_session)
        return self._pool

    async def close(self) -> None:
        await self.batcher.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset, done before a connection goes back: nothing more.

    asyncpg's default sends a query that closes cursors, unlistens, resets
    settings and releases advisory locks: a round trip on every release, for
    session state that the store's statements never leave (they LISTEN on a
    connection of their own, notifications.py, and set settings with ``SET
    LOCAL`` only). asyncpg still rolls back a transaction left open.
    """


async def _set_codecs(conn: asyncpg.Connection) -> None:
    """JSON in and out as Python values, as through SQLAlchemy's asyncpg dialect."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=json.dumps,
                                  decoder=json.loads, format="text")


def as_store_error(exc: BaseException) -> BaseException:
    """asyncpg's failures as the Store's exceptions (the engine's are mapped
    in executor.py); bugs in a statement stay as they are."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, asyncpg.exceptions.IntegrityConstraintViolationError):
        return Conflict("the database refused the write (a constraint)")
    if isinstance(exc, asyncpg.exceptions.DataError):
        return StoreError("the database refused a value")
    if isinstance(exc, (asyncpg.exceptions.SyntaxOrAccessError,
                        asyncpg.exceptions.FeatureNotSupportedError)):
        return exc
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)):
        return StoreUnavailable(f"database unavailable ({type(exc).__name__})")
    return exc
