"""Replies that belong to their conversation, not to the socket that asked.

A reply starts when the user's message is admitted: ``Store.admit`` saves the
message and opens the reply's *stream* row, leased to this process. From
then on (docs/architecture.md, "Durable replies"):

- **It runs in a task of its own** (:class:`LiveReply`, kept by this
  process's :class:`Replies`), not in the socket's. A socket that closes only
  stops listening; the reply goes on to its end (bounded by
  ``agent.timeout_seconds``) unless ``chat.finish_after_disconnect`` is false.
- **Listeners.** The socket that asked, and any socket that resumes the reply,
  listen to it: each gets every chunk (``seq`` 0, 1, 2, ...) and then the end,
  through a queue of its own, so a slow socket never slows the reply.
- **Chunks are saved in batches**: every ``FLUSH_SECONDS`` one transaction
  saves the new chunks of all of this process's replies. So a socket on any
  instance can resume a reply in flight, and a reply whose process dies keeps
  what it had generated. When the reply is saved whole its chunks are dropped
  in the same transaction; the stream row keeps their lengths (to cut the
  saved text into the same chunks for a late resume) for
  ``chat.resume_window_seconds``.
- **Another instance's reply is watched**: its new chunks and its end are read
  from the database when PostgreSQL notifies this process (LISTEN/NOTIFY), or
  on SQLite every ``POLL_SECONDS``.
- **Leases.** This process renews its streams' leases with its connection
  slots (``limits.lease_seconds``). Any process saves a reply whose lease ran
  out (its process was killed) as failed, ``error_kind`` ``interrupted``, with
  the text saved so far, and its watchers get the end.
- **Cancel by id**, from any socket of the user on any instance: a reply of
  this process is cancelled at once; another's gets a cancel request in its
  stream row, which its process reads at its next flush or poll.
- **Tool events** (the v2 ``tool_call`` / ``tool_result`` frames) are kept
  with the chunks, in order, each as a :class:`ToolMark`: the event and the
  chunk it came after (``follows``). They are
  saved with the chunks' flush (the stream row's ``tool_events``, JSON, kept
  for the resume window like the chunk lengths), and a resume replays them
  in place among the chunks (:class:`Cursor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import AsyncIterator, Awaitable, Callable

from .reply import Reply
from .store import Store, StoreError
from .store.models import STATUS_CANCELLED, STATUS_ERROR, STATUS_OK, utcnow
from .store.streams import cut
from .tool_loop import ToolEvent

logger = logging.getLogger(__name__)

# How often the chunks of replies in flight are saved: at most this much text
# is lost when a process dies, and a resume on another instance lags by this.
FLUSH_SECONDS = 0.1
# How often, without PostgreSQL's notifications, watched replies and cancel
# requests are read (with them: a safety net in case one is missed).
POLL_SECONDS = 0.1
NOTIFIED_POLL_SECONDS = 2.0

INTERRUPTED = "The reply was interrupted (reference {ref})."
UNEXPECTED = "An unexpected error occurred while processing your message."


@dataclass(frozen=True)
class Ending:
    """How a reply ended: ``status`` ok, error or cancelled; ``text`` the
    whole reply; ``error`` the error frame's text (status error only)."""

    status: str
    text: str
    error: str | None = None


@dataclass(frozen=True)
class Chunk:
    seq: int
    text: str


@dataclass(frozen=True)
class ToolMark:
    """A tool event of a reply, which came after the chunk of seq ``follows``
    (-1: before any chunk). A reply keeps its marks in a list, in order."""

    follows: int
    event: ToolEvent


def marks_json(marks: list[ToolMark]) -> str | None:
    """A reply's tool marks as its stream row keeps them (None: none)."""
    if not marks:
        return None
    return json.dumps([{"follows": m.follows, "name": m.event.name, "call_id": m.event.call_id,
                        "arguments": m.event.arguments, "ok": m.event.ok} for m in marks],
                      ensure_ascii=False)


def marks_from_json(text: str | None) -> list[ToolMark]:
    return [ToolMark(item["follows"], ToolEvent(item["name"], item["call_id"], item["arguments"],
                                                item["ok"]))
            for item in (json.loads(text) if text else [])]


@dataclass
class Cursor:
    """How far one listener has got in a reply: the last chunk given
    (``after_seq``) and the number of tool marks looked at (``tools_seen``).
    A resume that does not say how many tool frames it got (``tools_seen``
    None) is given those that came after its chunk ``after_seq`` (``floor``):
    it got the ones before with the chunks that followed them."""

    after_seq: int = -1
    tools_seen: int | None = None
    floor: int = -1

    def __post_init__(self):
        if self.tools_seen is None:
            self.tools_seen, self.floor = 0, self.after_seq

    def replay(self, listener: "Listener", chunks: list[Chunk], marks: list[ToolMark]) -> None:
        """Give the listener the chunks and marks it lacks, in the order they
        came. ``chunks`` ascending by seq and ``marks`` must be one snapshot
        (no mark that came after the last chunk's successor)."""
        todo = [m for m in marks[self.tools_seen:] if m.follows >= self.floor]
        at = 0
        for chunk in chunks:
            if chunk.seq <= self.after_seq:
                continue
            while at < len(todo) and todo[at].follows < chunk.seq:
                listener.put(todo[at].event)
                at += 1
            listener.put(chunk)
            self.after_seq = chunk.seq
        for mark in todo[at:]:
            listener.put(mark.event)
        self.tools_seen = max(self.tools_seen, len(marks))


class Listener:
    """One socket's view of one reply: its chunks, then its Ending. Without
    ``chunks`` (a reply that is not streamed) only the Ending: a socket's
    task then wakes once per reply, not once per chunk."""

    def __init__(self, reply_id: str, message_id: str, on_close: Callable | None = None,
                 chunks: bool = True):
        self.reply_id = reply_id
        self.message_id = message_id
        # Not an asyncio.Queue: one consumer only, and one per reply, so a
        # deque and the future its consumer waits on (if any) do.
        self._events: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._on_close = on_close
        self.closed = False
        self.chunks = chunks

    def put(self, event) -> None:  # a Chunk, a ToolEvent or the Ending
        if not self.closed and (self.chunks or isinstance(event, Ending)):
            self._events.append(event)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def events(self) -> AsyncIterator[Chunk | Ending]:
        """Chunks in order (tool events among them), then the Ending; stops after it."""
        while True:
            while not self._events:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            event = self._events.popleft()
            yield event
            if isinstance(event, Ending):
                self.close()
                return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close(self)


class LiveReply:
    """A reply this process is generating."""

    def __init__(self, reply_id: str, message_id: str, user_id: int, conversation_id: int,
                 message_row_id: int):
        self.reply_id = reply_id
        self.message_id = message_id  # the public id of the message it answers
        self.user_id = user_id
        self.conversation_id = conversation_id
        self.message_row_id = message_row_id
        self.reply = Reply()
        self.marks: list[ToolMark] = []  # its tool events, in order
        self.flushed = 0  # pieces saved so far
        self.marks_flushed = 0  # tool marks saved so far
        self.saved_any = False  # whether any chunk row was written
        self.flushing = False  # a flush with some of its chunks is under way
        self.listeners: set[Listener] = set()
        self.ending: Ending | None = None
        self.task: asyncio.Task | None = None
        self.started = False  # the task has begun to run
        self.cancel_pending = False  # cancelled before it began
        self.complete = False  # generated whole, being saved: too late to cancel
        self.reserved = None  # its quota reservation (store.quotas.Bound), if any
        self.cancelling = False  # cancel() was called
        self.born = time.monotonic()  # when it was admitted

    @property
    def last_seq(self) -> int:
        return len(self.reply.pieces) - 1

    def take(self, piece: str) -> None:
        """A new piece of text: keep it and pass it to every listener."""
        self.reply.take(piece)
        chunk = Chunk(len(self.reply.pieces) - 1, piece)
        for listener in self.listeners:
            listener.put(chunk)

    def tool_event(self, event: ToolEvent) -> None:
        """A tool call starting or ending: kept in place among the chunks (for
        a resume) and passed to every listener."""
        self.marks.append(ToolMark(self.last_seq, event))
        for listener in self.listeners:
            listener.put(event)

    def listen(self, after_seq: int = -1, tools_seen: int | None = None,
               chunks: bool = True) -> Listener:
        """A new listener, given the chunks after ``after_seq`` so far and the
        tool events it lacks among them (Cursor); without ``chunks`` it gets
        the Ending alone."""
        listener = Listener(self.reply_id, self.message_id, self.listeners.discard, chunks)
        pieces = [Chunk(seq, self.reply.pieces[seq])
                  for seq in range(max(after_seq + 1, 0), len(self.reply.pieces))]
        Cursor(after_seq, tools_seen).replay(listener, pieces, self.marks)
        if self.ending is not None:
            listener.put(self.ending)
        else:
            self.listeners.add(listener)
        return listener

    def end(self, ending: Ending) -> None:
        self.ending = ending
        for listener in list(self.listeners):
            listener.put(ending)
        self.listeners.clear()

    def cancel(self) -> bool:
        """Cancel the generation (it saves the reply as cancelled); False if it
        has ended already or is complete (being saved)."""
        if self.complete or self.ending is not None or self.task is None or self.task.done():
            return False
        if self.cancelling:
            # Asked again (a cancel request is seen both by a flush and by a
            # notification): a second task.cancel() would interrupt the save
            # of the cancelled reply, and its listeners would get an error.
            return True
        self.cancelling = True
        if not self.started:
            # A task cancelled before its first step never runs its code, so
            # it could not save the reply: it cancels itself when it starts.
            self.cancel_pending = True
        else:
            self.task.cancel()
        return True


class Replies:
    """This process's replies in flight, and its watches on other instances' ones."""

    def __init__(self, store: Store, instance: str, lease_seconds: float,
                 resume_window_seconds: float):
        self.store = store
        self.instance = instance
        self.lease_seconds = lease_seconds
        self.resume_window = resume_window_seconds
        self.live: dict[str, LiveReply] = {}
        self._watches: dict[str, _Watch] = {}
        self._wake = asyncio.Event()  # set by notifications and new work
        self._idle = True  # the loop waits for work without a timeout
        self._notified = False  # PostgreSQL notifications are arriving
        self._tasks: list[asyncio.Task] = []

    # Replies of this process

    def start(self, live: LiveReply, run: Callable[[LiveReply], Awaitable[None]]) -> LiveReply:
        """Run ``run(live)`` (the generation, which ends with live.end()) in a task."""
        self.live[live.reply_id] = live
        live.task = asyncio.get_running_loop().create_task(self._run(live, run))
        if self._idle:
            self._wake.set()  # from now on the loop flushes every FLUSH_SECONDS
        return live

    async def _run(self, live: LiveReply, run) -> None:
        live.started = True
        try:
            await run(live)
        except Exception:  # a bug: its listeners must not wait for ever
            logger.exception("reply %s failed unexpectedly", live.reply_id)
        finally:
            self.live.pop(live.reply_id, None)
            if live.ending is None:
                live.end(Ending(STATUS_ERROR, live.reply.text, UNEXPECTED))

    def local(self, reply_id: str) -> LiveReply | None:
        return self.live.get(reply_id)

    # Resume and cancel by id, for any socket of the user

    async def listen(self, reply_id: str, user_id: int, after_seq: int,
                     tools_seen: int | None = None) -> Listener | None:
        """A listener for the user's reply, wherever it is generated or saved;
        None if there is no such reply of that user."""
        live = self.live.get(reply_id)
        if live is not None:
            return live.listen(after_seq, tools_seen) if live.user_id == user_id else None
        state = await self.store.reply_state(reply_id)
        if state is None:
            return await self._listen_saved(reply_id, user_id, after_seq, tools_seen)
        if state.user_id != user_id:
            return None
        if state.finished_at is not None and state.status is not None:
            listener = Listener(reply_id, state.message_id)
            Cursor(after_seq, tools_seen).replay(
                listener, _chunks(cut(state.content, state.chunk_lengths)),
                marks_from_json(state.tool_events))
            listener.put(_ending(state))
            return listener
        watch = self._watches.get(reply_id)
        if watch is None:
            watch = self._watches[reply_id] = _Watch(reply_id)
        listener = Listener(reply_id, state.message_id, watch.listeners.pop_listener)
        watch.add(listener, Cursor(after_seq, tools_seen))
        self._wake.set()
        return listener

    async def _listen_saved(self, reply_id: str, user_id: int, after_seq: int,
                            tools_seen: int | None = None):
        """A reply saved so long ago that its stream is gone: its tool events
        (from its saved steps), then its whole text as one chunk (its old
        boundaries are forgotten), then the end."""
        saved = await self.store.saved_reply(reply_id)
        if saved is None or saved.user_id != user_id:
            return None
        listener = Listener(reply_id, saved.message_id)
        marks = []
        for step in await self.store.reply_tool_steps(saved.id):
            arguments = json.loads(step.arguments)
            marks += [ToolMark(-1, ToolEvent(step.name, step.call_id, arguments)),
                      ToolMark(-1, ToolEvent(step.name, step.call_id, arguments,
                                             step.status == STATUS_OK))]
        Cursor(after_seq, tools_seen).replay(
            listener, [Chunk(0, saved.content)] if saved.content else [], marks)
        listener.put(_ending(saved))
        return listener

    async def cancel(self, reply_id: str, user_id: int) -> bool:
        """Cancel the user's reply in flight on any instance; False if there is none."""
        live = self.live.get(reply_id)
        if live is not None:
            return live.user_id == user_id and live.cancel()
        asked = await self.store.request_cancel(reply_id, user_id)
        self._wake.set()
        return asked

    # Background work: flush chunks, read cancel requests and watched replies

    def start_background(self) -> None:
        self._tasks = [asyncio.create_task(self._loop())]

    def notified(self, reply_ids: list[str]) -> None:
        """PostgreSQL says these replies changed (store/notifications.py)."""
        self._wake.set()

    def listening(self, on: bool) -> None:
        """Whether PostgreSQL's notifications arrive (else: poll)."""
        self._notified = on

    async def _loop(self) -> None:
        while True:
            self._idle = not self.live and not self._watches
            if self._idle:
                await self._wake.wait()
                # A reply that ends within the batch interval costs no database
                # work here at all: most replies, under load.
                await asyncio.sleep(FLUSH_SECONDS)
            else:
                # Replies of this process: flush every FLUSH_SECONDS. Watches
                # only: poll, or wait for PostgreSQL to say something changed.
                timeout = FLUSH_SECONDS if self.live or not self._notified else (
                    NOTIFIED_POLL_SECONDS)
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops
                # a cancel (shutdown's) that comes as the event is set, and
                # this loop would then wait for ever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                await self._read_watches()
            except StoreError as exc:
                logger.warning("replies: %s; retrying", exc)
                await asyncio.sleep(POLL_SECONDS)
            except Exception:  # a bug: say so, and keep the loop alive
                logger.exception("replies: background step failed")
                await asyncio.sleep(POLL_SECONDS)

    async def flush(self) -> None:
        """Save the new chunks of this process's replies; act on cancel requests."""
        new_chunks, last_seqs, taken, tool_events = [], [], [], []
        # A reply younger than one interval waits for the next tick: most replies
        # end before it and so cost no database work, even when every tick finds
        # some just begun (a busy server). Its chunks are saved at most two
        # intervals after they came.
        young = time.monotonic() - FLUSH_SECONDS
        for live in list(self.live.values()):
            if live.born > young:
                continue
            pieces, marks = live.reply.pieces, len(live.marks)
            if len(pieces) > live.flushed or marks > live.marks_flushed:
                new_chunks += [{"reply_id": live.reply_id, "seq": seq, "text": pieces[seq]}
                               for seq in range(live.flushed, len(pieces))]
                if len(pieces) > live.flushed:
                    last_seqs.append({"which": live.reply_id, "seq": len(pieces) - 1})
                if marks > live.marks_flushed:  # the whole list: a few small items
                    tool_events.append({"which": live.reply_id,
                                        "events": marks_json(live.marks)})
                taken.append((live, len(pieces), marks))
        if not self.live:
            return
        if taken:
            for live, _count, _marks in taken:
                live.flushing = True
            try:
                cancels = await self.store.flush_chunks(new_chunks, last_seqs, self.instance,
                                                        tool_events)
            finally:
                for live, _count, _marks in taken:
                    live.flushing = False
            for live, count, marks in taken:
                live.flushed, live.saved_any = max(live.flushed, count), True
                live.marks_flushed = max(live.marks_flushed, marks)
        else:
            cancels = await self.store.cancel_requests(self.instance)
        for reply_id in cancels:
            live = self.live.get(reply_id)
            if live is not None and live.cancel():
                logger.info("reply %s cancelled at another socket's request", reply_id)

    async def _read_watches(self) -> None:
        for reply_id, watch in list(self._watches.items()):
            if not watch.listeners:
                del self._watches[reply_id]
                continue
            state = await self.store.reply_state(reply_id)
            if state is None:  # forgotten meanwhile: the saved row tells the end
                saved = await self.store.saved_reply(reply_id)
                watch.end(_ending(saved) if saved is not None else
                          Ending(STATUS_ERROR, "", INTERRUPTED.format(ref="-")), [])
                del self._watches[reply_id]
            elif state.finished_at is not None and state.status is not None:
                watch.end(_ending(state), _chunks(cut(state.content, state.chunk_lengths)),
                          marks_from_json(state.tool_events))
                del self._watches[reply_id]
            else:
                chunks = []
                if state.last_seq > watch.seen:
                    # Only up to the state's last seq: its tool events are of
                    # that moment, and a later chunk could follow a later event.
                    chunks = [Chunk(row.seq, row.text)
                              for row in await self.store.reply_chunks_after(reply_id, watch.seen)
                              if row.seq <= state.last_seq]
                watch.deliver(chunks, marks_from_json(state.tool_events))

    async def sweep(self) -> None:
        """Save the replies of stopped instances as interrupted (their leases
        ran out), and forget streams past the resume window. Every process
        does it, with its lease renewal (Connections.renew)."""
        forget_before = utcnow() - timedelta(seconds=self.resume_window)
        saved = await self.store.sweep_replies(time.time(), forget_before)
        if saved:
            logger.warning("saved %d reply(ies) of a stopped instance as interrupted",
                           len(saved))
            self._wake.set()

    # Shutdown

    async def stop(self, grace: float) -> None:
        """Let replies finish for up to ``grace`` seconds, then cancel them
        (each saves itself as cancelled); stop the background work."""
        tasks = [live.task for live in self.live.values() if live.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for live in list(self.live.values()):
            live.cancel()
        left = [live.task for live in self.live.values() if live.task is not None]
        if left:
            await asyncio.wait(left, timeout=10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Watch:
    """Listeners on this process to one reply of another instance."""

    def __init__(self, reply_id: str):
        self.reply_id = reply_id
        self.listeners = _Listeners()
        self.seen = -1  # the highest seq delivered from the database

    def add(self, listener: Listener, cursor: Cursor) -> None:
        self.listeners.add(listener, cursor)
        after_seq = cursor.after_seq
        self.seen = min(self.seen, after_seq) if self.listeners.count > 1 else after_seq

    def deliver(self, chunks: list[Chunk], marks: list[ToolMark]) -> None:
        """New chunks (ascending) and the tool marks of the same moment."""
        for listener, cursor in self.listeners.items():
            cursor.replay(listener, chunks, marks)
        if chunks:
            self.seen = max(self.seen, chunks[-1].seq)

    def end(self, ending: Ending, chunks: list[Chunk], marks: list[ToolMark]) -> None:
        for listener, cursor in self.listeners.items():
            cursor.replay(listener, chunks, marks)
            listener.put(ending)


class _Listeners:
    """Listeners with how far each has got (Cursor)."""

    def __init__(self):
        self._cursors: dict[Listener, Cursor] = {}

    def add(self, listener: Listener, cursor: Cursor) -> None:
        self._cursors[listener] = cursor

    def pop_listener(self, listener: Listener) -> None:
        self._cursors.pop(listener, None)

    def items(self) -> list[tuple[Listener, Cursor]]:
        return list(self._cursors.items())

    @property
    def count(self) -> int:
        return len(self._cursors)

    def __bool__(self) -> bool:
        return bool(self._cursors)


def _chunks(pieces: list[str]) -> list[Chunk]:
    return [Chunk(seq, piece) for seq, piece in enumerate(pieces)]


def _ending(row) -> Ending:
    """The Ending of a saved reply row (content, status, error_ref, error_kind)."""
    if row.status == STATUS_OK:
        return Ending(STATUS_OK, row.content)
    if row.status == STATUS_CANCELLED:
        return Ending(STATUS_CANCELLED, row.content)
    if row.error_kind == "interrupted":
        return Ending(STATUS_ERROR, row.content, INTERRUPTED.format(ref=row.error_ref))
    return Ending(STATUS_ERROR, row.content, Reply(
        status=STATUS_ERROR, error_ref=row.error_ref, error_kind=row.error_kind).error_text())
