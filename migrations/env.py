"""Alembic environment.

The service runs migrations on a connection of its own engine (passed in
``config.attributes["connection"]``; see tornado_app/store/schema.py). Run by
the plain ``alembic`` command instead, it connects to ``TORNADO_APP_DATABASE__URL``
(any form ``database.url`` takes, such as ``sqlite:///data/chat.db``).
"""

import asyncio
import os

from alembic import context

from tornado_app.store.models import Base
from tornado_app.store.schema import include_object

target_metadata = Base.metadata


def run_migrations(connection) -> None:
    # Batch mode lets later migrations ALTER tables on SQLite too.
    context.configure(
        connection=connection, target_metadata=target_metadata, render_as_batch=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_standalone() -> None:
    from tornado_app.store.store import create_engine
    from tornado_app.store.urls import async_url

    engine = create_engine(async_url(os.environ["TORNADO_APP_DATABASE__URL"]))
    async with engine.begin() as conn:
        await conn.run_sync(run_migrations)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    asyncio.run(run_standalone())
