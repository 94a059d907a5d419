"""PostgreSQL's group commit (store/pg_batcher.py): many exchanges' writes in
one transaction, results only after the commit, a failing unit failing only
its caller, deadlocks broken by running the batch again, and the rate limit
exact across four processes committing in batches. Real PostgreSQL only.
"""

import asyncio
import multiprocessing
import time

import asyncpg
import pytest
from sqlalchemy import Boolean, Integer, bindparam, text, update
from sqlalchemy.util import await_only

from tornado_app.store import Conflict, Store
from tornado_app.store import users
from tornado_app.store.asyncpg_executor import connect_args
from tornado_app.store.models import User
from tornado_app.store.store import _first

from .helpers import ADMIT, add_user_message, saved_messages

_USERS = ("u1", "u2", "u3")
# A row lock on one user, as the units of an exchange take them.
_LOCK = update(User.__table__).where(User.__table__.c.id == bindparam("which", type_=Integer)) \
    .values(is_admin=bindparam("flag", type_=Boolean))
_FAST_DEADLOCK_CHECK = text("SET LOCAL deadlock_timeout = '50ms'")


async def _prepare(url: str) -> None:
    store = Store.from_url(url)
    try:
        await store.ensure_schema()
        for name in _USERS:
            await store.create_user(name, None)
    finally:
        await store.close()


@pytest.fixture
def pg_store(io_loop, postgres_url):
    """A Store on PostgreSQL with users u1, u2, u3 (ids 1 to 3), its pool open."""
    io_loop.run_sync(lambda: _prepare(postgres_url))
    store = Store.from_url(postgres_url)
    io_loop.run_sync(lambda: store.open_conversation(1, "warm-up"))
    yield store
    io_loop.run_sync(store.close)


async def _committed_count(store, conversation_id: int) -> int:
    return len(await saved_messages(store, conversation_id))


@pytest.mark.gen_test
async def test_concurrent_exchanges_share_one_commit_and_are_committed_when_answered(pg_store):
    store, batcher = pg_store, pg_store.writer.batcher
    conversations = [await store.open_conversation(user, "c") for user in (1, 2, 3)]
    before = (batcher.batches, batcher.units)
    ids = await asyncio.gather(*(add_user_message(store, conversations[n % 3], n % 3 + 1,
                                                  f"message {n}") for n in range(30)))
    assert all(ids)
    assert batcher.units - before[1] == 30
    assert batcher.batches - before[0] < 30  # shared commits
    # Answered means committed: another connection sees every row.
    assert [await _committed_count(store, c) for c in conversations] == [10, 10, 10]


@pytest.mark.gen_test
async def test_a_connection_goes_back_to_the_pool_without_a_reset_round_trip(pg_store):
    """asyncpg's default reset (a query on every release) is skipped: the
    store's statements leave no session state (asyncpg_executor._keep_session)."""
    store = pg_store
    conversation = await store.open_conversation(1, "c")
    await add_user_message(store, conversation, 1, "hello")
    watcher = await asyncpg.connect(**connect_args(store.engine))
    try:
        last = [row["query"] for row in await watcher.fetch(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")]
    finally:
        await watcher.close()
    # The pooled connection's last query is its batch's COMMIT, not the reset.
    assert any(query.strip().rstrip(";") == "COMMIT" for query in last), last
    assert not any("RESET ALL" in query for query in last), last


@pytest.mark.gen_test
async def test_a_batch_holds_one_unit_per_user(pg_store):
    """Two units of one user in a batch could lock that user's rows in another
    order than a batch of another process (pg_batcher.py, "Deadlocks")."""
    store, batcher = pg_store, pg_store.writer.batcher
    conversations = [await store.open_conversation(user, "c") for user in (1, 2, 3)]
    keys_of_batches = []
    attempt = batcher._attempt

    async def recorded(batch):
        keys_of_batches.append([unit.key for unit in batch])
        return await attempt(batch)

    batcher._attempt = recorded
    ids = await asyncio.gather(*(add_user_message(store, conversations[n % 3], n % 3 + 1,
                                                  f"message {n}") for n in range(30)))
    assert all(ids)
    assert all(len(set(keys)) == len(keys) for keys in keys_of_batches), keys_of_batches
    assert any(len(keys) > 1 for keys in keys_of_batches)  # still shared commits
    assert [await _committed_count(store, c) for c in conversations] == [10, 10, 10]


@pytest.mark.gen_test
async def test_a_failing_unit_fails_only_its_caller(pg_store):
    store = pg_store
    first, second = [await store.open_conversation(user, "c") for user in (1, 2)]
    duplicate = {"username": "u1", "password_hash": None, "is_admin": False,
                 "created_at": None}
    ok_before, failed, ok_after = await asyncio.gather(
        add_user_message(store, first, 1, "before"),
        store.writer.run(_first, users.INSERT_USER, duplicate, lock_key=1),
        add_user_message(store, second, 2, "after"),
        return_exceptions=True)
    assert isinstance(failed, Conflict)
    assert isinstance(ok_before, int) and isinstance(ok_after, int)
    assert await _committed_count(store, first) == 1
    assert await _committed_count(store, second) == 1


@pytest.mark.parametrize("lock_key", [2, None], ids=["batched", "own-transaction"])
@pytest.mark.gen_test(timeout=30)
async def test_a_real_deadlock_rolls_the_batch_back_and_runs_it_again(pg_store, lock_key):
    """An outside transaction takes user 1's row and then user 2's; the unit
    takes them in the opposite order: PostgreSQL fails the unit's transaction
    (its deadlock check runs first), and the batcher runs it again. A write
    with no lock key (its own transaction, not batched) is run again the same
    way (pg_batcher.retrying)."""
    store, batcher = pg_store, pg_store.writer.batcher
    calls, holding, outsider_waits = [], asyncio.Event(), asyncio.Event()

    def unit(db):
        calls.append(1)
        db.execute(_FAST_DEADLOCK_CHECK)
        db.execute(_LOCK, {"which": 2, "flag": False})
        if len(calls) == 1:
            holding.set()
            await_only(outsider_waits.wait())
        db.execute(_LOCK, {"which": 1, "flag": False})
        return "saved"

    outsider = await asyncpg.connect(**connect_args(store.engine))
    watcher = await asyncpg.connect(**connect_args(store.engine))
    try:
        transaction = outsider.transaction()
        await transaction.start()
        await outsider.execute("SET LOCAL deadlock_timeout = '20s'")
        await outsider.execute("UPDATE users SET is_admin = false WHERE id = 1")
        retries = batcher.retries
        saving = asyncio.ensure_future(store.writer.run(unit, lock_key=lock_key))
        await holding.wait()
        blocked = asyncio.ensure_future(
            outsider.execute("UPDATE users SET is_admin = false WHERE id = 2"))
        pid = outsider.get_server_pid()
        while await watcher.fetchval("SELECT wait_event_type FROM pg_stat_activity "
                                     "WHERE pid = $1", pid) != "Lock":
            await asyncio.sleep(0.01)
        outsider_waits.set()  # the unit now waits for user 1: a cycle
        await blocked  # the unit's transaction was the one rolled back
        await transaction.commit()
        assert await saving == "saved"
    finally:
        await outsider.close()
        await watcher.close()
    assert len(calls) == 2
    assert batcher.retries == retries + (1 if lock_key is not None else 0)


LIMIT = 25  # messages per user in the window, across all processes
SENDS = 20  # per user and process


def _sender(url: str, conversations: list[int], start, results) -> None:
    """One process: its own Store, SENDS admits per user, all at once."""

    async def main():
        store = Store.from_url(url)
        try:
            await store.open_conversation(1, "warm-up")  # opens the pool
            start.wait()
            admissions = await asyncio.gather(*(
                store.admit(conversation, user, "hello", now=1000.0, messages=LIMIT,
                            per_seconds=3600.0, after_id=0, history_limit=0, **ADMIT)
                for _ in range(SENDS) for user, conversation in enumerate(conversations, 1)))
            allowed = [0] * len(conversations)
            for index, admission in enumerate(admissions):
                allowed[index % len(conversations)] += admission.decision.allowed
            batcher = store.writer.batcher
            results.put((allowed, batcher.batches, batcher.units))
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_group_commit_keeps_the_rate_limit_exact_across_four_processes(pg_store):
    store = pg_store
    conversations = [await store.open_conversation(user, "burst") for user in (1, 2, 3)]
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(4), context.Queue()
    senders = [context.Process(target=_sender, args=(str(store.engine.url.render_as_string(
        hide_password=False)), conversations, start, results)) for _ in range(4)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 100
    outcomes = []
    while len(outcomes) < 4 and time.monotonic() < deadline:
        try:
            outcomes.append(results.get_nowait())
        except Exception:  # queue.Empty: not yet
            await asyncio.sleep(0.1)
    for sender in senders:
        sender.join(10)
    assert len(outcomes) == 4, "a sender process failed"
    allowed = [sum(outcome[0][n] for outcome in outcomes) for n in range(3)]
    assert allowed == [LIMIT] * 3
    assert [await _committed_count(store, c) for c in conversations] == [LIMIT] * 3
    batches, units = sum(o[1] for o in outcomes), sum(o[2] for o in outcomes)
    assert units >= 4 * 3 * SENDS and batches < units  # the admits were group-committed


@pytest.mark.gen_test
async def test_a_unit_queued_as_the_last_lane_leaves_still_runs(pg_store):
    """The caller of one unit resumes before the lane's task is done: its next
    unit must start a lane of its own, not wait for one that has left."""
    store = pg_store
    store.writer.batcher.lanes = 1
    conversation = await store.open_conversation(1, "c")

    async def one_after_another():  # in one task: no loop turn between the units
        for n in range(3):
            await add_user_message(store, conversation, 1, f"message {n}")

    await asyncio.wait_for(one_after_another(), 10)
    assert await _committed_count(store, conversation) == 3
