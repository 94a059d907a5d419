"""PostgreSQL's LISTEN/NOTIFY: how an instance learns at once that a reply of
another instance changed (new chunks, its end, a cancel request).

Writers notify inside their transaction (streams.notify), so the
notification arrives when the change is committed. Each process listens on
one connection of its own, outside the engine's pool, and reconnects with
backoff when it is lost; meanwhile the replies fall back to polling.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from .asyncpg_executor import connect_args
from .streams import CHANNEL

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0


class Notifications:
    """Calls ``on_notify(reply_ids)`` for every notification, and
    ``on_state(listening)`` when listening starts or stops."""

    def __init__(self, engine: AsyncEngine, timeout: float,
                 on_notify: Callable[[list[str]], None], on_state: Callable[[bool], None]):
        self.connect_args = connect_args(engine)
        self.timeout = timeout
        self.on_notify = on_notify
        self.on_state = on_state
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listen_forever(self) -> None:
        backoff = 1.0
        while True:
            lost = asyncio.Event()
            conn = None
            try:
                conn = await asyncpg.connect(**self.connect_args, timeout=self.timeout)
                conn.add_termination_listener(lambda _conn: lost.set())
                await conn.add_listener(CHANNEL, self._received)
                self.on_state(True)
                backoff = 1.0
                await lost.wait()
                logger.warning("notifications: connection lost; polling until it is back")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                logger.warning("notifications: cannot listen (%s); retrying in %.0fs",
                               type(exc).__name__, backoff)
            finally:
                self.on_state(False)
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _received(self, _conn, _pid, _channel, payload: str) -> None:
        self.on_notify(payload.split(","))
