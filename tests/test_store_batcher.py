"""The SQLite fast path of the Store (sqlite_batcher.SqliteBatcher): group commit, same rows.

The exchange's statements on a SQLite file go through one thread and one
connection, many callers per transaction. These tests check what callers
rely on: results only after the commit, the same rows as the engine would
write, one failing statement failing only its own caller, and close()
finishing what is queued.
"""

import asyncio
import datetime
import sqlite3
import time

import pytest

from tornado_app.store import Conflict, Store
from tornado_app.store.sqlite_batcher import SqliteBatcher

from .helpers import ADMIT, add_reply, add_user_message, saved_messages, take_rate_limit


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"


@pytest.fixture
def sqlite_store(io_loop, sqlite_url):
    store = Store.from_url(sqlite_url)

    async def prepare():
        await store.ensure_schema()
        await store.create_user("u1", None)

    io_loop.run_sync(prepare)
    yield store
    io_loop.run_sync(store.close)


def test_a_file_database_uses_the_batcher_and_memory_does_not(sqlite_url):
    assert isinstance(Store.from_url(sqlite_url).writer, SqliteBatcher)
    memory = Store.from_url("sqlite+aiosqlite:///:memory:")
    assert not isinstance(memory.writer, SqliteBatcher)


@pytest.mark.gen_test
async def test_concurrent_exchanges_are_saved_and_read_back_through_the_engine(sqlite_store):
    store = sqlite_store
    conversation = await store.open_conversation(1, "c1")
    assert await store.open_conversation(1, "c1") == conversation  # the same one again

    async def exchange(n):
        message_id = await add_user_message(store, conversation, 1, f"question {n}")
        reply_id = await add_reply(store, conversation, 1, message_id, content=f"answer {n}",
                                         status="ok", agent="echo", tokens_out=2,
                                         latency_ms=1.5)
        return message_id, reply_id

    ids = await asyncio.gather(*(exchange(n) for n in range(50)))
    rows = await saved_messages(store, conversation)  # through SQLAlchemy
    assert len(rows) == 100 and len({row.id for row in rows}) == 100
    by_id = {row.id: row for row in rows}
    for message_id, reply_id in ids:
        reply = by_id[reply_id]
        assert reply.reply_to_id == message_id and reply.role == "assistant"
        assert by_id[message_id].content.replace("question", "answer") == reply.content
        assert reply.agent == "echo" and reply.tokens_out == 2 and reply.latency_ms == 1.5
        assert isinstance(reply.created_at, datetime.datetime)
    # add_user_message took the rate limit at time.time(): later than that.
    admitted = await store.admit(conversation, 1, "one more", now=time.time() + 1, messages=1,
                                 per_seconds=1.0, after_id=0, history_limit=6, **ADMIT)
    # The turns are the new message's branch (concurrent exchanges make a tree),
    # read up from its parent, six messages at most.
    by_id = {row.id: row for row in await saved_messages(store, conversation)}
    path, parent = [], by_id[admitted.message_id].parent_id
    while parent is not None and len(path) < 6:
        path.append(by_id[parent])
        parent = by_id[parent].parent_id
    expected = [(row.id, row.role, row.content) for row in reversed(path)]
    assert len(expected) == 6
    assert [(turn.id, turn.role, turn.content) for turn in admitted.turns] == expected


@pytest.mark.gen_test
async def test_a_failing_statement_fails_only_its_caller(sqlite_store):
    store = sqlite_store
    conversation = await store.open_conversation(1, "c1")
    results = await asyncio.gather(
        add_user_message(store, conversation, 1, "fine"),
        add_user_message(store, 999, 1, "no such conversation"),  # foreign key
        take_rate_limit(store, 1, time.time() + 100, 5, 60.0),
        return_exceptions=True,
    )
    assert isinstance(results[0], int)
    assert isinstance(results[1], Conflict)
    assert results[2].allowed
    rows = await saved_messages(store, conversation)
    assert [row.content for row in rows] == ["fine"]


@pytest.mark.gen_test
async def test_results_come_after_the_commit(sqlite_store, sqlite_url):
    store = sqlite_store
    conversation = await store.open_conversation(1, "c1")
    message_id = await add_user_message(store, conversation, 1, "durable")
    # Another connection (another process, say) sees it at once.
    path = sqlite_url.split("///", 1)[1]
    with sqlite3.connect(path) as other:
        assert other.execute("SELECT content FROM messages WHERE id = ?",
                             (message_id,)).fetchone() == ("durable",)


@pytest.mark.gen_test
async def test_close_finishes_what_is_queued(sqlite_url):
    store = Store.from_url(sqlite_url)
    await store.ensure_schema()
    await store.create_user("u1", None)
    conversation = await store.open_conversation(1, "c1")
    pending = [asyncio.ensure_future(add_user_message(store, conversation, 1, f"m{n}"))
               for n in range(20)]
    await asyncio.sleep(0)
    await store.close()
    assert all(isinstance(task.result(), int) for task in pending)  # done already
    reader = Store.from_url(sqlite_url)
    try:
        assert len(await saved_messages(reader, conversation)) == 20
    finally:
        await reader.close()


@pytest.mark.gen_test
async def test_a_value_the_driver_cannot_bind_fails_only_its_caller(sqlite_store):
    store = sqlite_store
    conversation = await store.open_conversation(1, "c1")
    results = await asyncio.gather(
        add_user_message(store, conversation, 1, "before"),
        add_user_message(store, conversation, 1, "lone \ud800 surrogate"),
        add_user_message(store, conversation, 1, "after"),
        return_exceptions=True,
    )
    assert isinstance(results[1], UnicodeEncodeError)
    assert isinstance(results[0], int) and isinstance(results[2], int)
    rows = await saved_messages(store, conversation)
    assert [row.content for row in rows] == ["before", "after"]


@pytest.mark.gen_test
async def test_units_share_the_transaction_without_savepoints_until_one_fails(
        sqlite_store, monkeypatch):
    store = sqlite_store
    conversation = await store.open_conversation(1, "c1")
    statements = []
    connect = SqliteBatcher._connect

    def traced(batcher):
        conn = connect(batcher)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(SqliteBatcher, "_connect", traced)
    await store.writer.close()  # the next unit connects again, traced
    await asyncio.gather(*(add_user_message(store, conversation, 1, f"m{n}") for n in range(5)))
    assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") >= 1
    assert not [sql for sql in statements if "SAVEPOINT" in sql]
    # A failing unit: the batch runs again, each unit in its own savepoint.
    statements.clear()
    results = await asyncio.gather(
        add_user_message(store, conversation, 1, "fine"),
        add_user_message(store, 999, 1, "no such conversation"),  # foreign key
        add_user_message(store, conversation, 1, "fine too"),
        return_exceptions=True,
    )
    assert isinstance(results[1], Conflict) and all(isinstance(r, int) for r in results[::2])
    assert "ROLLBACK" in statements and "SAVEPOINT unit" in statements
    assert [row.content for row in await saved_messages(store, conversation)][-2:] == [
        "fine", "fine too"]


def test_compiled_parameters_take_given_values_defaults_and_processors():
    from sqlalchemy import DateTime, Integer, bindparam, select
    from sqlalchemy.dialects.sqlite import pysqlite

    from tornado_app.store.compiled import Compiled

    dialect = pysqlite.dialect()
    when = datetime.datetime(2026, 11, 28, 16, 0, 0)
    two = Compiled(select(bindparam("a", type_=Integer), bindparam("at", type_=DateTime),
                          bindparam("b", 7, type_=Integer)), dialect)
    assert list(two.parameters({"a": 1, "at": when, "b": 2})) == [
        1, "2026-11-28 16:00:00.000000", 2]
    assert list(two.parameters({"a": 1, "at": when})) == [1, "2026-11-28 16:00:00.000000", 7]
    assert tuple(Compiled(select(bindparam("a", type_=Integer)), dialect).parameters(
        {"a": 5})) == (5,)
    assert tuple(Compiled(select(1), dialect).parameters(None)) == ()
    # No values at all: every parameter's own value stands in.
    assert list(Compiled(select(bindparam("b", 7, type_=Integer)), dialect).parameters(
        None)) == [7]
