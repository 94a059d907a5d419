"""The WebSocket of the spec: /ws/ai/ai-chat/{client_id}, and protocol v2.

Per socket, frames are read in ``on_message`` and never awaited there (Tornado
reads no further frame, not even a pong, until it returns). Chat messages go
into a small list; a worker task answers them in order, so a second message
sent while a reply is in flight waits its turn. The worker exists only while
there is something to answer: an idle socket holds no task. At most
``chat.max_pending`` messages may be unanswered on a socket, the one in flight
included; one more gets an ``error`` frame.

The reply itself runs in a task of its own (replies.py): the socket listens
to it. When the socket closes, the reply goes on to its end unless
``chat.finish_after_disconnect`` is false. A client that asks for the
``ai-chat.v2`` subprotocol gets ids on the frames about replies, an ``ack`` per
message, the ``resume`` and ``cancel``-by-id actions, and the conversation
controls: ``feedback`` (beside the queue), ``regenerate`` and ``edit`` (messages,
in the queue), ``switch`` and ``use_agent`` (in the queue, in order with the
messages) (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
from urllib.parse import urlsplit

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import closes, frames, logs, metrics
from ..auth import bearer_value
from ..chat import STORE_UNAVAILABLE, ChatService, QuotaExceeded, RateLimited, UnknownTarget
from ..connections import Connections
from ..frames import Cancel, ChatMessage, Feedback, FrameError, Resume, Switch, UseAgent
from ..history import History
from ..replies import UNEXPECTED, Chunk, Ending, Listener, LiveReply
from ..store import StoreError
from ..store.store import Branching
from ..tool_loop import ToolEvent
from ..store.models import STATUS_CANCELLED, STATUS_OK
from .base import COOKIE_NAME, request_summary

logger = logging.getLogger(__name__)

QUEUE_FULL = "Too many messages are waiting for a reply; wait for the current one."
NOTHING_TO_CANCEL = "There is no reply in progress to cancel."
UNKNOWN_REPLY = "There is no such reply of yours."


class ChatSocket(WebSocketHandler):
    def initialize(self) -> None:
        # The socket's whole state. open() fills in the user's part once the
        # token is checked; connections.py reads user, jti, issued_at and lease.
        self.user = None
        self.jti: str | None = None
        self.issued_at = None
        self.lease: str | None = None
        self.history: History | None = None
        self.v2 = False  # the client asked for the ai-chat.v2 subprotocol
        self.rejections = 0  # messages refused by the rate limit in a row
        self.pending: list[ChatMessage | Switch | UseAgent] = []  # waiting for the worker
        self.worker: asyncio.Task | None = None  # answers ``pending``, in order
        self.busy = False  # an exchange is under way (being admitted or answered)
        self.replying: LiveReply | None = None  # the reply the worker waits for
        self.cancel_next = False  # a cancel came before the reply existed
        self.extras: set[asyncio.Task] = set()  # v2 actions: resume, cancel by id

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

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Any other (or none): the spec's protocol, and no subprotocol echoed.
        return frames.V2 if frames.V2 in subprotocols else None

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
            # v2: the replies in flight are read before this socket can start
            # one of its own (no frame is read until open() returns).
            in_progress = (await self.chat.store.live_replies(conversation_id)
                           if self.selected_subprotocol == frames.V2 else [])
            chosen = (await self.chat.store.conversation_agent(conversation_id)
                      if self.selected_subprotocol == frames.V2 else None)
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
        self.v2 = self.selected_subprotocol == frames.V2
        self.history = History(conversation_id, client_id=client_id)
        self.connections.join(self)
        self._send_now(frames.frame(frames.SYSTEM, frames.WELCOME.format(username=user.username)))
        if self.v2:  # what a client needs to draw an agent picker
            self._send_now(frames.frame(frames.SYSTEM, "", agent=self.chat.agent_name(chosen),
                                        selectable=self.chat.settings.agent.choices()))
        # v2: name the conversation's replies in flight (on any instance), so
        # that a client that lost its state can resume them.
        for row in in_progress:
            live = self.chat.replies.local(row.reply_id)
            seq = live.last_seq if live is not None else row.last_seq
            self._send_now(frames.frame(frames.SYSTEM, frames.IN_PROGRESS,
                                        reply_id=row.reply_id, message_id=row.message_id,
                                        seq=seq))

    def on_message(self, message: str | bytes) -> None:
        if self.user is None:
            return
        try:
            parsed = frames.parse_client_frame(
                message, self.chat.settings.chat.max_content_chars, self.v2)
        except FrameError as exc:
            metrics.messages.labels("invalid").inc()
            self._send_now(frames.frame(frames.ERROR, str(exc)))
            return
        if isinstance(parsed, Cancel):
            if parsed.reply_id is None:
                self._cancel_own_reply()
            else:
                self._extra(self._cancel_by_id(parsed.reply_id))
        elif isinstance(parsed, Resume):
            self._extra(self._resume(parsed.reply_id, parsed.after_seq, parsed.tools_seen))
        elif isinstance(parsed, Feedback):
            self._extra(self._feedback(parsed))
        elif len(self.pending) + self.busy >= self.chat.settings.chat.max_pending:
            metrics.messages.labels("queue_full").inc()
            self._send_now(frames.frame(frames.ERROR, QUEUE_FULL))
        else:
            self.pending.append(parsed)
            if self.worker is None or self.worker.done():
                self.worker = asyncio.create_task(self._work())

    def on_close(self) -> None:
        self.connections.leave(self)
        if self.worker is not None:
            self.worker.cancel()  # stops listening; the reply itself goes on (see _work)
        for task in self.extras:
            task.cancel()

    def shut_down(self) -> asyncio.Task | None:
        """Close with 1001 for a server shutdown (the replies were given their
        grace and ended before); returns the worker task to wait for, if any.
        The slot is given back now: a client that never acknowledges the close
        must not hold the shutdown up."""
        self.close(*closes.SHUTTING_DOWN)
        worker = self.worker
        if worker is not None:
            worker.cancel()
        self.connections.leave(self)
        return worker

    def _cancel_own_reply(self) -> None:
        """``{"action": "cancel"}``: the reply this socket waits for."""
        if self.replying is not None and self.replying.cancel():
            return
        if self.busy and self.replying is None:
            self.cancel_next = True  # still being admitted: cancel it as it starts
            return
        self._send_now(frames.frame(frames.ERROR, NOTHING_TO_CANCEL))

    async def _cancel_by_id(self, reply_id: str) -> None:
        """v2 ``{"action": "cancel", "reply_id": ...}``: any reply of the user,
        on any instance. This socket gets the cancelled frame too."""
        own = self.replying is not None and self.replying.reply_id == reply_id
        listener = None
        if not own:
            # Listen before cancelling, so that the end cannot be missed.
            listener = await self.chat.replies.listen(reply_id, self.user.id, after_seq=1 << 62)
        if listener is None and not own:
            await self._send(frames.frame(frames.ERROR, UNKNOWN_REPLY))
            return
        if not await self.chat.replies.cancel(reply_id, self.user.id):
            if listener is not None:
                listener.close()
            await self._send(frames.frame(frames.ERROR, NOTHING_TO_CANCEL))
            return
        if listener is not None:
            await self._forward(listener, stream=False)

    async def _resume(self, reply_id: str, after_seq: int, tools_seen: int | None = None) -> None:
        """v2 ``{"action": "resume", ...}``: the chunks after ``after_seq`` (and
        the tool frames among them), the live ones, then the end, of any reply
        of the user on any instance."""
        listener = await self.chat.replies.listen(reply_id, self.user.id, after_seq, tools_seen)
        if listener is None:
            await self._send(frames.frame(frames.ERROR, UNKNOWN_REPLY))
            return
        await self._forward(listener, stream=True)

    # Conversation controls (v2): feedback, switch, use_agent. Regenerate and
    # edit are messages (ChatMessage.branch), answered by _exchange.

    async def _feedback(self, feedback: Feedback) -> None:
        if await self.chat.store.set_feedback(self.user.id, feedback.reply_id, feedback.rating,
                                              feedback.comment):
            await self._send(frames.frame(frames.SYSTEM, frames.FEEDBACK_THANKS,
                                          reply_id=feedback.reply_id))
        else:
            await self._send(frames.frame(frames.ERROR, UNKNOWN_REPLY))

    async def _control(self, action: Switch | UseAgent) -> None:
        conversation_id = self.history.conversation_id
        if isinstance(action, Switch):
            path = await self.chat.store.switch_branch(conversation_id, action.message_id)
            if path is None:
                await self._send(frames.frame(frames.ERROR, frames.UNKNOWN_MESSAGE))
            else:
                await self._send(frames.frame(frames.SYSTEM, frames.SWITCHED, path=path))
            return
        choices = self.chat.settings.agent.choices()
        if action.agent not in choices:
            await self._send(frames.frame(frames.ERROR, frames.UNKNOWN_AGENT.format(
                agent=action.agent, choices=", ".join(choices))))
            return
        await self.chat.store.set_conversation_agent(conversation_id, action.agent)
        await self._send(frames.frame(frames.SYSTEM,
                                      frames.NOW_ANSWERING.format(agent=action.agent),
                                      agent=action.agent))

    def _extra(self, coroutine) -> None:
        """Run a v2 action (or announcement) beside the worker; the socket's
        close cancels it."""
        task = asyncio.create_task(self._guarded(coroutine))
        self.extras.add(task)
        task.add_done_callback(self.extras.discard)

    async def _guarded(self, coroutine) -> None:
        try:
            await coroutine
        except StoreError:
            logger.exception("websocket: database error in a v2 action")
            metrics.errors.labels("database").inc()
            await self._send(frames.frame(frames.ERROR, STORE_UNAVAILABLE))

    async def _work(self) -> None:
        while self.pending:
            message = self.pending.pop(0)
            self.busy = True
            try:
                if isinstance(message, ChatMessage):
                    await self._exchange(message)
                else:  # switch, use_agent: in order with the messages around them
                    await self._guarded(self._control(message))
            except asyncio.CancelledError:
                # The socket is closing. Its reply goes on to its end, unless
                # the operator prefers to save the compute.
                if self.replying is not None and not self.chat.settings.chat.finish_after_disconnect:
                    self.replying.cancel()
                raise
            except Exception:
                logger.exception("websocket: unexpected error in an exchange")
                metrics.errors.labels("internal").inc()
                await self._send(frames.frame(frames.ERROR, UNEXPECTED))
                self.close(*closes.UNEXPECTED_ERROR)
                return
            finally:
                self.busy, self.replying, self.cancel_next = False, None, False

    async def _exchange(self, message: ChatMessage) -> None:
        """Admit the message, start its reply, pass the reply on."""
        # Every log line of this exchange (agents' included) carries these ids.
        # A log line's tag, not a secret: no system call per exchange.
        logs.context.set({"exchange": f"{random.getrandbits(32):08x}",
                          "conversation": self.history.conversation_id,
                          "user": self.user.username})
        branching = Branching(message.branch, message.target) if message.branch else None
        try:
            admission, turns = await self.chat.admit(self.user, self.history, message.content,
                                                     branching)
        except RateLimited as exc:
            await self._rate_limited(exc.retry_after)
            return
        except QuotaExceeded as exc:
            await self._over_quota(str(exc))
            return
        except UnknownTarget:
            await self._send(frames.frame(frames.ERROR, unknown_target(message)))
            return
        except StoreError:
            logger.exception("websocket: database error during an exchange")
            metrics.errors.labels("database").inc()
            await self._send(frames.frame(frames.ERROR, STORE_UNAVAILABLE))
            return
        self.rejections = 0
        if await self.chat.drop_unavailable_agent(self.history.conversation_id, admission.agent):
            if self.v2:
                await self._send(frames.frame(frames.SYSTEM, frames.AGENT_GONE.format(
                    agent=admission.agent, backend=self.chat.settings.agent.backend),
                    agent=self.chat.settings.agent.backend))
        live = self.chat.start_reply(self.user, self.history, admission, turns,
                                     admission.content)
        self.replying = live
        if self.cancel_next:
            live.cancel()
        listener = live.listen(chunks=message.stream)
        if self.v2:
            await self._send(frames.frame(frames.ACK, "", message_id=live.message_id,
                                          reply_id=live.reply_id))
        await self._forward(listener, stream=message.stream)

    async def _forward(self, listener: Listener, stream: bool) -> None:
        """Send a reply's chunks (if ``stream``) and its final frame."""
        v2 = self.v2
        ids = {"reply_id": listener.reply_id, "message_id": listener.message_id} if v2 else {}
        try:
            async for event in listener.events():
                if isinstance(event, Chunk):
                    if stream:
                        extra = {**ids, "seq": event.seq} if v2 else ids
                        await self._send(frames.frame(frames.AI_RESPONSE_CHUNK, event.text,
                                                      **extra))
                elif isinstance(event, ToolEvent):
                    if stream and v2:  # v1 clients see nothing of tools
                        await self._send(frames.tool_frame(event, listener.reply_id))
                else:
                    await self._send(final_frame(event, ids))
        finally:
            listener.close()

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

    async def _over_quota(self, text: str) -> None:
        # Not a rejection in a row (rate_limit.max_rejections): a user over
        # budget is not abusing the socket, and may still cancel or resume.
        metrics.messages.labels("quota").inc()
        metrics.rejections.labels("quota").inc()
        await self._send(frames.frame(frames.ERROR, text))

    async def _send(self, text: str) -> None:
        """Send a frame, waiting (up to server.write_timeout_seconds) until it is
        handed to the kernel. Always an await point."""
        try:
            written = self.write_message(text)
        except WebSocketClosedError:
            await asyncio.sleep(0)  # the client left; what it missed is in the transcript
            return
        # One turn of the loop lets the write's task finish: it has, unless the
        # kernel's buffer was full (the wait below is for that case only).
        await asyncio.sleep(0)
        done = written.done()
        if not done:
            # asyncio.wait, not wait_for: cancelling Tornado's write future breaks its callback.
            done, _ = await asyncio.wait(
                {written}, timeout=self.chat.settings.server.write_timeout_seconds)
        if done:
            if written.exception() is not None and not isinstance(
                written.exception(), (WebSocketClosedError, StreamClosedError)
            ):
                raise written.exception()
            return
        # A client that does not read would make us buffer without bound: close
        # it (its reply goes on, or is cancelled, as on any close).
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


def unknown_target(message: ChatMessage) -> str:
    """The error of an edit or regenerate whose message or reply is unknown."""
    if message.branch == "edit":
        return frames.UNKNOWN_MESSAGE
    return UNKNOWN_REPLY if message.target is not None else frames.NOTHING_TO_REGENERATE


def final_frame(ending: Ending, ids: dict) -> str:
    """The frame that ends a reply: its text, its error, or that it was cancelled."""
    if ending.status == STATUS_OK:
        return frames.frame(frames.AI_RESPONSE, ending.text, **ids)
    if ending.status == STATUS_CANCELLED:
        return frames.frame(frames.SYSTEM, frames.CANCELLED, **ids)
    return frames.frame(frames.ERROR, ending.error, **ids)


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
