"""Replies that outlive their socket, across real server processes: resume on
another instance (two servers on one PostgreSQL) and between ``--processes``
workers (SQLite), cancel from another instance, and a reply whose instance is
killed with -9 saved as interrupted.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from .helpers import connect_ws, run_async
from .servers import ServerProcess, add_users, token, write_config

pytestmark = pytest.mark.slow

V2 = ["ai-chat.v2"]
WORDS = [f"w{n}" for n in range(40)]
MESSAGE = " ".join(WORDS)
ANSWER = "Echo: " + MESSAGE


def config_for(folder, db_url, delay=0.1, **sections):
    return write_config(
        folder,
        database={"url": db_url},
        agent={"backend": "echo", "echo": {"delay_seconds": delay}},
        limits={"lease_seconds": 3},
        **sections,
    )


def start(servers, tmp_path, db_url, count=2, delay=0.1, **sections):
    """``count`` instances of one service with user alice: the instances, her token."""
    config = config_for(tmp_path, db_url, delay, **sections)
    add_users(config, "alice")
    return [servers(config) for _ in range(count)], token(config, "alice")


async def open_v2(server: ServerProcess, tok: str, client_id: str = "c1"):
    client = await connect_ws(server.ws_url(client_id, tok), subprotocols=V2)
    welcome = await client.receive(timeout=15)
    assert welcome["message"].startswith("Welcome"), welcome
    assert "selectable" in await client.receive(timeout=15)  # the conversation's agent
    return client


async def start_reply(client, chunks: int = 3) -> list[dict]:
    """Send the long message (streamed); its ack and first ``chunks`` chunks."""
    await client.send({"content": MESSAGE, "stream": True})
    return [await client.receive(timeout=15) for _ in range(1 + chunks)]


def assert_whole(chunks: list[dict], final: dict) -> None:
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["message"] for c in chunks) == final["message"] == ANSWER


def test_resume_on_another_instance(tmp_path, postgres_url, servers):
    (first, second), tok = start(servers, tmp_path, postgres_url)

    async def scenario():
        asker = await open_v2(first, tok)
        ack, *received = await start_reply(asker)
        asker.close()  # the laptop slept: the reply goes on, on the first instance
        resumer = await open_v2(second, tok)
        progress = await resumer.receive(timeout=15)
        assert (progress["message"], progress["reply_id"]) == (
            "A reply is in progress.", ack["reply_id"])
        await resumer.send({"action": "resume", "reply_id": ack["reply_id"],
                            "after_seq": received[-1]["seq"]})
        *rest, final = await resumer.receive_until("ai_response", timeout=30)
        assert_whole(received + rest, final)
        assert final["message_id"] == ack["message_id"]

    asyncio.run(scenario())


def test_resume_between_processes_of_one_instance(tmp_path, servers):
    (server,), tok = start(servers, tmp_path, "sqlite:///data/chat.db", count=1,
                           server={"processes": 2})

    async def scenario():
        asker = await open_v2(server, tok)
        ack, *received = await start_reply(asker)
        # Resumers on sockets the kernel spreads over both workers: whichever
        # worker each lands on, it gets the reply whole.
        resumers = [await open_v2(server, tok, f"r{n}") for n in range(6)]
        for resumer in resumers:
            await resumer.send({"action": "resume", "reply_id": ack["reply_id"]})
        for resumer in resumers:
            *chunks, final = await resumer.receive_until("ai_response", timeout=30)
            assert_whole(chunks, final)
        *rest, final = await asker.receive_until("ai_response", timeout=30)
        assert_whole(received + rest, final)

    asyncio.run(scenario())
    assert server.log().count("serving on http://") == 2


def test_cancel_from_another_instance(tmp_path, postgres_url, servers):
    (first, second), tok = start(servers, tmp_path, postgres_url)

    async def scenario():
        asker = await open_v2(first, tok)
        ack, *_chunks = await start_reply(asker)
        canceller = await open_v2(second, tok, "elsewhere")
        await canceller.send({"action": "cancel", "reply_id": ack["reply_id"]})
        for client in (asker, canceller):
            frame = await client.receive_type("system", timeout=15)
            assert (frame["message"], frame["reply_id"]) == (
                "The reply was cancelled.", ack["reply_id"])

    asyncio.run(scenario())


def test_a_killed_instance_leaves_no_reply_hanging(tmp_path, postgres_url, servers):
    (doomed, survivor), tok = start(servers, tmp_path, postgres_url, delay=0.2)

    async def scenario():
        asker = await open_v2(doomed, tok)
        ack, *received = await start_reply(asker)
        resumer = await open_v2(survivor, tok)
        await resumer.receive(timeout=15)  # "A reply is in progress."
        await resumer.send({"action": "resume", "reply_id": ack["reply_id"]})
        await resumer.receive_type("ai_response_chunk", timeout=15)
        doomed.kill()  # kill -9, in the middle of the reply
        killed_at = time.monotonic()
        end = await resumer.receive_type("error", timeout=30)
        # Within the lease (3 s) and one renewal period of the survivor.
        assert time.monotonic() - killed_at < 3 + 1 + 2
        assert end["message"].startswith("The reply was interrupted (reference ")
        assert (end["reply_id"], end["message_id"]) == (ack["reply_id"], ack["message_id"])
        return ack

    ack = asyncio.run(scenario())

    async def saved_row():
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(postgres_url)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(text(
                    "SELECT status, error_kind, content FROM messages WHERE public_id = :id"),
                    {"id": ack["reply_id"]})).one()
        finally:
            await engine.dispose()

    status, kind, content = run_async(saved_row())
    assert (status, kind) == ("error", "interrupted")
    assert ANSWER.startswith(content) and 0 < len(content) < len(ANSWER)


def test_a_killed_sqlite_instance_is_swept_by_the_next(tmp_path, servers):
    """One instance on a SQLite file, killed mid-reply; the one started
    after it saves the reply as interrupted."""
    config = config_for(tmp_path, "sqlite:///data/chat.db", delay=0.2)
    add_users(config, "alice")
    doomed = servers(config)
    tok = token(config, "alice")

    async def scenario():
        asker = await open_v2(doomed, tok)
        ack, *_ = await start_reply(asker)
        await asyncio.sleep(0.5)  # a flush or two
        doomed.kill()
        return ack

    ack = asyncio.run(scenario())
    survivor = servers(config)
    database = tmp_path / "data" / "chat.db"
    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as conn:
            row = conn.execute("SELECT status, error_kind, content FROM messages "
                               "WHERE public_id = ?", (ack["reply_id"],)).fetchone()
        if row is not None:
            break
        time.sleep(0.2)
    assert row is not None, survivor.log()
    assert row[:2] == ("error", "interrupted") and ANSWER.startswith(row[2]) and row[2]


@pytest.mark.gen_test
async def test_a_second_cancel_does_not_interrupt_the_save_of_a_cancelled_reply():
    """A cancel request is seen twice (a flush and a notification): the task
    is cancelled once, so the save it makes on its way out completes."""
    from tornado_app.replies import LiveReply

    live = LiveReply("reply", "message", 1, 1, 1)
    release, saved = asyncio.Event(), asyncio.Event()

    async def generate():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.shield(release.wait())  # saving the cancelled reply
            saved.set()
            raise

    live.task, live.started = asyncio.create_task(generate()), True
    await asyncio.sleep(0)
    assert live.cancel()
    for _ in range(3):  # the task is saving now
        await asyncio.sleep(0)
    assert live.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await live.task
    assert saved.is_set()


@pytest.mark.gen_test
async def test_a_listener_without_chunks_gets_the_ending_alone():
    """A reply that is not streamed wakes its socket once, for its end; a
    streaming listener of the same reply still gets every chunk."""
    from tornado_app.replies import Chunk, Ending, LiveReply

    live = LiveReply("reply", "message", 1, 1, 1)
    live.take("early ")
    quiet, streaming = live.listen(chunks=False), live.listen()
    live.take("late")
    live.end(Ending("ok", "early late"))
    assert [event async for event in quiet.events()] == [Ending("ok", "early late")]
    assert [event async for event in streaming.events()] == [
        Chunk(0, "early "), Chunk(1, "late"), Ending("ok", "early late")]
