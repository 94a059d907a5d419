"""Group commit on PostgreSQL: the exchange's writes of many users in one transaction.

Each commit waits for PostgreSQL's WAL flush (an fsync), and a transaction
that sends a ``NOTIFY`` (every saved reply does, for the other instances'
watchers) holds PostgreSQL's notification lock until its commit is flushed,
so such commits queue one behind the other across the whole server. One
commit for many exchanges is what lets PostgreSQL keep up (docs/benchmarks.md,
figure 4), as the SQLite batcher's one ``COMMIT`` per batch does for SQLite.

Callers queue a unit of work with a *lock key* (the user it belongs to) and
await its future. Up to :attr:`PgBatcher.lanes` batches run at a time, each on
its own pooled connection: a free lane takes whatever is queued, runs it in
one transaction and resolves the futures only after the ``COMMIT``. So a
caller never sees a write that is not committed.

Deadlocks. The units lock their user's rows (the rate limit's, the user row
for quotas and slots, the conversation's). A batch holds at most one unit per
lock key and runs them sorted by key, so that batches of any process take
those locks in one order and cannot wait on each other in a cycle. Two units
of one user in a batch did not: a saved reply's foreign key takes a share
lock on the user's row, then the next admit wants the rate limit's row, while
another batch's admit held that row and wanted the user's row for its quota
(tests/test_quota_scale_out.py found it). A user's further units wait for the
next batch. What still can (a unit that locks
rows of several users, an outside transaction) PostgreSQL breaks by failing
one transaction with a deadlock or serialization failure: then the whole batch
is rolled back and run again, up to :data:`ATTEMPTS` times.

A unit that fails on its own (a constraint, a bug) fails only its caller: the
batch is rolled back, that unit's caller gets the error, and the rest run
again without it. No savepoints: they would cost two round trips a unit
on the path that almost never needs them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable

import asyncpg
from sqlalchemy.util import greenlet_spawn

from .executor import StoreUnavailable, Work

logger = logging.getLogger(__name__)

# Rolled back by PostgreSQL to break a cycle of waits: worth running again.
RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
ATTEMPTS = 5


class _Unit:
    __slots__ = ("work", "args", "key", "future")

    def __init__(self, work: Work, args: tuple, key: int, future: asyncio.Future):
        self.work = work
        self.args = args
        self.key = key
        self.future = future


class _UnitFailed(Exception):
    """One unit's own failure inside a batch (``index`` in it)."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(index)
        self.index = index
        self.error = error


class PgBatcher:
    """Units of work in shared transactions (see the module).

    ``acquire()`` gives a pooled connection (an async context manager);
    ``database(conn)`` the unit's ``db`` on it; ``as_error(exc)`` a driver's
    failure as the Store's exception."""

    # Batches at once, and units in one. Small batches on several connections
    # keep the round trips of one batch short while others wait for their
    # commit's flush (figure 4 measured 3/128 against 6/8: same throughput,
    # a lower p99 with 6/8).
    lanes = 6
    max_batch = 8

    def __init__(self, acquire: Callable[[], Any], database: Callable[[Any], Any],
                 as_error: Callable[[BaseException], BaseException]):
        self.acquire = acquire
        self.database = database
        self.as_error = as_error
        self._queue: list[_Unit] = []
        self._running: set[asyncio.Task] = set()
        # Lanes still in their loop: counted down by the lane itself as it
        # leaves (not by the task's done callback, which runs later), so
        # that a unit queued in between always finds a lane.
        self._busy = 0
        # What tests and figures read: batches committed, units in them, reruns.
        self.batches = 0
        self.units = 0
        self.retries = 0

    def run(self, work: Work, args: tuple, key: int) -> Awaitable:
        """Queue ``work(db, *args)``; the future resolves after its batch commits."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Unit(work, args, key, future))
        if self._busy < self.lanes:
            self._busy += 1
            task = asyncio.create_task(self._lane())
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return future

    async def close(self) -> None:
        """Let the lanes finish what is queued."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _lane(self) -> None:
        try:
            while self._queue:
                batch = self._take_batch()
                batch.sort(key=_key)
                try:
                    await self._commit(batch)
                except BaseException as exc:  # cancelled at shutdown, or a bug here
                    _fail(batch, StoreUnavailable(f"database unavailable ({type(exc).__name__})"))
                    raise
        finally:
            self._busy -= 1

    def _take_batch(self) -> list[_Unit]:
        """The oldest queued units, up to ``max_batch``, one per lock key; the
        others stay queued in their order."""
        batch, keys, rest = [], set(), []
        for unit in self._queue:
            if len(batch) < self.max_batch and unit.key not in keys:
                keys.add(unit.key)
                batch.append(unit)
            else:
                rest.append(unit)
        self._queue[:] = rest
        return batch

    async def _commit(self, batch: list[_Unit]) -> None:
        while batch:
            try:
                results = await retrying(lambda: self._attempt(batch), self._count_retry)
            except _UnitFailed as failed:
                unit = batch.pop(failed.index)
                _settle(unit, None, self.as_error(failed.error))
                continue
            except Exception as exc:  # the connection or the commit failed, or deadlocks
                _fail(batch, self.as_error(exc))
                return
            self.batches += 1
            self.units += len(batch)
            for unit, result in zip(batch, results):
                _settle(unit, result, None)
            return

    def _count_retry(self) -> None:
        self.retries += 1

    async def _attempt(self, batch: list[_Unit]) -> list:
        """Run the batch in one transaction; its results once committed."""
        async with self.acquire() as conn:
            db = self.database(conn)
            async with conn.transaction():
                results = []
                for index, unit in enumerate(batch):
                    try:
                        results.append(await greenlet_spawn(unit.work, db, *unit.args))
                    except RETRYABLE:
                        raise
                    except (asyncpg.InterfaceError, OSError, TimeoutError):
                        raise  # the connection, not the unit
                    except Exception as exc:
                        raise _UnitFailed(index, exc) from exc
            return results


async def retrying(attempt: Callable[[], Awaitable], on_retry: Callable[[], None] | None = None):
    """``await attempt()``, again when PostgreSQL rolled its transaction back
    to break a deadlock or a serialization conflict, up to :data:`ATTEMPTS`
    times (after a short random pause, so that the same two do not meet again
    at once); the last failure is raised. Shared by the batches here and the
    executor's other writes (asyncpg_executor.py)."""
    for attempt_number in range(1, ATTEMPTS + 1):
        try:
            return await attempt()
        except RETRYABLE as exc:
            if attempt_number == ATTEMPTS:
                raise
            if on_retry is not None:
                on_retry()
            logger.info("transaction rolled back by PostgreSQL (%s); running it again",
                        type(exc).__name__)
            await asyncio.sleep(random.uniform(0, 0.005 * attempt_number))


def _key(unit: _Unit) -> int:
    return unit.key


def _settle(unit: _Unit, result, error) -> None:
    if unit.future.done():  # its caller was cancelled; the write stands
        return
    if error is None:
        unit.future.set_result(result)
    else:
        unit.future.set_exception(error)


def _fail(batch: list[_Unit], error: BaseException) -> None:
    for unit in batch:
        _settle(unit, None, error)
