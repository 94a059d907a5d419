"""The Store's writes on a SQLite file: one thread, one connection, group commit.

Through aiosqlite and SQLAlchemy each statement costs several thread
hand-offs, and the pool's connections queue on SQLite's write lock in the busy
handler's sleeps (docs/benchmarks.md). So on a file the Store's writes go
through :class:`SqliteBatcher` instead, an executor (store/executor.py) like
the engine:

Callers on the event loop queue a unit of work and await its future. The
thread takes everything queued (up to ``max_batch``), runs it in one
transaction (``BEGIN IMMEDIATE``, each unit in its own savepoint so that one
failing statement fails only its own caller), commits, and only then resolves
the futures, with one wake-up of each event loop per batch. So a caller never
sees a write that is not committed, and under load one commit (and one wait for
the write lock, when other processes share the file) serves many exchanges.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections import namedtuple
from typing import Any

from sqlalchemy.dialects.sqlite import pysqlite

from ..threads import call_in_loops
from .engine import DEFAULT_TIMEOUT, sqlite_pragmas
from .executor import Rows, Work, as_store_error

logger = logging.getLogger(__name__)

_STOP = object()


class _Compiled:
    """A Core statement compiled once for SQLite, run on a plain sqlite3 cursor.

    Values go through the bind processors SQLAlchemy itself uses and results
    through its result processors (a DateTime is written as the same text and
    read back as a datetime), and rows are named tuples: the same values, read
    the same way, as the engine's rows.
    """

    _dialect = pysqlite.dialect()

    def __init__(self, statement):
        compiled = statement.compile(dialect=self._dialect)
        self.sql = str(compiled)
        self.names = list(compiled.positiontup or ())
        self.defaults = {name: bind.effective_value for name, bind in compiled.binds.items()}
        self.processors = [
            compiled.binds[name].type.dialect_impl(self._dialect).bind_processor(self._dialect)
            for name in self.names
        ]
        columns = compiled._result_columns
        results = [column.type.dialect_impl(self._dialect).result_processor(self._dialect, None)
                   for column in columns]
        self.results = results if any(results) else None
        # Rows with the columns' names, as the engine's Rows have them.
        self.row = namedtuple("Row", [column.keyname for column in columns], rename=True)._make

    def parameters(self, values: dict) -> tuple:
        defaults = self.defaults
        return tuple(
            (values[name] if name in values else defaults[name]) if process is None
            else process(values[name] if name in values else defaults[name])
            for name, process in zip(self.names, self.processors)
        )

    def run(self, cursor: sqlite3.Cursor, values: dict | None) -> Rows:
        cursor.execute(self.sql, self.parameters(values or {}))
        rows = cursor.fetchall()
        if self.results is not None:
            rows = [[value if process is None else process(value)
                     for value, process in zip(row, self.results)] for row in rows]
        return Rows(list(map(self.row, rows)), cursor.rowcount)


class _Cursor:
    """A unit's ``db`` on the batcher's thread."""

    __slots__ = ("cursor", "compiled")
    dialect = "sqlite"

    def __init__(self, cursor: sqlite3.Cursor, compiled: dict):
        self.cursor = cursor
        self.compiled = compiled

    def execute(self, statement, values: dict | None = None) -> Rows:
        compiled = self.compiled.get(statement)
        if compiled is None:
            if len(self.compiled) >= SqliteBatcher.max_compiled:
                self.compiled.clear()  # statements built per call: never grow without bound
            compiled = self.compiled[statement] = _Compiled(statement)
        return compiled.run(self.cursor, values)


class SqliteBatcher:
    """An executor for the writes on one SQLite file (see the module)."""

    dialect = "sqlite"
    max_batch = 512
    max_compiled = 256

    def __init__(self, database: str, timeout: float = DEFAULT_TIMEOUT):
        self.database = database
        self.timeout = timeout
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._compiled: dict = {}  # statement -> _Compiled, filled on first use (thread only)

    def run(self, work: Work, *args: Any, write: bool = True) -> asyncio.Future:
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
        db = _Cursor(cursor, self._compiled)
        writes = any(write for _work, _args, write, _future in batch)
        outcomes = []
        if writes:
            cursor.execute("BEGIN IMMEDIATE")
        try:
            for work, args, _write, future in batch:
                if writes:
                    cursor.execute("SAVEPOINT unit")
                try:
                    result = work(db, *args)
                except Exception as exc:  # sqlite3.Error, or a value the driver cannot bind
                    if writes:
                        cursor.execute("ROLLBACK TO unit")
                        cursor.execute("RELEASE unit")
                    outcomes.append((future, None, as_store_error(exc)))
                    continue
                if writes:
                    cursor.execute("RELEASE unit")
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


def _resolve(outcomes: list) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
