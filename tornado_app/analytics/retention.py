"""Retention: purge old transcripts, keep the rollups; and the periodic task.

``analytics.retention_days: N`` deletes messages older than N whole UTC days
(everything before midnight N days ago), then the conversations left without
messages. Users, rollups (``analytics_daily``, ``analytics_daily_percentiles``,
``analytics_rollup_days``), rate-limit state and conversations that still have
newer messages are kept. Days are always rolled up before their messages are
deleted, and a day that is not rolled up is never purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from ..store.models import Conversation, Message, utcnow
from .rollup import DAY, midnight, roll_up, rollup_days

logger = logging.getLogger(__name__)

messages = Message.__table__
conversations = Conversation.__table__
# Messages deleted per transaction: short write locks, so that chats go on
# while a large backlog is purged.
BATCH = 5000


@dataclass(frozen=True)
class PurgeResult:
    cutoff: datetime
    messages: int
    conversations: int


async def purge(
    engine: AsyncEngine, retention_days: int, now: datetime | None = None, batch: int = BATCH
) -> PurgeResult:
    """Delete transcripts older than ``retention_days`` whole days (rollups first)."""
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    now = now or utcnow()
    await roll_up(engine, now)
    cutoff = await _rolled_up_until(engine, retention_cutoff(now, retention_days))
    deleted = 0
    while True:
        async with engine.begin() as conn:
            oldest = select(messages.c.id).where(messages.c.created_at < cutoff).limit(batch)
            result = await conn.execute(delete(messages).where(messages.c.id.in_(oldest)))
        deleted += result.rowcount
        if result.rowcount < batch:
            break
        await asyncio.sleep(0)
    async with engine.begin() as conn:
        has_messages = exists().where(messages.c.conversation_id == conversations.c.id)
        result = await conn.execute(
            delete(conversations).where(conversations.c.created_at < cutoff, ~has_messages)
        )
        # Their rollups stay, but no longer match the rows left (see rollup.Plan).
        await conn.execute(
            update(rollup_days)
            .where(rollup_days.c.day < cutoff.date(), rollup_days.c.purged_at.is_(None))
            .values(purged_at=utcnow())
        )
    return PurgeResult(cutoff, deleted, result.rowcount)


async def _rolled_up_until(engine: AsyncEngine, cutoff: datetime) -> datetime:
    """``cutoff``, or the start of the first earlier day that is not rolled up."""
    async with engine.connect() as conn:
        oldest = (await conn.execute(select(func.min(messages.c.created_at)))).scalar()
        if oldest is None or oldest >= cutoff:
            return cutoff
        done = set((await conn.execute(
            select(rollup_days.c.day).where(rollup_days.c.day >= oldest.date(),
                                            rollup_days.c.day < cutoff.date())
        )).scalars())
    day = oldest.date()
    while day < cutoff.date():
        if day not in done:
            return midnight(day)
        day += DAY
    return cutoff


class AnalyticsTask:
    """In the service: roll up finished days and apply retention, every interval.

    The first round runs at start-up (in the background), so a restarted
    server catches up at once. Failures are logged and retried next round.
    """

    def __init__(self, engine: AsyncEngine, retention_days: int | None, interval: float):
        self.engine = engine
        self.retention_days = retention_days
        self.interval = interval
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        logger.info("analytics: rollups and retention run in this process (every %.0f s)",
                    self.interval)
        self.task = asyncio.create_task(self._run(), name="analytics")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def run_once(self) -> None:
        await roll_up(self.engine)
        if self.retention_days:
            result = await purge(self.engine, self.retention_days)
            if result.messages or result.conversations:
                logger.info("analytics: purged %d messages and %d conversations before %s",
                            result.messages, result.conversations, f"{result.cutoff:%Y-%m-%d}")

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # a database hiccup must not end the task
                logger.exception("analytics: rollup or retention failed; retrying in %.0fs",
                                 self.interval)
            await asyncio.sleep(self.interval)


def retention_cutoff(now: datetime, retention_days: int) -> datetime:
    """Where a purge with ``retention_days`` would cut (for messages to the operator)."""
    return midnight(now.date()) - timedelta(days=retention_days)
