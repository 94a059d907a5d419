"""A fake OpenAI-compatible server for tests: real HTTP on 127.0.0.1, scripted.

``FakeOpenAI`` runs a Tornado app on a random port in a background thread
with its own IOLoop and answers ``POST /v1/chat/completions``, streaming
(SSE ``data: {...}`` events, then ``data: [DONE]``) or not (one JSON object),
the way the Chat Completions API does. Client libraries talk to it over real
sockets; nothing is patched.

Script it per test; each behaviour serves ``times`` requests, in order:

- ``reply(["Hel", "lo"], usage=(12, 2), delay=0.0)``: a normal answer; the
  usage chunk is sent only if the request asked for it
  (``stream_options.include_usage``), as OpenAI does.
- ``tool_calls([(id, name, arguments_json), ...], pieces=[...], usage=...)``:
  an answer that calls tools, as OpenAI, vLLM and llama.cpp send it:
  streamed, text pieces first, then each call's first ``delta.tool_calls``
  fragment (index, id, name) and its ``arguments`` in pieces of
  ``arguments_piece`` characters; not streamed, one message with
  ``tool_calls``; ``finish_reason`` is ``tool_calls``.
- ``status(429)``, ``status(500, body="...", headers={...})``: an error answer.
- ``hang(seconds)``: send nothing at all for that long.
- ``stream_error(pieces, message)``: stream ``pieces``, then an error event
  (``data: {"error": {...}}``), as vLLM and OpenAI do when generation fails.
- ``respond(answer, times=1)``: ``answer(body)`` returns the Behaviour for
  each request (a ``reply`` or ``tool_calls`` one): a model that reads its
  prompt and the tool results in it.
- ``garbage(kind)``: a malformed 200 stream: ``"json"`` (invalid JSON in an
  event), ``"no_choices"`` (a chunk without ``choices``), ``"not_sse"``.

A request with nothing scripted gets a 500 that names the mistake. Every
request is recorded in ``requests`` (headers with lower-case names, the JSON
body, and whether the client went away before the answer was complete).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.web
from tornado.iostream import StreamClosedError
from tornado.testing import bind_unused_port


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    json: Any
    disconnected: bool = False
    completed: bool = False


@dataclass
class Behaviour:
    kind: str  # reply, status, hang, stream_error, garbage
    times: int = 1
    pieces: list[str] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    delay: float = 0.0
    code: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    garbage: str = "json"
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    arguments_piece: int = 4
    answer: Any = None  # respond: body -> Behaviour


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._loop: tornado.ioloop.IOLoop | None = None
        self._server: tornado.httpserver.HTTPServer | None = None
        self._stopping: asyncio.Event | None = None
        self.port = 0

    # Life cycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        sock, self.port = bind_unused_port()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self._loop = tornado.ioloop.IOLoop.current()
            self._stopping = asyncio.Event()
            app = tornado.web.Application([(r"/v1/chat/completions", _Handler, {"fake": self})])
            self._server = tornado.httpserver.HTTPServer(app)
            self._server.add_sockets([sock])
            started.set()
            self._loop.start()
            self._loop.close(all_fds=True)

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        started.wait(5)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            self._stopping.set()  # ends hangs and delays at once
            self._server.stop()
            await asyncio.sleep(0.01)  # let handlers see it and return
            await self._server.close_all_connections()
            self._loop.stop()

        self._loop.add_callback(shutdown)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # Script

    def reply(self, pieces, usage: tuple[int, int] | None = None, delay: float = 0.0, times=1):
        self._add(Behaviour("reply", times, pieces=list(pieces), usage=usage, delay=delay))

    def tool_calls(self, calls, pieces=(), usage: tuple[int, int] | None = None,
                   arguments_piece: int = 4, times=1):
        self._add(Behaviour("tool_calls", times, pieces=list(pieces), usage=usage,
                            calls=list(calls), arguments_piece=arguments_piece))

    def status(self, code: int, body: Any = None, headers: dict | None = None, times=1):
        if body is None:
            body = {"error": {"message": f"fake upstream error {code}", "type": "fake", "code": None}}
        self._add(Behaviour("status", times, code=code, body=body, headers=dict(headers or {})))

    def hang(self, seconds: float, times=1):
        self._add(Behaviour("hang", times, seconds=seconds))

    def stream_error(self, pieces, message: str = "fake upstream: generation failed", times=1):
        self._add(Behaviour("stream_error", times, pieces=list(pieces), body=message))

    def respond(self, answer, times=1):
        self._add(Behaviour("respond", times, answer=answer))

    def garbage(self, kind: str = "json", times=1):
        assert kind in ("json", "no_choices", "not_sse"), kind
        self._add(Behaviour("garbage", times, garbage=kind))

    def _add(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._script.append(behaviour)

    def _next(self) -> Behaviour | None:
        with self._lock:
            if not self._script:
                return None
            behaviour = self._script[0]
            behaviour.times -= 1
            if behaviour.times <= 0:
                self._script.popleft()
            return behaviour

    # Observations

    def _record(self, request: RecordedRequest) -> None:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()

    def _update(self, request: RecordedRequest, **changes) -> None:
        with self._changed:
            for name, value in changes.items():
                setattr(request, name, value)
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        """Wait (in the test's thread) until ``predicate(self.requests)`` holds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def wait_for_disconnect(self, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda requests: any(r.disconnected for r in requests), timeout)


class _Handler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.record: RecordedRequest | None = None

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.request.headers.get_all()}
        self.record = RecordedRequest(self.request.path, headers, body)
        self.fake._record(self.record)
        behaviour = self.fake._next()
        try:
            if behaviour is None:
                self._json(500, {"error": {"message": "fake upstream: nothing scripted"}})
            else:
                await getattr(self, "_" + behaviour.kind)(behaviour, body or {})
            self.fake._update(self.record, completed=True)
        except StreamClosedError:
            self.fake._update(self.record, disconnected=True)

    def on_connection_close(self) -> None:
        if self.record is not None and not self.record.completed:
            self.fake._update(self.record, disconnected=True)

    # Behaviours

    async def _reply(self, behaviour: Behaviour, body: dict) -> None:
        model = body.get("model", "fake-model")
        if not body.get("stream"):
            self._json(200, _completion(model, "".join(behaviour.pieces), behaviour.usage))
            return
        await self._start_stream()
        for piece in behaviour.pieces:
            if behaviour.delay and await self._stopped_within(behaviour.delay):
                return
            await self._event(_chunk(model, {"content": piece}))
        await self._event(_chunk(model, {}, finish_reason="stop"))
        wants_usage = (body.get("stream_options") or {}).get("include_usage")
        if behaviour.usage and wants_usage:
            await self._event({**_chunk(model, None), "usage": _usage(behaviour.usage)})
        await self._send("data: [DONE]\n\n")
        self.finish()

    async def _tool_calls(self, behaviour: Behaviour, body: dict) -> None:
        model = body.get("model", "fake-model")
        text = "".join(behaviour.pieces) or None
        if not body.get("stream"):
            answer = _completion(model, text, behaviour.usage, "tool_calls")
            answer["choices"][0]["message"]["tool_calls"] = [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": arguments}}
                for call_id, name, arguments in behaviour.calls]
            self._json(200, answer)
            return
        await self._start_stream()
        for piece in behaviour.pieces:
            await self._event(_chunk(model, {"content": piece}))
        size = behaviour.arguments_piece
        for index, (call_id, name, arguments) in enumerate(behaviour.calls):
            await self._event(_chunk(model, {"tool_calls": [
                {"index": index, "id": call_id, "type": "function",
                 "function": {"name": name, "arguments": ""}}]}))
            for start in range(0, len(arguments), size):
                await self._event(_chunk(model, {"tool_calls": [
                    {"index": index, "function": {"arguments": arguments[start:start + size]}}]}))
        await self._event(_chunk(model, {}, finish_reason="tool_calls"))
        if behaviour.usage and (body.get("stream_options") or {}).get("include_usage"):
            await self._event({**_chunk(model, None), "usage": _usage(behaviour.usage)})
        await self._send("data: [DONE]\n\n")
        self.finish()

    async def _respond(self, behaviour: Behaviour, body: dict) -> None:
        chosen = behaviour.answer(body)
        await getattr(self, "_" + chosen.kind)(chosen, body)

    async def _status(self, behaviour: Behaviour, body: dict) -> None:
        for name, value in behaviour.headers.items():
            self.set_header(name, value)
        if isinstance(behaviour.body, (dict, list)):
            self._json(behaviour.code, behaviour.body)
        else:
            self.set_status(behaviour.code)
            self.finish(str(behaviour.body))

    async def _hang(self, behaviour: Behaviour, body: dict) -> None:
        if await self._stopped_within(behaviour.seconds):
            return
        # The client has usually given up by now; writing shows it.
        self.set_status(500)
        await self._send('{"error": {"message": "fake upstream: hung"}}')
        self.finish()

    async def _stream_error(self, behaviour: Behaviour, body: dict) -> None:
        model = body.get("model", "fake-model")
        await self._start_stream()
        for piece in behaviour.pieces:
            await self._event(_chunk(model, {"content": piece}))
        await self._event({"error": {"message": behaviour.body, "type": "server_error", "code": 500}})
        self.finish()

    async def _garbage(self, behaviour: Behaviour, body: dict) -> None:
        if behaviour.garbage == "not_sse":
            self.set_header("Content-Type", "text/html")
            self.finish("<html><body>fake upstream: not an event stream</body></html>")
            return
        await self._start_stream()
        if behaviour.garbage == "json":
            await self._send('data: {"id": "chatcmpl-1", "choices": [{"delta": {"content": "Hel\n\n')
        else:
            await self._event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "detail": "fake upstream body"})
        await self._send("data: [DONE]\n\n")
        self.finish()

    # Helpers

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.fake._stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def _json(self, code: int, payload: Any) -> None:
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))

    async def _start_stream(self) -> None:
        # Headers go out at once, as real servers send them before the first token.
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        await self.flush()

    async def _event(self, payload: dict) -> None:
        await self._send(f"data: {json.dumps(payload)}\n\n")

    async def _send(self, text: str) -> None:
        self.write(text)
        await self.flush()


def _chunk(model: str, delta: dict | None, finish_reason: str | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def _usage(usage: tuple[int, int]) -> dict:
    prompt, completion = usage
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(model: str, text: str | None, usage: tuple[int, int] | None,
                finish_reason: str = "stop") -> dict:
    answer = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": finish_reason}
        ],
    }
    if usage:
        answer["usage"] = _usage(usage)
    return answer
