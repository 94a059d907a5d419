"""Several worker processes on one port, as Tornado's ``fork_processes`` does.

The parent binds the listening sockets, then forks ``count`` children that
each run the whole service on those sockets (the kernel spreads connections
over them). Unlike ``fork_processes``, the parent stays a small supervisor
that forwards SIGTERM, SIGINT and SIGHUP to every child, restarts a child
that crashed, and exits once all children have exited after a stop. Every
limit that must hold across processes lives in the database, not here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time

from . import metrics

logger = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A child that crashes sooner than this after its start is not restarted
# (a bad config or a broken database would otherwise restart for ever).
MIN_UPTIME_SECONDS = 5.0
PR_SET_PDEATHSIG = 1


def fork_workers(count: int) -> int | None:
    """In each child: returns its index (0..count-1). In the parent: supervises,
    and returns None once every child has exited."""
    children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def spawn(index: int) -> bool:
        pid = os.fork()
        if pid == 0:
            for signum in FORWARDED:  # the child's event loop installs its own
                signal.signal(signum, signal.SIG_DFL)
            _stop_with_parent()
            return True
        children[pid] = (index, time.monotonic())
        return False

    for index in range(count):
        if spawn(index):
            return index
    for signum in FORWARDED:
        signal.signal(signum, forward)
    logger.info("supervising %d worker processes", count)

    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index, started = children.pop(pid)
        metrics.process_exited(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping or code == 0:
            continue
        if time.monotonic() - started < MIN_UPTIME_SECONDS:
            logger.error("worker %d exited with %d right after starting; not restarting",
                         index, code)
            continue
        logger.error("worker %d exited with %d; restarting it", index, code)
        if spawn(index):
            return index
    return None


def _stop_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by kill -9,
    so that no worker is left serving on its own."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: a stopped supervisor's workers run until stopped
