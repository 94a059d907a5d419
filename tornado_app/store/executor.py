"""How the Store runs its work: every operation is one unit, run by an executor.

A unit of work is a plain (synchronous) function ``work(db, *args)`` that runs
statements with ``db.execute(statement, values)`` and returns a value. Each
:class:`~tornado_app.store.store.Store` method is written once as such a unit
and handed to an executor, which runs it in one transaction:

- :class:`EngineExecutor` (here): SQLAlchemy's async engine, the unit inside
  ``AsyncConnection.run_sync``; for PostgreSQL, and for reads on SQLite;
- :class:`~tornado_app.store.sqlite_batcher.SqliteBatcher`: the writes on a
  SQLite file, on one thread with group commit.

Both give the unit the same ``db``: ``db.dialect`` (``"sqlite"`` or
``"postgresql"``, for the few statements that differ) and ``db.execute``, which
returns :class:`Rows`. Statements take their values as bind parameters, so that
each is built (and, for the batcher, compiled) once.

Errors leave an executor as the Store's own: :class:`StoreUnavailable` when the
database cannot be reached or is locked past ``database.timeout_seconds``,
:class:`Conflict` when a constraint refuses the write. Callers never see a
driver's or SQLAlchemy's exception.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any, Callable, Protocol, TypeVar

from sqlalchemy import exc as sa
from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")


class StoreError(Exception):
    """A request the Store could not carry out."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, or stayed locked past the timeout."""


class Conflict(StoreError):
    """A constraint refused the write (a duplicate user name, say)."""


class Rows:
    """What a statement returned: its rows (tuples, or SQLAlchemy Rows, which
    are tuples too) and the number of rows it changed."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: list, rowcount: int = -1):
        self.rows = rows
        self.rowcount = rowcount

    def all(self) -> list:
        return self.rows

    def first(self):
        return self.rows[0] if self.rows else None

    def scalar(self):
        """The first column of the first row, or None."""
        return self.rows[0][0] if self.rows else None

    def scalars(self) -> list:
        return [row[0] for row in self.rows]


class Database(Protocol):
    """What a unit of work receives."""

    dialect: str

    def execute(self, statement, values: dict | list[dict] | None = None) -> Rows:
        """Run a statement; with a list of values, once per item (no rows back)."""


Work = Callable[..., T]


class Executor(Protocol):
    dialect: str

    async def run(self, work: Work, *args: Any, write: bool = True,
                  lock_key: int | None = None) -> Any:
        """Run ``work(db, *args)`` in one transaction (committed when ``write``).
        ``lock_key``: the user whose rows a write locks, for executors that
        commit several units together (pg_batcher.py)."""

    async def close(self) -> None: ...


class _Connection:
    """A unit's ``db`` on a SQLAlchemy (sync-facing) connection."""

    __slots__ = ("conn", "dialect")

    def __init__(self, conn, dialect: str):
        self.conn = conn
        self.dialect = dialect

    def execute(self, statement, values: dict | list[dict] | None = None) -> Rows:
        result = self.conn.execute(statement, values)
        return Rows(result.all() if result.returns_rows else [], result.rowcount)


class EngineExecutor:
    """Units of work on SQLAlchemy's async engine, one transaction each."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.dialect = engine.dialect.name

    async def run(self, work: Work, *args: Any, write: bool = True,
                  lock_key: int | None = None) -> Any:
        dialect = self.dialect
        # begin() commits at the end; connect() rolls the reads' implicit
        # transaction back.
        with store_errors():
            async with (self.engine.begin() if write else self.engine.connect()) as conn:
                return await conn.run_sync(lambda sync: work(_Connection(sync, dialect), *args))

    async def close(self) -> None:
        await self.engine.dispose()


@contextlib.contextmanager
def store_errors():
    """Raise database failures inside the block as the Store's exceptions."""
    try:
        yield
    except Exception as exc:
        error = as_store_error(exc)
        if error is exc:
            raise
        raise error from exc


# Statements the database or driver refused as written: bugs, never outages.
_BUGS = (sa.ProgrammingError, sa.NotSupportedError, sa.CompileError, sa.ArgumentError,
         sqlite3.ProgrammingError, sqlite3.NotSupportedError)
# The database is not there, or not answering in time.
_OUTAGES = (sa.DBAPIError, sa.TimeoutError, sa.DisconnectionError, sqlite3.DatabaseError,
            sqlite3.InterfaceError, OSError, TimeoutError)


def as_store_error(exc: BaseException) -> BaseException:
    """A database failure as the Store's own exception; anything else (a bug,
    a value no driver can bind) as it is."""
    if isinstance(exc, StoreError) or isinstance(exc, _BUGS):
        return exc
    if isinstance(exc, (sa.IntegrityError, sqlite3.IntegrityError)):
        return Conflict("the database refused the write (a constraint)")
    if isinstance(exc, (sa.DataError, sqlite3.DataError)):
        return StoreError("the database refused a value")
    if isinstance(exc, _OUTAGES):
        return StoreUnavailable(f"database unavailable ({type(exc).__name__})")
    return exc
