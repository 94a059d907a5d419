"""Each user's memory on both databases (tornado_app/memory.py): saved values
are encrypted at rest, one user never sees another's, ``memory.max_items``
holds, deleting the user deletes them, retention leaves them; and recall, the
full-text search of a user's own messages (migration 0006)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from tornado_app.analytics import purge
from tornado_app.memory import (
    InvalidMemory,
    Memories,
    MemoryCipher,
    MemoryFull,
    memory_section,
    snippet,
    system_prompt,
)
from tornado_app.store import Store
from tornado_app.store.schema import downgrade, upgrade

from .helpers import add_reply, add_user_message, seed_old_schema

KEY = "k" * 64
SECRET_VALUE = "March 15, the plain-text-canary-4711"


async def users_of(store, *names: str) -> list[int]:
    await store.ensure_schema()
    return [(await store.create_user(name, None)).id for name in names]


def raw_database(store) -> bytes:
    """Everything the database holds, as bytes: the SQLite file with its WAL,
    or (PostgreSQL) every row of every table as text, as pg_dump would write it."""
    if store.sqlite_file:
        files = [Path(store.sqlite_file), Path(store.sqlite_file + "-wal")]
        return b"".join(path.read_bytes() for path in files if path.exists())
    raise AssertionError("use raw_postgres")


async def raw_postgres(store) -> str:
    async with store.engine.connect() as conn:
        tables = (await conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))).scalars().all()
        dump = []
        for table in tables:
            rows = await conn.execute(text(f'SELECT t::text FROM "{table}" t'))
            dump += rows.scalars().all()  # bytea columns come as hex
    return "\n".join(dump)


@pytest.mark.gen_test(timeout=60)
async def test_values_are_encrypted_at_rest_and_read_back(db_store):
    alice, bob = await users_of(db_store, "alice", "bob")
    memories = Memories(db_store, MemoryCipher("s" * 40), max_items=10)
    await memories.of(alice).set("birthday", SECRET_VALUE)
    await memories.of(alice).set(KEY, "a value under the longest key")

    assert await memories.of(alice).get("birthday") == SECRET_VALUE
    listed = await memories.of(alice).list()
    assert [(key, value) for key, value, _ in listed] == [
        ("birthday", SECRET_VALUE), (KEY, "a value under the longest key")]
    assert all(isinstance(updated, datetime) for _, _, updated in listed)
    # Another user sees nothing of it.
    assert await memories.of(bob).list() == []
    assert await memories.of(bob).get("birthday") is None
    assert await memories.of(bob).delete("birthday") is False

    canary = "plain-text-canary-4711"
    if db_store.sqlite_file:
        # Futures resolve after the COMMIT: the writes are in the file or its WAL.
        assert canary.encode() not in raw_database(db_store)
        assert canary.encode("utf-16-le") not in raw_database(db_store)
    else:
        dump = await raw_postgres(db_store)
        assert "birthday" in dump  # the dump holds the memories table
        assert canary not in dump and canary.encode().hex() not in dump


@pytest.mark.gen_test(timeout=60)
async def test_a_value_only_decrypts_for_its_user_key_and_secret(db_store):
    alice, bob = await users_of(db_store, "alice", "bob")
    cipher = MemoryCipher("s" * 40)
    blob = cipher.encrypt(alice, "birthday", "March 15")
    assert cipher.decrypt(alice, "birthday", blob) == "March 15"
    assert cipher.decrypt(bob, "birthday", blob) is None  # a row copied to another user
    assert cipher.decrypt(alice, "name", blob) is None
    assert MemoryCipher("t" * 40).decrypt(alice, "birthday", blob) is None
    # A memory saved under another key (memory.key replaced) is left out, not a crash.
    await Memories(db_store, MemoryCipher("t" * 40), 10).of(alice).set("old", "unreadable")
    memories = Memories(db_store, cipher, 10)
    await memories.of(alice).set("birthday", "March 15")
    assert [key for key, _, _ in await memories.of(alice).list()] == ["birthday"]


@pytest.mark.gen_test(timeout=60)
async def test_max_items_keys_and_values_are_enforced(db_store):
    (alice,) = await users_of(db_store, "alice")
    mine = Memories(db_store, MemoryCipher("s" * 40), max_items=2).of(alice)
    await mine.set("a", "1")
    await mine.set("b", "2")
    with pytest.raises(MemoryFull, match="at most 2"):
        await mine.set("c", "3")
    await mine.set("a", "replaced")  # replacing is not adding
    assert await mine.get("a") == "replaced"
    assert await mine.delete("a") is True
    assert await mine.delete("a") is False
    for key in ("", "k" * 65, " padded", "line\nbreak"):
        with pytest.raises(InvalidMemory, match="key"):
            await mine.set(key, "value")
    for value in ("", "   ", "v" * 1001, "bell\x07", 42):
        with pytest.raises(InvalidMemory, match="value"):
            await mine.set("key", value)
    await mine.delete("b")
    await mine.set("c", "v" * 1000)  # the longest value, and the longest key
    await mine.set("k" * 64, "tab\tand\nnew line")
    assert await mine.get("c") == "v" * 1000


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_saves_never_pass_max_items(db_store):
    (alice,) = await users_of(db_store, "alice")
    mine = Memories(db_store, MemoryCipher("s" * 40), max_items=5).of(alice)
    results = await asyncio.gather(*(mine.set(f"key{index}", "v") for index in range(30)),
                                   return_exceptions=True)
    assert sum(result is None for result in results) == 5
    assert all(isinstance(result, MemoryFull) for result in results if result is not None)
    assert len(await mine.list()) == 5


@pytest.mark.gen_test(timeout=60)
async def test_deleting_a_user_deletes_their_memories_and_forget_does_too(db_store):
    alice, bob = await users_of(db_store, "alice", "bob")
    memories = Memories(db_store, MemoryCipher("s" * 40), 10)
    await memories.of(alice).set("birthday", "March 15")
    await memories.of(bob).set("birthday", "June 1")
    await memories.of(bob).set("city", "Lyon")
    assert await memories.forget("bob") == 2
    assert await memories.of(bob).list() == []
    assert await memories.forget("nobody") is None
    async with db_store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM users WHERE id = :id"), {"id": alice})
    async with db_store.engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM memories"))).scalar()
    assert left == 0


@pytest.mark.gen_test(timeout=60)
async def test_retention_purges_messages_but_not_memories(db_store):
    (alice,) = await users_of(db_store, "alice")
    memories = Memories(db_store, MemoryCipher("s" * 40), 10)
    await memories.of(alice).set("birthday", "March 15")
    conversation = await db_store.open_conversation(alice, "old-chat")
    await add_user_message(db_store, conversation, alice, "my favourite colour is teal")
    search = memories.messages_of(alice)
    assert len(await search.search("teal", 5)) == 1
    result = await purge(db_store.engine, retention_days=1,
                         now=datetime.utcnow() + timedelta(days=5))
    assert result.messages == 1
    assert await search.search("teal", 5) == []  # the search index forgot it too
    assert [key for key, _, _ in await memories.of(alice).list()] == ["birthday"]


@pytest.mark.gen_test(timeout=60)
async def test_recall_finds_the_users_own_messages_newest_first(db_store):
    alice, bob = await users_of(db_store, "alice", "bob")
    first = await db_store.open_conversation(alice, "chat-one")
    second = await db_store.open_conversation(alice, "chat-two")
    asked = await add_user_message(db_store, first, alice, "Remember: my birthday is March 15")
    await add_reply(db_store, first, alice, asked, content="Noted, your Birthday is March 15.")
    long_text = "x " * 400 + "the birthday party is in Lyon " + "y " * 400
    await add_user_message(db_store, second, alice, long_text)
    await add_user_message(db_store, second, alice, "nothing to see here")
    theirs = await db_store.open_conversation(bob, "chat-one")
    await add_user_message(db_store, theirs, bob, "my birthday is June 1")

    search = Memories(db_store, MemoryCipher("s" * 40), 10).messages_of(alice)
    matches = await search.search("birthday", 5)
    assert [(m["conversation"], m["role"]) for m in matches] == [
        ("chat-two", "user"), ("chat-one", "assistant"), ("chat-one", "user")]
    assert "June" not in str(matches)
    newest = matches[0]["content"]
    assert len(newest) <= 300 and "birthday party is in Lyon" in newest
    assert newest.startswith("…") and newest.endswith("…")
    assert matches[2]["content"] == "Remember: my birthday is March 15"
    assert matches[0]["timestamp"].endswith("Z")
    datetime.fromisoformat(matches[0]["timestamp"].replace("Z", "+00:00"))
    # Every word must be there; case does not matter; the limit holds.
    assert len(await search.search("BIRTHDAY march", 5)) == 2
    assert len(await search.search("birthday", 1)) == 1
    assert await search.search("birthday zebra", 5) == []
    # Text that is query syntax for either database is just words.
    for query in ('"birthday', "birthday*", "NEAR(birthday march)", "birthday OR -x", "!!", ""):
        assert isinstance(await search.search(query, 5), list)
    assert len(await search.search('"birthday"', 5)) == 3
    # The user's own id is no word of theirs (SQLite indexes it beside the content).
    assert await search.search(str(alice), 5) == []
    assert len(await search.search("15", 5)) == 2


async def indexed(store, word: str) -> list[int]:
    """The message ids SQLite's full-text index holds for a word, as it is now."""
    async with store.engine.connect() as conn:
        return (await conn.execute(text(
            "SELECT rowid FROM messages_fts WHERE messages_fts MATCH :word ORDER BY rowid"),
            {"word": f'content : "{word}"'})).scalars().all()


async def fts_intact(store) -> None:
    async with store.engine.begin() as conn:  # raises if the index and the rows disagree
        await conn.execute(text(
            "INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')"))


@pytest.fixture
def sqlite_store(io_loop, tmp_path):
    """A Store on an empty SQLite file (the full-text index's own behaviour)."""
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'recall.db'}")
    yield store
    io_loop.run_sync(store.close)


@pytest.mark.gen_test(timeout=60)
async def test_sqlite_indexes_messages_in_bulk_and_a_search_sees_every_one(sqlite_store):
    (alice,) = await users_of(sqlite_store, "alice")
    conversation = await sqlite_store.open_conversation(alice, "c")
    first = await add_user_message(sqlite_store, conversation, alice, "apple one")
    # Not indexed in the exchange's transaction (migration 0011)...
    assert await indexed(sqlite_store, "apple") == []
    await sqlite_store.fill_search_index()  # ...but on the lease renewal's fill
    assert await indexed(sqlite_store, "apple") == [first]
    # A search indexes what was saved since, before it reads.
    second = await add_user_message(sqlite_store, conversation, alice, "apple two")
    search = Memories(sqlite_store, MemoryCipher("s" * 40), 10).messages_of(alice)
    assert [m["content"] for m in await search.search("apple", 5)] == [
        "apple two", "apple one"]
    assert await indexed(sqlite_store, "apple") == [first, second]
    # Deleting the newest messages, indexed (second) and not yet (third):
    # the index stays intact, and SQLite gives their ids to the next
    # messages, which must be indexed again.
    await add_user_message(sqlite_store, conversation, alice, "apple three")
    async with sqlite_store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM messages WHERE id >= :id"), {"id": second})
    await fts_intact(sqlite_store)
    again = await add_user_message(sqlite_store, conversation, alice, "banana")
    assert again == second
    assert [m["content"] for m in await search.search("banana", 5)] == ["banana"]
    assert [m["content"] for m in await search.search("apple", 5)] == ["apple one"]
    # An edited message is indexed under its new words once indexed.
    async with sqlite_store.engine.begin() as conn:
        await conn.execute(text("UPDATE messages SET content = 'cherry' WHERE id = :id"),
                           {"id": first})
    assert [m["content"] for m in await search.search("cherry", 5)] == ["cherry"]
    assert await search.search("apple", 5) == []
    await fts_intact(sqlite_store)


@pytest.mark.gen_test(timeout=60)
async def test_migration_0011_down_indexes_what_was_left_and_up_again(sqlite_store):
    (alice,) = await users_of(sqlite_store, "alice")
    conversation = await sqlite_store.open_conversation(alice, "c")
    left = await add_user_message(sqlite_store, conversation, alice, "apple left")
    await downgrade(sqlite_store.engine, "0010")  # 0006's triggers again, the index filled
    assert await indexed(sqlite_store, "apple") == [left]
    await insert_message(sqlite_store.engine, alice, "apple by trigger")
    await upgrade(sqlite_store.engine, "head")
    search = Memories(sqlite_store, MemoryCipher("s" * 40), 10).messages_of(alice)
    assert [m["content"] for m in await search.search("apple", 5)] == [
        "apple by trigger", "apple left"]
    await fts_intact(sqlite_store)


def test_snippets_are_whole_or_300_characters_around_the_words():
    assert snippet("short", "x") == "short"
    text_ = "a" * 1000 + " needle " + "b" * 1000
    cut = snippet(text_, "needle")
    assert len(cut) == 300 and "needle" in cut and cut[0] == cut[-1] == "…"
    assert snippet("needle " + "b" * 500, "needle").startswith("needle")
    assert snippet("b" * 500 + " needle", "needle").endswith("needle")
    assert len(snippet("b" * 500 + " needle", "needle")) == 300


def test_the_memory_section_keeps_the_newest_within_its_budget():
    day = datetime(2026, 11, 1)
    items = [("old", "o" * 80, day), ("new", "n" * 8, day + timedelta(days=2)),
             ("mid", "m" * 8, day + timedelta(days=1))]
    count = len  # one token a character
    section = memory_section(items, 1000, count)
    assert section.splitlines()[1:] == ["- new: nnnnnnnn", "- mid: mmmmmmmm", "- old: " + "o" * 80]
    small = memory_section(items, 100, count)
    assert "- old" not in small and "- new" in small and len(small) <= 100
    assert memory_section([], 1000, count) == ""
    assert memory_section(items, 10, count) == ""
    assert system_prompt("Hi {username}.", "ann", "") == "Hi ann."
    assert system_prompt("Hi {username}.", "ann", "S") == "Hi ann.\n\nS"
    assert system_prompt("A {memories} B {username}", "ann", "S") == "A S B ann"


async def insert_message(engine, user_id: int, content: str) -> None:
    """A message saved with plain SQL (at 0004 the Store's exchange, which
    reads memories too, is not there yet)."""
    async with engine.begin() as conn:
        conversation = (await conn.execute(text(
            "SELECT id FROM conversations WHERE user_id = :user_id"), {"user_id": user_id})).scalar()
        await conn.execute(text(
            "INSERT INTO messages (public_id, conversation_id, user_id, role, content, status, "
            "created_at) VALUES (:public_id, :conversation, :user_id, 'user', :content, 'ok', "
            ":now)"), {"public_id": uuid.uuid4().hex, "conversation": conversation,
                       "user_id": user_id, "content": content, "now": datetime.utcnow()})


@pytest.mark.gen_test(timeout=60)
async def test_migration_0006_up_and_down_with_data(db_store):
    engine = db_store.engine
    await upgrade(engine, "0004")
    # Plain SQL: the Store's statements know the columns of later revisions.
    async with engine.begin() as conn:
        await seed_old_schema(conn, "alice", ["before"])
    alice = 1
    await insert_message(engine, alice, "saved before the search existed")
    await upgrade(engine, "head")  # the Store's search needs the newest schema
    memories = Memories(db_store, MemoryCipher("s" * 40), 10)
    # Messages saved before the migration are searchable (the index was built).
    assert len(await memories.messages_of(alice).search("existed", 5)) == 1
    await memories.of(alice).set("birthday", "March 15")
    await insert_message(engine, alice, "saved after, searchable too")
    assert len(await memories.messages_of(alice).search("searchable", 5)) == 1
    await downgrade(engine, "0004")
    async with engine.connect() as conn:
        names = (await conn.execute(text(
            "SELECT name FROM sqlite_master" if db_store.sqlite_file else
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' UNION "
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"))).scalars().all()
        count = (await conn.execute(text("SELECT count(*) FROM messages"))).scalar()
    assert not [name for name in names if "memories" in name or "fts" in name]
    assert count == 2
    # Messages can still be saved without the triggers' table.
    await insert_message(engine, alice, "after the downgrade")
    await upgrade(engine, "head")
    assert len(await memories.messages_of(alice).search("downgrade", 5)) == 1


def test_the_memory_key_comes_from_config_or_a_generated_file(tmp_path):
    from tornado_app.config import ConfigError, load_settings

    base = {"TORNADO_APP_DATA_DIR": str(tmp_path / "data"),
            "TORNADO_APP_AUTH__JWT_SECRET": "j" * 40}
    generated = load_settings(None, base).memory_key
    assert (tmp_path / "data" / "memory_key").read_text().strip() == generated
    assert load_settings(None, base).memory_key == generated  # the same on the next start
    assert len(bytes.fromhex(generated)) == 32
    configured = load_settings(None, {**base, "TORNADO_APP_MEMORY__KEY": "m" * 40})
    assert configured.memory_key == "m" * 40
    with pytest.raises(ConfigError, match=r"^memory\.key: must be at least 32 bytes"):
        load_settings(None, {**base, "TORNADO_APP_MEMORY__KEY": "short"})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^memory\.key_file: cannot use .*"
                                          r"set memory\.key or TORNADO_APP_MEMORY__KEY"):
        load_settings(None, {**base, "TORNADO_APP_MEMORY__KEY_FILE": "../file/key"})


@pytest.mark.gen_test(timeout=60)
async def test_recall_is_newest_first_past_the_recent_window(db_store, monkeypatch):
    from tornado_app.store import message_search

    monkeypatch.setattr(message_search, "RECENT_WINDOW", 3)  # PostgreSQL's first look
    (alice,) = await users_of(db_store, "alice")
    conversation = await db_store.open_conversation(alice, "c")
    for index in range(6):
        await add_user_message(db_store, conversation, alice,
                               f"note {index}" if index % 2 else f"other {index}")
    search = Memories(db_store, MemoryCipher("s" * 40), 10).messages_of(alice)
    assert [m["content"] for m in await search.search("note", 1)] == ["note 5"]
    assert [m["content"] for m in await search.search("note", 3)] == [
        "note 5", "note 3", "note 1"]
    assert [m["content"] for m in await search.search("other", 2)] == ["other 4", "other 2"]
