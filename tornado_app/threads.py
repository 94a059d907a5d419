"""Handing results from a worker thread back to asyncio event loops.

The SQLite batcher (store/sqlite_batcher.py) and the local model's engine
(plugins/transformers_batching.py) both run on a thread of their own and
finish many callers' work at once. Waking an event loop is a system call, so
each finished batch wakes every loop once, with all of that loop's items.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable


def call_in_loops(
    items: Iterable[tuple[asyncio.AbstractEventLoop, Any]], handler: Callable[[list], None]
) -> None:
    """From any thread: run ``handler(items_of_that_loop)`` in each loop, one
    ``call_soon_threadsafe`` per loop. A closed loop's items are dropped:
    nobody waits for them there any more."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for loop, item in items:
        by_loop.setdefault(loop, []).append(item)
    for loop, loop_items in by_loop.items():
        try:
            loop.call_soon_threadsafe(handler, loop_items)
        except RuntimeError:
            pass
