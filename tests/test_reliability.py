"""Reliability (issue 5, items 7-10): what an on-call engineer relies on.

- Graceful shutdown: SIGTERM/SIGINT with replies in flight, against a real
  server process.
- Crash safety: ``kill -9`` under load, restart on the same database, and
  compare what the clients saw with what the database holds.
- Database faults: PostgreSQL behind a TCP proxy that the test cuts,
  partitions and restores (the shared PostgreSQL itself is never touched),
  and a SQLite file whose write lock another process holds.
- Upstream faults: hung, slow and failing agents (a scripted fake in-process,
  and a hung OpenAI-compatible upstream behind a real server process).

Server processes come from tests/servers.py and are killed at teardown
whatever happens. Clients run in ``asyncio.run`` with generous timeouts;
nothing sleeps to synchronise where an event can be awaited.
See docs/reliability.md for what each test establishes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from tornado.websocket import WebSocketClosedError

from tornado_app.agents import AgentError

from .helpers import Client, connect_ws, get, run_async, saved_messages
from .openai_upstream import FakeOpenAI
from .servers import ServerProcess, add_users, sqlite_url, token, write_config
from .servers import tokens as cli_tokens
from .tcp_proxy import TcpProxy

STORE_UNAVAILABLE = "The service could not save your message; please try again shortly."
# Log lines that mean an exception escaped the service's own handling.
UNCAUGHT = ("Uncaught exception", "Task exception was never retrieved",
            "unexpected error", "Exception in callback")


def run(coro, timeout: float = 120):
    """Run a client scenario in a fresh event loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


TRANSCRIPT = text(
    "SELECT m.id, c.client_id, m.role, m.content, m.status, m.reply_to_id "
    "FROM messages m JOIN conversations c ON c.id = m.conversation_id ORDER BY m.id"
)
# User messages that no reply row answers: accepted, never answered ("not delivered").
UNANSWERED = text(
    "SELECT u.id FROM messages u WHERE u.role = 'user' AND NOT EXISTS "
    "(SELECT 1 FROM messages a WHERE a.reply_to_id = u.id) ORDER BY u.id"
)


def query(url: str, statement) -> list:
    async def read():
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return list(await conn.execute(statement))
        finally:
            await engine.dispose()

    return run_async(read())


def assert_no_uncaught_errors(log: str) -> None:
    for marker in UNCAUGHT:
        assert marker not in log, f"{marker!r} in the server log:\n{log[-5000:]}"


async def open_client(server: ServerProcess, client_id: str, token_: str) -> Client:
    client = await connect_ws(server.ws_url(client_id, token_))
    welcome = await client.receive(timeout=30)
    assert welcome is not None and welcome["type"] == "system", welcome
    return client


async def drain(client: Client, timeout: float) -> list[dict]:
    """Every frame until the server closes the socket."""
    frames = []
    while (frame := await client.receive(timeout)) is not None:
        frames.append(frame)
    return frames


# 7. Graceful shutdown

WORD_DELAY = 0.05  # the echo agent's pause before each word
GRACE = 3.0
SHORT = " ".join(f"s{n}" for n in range(15))  # about 0.8 s: finishes within the grace time
LONG = " ".join(f"l{n}" for n in range(400))  # about 20 s: does not
EXIT_MARGIN = 5.0  # closing sockets, saving cancelled replies, disposing, exiting (on a busy machine)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_finishes_or_saves_every_reply_and_closes_with_1001(tmp_path, servers, signum, any_db_url):
    url = any_db_url
    config = write_config(
        tmp_path, database={"url": url}, server={"shutdown_grace_seconds": GRACE},
        agent={"backend": "echo", "echo": {"delay_seconds": WORD_DELAY}},
    )
    add_users(config, "alice", "bob")
    tokens = cli_tokens(config, "alice", "bob")
    server = servers(config)
    plan = {  # client_id: (user, first message)
        "short-1": ("alice", f"short-1 {SHORT}"),
        "short-2": ("bob", f"short-2 {SHORT}"),
        "short-3": ("alice", f"short-3 {SHORT}"),
        "long-1": ("bob", f"long-1 {LONG}"),
        "long-2": ("alice", f"long-2 {LONG}"),
    }
    queued = "short-1 queued behind the first"

    async def scenario():
        clients = {cid: await open_client(server, cid, tokens[user]) for cid, (user, _) in plan.items()}
        idle = await open_client(server, "idle", tokens["bob"])
        for cid, (_user, content) in plan.items():
            await clients[cid].send({"content": content, "stream": True})
        for client in clients.values():  # every reply is under way
            await client.receive_type("ai_response_chunk", timeout=30)
        await clients["short-1"].send({"content": queued})
        signalled = time.monotonic()
        server.signal(signum)
        frames = await asyncio.gather(*(drain(c, GRACE + 30) for c in clients.values()))
        await drain(idle, GRACE + 30)
        code = await asyncio.to_thread(server.wait, GRACE + 30)
        elapsed = time.monotonic() - signalled
        closes = {cid: c.close_code for cid, c in {**clients, "idle": idle}.items()}
        return dict(zip(clients, frames)), closes, code, elapsed

    frames, closes, code, elapsed = run(scenario())
    print(f"shutdown: exited {code} after {elapsed:.2f} s (grace {GRACE} s)")
    assert closes == {cid: 1001 for cid in closes}
    assert code == 0, server.log()
    assert elapsed < GRACE + EXIT_MARGIN, f"took {elapsed:.1f} s"
    assert "Traceback" not in server.log()

    replies = {cid: [f["message"] for f in got if f["type"] == "ai_response"] for cid, got in frames.items()}
    rows = query(url, TRANSCRIPT)
    users = {row.content: row for row in rows if row.role == "user"}
    answers = {row.reply_to_id: row for row in rows if row.role == "assistant"}
    assert len(answers) == sum(row.role == "assistant" for row in rows)  # one reply row each
    for cid, (_user, content) in plan.items():
        assert content in users, f"{cid}: the user message was lost"
        answer = answers.get(users[content].id)
        assert answer is not None, f"{cid}: no reply row"
        expected = "Echo: " + content
        if cid.startswith("short"):  # finished within the grace time
            assert (answer.status, answer.content) == ("ok", expected)
            assert replies[cid][:1] == [expected]
        else:  # cut at the end of the grace time, saved as far as it got
            assert answer.status == "cancelled"
            assert expected.startswith(answer.content) and answer.content
            assert replies[cid] == []
    # The queued message may have started in the grace time; if it did, its
    # reply row says how it ended. It is never half-recorded.
    if queued in users:
        answer = answers.get(users[queued].id)
        assert answer is not None and answer.status in ("ok", "cancelled")
        assert (answer.status == "ok") == (("Echo: " + queued) in replies["short-1"])


# 8. Crash safety

CLIENTS = [(f"load-{n}", "alice" if n % 2 else "bob") for n in range(8)]
KILL_AFTER_REPLIES = 80


@dataclass
class Ledger:
    """What one client saw: messages sent, replies begun (a chunk arrived), replies received."""

    client_id: str
    sent: list[str] = field(default_factory=list)
    started: set[str] = field(default_factory=set)
    received: dict[str, str] = field(default_factory=dict)


async def keep_chatting(client: Client, ledger: Ledger, on_frame) -> None:
    """Send, wait for the reply, repeat, until the server goes away."""
    try:
        for number in range(10_000):
            content = f"{ledger.client_id} message {number} " + " ".join(["word"] * 8)
            ledger.sent.append(content)
            await client.send({"content": content, "stream": True})
            while True:
                frame = await client.receive(timeout=30)
                if frame is None:
                    return
                if frame["type"] == "ai_response_chunk":
                    ledger.started.add(content)
                elif frame["type"] == "ai_response":
                    ledger.received[content] = frame["message"]
                else:
                    raise AssertionError(f"{ledger.client_id}: unexpected {frame}")
                on_frame(frame)
                if frame["type"] == "ai_response":
                    break
    except WebSocketClosedError:
        return  # the server died while a message was being sent


@pytest.mark.slow
def test_kill_9_under_load_loses_nothing_that_was_accepted(tmp_path, servers, any_db_url):
    url = any_db_url
    config = write_config(tmp_path, database={"url": url},
                          agent={"backend": "echo", "echo": {"delay_seconds": 0.01}})
    add_users(config, "alice", "bob")
    tokens = cli_tokens(config, "alice", "bob")
    server = servers(config)
    ledgers = [Ledger(cid) for cid, _user in CLIENTS]

    async def load():
        clients = [await open_client(server, cid, tokens[user]) for cid, user in CLIENTS]
        received, killed = 0, False

        def on_frame(frame):
            nonlocal received, killed
            if frame["type"] == "ai_response":
                received += 1
            elif received >= KILL_AFTER_REPLIES and not killed:
                # A chunk: kill while this reply (and likely others) is mid-stream.
                os.kill(server.pid, signal.SIGKILL)
                killed = True

        await asyncio.gather(*(keep_chatting(c, ledger, on_frame) for c, ledger in zip(clients, ledgers)))

    run(load())
    server.kill()  # reap it
    assert server.proc.returncode == -signal.SIGKILL

    restarted = servers(config)
    if make_url(url).get_backend_name() == "sqlite":
        assert query(url, text("PRAGMA integrity_check"))[0][0] == "ok"
    rows = query(url, TRANSCRIPT)
    by_id = {row.id: row for row in rows}
    users = {}
    for row in rows:
        if row.role == "user":
            assert row.content not in users, f"saved twice: {row.content}"
            users[row.content] = row
    replies = {}
    for row in rows:
        if row.role == "assistant":
            assert row.reply_to_id not in replies, f"two replies to {row.reply_to_id}"
            assert by_id[row.reply_to_id].client_id == row.client_id
            replies[row.reply_to_id] = row

    for ledger in ledgers:
        # Every reply a client received is saved, with the very same text.
        for content, reply_text in ledger.received.items():
            assert content in users, f"{ledger.client_id}: answered message not saved"
            reply = replies.get(users[content].id)
            assert reply is not None and (reply.status, reply.content) == ("ok", reply_text)
        # Every message whose reply had begun was saved first.
        assert ledger.started <= set(users), ledger.client_id
        # Nothing was saved that the client did not send; in its order.
        saved = [row.content for row in rows if row.role == "user" and row.client_id == ledger.client_id]
        assert saved == ledger.sent[: len(saved)], ledger.client_id
        # The kill cut at most the one exchange in flight: the last message.
        assert len(saved) >= len(ledger.received)
        assert len(saved) - len(ledger.received) <= 1, ledger.client_id
    assert sum(len(ledger.received) for ledger in ledgers) >= KILL_AFTER_REPLIES
    # The kill landed mid-reply: some replies had begun and were never received.
    cut = [c for ledger in ledgers for c in ledger.started if c not in ledger.received]
    assert cut, "the kill found no reply in flight; nothing was tested"

    # Not delivered = a user message without a reply row: only the last
    # message of a conversation, and never one whose reply a client got.
    unanswered = [by_id[row.id] for row in query(url, UNANSWERED)]
    received_anywhere = {c for ledger in ledgers for c in ledger.received}
    last_of = {}
    for row in rows:
        last_of[row.client_id] = row.id if row.role == "user" else last_of.get(row.client_id)
    for row in unanswered:
        assert row.content not in received_anywhere
        assert last_of[row.client_id] == row.id, f"an unanswered message in the middle: {row}"
    assert len({row.client_id for row in unanswered}) == len(unanswered) <= len(CLIENTS)
    saved_not_received = [r for r in replies.values() if by_id[r.reply_to_id].content not in received_anywhere]
    print(f"kill -9: {sum(len(x.received) for x in ledgers)} replies received, {len(cut)} cut "
          f"mid-stream, {len(unanswered)} user messages without a reply row, "
          f"{len(saved_not_received)} replies saved but not received")

    # The restarted server carries on with the same conversations, and the
    # undelivered set stays what it was (new messages are all answered).
    async def carry_on():
        for cid, user in CLIENTS:
            client = await open_client(restarted, cid, tokens[user])
            await client.send({"content": f"{cid} after the restart"})
            frame = await client.receive(timeout=30)
            assert frame["type"] == "ai_response", frame
            assert frame["message"] == f"Echo: {cid} after the restart"
            client.close()

    run(carry_on())
    assert [row.id for row in query(url, UNANSWERED)] == [row.id for row in unanswered]
    assert_no_uncaught_errors(restarted.log())


# 9. Database faults


async def expect_error_frame(client: Client, content: str, timeout: float) -> dict:
    await client.send({"content": content})
    frame = await client.receive(timeout)
    assert frame is not None, f"socket closed ({client.close_code}) instead of an error frame"
    return frame


async def wait_ready(server: ServerProcess, timeout: float = 60) -> None:
    """Poll /readyz until 200: recovery has no event to await from outside."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = await asyncio.to_thread(server.get, "/readyz", 10)
        if status == 200:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("/readyz did not come back")


def proxied(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@pytest.fixture
def pg_proxy(postgres_url):
    """A proxy to the test PostgreSQL (ask for it before ``servers``: servers stop first)."""
    parsed = make_url(postgres_url)
    with TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
        yield proxy


@pytest.mark.slow
def test_postgresql_down_mid_run_gives_error_frames_and_recovers(tmp_path, postgres_url, pg_proxy, servers):
    url = proxied(postgres_url, pg_proxy)
    config = write_config(tmp_path, database={"url": url},
                          agent={"backend": "echo", "echo": {"delay_seconds": 0.1}})
    add_users(config, "alice", "bob")
    tokens = cli_tokens(config, "alice", "bob")
    server = servers(config)

    async def scenario():
        alice = await open_client(server, "alice-1", tokens["alice"])
        bob = await open_client(server, "bob-1", tokens["bob"])
        await alice.send({"content": "before the outage"})
        assert (await alice.receive(30))["message"] == "Echo: before the outage"

        # Cut in the middle of a reply: it cannot be saved, so it is not sent.
        await bob.send({"content": "one two three four five six seven eight", "stream": True})
        await bob.receive_type("ai_response_chunk", timeout=30)
        pg_proxy.cut()
        frames = []
        while not frames or frames[-1]["type"] == "ai_response_chunk":
            frames.append(await bob.receive(30))
            assert frames[-1] is not None, f"bob's socket closed ({bob.close_code})"
        assert frames[-1] == {**frames[-1], "type": "error", "message": STORE_UNAVAILABLE}

        # While it is down: error frames on open sockets, which stay open.
        for attempt in range(3):
            frame = await expect_error_frame(alice, f"during the outage {attempt}", 30)
            assert (frame["type"], frame["message"]) == ("error", STORE_UNAVAILABLE)
        status, body = await asyncio.to_thread(server.get, "/readyz")
        assert (status, body["database"]) == (503, "unavailable")
        assert (await asyncio.to_thread(server.get, "/healthz"))[0] == 200
        # A new socket cannot be opened without the database: documented 1011.
        newcomer = await connect_ws(server.ws_url("late", tokens["bob"]))
        assert await newcomer.wait_closed(30) in (1011, 1013)
        assert newcomer.close_reason == "Service unavailable"

        pg_proxy.restore()
        await wait_ready(server)
        for client, name in ((alice, "alice"), (bob, "bob")):
            await client.send({"content": f"{name} after the outage"})
            frame = await client.receive(30)
            assert (frame["type"], frame["message"]) == ("ai_response", f"Echo: {name} after the outage")
        again = await open_client(server, "late", tokens["bob"])
        await again.send({"content": "hello again"})
        assert (await again.receive(30))["type"] == "ai_response"
        assert alice.close_code is None and bob.close_code is None

    run(scenario())
    assert server.running
    assert_no_uncaught_errors(server.log())
    # Nothing from the outage was half-saved: bob's message is there, unanswered.
    rows = query(postgres_url, TRANSCRIPT)
    contents = [(row.client_id, row.role, row.content) for row in rows]
    assert ("alice-1", "user", "during the outage 0") not in contents
    unanswered = [row.id for row in query(postgres_url, UNANSWERED)]
    bob_message = [row.id for row in rows if row.content.startswith("one two three")]
    assert unanswered == bob_message


@pytest.mark.slow
def test_postgresql_partitioned_gives_error_frames_within_a_bound(tmp_path, postgres_url, pg_proxy, servers):
    url = proxied(postgres_url, pg_proxy)
    config = write_config(tmp_path, database={"url": url, "timeout_seconds": 4})
    add_users(config, "alice")
    alice_token = token(config, "alice")
    server = servers(config)

    async def scenario():
        alice = await open_client(server, "alice-1", alice_token)
        await alice.send({"content": "before"})
        assert (await alice.receive(30))["type"] == "ai_response"
        pg_proxy.partition()
        try:
            status, body = await asyncio.to_thread(server.get, "/readyz", 10)
            assert (status, body["database"]) == (503, "unavailable")
            frame = await expect_error_frame(alice, "during the partition", 20)
            assert (frame["type"], frame["message"]) == ("error", STORE_UNAVAILABLE)
        finally:
            pg_proxy.restore()

    try:
        run(scenario())
    except (TimeoutError, asyncio.TimeoutError) as exc:
        raise AssertionError("no answer while the database was unreachable") from exc


def hold_sqlite_write_lock(path: Path) -> sqlite3.Connection:
    """Another process's writer: BEGIN EXCLUSIVE takes the write lock (WAL: readers go on)."""
    lock = sqlite3.connect(path, isolation_level=None, timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    return lock


SQLITE_BUSY_TIMEOUT = 3  # database.timeout_seconds, set in the test's config
# Writes queue in one batcher thread: a batch that arrives while the one
# before it waits for the lock waits its own busy_timeout after it.
SQLITE_LOCKED_ERROR_WITHIN = 2 * SQLITE_BUSY_TIMEOUT + 20


@pytest.mark.slow
def test_sqlite_locked_by_another_process_gives_error_frames_and_recovers(tmp_path, servers):
    url = sqlite_url(tmp_path)
    config = write_config(tmp_path, database={"url": url, "timeout_seconds": SQLITE_BUSY_TIMEOUT})
    add_users(config, "alice", "bob")
    tokens = cli_tokens(config, "alice", "bob")
    server = servers(config)

    async def timed_error(client: Client, started: float) -> float:
        frame = await expect_error_frame(client, "while locked", SQLITE_LOCKED_ERROR_WITHIN)
        assert (frame["type"], frame["message"]) == ("error", STORE_UNAVAILABLE)
        return time.monotonic() - started

    async def scenario():
        alice = await open_client(server, "alice-1", tokens["alice"])
        bob = await open_client(server, "bob-1", tokens["bob"])
        await alice.send({"content": "before the lock"})
        assert (await alice.receive(30))["type"] == "ai_response"
        lock = hold_sqlite_write_lock(tmp_path / "data" / "chat.db")
        try:
            started = time.monotonic()
            waits = [asyncio.ensure_future(timed_error(c, started)) for c in (alice, bob)]
            # The writes wait off the event loop: HTTP and sockets keep answering.
            assert (await asyncio.to_thread(server.get, "/healthz", 5))[0] == 200
            waited = await asyncio.gather(*waits)
        finally:
            lock.rollback()
            lock.close()
        for client in (alice, bob):
            await client.send({"content": "after the lock"})
            frame = await client.receive(30)
            assert (frame["type"], frame["message"]) == ("ai_response", "Echo: after the lock")
            assert client.close_code is None
        return waited

    waited = run(scenario(), timeout=SQLITE_LOCKED_ERROR_WITHIN + 90)
    # Writers queue for busy_timeout before giving up, never less.
    assert min(waited) >= SQLITE_BUSY_TIMEOUT * 0.9, waited
    assert server.running
    assert_no_uncaught_errors(server.log())
    assert not [row for row in query(url, TRANSCRIPT) if row.content == "while locked"]
    print(f"error frames after {waited[0]:.1f} s and {waited[1]:.1f} s")


@pytest.mark.slow
def test_readyz_reports_a_sqlite_file_locked_by_another_process(tmp_path, servers):
    config = write_config(tmp_path, database={"url": sqlite_url(tmp_path)})
    server = servers(config)
    lock = hold_sqlite_write_lock(tmp_path / "data" / "chat.db")
    try:
        status, body = server.get("/readyz", timeout=SQLITE_BUSY_TIMEOUT + 30)
    finally:
        lock.rollback()
        lock.close()
    assert (status, body["database"]) == (503, "unavailable")


# 10. Upstream faults (in-process, with the scripted fake agent)

DEADLINE = 1.0


class TestUpstreamFaults:
    @pytest.fixture
    def settings(self, settings):
        settings.agent.timeout_seconds = DEADLINE
        settings.rate_limit.messages = 1000
        return settings

    @pytest.mark.gen_test(timeout=30)
    async def test_hung_slow_and_failing_agents_do_not_block_other_users(self, connect, fake_agent, store):
        names = ("hung", "slow", "failing")
        troubled = {name: await connect(name, user=name) for name in names}
        others = [await connect(f"other-{n}", user=f"user{n}") for n in range(8)]
        fake_agent.enqueue("never", gate=asyncio.Event())  # hung: no token at all
        fake_agent.enqueue(*["slow "] * 1000, delay=0.05)  # tokens keep coming, for ever
        fake_agent.enqueue("partial ", error=AgentError("upstream", "boom"))  # fails
        started = asyncio.get_running_loop().time()
        for number, name in enumerate(names, start=1):
            await troubled[name].send({"content": name, "stream": True})
            await fake_agent.received(number)
        outcome = {name: asyncio.ensure_future(troubled[name].receive_type("error", DEADLINE + 10))
                   for name in names}

        for n, client in enumerate(others):
            await client.send({"content": f"hello {n}"})
        for n, client in enumerate(others):
            frame = await client.receive()
            assert (frame["type"], frame["message"]) == ("ai_response", f"fake reply to: hello {n}")
        # Everybody else was answered while the hung and slow replies still waited.
        assert not outcome["hung"].done() and not outcome["slow"].done()

        assert "reference" in (await outcome["failing"])["message"]
        for name in ("hung", "slow"):
            assert "did not answer in time" in (await outcome[name])["message"]
        elapsed = asyncio.get_running_loop().time() - started
        assert DEADLINE * 0.8 <= elapsed < DEADLINE + 5

        for name, client in troubled.items():  # the sockets are still usable
            await client.send({"content": "again"})
            assert (await client.receive_type("ai_response"))["message"] == "fake reply to: again"
            user = await store.get_user(name)
            conversation = await store.open_conversation(user.id, name)
            first_reply = [r for r in await saved_messages(store, conversation)
                           if r.role == "assistant"][0]
            assert first_reply.status == "error"
            if name == "slow":  # what it said before the deadline is kept
                assert first_reply.content.startswith("slow ")

    @pytest.mark.gen_test(timeout=30)
    async def test_each_reply_gets_its_own_deadline(self, connect, fake_agent):
        fake_agent.enqueue("never", gate=asyncio.Event())
        # 0.7 of the deadline: it fits only if the clock restarted for it.
        fake_agent.enqueue("in ", "time", delay=DEADLINE * 0.35)
        client = await connect()
        await client.send({"content": "first"})
        await client.send({"content": "second"})  # queued behind the hung one
        first = await client.receive(timeout=DEADLINE + 10)
        assert first["type"] == "error" and "did not answer in time" in first["message"]
        second = await client.receive(timeout=DEADLINE + 10)
        assert (second["type"], second["message"]) == ("ai_response", "in time")

    @pytest.mark.gen_test(timeout=30)
    async def test_many_hung_replies_leave_the_server_responsive(self, connect, fake_agent, base_url):
        hung = [await connect(f"hung-{n}", user=f"hung{n}") for n in range(12)]
        fresh = await connect("fresh", user="fresh")
        for client in hung:
            fake_agent.enqueue("never", gate=asyncio.Event())
            await client.send({"content": "hang"})
        await fake_agent.received(len(hung))
        outcome = [asyncio.ensure_future(c.receive(timeout=DEADLINE + 10)) for c in hung]
        response = await get(f"{base_url}/readyz")
        assert response.code == 200
        await fresh.send({"content": "hi"})
        assert (await fresh.receive())["type"] == "ai_response"
        assert not any(task.done() for task in outcome)  # all still hanging meanwhile
        for task in outcome:
            assert "did not answer in time" in (await task)["message"]


@pytest.mark.slow
def test_a_hung_openai_upstream_blocks_nobody_and_hits_the_deadline(tmp_path, servers):
    with FakeOpenAI() as upstream:
        upstream.hang(60)
        upstream.reply(["fine"], times=10)
        config = write_config(
            tmp_path, database={"url": sqlite_url(tmp_path)},
            agent={"backend": "openai", "timeout_seconds": 1.5,
                   "openai": {"base_url": upstream.base_url, "api_key": "sk-test-unused-key",
                              "model": "fake", "timeout_seconds": 30, "max_retries": 0}},
        )
        add_users(config, "alice", "bob")
        tokens = cli_tokens(config, "alice", "bob")
        server = servers(config)

        async def scenario():
            alice = await open_client(server, "alice-1", tokens["alice"])
            await alice.send({"content": "hang please"})
            assert await asyncio.to_thread(upstream.wait_for, lambda r: len(r) == 1, 10)
            alice_answer = asyncio.ensure_future(alice.receive(15))
            bob = await open_client(server, "bob-1", tokens["bob"])
            for n in range(3):
                await bob.send({"content": f"question {n}"})
                frame = await bob.receive(10)
                assert (frame["type"], frame["message"]) == ("ai_response", "fine")
            assert not alice_answer.done()  # bob was answered while alice's upstream hung
            frame = await alice_answer
            assert frame["type"] == "error" and "did not answer in time" in frame["message"]
            # The host's deadline closed the upstream request, not just stopped listening.
            assert await asyncio.to_thread(upstream.wait_for_disconnect, 10)

        run(scenario())
        assert_no_uncaught_errors(server.log())
        assert "sk-test-unused-key" not in server.log()
