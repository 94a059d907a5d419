"""The SQLAlchemy engine for a database URL, with the settings each database needs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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


def sqlite_file(engine: AsyncEngine) -> str | None:
    """The file of a SQLite engine (None for PostgreSQL and for ``:memory:``)."""
    if engine.url.get_backend_name() != "sqlite":
        return None
    database = engine.url.database
    return database if database not in (None, "", ":memory:") else None


def create_engine(url: str, echo: bool = False, timeout: float = DEFAULT_TIMEOUT) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # A lost route to the server (no reset) must not hang a request for ever.
        connect_args = {"timeout": timeout, "command_timeout": timeout}
        if parsed.get_driver_name() != "asyncpg":
            connect_args = {}
        # The engine serves the reads; the writes have a pool of their own
        # (asyncpg_executor.py): together at most 20 connections a process.
        return create_async_engine(
            parsed, echo=echo, pool_pre_ping=True, pool_timeout=timeout, connect_args=connect_args,
            pool_size=5, max_overflow=5,
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


def probe_sqlite_write_lock(path: str) -> None:
    """Raise sqlite3.OperationalError if the file's write lock cannot be had
    within a second (SELECT 1 needs no lock, so it cannot tell)."""
    conn = sqlite3.connect(path, timeout=1.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()
