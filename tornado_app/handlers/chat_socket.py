"""The WebSocket of the spec: /ws/ai/ai-chat/{client_id}.

Per socket, frames are read in ``on_message`` and never awaited there (Tornado
reads no further frame, not even a pong, until it returns). Chat messages go
into a small list; a worker task answers them in order, so a second message
sent while a reply is in flight waits its turn. The worker exists only while
there is something to answer: an idle socket holds no task. At most
``chat.max_pending`` messages may be unanswered on a socket, the one in flight
included; one more gets an ``error`` frame.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from urllib.parse import urlsplit

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import closes, frames, logs, metrics
from ..auth import bearer_value
from ..chat import ChatService, RateLimited
from ..connections import Connections
from ..frames import Cancel, ChatMessage, FrameError
from ..history import History
from ..store import StoreError
from .base import COOKIE_NAME, request_summary

logger = logging.getLogger(__name__)

STORE_UNAVAILABLE = "The service could not save your message; please try again shortly."
QUEUE_FULL = "Too many messages are waiting for a reply; wait for the current one."
NOTHING_TO_CANCEL = "There is no reply in progress to cancel."
CANCELLED = "The reply was cancelled."
UNEXPECTED = "An unexpected error occurred while processing your message."


class ChatSocket(WebSocketHandler):
    def initialize(self) -> None:
        # The socket's whole state. open() fills in the user's part once the
        # token is checked; connections.py reads user, jti, issued_at and lease.
        self.user = None
        self.jti: str | None = None
        self.issued_at = None
        self.lease: str | None = None
        self.history: History | None = None
        self.rejections = 0  # messages refused by the rate limit in a row
        self.pending: list[ChatMessage] = []  # waiting for the worker
        self.worker: asyncio.Task | None = None  # answers ``pending``, in order
        self.current: asyncio.Task | None = None  # the exchange in flight

    @property
    def chat(self) -> ChatService:
        return self.settings["chat"]

    @property
    def connections(self) -> Connections:
        return self.settings["connections"]

    def _request_summary(self) -> str:
        return request_summary(self)

    def get_compression_options(self):
        return None  # off: compression costs memory per socket and invites CRIME-style leaks

    def check_origin(self, origin: str) -> bool:
        # Decided in open() instead: a refused browser then sees close code
        # 1008 and its reason, not a bare failed handshake.
        return True

    async def open(self, client_id: str) -> None:
        if not origin_allowed(self.request, self.chat.settings.server.allowed_origins):
            # Cross-site WebSocket hijacking: another site's page carrying our cookie.
            metrics.rejections.labels("origin").inc()
            self.close(*closes.ORIGIN_NOT_ALLOWED)
            return
        if self.connections.full:
            metrics.rejections.labels("process_connections").inc()
            self.close(*closes.TOO_MANY_CONNECTIONS)
            return
        token = self.get_query_argument("token", None) or bearer_value(self.get_cookie(COOKIE_NAME))
        try:
            identity = await self.chat.authenticate(token)
            # Accept, then close: a browser sees 1008 only on an open socket.
            if identity is None:
                metrics.rejections.labels("auth").inc()
                self.close(*closes.AUTHENTICATION_FAILED)
                return
            if not frames.valid_client_id(client_id):
                self.close(*closes.INVALID_CLIENT_ID)
                return
            user, claims = identity
            conversation_id = await self.chat.store.open_conversation(user.id, client_id)
            self.lease = await self.connections.take_slot(user.id)
        except StoreError:
            logger.exception("websocket: database unavailable while opening a socket")
            metrics.errors.labels("database").inc()
            self.close(*closes.SERVICE_UNAVAILABLE)
            return
        if self.lease is None:
            metrics.rejections.labels("user_connections").inc()
            self.close(*closes.TOO_MANY_USER_CONNECTIONS)
            return
        if self.ws_connection is None or self.ws_connection.is_closing():
            self.connections.leave(self)  # the client left while we were checking
            return
        self.user, self.jti, self.issued_at = user, claims.jti, claims.issued_at_naive
        self.history = History(conversation_id)
        self.connections.join(self)
        self._send_now(frames.frame(frames.SYSTEM, frames.WELCOME.format(username=user.username)))

    def on_message(self, message: str | bytes) -> None:
        if self.user is None:
            return
        try:
            parsed = frames.parse_client_frame(message, self.chat.settings.chat.max_content_chars)
        except FrameError as exc:
            metrics.messages.labels("invalid").inc()
            self._send_now(frames.frame(frames.ERROR, str(exc)))
            return
        if isinstance(parsed, Cancel):
            self._cancel_reply()
        elif len(self.pending) + self.busy >= self.chat.settings.chat.max_pending:
            metrics.messages.labels("queue_full").inc()
            self._send_now(frames.frame(frames.ERROR, QUEUE_FULL))
        else:
            self.pending.append(parsed)
            if self.worker is None or self.worker.done():
                self.worker = asyncio.create_task(self._work())

    @property
    def busy(self) -> bool:
        return self.current is not None and not self.current.done()

    def on_close(self) -> None:
        self.connections.leave(self)
        if self.worker is not None:
            self.worker.cancel()  # also cancels the reply in flight, which saves it

    def shut_down(self) -> asyncio.Task | None:
        """Close with 1001 for a server shutdown and cancel the reply in flight
        (which saves itself); returns the worker task to wait for, if any.
        The slot is given back now: a client that never acknowledges the close
        must not hold the shutdown up."""
        self.close(*closes.SHUTTING_DOWN)
        worker = self.worker
        if worker is not None:
            worker.cancel()
        self.connections.leave(self)
        return worker

    def _cancel_reply(self) -> None:
        if not self.busy:
            self._send_now(frames.frame(frames.ERROR, NOTHING_TO_CANCEL))
            return
        self.current.cancel()

    async def _work(self) -> None:
        while self.pending:
            message = self.pending.pop(0)
            self.current = asyncio.create_task(self._exchange(message))
            try:
                final = await self.current
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    # The socket closed, which cancelled the reply too: wait
                    # while it saves itself as cancelled, then stop.
                    await asyncio.wait([self.current])
                    raise
                await self._send(frames.frame(frames.SYSTEM, CANCELLED))
                continue
            except Exception:
                logger.exception("websocket: unexpected error in an exchange")
                metrics.errors.labels("internal").inc()
                await self._send(frames.frame(frames.ERROR, UNEXPECTED))
                self.close(*closes.UNEXPECTED_ERROR)
                return
            finally:
                self.current = None
            # Sent outside the cancellable task: once saved, a reply is delivered
            # whole, and a late cancel cannot follow it with "cancelled".
            if final is not None:
                await self._send(final)

    async def _exchange(self, message: ChatMessage) -> str | None:
        """Rate limit, answer, save; returns the final frame to send, if any."""
        # Every log line of this exchange (agents' included) carries these ids.
        logs.context.set({"exchange": secrets.token_hex(4),
                          "conversation": self.history.conversation_id,
                          "user": self.user.username})
        try:
            on_chunk = self._send_chunk if message.stream else None
            reply = await self.chat.answer(self.user, self.history, message.content, on_chunk)
        except RateLimited as exc:
            await self._rate_limited(exc.retry_after)
            return
        except StoreError:
            logger.exception("websocket: database error during an exchange")
            metrics.errors.labels("database").inc()
            await self._send(frames.frame(frames.ERROR, STORE_UNAVAILABLE))
            return
        self.rejections = 0
        if reply.ok:
            return frames.frame(frames.AI_RESPONSE, reply.text)
        return frames.frame(frames.ERROR, reply.error_text())

    async def _rate_limited(self, retry_after: float) -> None:
        self.rejections += 1
        metrics.messages.labels("rate_limited").inc()
        metrics.rejections.labels("rate_limit").inc()
        await self._send(frames.frame(
            frames.ERROR,
            f"Rate limit exceeded: try again in {max(retry_after, 0.1):.1f} seconds.",
        ))
        if self.rejections >= self.chat.settings.rate_limit.max_rejections:
            logger.info("websocket: closing %s for sending while rate limited", self.user.username)
            self.close(*closes.RATE_LIMIT_EXCEEDED)

    async def _send_chunk(self, piece: str) -> None:
        await self._send(frames.frame(frames.AI_RESPONSE_CHUNK, piece))

    async def _send(self, text: str) -> None:
        """Send a frame, waiting (up to server.write_timeout_seconds) until it is
        handed to the kernel. Always an await point, so that a cancellation (the
        socket closed) lands even while an agent yields without awaiting."""
        try:
            written = self.write_message(text)
        except WebSocketClosedError:
            await asyncio.sleep(0)  # the client left; what it missed is in the transcript
            return
        # asyncio.wait, not wait_for: cancelling Tornado's write future breaks its callback.
        done, _ = await asyncio.wait({written}, timeout=self.chat.settings.server.write_timeout_seconds)
        if done:
            if written.exception() is not None and not isinstance(
                written.exception(), (WebSocketClosedError, StreamClosedError)
            ):
                raise written.exception()
            return
        # A client that does not read would make us buffer without bound: close
        # it, and stop generating for it (the reply is saved as cancelled).
        logger.info("websocket: closing a socket whose client stopped reading")
        self.close(*closes.CLIENT_TOO_SLOW)
        if self.worker is not None:
            self.worker.cancel()
        await asyncio.sleep(0)

    def _send_now(self, text: str) -> None:
        """Queue a frame without waiting (from on_message and open)."""
        try:
            self.write_message(text)
        except WebSocketClosedError:
            pass


def origin_allowed(request, allowed: list[str]) -> bool:
    """No Origin header (a script, not a browser), or an allowed one.

    With no allowlist only the page's own origin passes (its host and port equal
    the Host the request was sent to); with one, the exact scheme://host[:port].
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if allowed:
        return origin in {entry.strip().rstrip("/").lower() for entry in allowed}
    return urlsplit(origin).netloc == request.host.lower()


routes = [(r"/ws/ai/ai-chat/([^/]+)", ChatSocket)]
