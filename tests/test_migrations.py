"""Alembic migrations on both databases: from empty, from every earlier
revision, one step down; the result matches the models exactly."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from tornado_app.store.models import Base
from tornado_app.store.schema import (
    alembic_config,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    include_object,
    upgrade,
)


def revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


@pytest.fixture
def engine(db_store):
    return db_store.engine


async def schema_differences(engine) -> list:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: compare_metadata(
                MigrationContext.configure(sync_conn, opts={"include_object": include_object}),
                Base.metadata)
        )


def test_revisions_form_one_line():
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert revisions()[0] == "0001"
    assert revisions()[-1] == head_revision()


@pytest.mark.gen_test(timeout=60)
async def test_upgrade_from_empty_matches_the_models(engine):
    assert await ensure_schema(engine) == "created"
    assert await current_revision(engine) == head_revision()
    assert await schema_differences(engine) == []


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("start", revisions()[:-1] or ["none"])
async def test_upgrade_from_every_earlier_revision(engine, start):
    if start == "none":
        pytest.skip("only one revision")
    await upgrade(engine, start)
    assert await current_revision(engine) == start
    await upgrade(engine)
    assert await current_revision(engine) == head_revision()
    assert await schema_differences(engine) == []


@pytest.mark.gen_test(timeout=60)
async def test_downgrade_one_step_and_back(engine):
    await upgrade(engine)
    await downgrade(engine, "-1")
    previous = revisions()[-2] if len(revisions()) > 1 else None
    assert await current_revision(engine) == previous
    await upgrade(engine)
    assert await schema_differences(engine) == []


@pytest.mark.gen_test(timeout=60)
async def test_downgrade_to_base_leaves_no_table(engine):
    from sqlalchemy import inspect

    await upgrade(engine)
    await downgrade(engine, "base")
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
    assert set(tables) <= {"alembic_version"}
