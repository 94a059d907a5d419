"""The Store's writes on a SQLite file: one thread, one connection, group commit.

Through aiosqlite and SQLAlchemy each statement costs several thread
hand-offs, and the pool's connections queue on SQLite's write lock in the busy
handler's sleeps (docs/benchmarks.md). So on a file the Store's writes go
through :class:`SqliteBatcher` instead, an executor (store/executor.py) like
the engine, running statements compiled once (compiled.py) on a plain sqlite3
connection:

Callers on the event loop queue a unit of work and await its future. The
thread takes everything queued (up to ``max_batch``), runs it in one
transaction (``BEGIN IMMEDIATE``; if a unit fails, the batch again with each
unit in its own savepoint, so that it fails only its own caller), commits,
and only then resolves the futures, with one wake-up of each event loop per
batch. A unit may so run twice: it must change nothing but the database
(its arguments included). So a caller never
sees a write that is not committed, and under load one commit (and one wait for
the write lock, when other processes share the file) serves many exchanges.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from typing import Any

from sqlalchemy.dialects.sqlite import pysqlite

from ..threads import call_in_loops
from .compiled import StatementCache
from .engine import DEFAULT_TIMEOUT, sqlite_pragmas
from .executor import Rows, Work, as_store_error

logger = logging.getLogger(__name__)

_STOP = object()


class _Cursor:
    """A unit's ``db`` on the batcher's thread."""

    __slots__ = ("cursor", "statements")
    dialect = "sqlite"

    def __init__(self, cursor: sqlite3.Cursor, statements: StatementCache):
        self.cursor = cursor
        self.statements = statements

    def execute(self, statement, values: dict | list | None = None) -> Rows:
        compiled = self.statements.get(statement)
        cursor = self.cursor
        if isinstance(values, list):  # executemany: no rows come back
            cursor.executemany(compiled.sql, map(compiled.parameters, values))
            return Rows([], cursor.rowcount)
        cursor.execute(compiled.sql, compiled.parameters(values))
        return Rows(compiled.rows(cursor.fetchall()), cursor.rowcount)


class SqliteBatcher:
    """An executor for the writes on one SQLite file (see the module)."""

    dialect = "sqlite"
    max_batch = 512

    def __init__(self, database: str, timeout: float = DEFAULT_TIMEOUT):
        self.database = database
        self.timeout = timeout
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Used on the batcher's thread only.
        self._statements = StatementCache(pysqlite.dialect())

    def run(self, work: Work, *args: Any, write: bool = True,
            lock_key: int | None = None) -> asyncio.Future:
        """Queue ``work(db, *args)``; the future resolves after its batch commits."""
        if self._thread is None:
            self._start()
        future = asyncio.get_running_loop().create_future()
        self._queue.put((work, args, write, future))
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
                outcomes = [(future, None, as_store_error(exc)) for *_, future in batch]
                if conn is not None:
                    conn.close()
                    conn = None
            call_in_loops(((outcome[0].get_loop(), outcome) for outcome in outcomes), _resolve)
        if conn is not None:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list) -> list:
        cursor = conn.cursor()
        db = _Cursor(cursor, self._statements)
        try:
            if not any(write for _work, _args, write, _future in batch):
                return _run_units(db, batch, alone=True)  # reads: no transaction
            # The units together, with no savepoint each (they cost 4 us a
            # unit): units rarely fail, and when one does the batch is run
            # again, each unit in its own savepoint, so that it fails alone.
            cursor.execute("BEGIN IMMEDIATE")
            outcomes = _run_units(db, batch, alone=False)
            if outcomes is None:
                if conn.in_transaction:
                    cursor.execute("ROLLBACK")
                cursor.execute("BEGIN IMMEDIATE")
                outcomes = _run_units(db, batch, alone=True, savepoints=True)
            cursor.execute("COMMIT")
            return outcomes
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        finally:
            cursor.close()


def _run_units(db: _Cursor, batch: list, alone: bool, savepoints: bool = False) -> list | None:
    """The outcome of each unit; None when a unit failed and not ``alone``
    (its failure could have undone part of the others' writes)."""
    cursor = db.cursor
    outcomes = []
    for work, args, _write, future in batch:
        if savepoints:
            cursor.execute("SAVEPOINT unit")
        try:
            result = work(db, *args)
        except Exception as exc:  # sqlite3.Error, or a value the driver cannot bind
            if not alone:
                return None
            if savepoints:
                cursor.execute("ROLLBACK TO unit")
                cursor.execute("RELEASE unit")
            outcomes.append((future, None, as_store_error(exc)))
            continue
        if savepoints:
            cursor.execute("RELEASE unit")
        outcomes.append((future, result, None))
    return outcomes


def _resolve(outcomes: list) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
