"""What differs between the two databases the Store runs on."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite


def dialect_insert(dialect: str):
    """The dialect's INSERT, which knows ON CONFLICT (SQLite and PostgreSQL)."""
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise RuntimeError(f"unsupported database dialect {dialect!r}")
