"""The open sockets of this process: their slots, and the checks that close them.

Every authenticated socket takes a connection slot (a lease row, see
store/leases.py) so that ``limits.connections_per_user`` holds across every
process and instance sharing the database. Two periodic tasks run per process:

- renew: every third of ``limits.lease_seconds``, one transaction extends the
  leases of all of this process's sockets and of its replies in flight
  (replies.py), then any reply whose process stopped renewing is saved as
  interrupted;
- recheck: every ``auth.recheck_seconds``, the users and tokens behind the open
  sockets are read again; a disabled user or a revoked token closes the
  socket with 1008, on whichever instance it is. About once an hour the same
  job forgets the revocations of tokens that have expired anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

from . import closes, metrics
from .closes import Close
from .config import Settings
from .replies import Replies
from .store import Store, StoreUnavailable

logger = logging.getLogger(__name__)


def instance_name() -> str:
    """This process's name in lease rows: unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Connections:
    # How often the recheck also purges expired revocations.
    purge_every_seconds = 3600.0

    def __init__(self, settings: Settings, store: Store, replies: Replies):
        self.settings = settings
        self.store = store
        self.replies = replies
        self.instance = replies.instance
        self.sockets: set = set()
        self._to_release: set[str] = set()
        self._releases: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._purged_at = time.monotonic()

    @property
    def full(self) -> bool:
        return len(self.sockets) >= self.settings.limits.connections_per_process

    async def take_slot(self, user_id: int) -> str | None:
        limits = self.settings.limits
        return await self.store.acquire_lease(
            user_id, self.instance, time.time(), limits.lease_seconds,
            limits.connections_per_user,
        )

    def join(self, sock) -> None:
        self.sockets.add(sock)
        metrics.open_sockets.inc()

    def leave(self, sock) -> None:
        """Forget a closed socket and give its slot back (in the background)."""
        if sock in self.sockets:
            self.sockets.discard(sock)
            metrics.open_sockets.dec()
        lease_id, sock.lease = sock.lease, None
        if lease_id is not None:
            task = asyncio.get_running_loop().create_task(self.release_slot(lease_id))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def release_slot(self, lease_id: str) -> None:
        try:
            await self.store.release_lease(lease_id)
        except StoreUnavailable:
            # renew() extends every lease of this instance: it must not keep
            # this one alive, so it deletes it on its next run.
            self._to_release.add(lease_id)
            logger.warning("could not release a connection slot now; retrying later")

    def start(self) -> None:
        lease_every = self.settings.limits.lease_seconds / 3
        self._tasks = [
            asyncio.create_task(self._every(lease_every, self.renew)),
            asyncio.create_task(self._every(self.settings.auth.recheck_seconds, self.recheck)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._releases, return_exceptions=True)

    async def _every(self, seconds: float, job) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except StoreUnavailable as exc:
                logger.warning("%s failed (%s); retrying in %.0fs", job.__name__, exc, seconds)
            except Exception:  # a bug: say so, and keep the job alive
                logger.exception("%s failed; retrying in %.0fs", job.__name__, seconds)

    async def renew(self) -> None:
        for lease_id in list(self._to_release):
            await self.store.release_lease(lease_id)
            self._to_release.discard(lease_id)
        await self.store.renew_leases(
            self.instance, time.time(), self.settings.limits.lease_seconds,
            list(self.replies.live))
        await self.replies.sweep()
        # Here too, so that a search finds little left to index (recall's
        # index fills in bulk, store/message_search.py).
        await self.store.fill_search_index()

    async def recheck(self) -> None:
        """Close sockets whose user was disabled or whose token was revoked."""
        if time.monotonic() - self._purged_at >= self.purge_every_seconds:
            self._purged_at = time.monotonic()
            await self.store.purge_revocations()
        sockets = list(self.sockets)
        if not sockets:
            return
        users, revoked = await self.store.token_states(
            {s.user.id for s in sockets}, {s.jti for s in sockets})
        for sock in sockets:
            close = refusal(users.get(sock.user.id), sock.jti, sock.issued_at, revoked)
            if close is not None:
                logger.info("closing a socket of user %s: %s", sock.user.id, close.reason)
                sock.close(*close)


def refusal(user, jti: str, issued_at, revoked_jtis: set[str]) -> Close | None:
    """Why a token of this user may no longer be used, or None if it may."""
    if user is None or user.disabled:
        return closes.ACCOUNT_DISABLED
    if jti in revoked_jtis:
        return closes.TOKEN_REVOKED
    if user.tokens_revoked_before is not None and issued_at < user.tokens_revoked_before:
        return closes.TOKEN_REVOKED
    return None
