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
import re
import secrets
from urllib.parse import urlsplit

from sqlalchemy.exc import SQLAlchemyError
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import frames, logs, metrics
from ..auth import bearer_value
from ..chat import ChatService, RateLimited, error_text
from ..connections import Connections
from ..frames import Cancel, ChatMessage, FrameError
from ..history import History
from .base import COOKIE_NAME, request_summary

logger = logging.getLogger(__name__)

CLIENT_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")

# Close codes (RFC 6455 and DESIGN.md).
NORMAL = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
SERVER_ERROR = 1011
TRY_AGAIN_LATER = 1013

STORE_UNAVAILABLE = "The service could not save your message; please try again shortly."
QUEUE_FULL = "Too many messages are waiting for a reply; wait for the current one."
NOTHING_TO_CANCEL = "There is no reply in progress to cancel."
CANCELLED = "The reply was cancelled."
UNEXPECTED = "An unexpected error occurred while processing your message."


class ChatSocket(WebSocketHandler):
    user = None
    lease: str | None = None
    worker: asyncio.Task | None = None
    current: asyncio.Task | None = None

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
            self.close(POLICY_VIOLATION, "Origin not allowed")
            return
        if self.connections.full:
            metrics.rejections.labels("process_connections").inc()
            self.close(TRY_AGAIN_LATER, "Too many connections")
            return
        token = self.get_query_argument("token", None) or bearer_value(self.get_cookie(COOKIE_NAME))
        try:
            identity = await self.chat.authenticate(token)
            # Accept, then close: a browser sees 1008 only on an open socket.
            if identity is None:
                metrics.rejections.labels("auth").inc()
                self.close(POLICY_VIOLATION, "Authentication failed")
                return
            if not CLIENT_ID.fullmatch(client_id):
                self.close(POLICY_VIOLATION, "Invalid client_id")
                return
            user, claims = identity
            conversation_id = await self.chat.store.open_conversation(user.id, client_id)
            self.lease = await self.connections.take_slot(user.id)
        except (SQLAlchemyError, OSError):
            logger.exception("websocket: database unavailable while opening a socket")
            metrics.errors.labels("database").inc()
            self.close(SERVER_ERROR, "Service unavailable")
            return
        if self.lease is None:
            metrics.rejections.labels("user_connections").inc()
            self.close(TRY_AGAIN_LATER, "Too many connections for this user")
            return
        if self.ws_connection is None or self.ws_connection.is_closing():
            self.connections.leave(self)  # the client left while we were checking
            return
        self.user, self.jti, self.issued_at = user, claims.jti, claims.issued_at_naive
        self.history = History(conversation_id)
        self.rejections = 0
        self.pending: list[ChatMessage] = []
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
                self.close(SERVER_ERROR, "Unexpected server error")
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
        except (SQLAlchemyError, OSError):
            logger.exception("websocket: database error during an exchange")
            metrics.errors.labels("database").inc()
            await self._send(frames.frame(frames.ERROR, STORE_UNAVAILABLE))
            return
        self.rejections = 0
        if reply.ok:
            return frames.frame(frames.AI_RESPONSE, reply.text)
        return frames.frame(frames.ERROR, error_text(reply))

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
            self.close(POLICY_VIOLATION, "Rate limit exceeded")

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
        self.close(POLICY_VIOLATION, "Client too slow")
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
