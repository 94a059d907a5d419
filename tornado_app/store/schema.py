"""Schema management through Alembic, which owns the schema.

Like JupyterHub: an empty database is brought to the newest revision at
start-up; a database at an older revision stops start-up with a message that
names ``db upgrade``. The service never migrates behind an operator's back.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicCommandError
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import FULL_TEXT_NAMES

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
UPGRADE_HINT = "python -m tornado_app --config CONFIG db upgrade"


class SchemaError(Exception):
    """The database is not at the schema this version of the service needs."""


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Alembic's filter for comparisons with the models: the full-text search
    objects of migration 0006 (an FTS5 table and its shadow tables, a GIN
    expression index) are made by hand, not described by the models."""
    return not (name or "").startswith(FULL_TEXT_NAMES)


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _run_command(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    await _run_command(engine, command.downgrade, revision)


async def _run_command(engine: AsyncEngine, alembic_command, revision: str) -> None:
    """Run an Alembic command on a connection of our engine, in one transaction."""

    def run(sync_conn):
        config = alembic_config()
        config.attributes["connection"] = sync_conn
        alembic_command(config, revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    except AlembicCommandError as exc:
        raise SchemaError(str(exc)) from None


def is_known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except AlembicCommandError:
        return False


async def ensure_schema(engine: AsyncEngine) -> str:
    """Create the schema on an empty database; refuse one at another revision.

    Returns what was done: "created" or "current".
    """
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda sync_conn: inspect(sync_conn).get_table_names())
    # An alembic_version table alone (a database downgraded to base) is empty too.
    tables = [name for name in tables if name != "alembic_version"]
    current = await current_revision(engine)
    head = head_revision()
    if current is None and not tables:
        try:
            await upgrade(engine)
        except Exception:
            # Another process may have created it at the same moment (several
            # instances starting on one empty database): then all is well.
            if await current_revision(engine) != head:
                raise
            return "current"
        return "created"
    if current is None:
        raise SchemaError(
            "the database has tables but no schema revision; "
            "point database.url at an empty database or one made by this service"
        )
    if current == head:
        return "current"
    if not is_known_revision(current):
        raise SchemaError(unknown_revision_message(current))
    raise SchemaError(
        f"the database is at revision {current}, this version needs {head}; "
        f"run: {UPGRADE_HINT}"
    )


def unknown_revision_message(current: str) -> str:
    return (
        f"the database is at revision {current}, which this version of the service "
        f"does not know (it expects {head_revision()}); run the newer version"
    )
