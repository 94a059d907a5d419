"""Fuzzing the WebSocket with Hypothesis (issue 5, item 11).

Strategies generate whole client frames: arbitrary JSON (nested, near the
frame limit, NaN and Infinity, big numbers, odd Unicode including lone
surrogates written as JSON escapes), chat messages with odd fields, raw text,
binary frames, and text frames that are not UTF-8 (tornado's client writes
bytes given as a text frame as they are, so it serves as the raw client).
Examples are single frames or bursts of up to four sent at once.

Invariant, for every example: each frame gets an ``error`` frame or the
right reply (an independent oracle in ``expected()`` says which, and the
reply must carry the content back exactly); the server never closes with
1011, never logs an error or an uncaught exception, and keeps serving a
second client. Invalid UTF-8 in a text frame is the one frame that ends the
connection (RFC 6455 section 8.1 requires it): tornado drops the TCP
connection without a close frame, so the client sees no code (1006) rather
than 1007; either is accepted, 1011 is not (docs/reliability.md).

One server (the in-process ``service`` fixture) and the same two sockets
serve all examples; a socket is reopened only after the server closed it.
2,000 examples run on SQLite, the default database, and an eighth of that on
PostgreSQL (its driver and what text it stores differ); ``FUZZ_EXAMPLES``
changes the count. ``derandomize`` makes CI runs repeatable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .helpers import saved_messages

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
MAX_FRAME = 64 * 1024  # server.max_message_bytes (default)
MAX_CHARS = 4000  # chat.max_content_chars (default)
TIMEOUT = 30.0
# Content the service cannot store (lone surrogates; NUL on PostgreSQL) is
# left out of the chat messages fuzzed here until the bug that
# test_unstorable_content_gets_an_error_frame documents is fixed; then set
# this True. Elsewhere in frames (keys, other fields, raw JSON) they stay.
FUZZ_UNSTORABLE_CONTENT = True
# A cancel that lands while the finished reply is being written gets "The
# reply was cancelled." after the whole reply was delivered (and saved "ok"):
# test_a_cancel_during_the_final_write_is_not_reported_as_cancelling. Until
# that is fixed the burst check tolerates it; then set this False.
TOLERATE_CANCELLED_AFTER_DELIVERY = False

INVALID, BINARY, TEXT = "invalid-utf8", "binary", "text"

# Strategies

ODD_CHARACTERS = [
    "\x00", "\x7f", "\u0085", "\u00a0", "\u2028", "\u2029", "\u200b", "\u200d", "\u202e",
    "\u3000", "\ufeff", "\ufffd", "\ufffe", "\uffff", "\U0001f600", "\U0001f44d\U0001f3fd",
    "\U0010ffff", "e\u0301", "\u0000\u0000", "\ud800", "\udfff", "\udbff\udfff", "\\", '"',
]
odd_text = st.lists(
    st.sampled_from(ODD_CHARACTERS) | st.characters(exclude_categories=()), max_size=30
).map("".join)
any_text = st.text(max_size=40) | odd_text
big_numbers = st.integers(min_value=-(10**400), max_value=10**400) | st.sampled_from(
    [63, 64, 4299]  # 2**63 and 2**64 overflow int64; 4300 digits is Python's str/int limit
).map(lambda e: 2**e if e < 100 else -(10**e))
json_leaves = (
    st.none() | st.booleans() | st.integers() | big_numbers | any_text
    | st.floats(allow_nan=True, allow_infinity=True)
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(any_text, children, max_size=5),
    max_leaves=15,
)


def storable(text: str) -> bool:
    return "\x00" not in text and _encodes(text)


def _converts(convert, value) -> bool:
    """Whether ``convert(value)`` (str.encode or bytes.decode: UTF-8, strict) succeeds."""
    try:
        convert(value)
        return True
    except UnicodeError:
        return False


def _encodes(text: str) -> bool:
    return _converts(str.encode, text)


content_text = st.one_of(
    st.text(min_size=1, max_size=60),
    odd_text,
    st.sampled_from([" ", "\t\n", "\u3000\u00a0"]),
    st.builds(lambda c, extra: c * (MAX_CHARS + extra),  # at the length limit, and one past it
              st.sampled_from(["x", " ", "\U0001f600", "e\u0301"]), st.sampled_from([0, 1])),
    st.builds(lambda piece, times: (piece * times)[: MAX_CHARS + 2],
              st.text(min_size=1, max_size=8), st.integers(1, MAX_CHARS)),
)
message_objects = st.fixed_dictionaries(
    {"content": content_text | json_values},
    optional={
        "stream": st.booleans() | json_values,
        "action": st.sampled_from(["cancel", "Cancel", "", "stop"]) | json_values,
        "extra": json_values,
        "": json_values,
    },
)


def dump(value, ascii_only: bool) -> str:
    """JSON text; lone surrogates can only travel as \\u escapes."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    return text if _encodes(text) else json.dumps(value, allow_nan=True)


json_frames = st.builds(dump, json_values | message_objects, st.booleans())
raw_text = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["", " ", "{", "}", "[", "null", "true", "0", '""', "NaN", "-Infinity",
                     "{content: 'x'}", '{"content": "x",}', '{"content": "x"} {}',
                     "\ufeff{\"content\": \"bom\"}", '{"content": "x" "y"}', "'single'",
                     '{"content": "a", "content": "b"}', '{"content": "\\ud800"}',
                     '{"content": "\\u0000"}', "1e99999", "-0", "0x10"]),
)
deep = st.integers(min_value=1, max_value=MAX_FRAME // 2 - 20).flatmap(
    lambda depth: st.sampled_from([
        "[" * depth + "]" * depth,
        '{"a":' * depth + "1" + "}" * depth,
        '{"content": ' + "[" * depth + "]" * depth + "}",
        "[" * depth,  # never closed
    ])
)
digits = st.integers(min_value=4000, max_value=MAX_FRAME - 100).map(
    lambda n: '{"content": "x", "n": ' + "9" * n + "}"
)
padded = st.builds(
    lambda content, size: json.dumps({"content": content, "pad": "p" * size}),
    st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and storable(t)),
    st.integers(min_value=0, max_value=MAX_FRAME - 200),
)
text_frames = st.one_of(json_frames, json_frames, raw_text, deep, digits, padded).filter(
    lambda t: len(t.encode("utf-8", "surrogatepass")) <= MAX_FRAME and _encodes(t)
)
if not FUZZ_UNSTORABLE_CONTENT:
    text_frames = text_frames.filter(lambda t: not _unstorable_message(t))
text_frames = text_frames.map(lambda t: (TEXT, t))

BAD_SEQUENCES = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf",
                 b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
                 b"\xe2\x82", b"\xf0\x9f\x98"]
invalid_utf8 = st.builds(
    lambda before, bad, after: before + bad + after,
    st.text(max_size=30).map(lambda t: t.encode()) | st.just(b'{"content": "'),
    st.sampled_from(BAD_SEQUENCES) | st.binary(min_size=1, max_size=8),
    st.binary(max_size=30),
).filter(lambda b: not _decodes(b)).map(lambda b: (INVALID, b))
binary_frames = st.binary(max_size=2000).map(lambda b: (BINARY, b))


def _decodes(data: bytes) -> bool:
    return _converts(bytes.decode, data)


burst_frames = text_frames | binary_frames
examples = st.one_of(
    text_frames.map(lambda f: [f]),
    text_frames.map(lambda f: [f]),
    binary_frames.map(lambda f: [f]),
    invalid_utf8.map(lambda f: [f]),
    st.lists(burst_frames, min_size=2, max_size=4),  # bursts
)


# The oracle: what the protocol (docs/protocol.md) says each frame gets.

ERROR, CANCEL, REPLY, CLOSE = "error", "cancel", "reply", "close"


def expected(kind: str, payload) -> tuple[str, str | None]:
    outcome, content = protocol_outcome(kind, payload)
    if outcome == REPLY and not storable(content):
        return ERROR, None  # the fixed behaviour; see test_unstorable_content_gets_an_error_frame
    return outcome, content


def _unstorable_message(text: str) -> bool:
    outcome, content = protocol_outcome(TEXT, text)
    return outcome == REPLY and not storable(content)


def protocol_outcome(kind: str, payload) -> tuple[str, str | None]:
    """What docs/protocol.md says, as written (storability aside)."""
    if kind == INVALID:
        return CLOSE, None
    if kind == BINARY:
        return ERROR, None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return ERROR, None
    if not isinstance(data, dict):
        return ERROR, None
    if "action" in data:
        return (CANCEL if data["action"] == "cancel" else ERROR), None
    content = data.get("content")
    if not isinstance(content, str) or not content.strip() or len(content) > MAX_CHARS:
        return ERROR, None
    if not isinstance(data.get("stream", False), bool):
        return ERROR, None
    return REPLY, content


def reply_to(content: str) -> str:
    return f"fake reply to: {content}"  # the FakeAgent's default answer


# The harness: one server, two sockets, every log record watched.


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take_bad(self) -> list[str]:
        bad = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records
               if r.levelno >= logging.ERROR or r.exc_info
               or r.name in ("tornado.application", "asyncio")]
        self.records.clear()
        return bad


@pytest.fixture
def records():
    handler = Records()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@pytest.fixture
def settings_for_fuzz(settings):
    settings.rate_limit.messages = 1_000_000  # every valid message is answered
    settings.rate_limit.per_seconds = 1
    assert settings.server.max_message_bytes == MAX_FRAME
    assert settings.chat.max_content_chars == MAX_CHARS
    return settings


class Harness:
    def __init__(self, io_loop, connect):
        self.io_loop = io_loop
        self.connect = connect
        self.fuzzed = None
        self.bystander = None
        self.examples = 0
        self.sentinels = 0

    def run(self, coro_fn):
        return self.io_loop.run_sync(coro_fn, timeout=TIMEOUT * 4)

    async def open(self):
        if self.fuzzed is None:
            self.fuzzed = await self.connect("fuzzed", user="fuzzer")
        if self.bystander is None:
            self.bystander = await self.connect("bystander", user="bystander")

    async def send(self, kind: str, payload) -> None:
        if kind == TEXT:
            await self.fuzzed.send(payload)
        else:  # bytes: binary frame, or (INVALID) the same bytes in a text frame
            await self.fuzzed.conn.write_message(payload, binary=kind == BINARY)

    async def answers(self, until_reply: str | None, count: int | None) -> list[dict]:
        """Frames (chunks left out) until ``count`` arrived or the reply ``until_reply`` did."""
        got = []
        while count is None or len(got) < count:
            frame = await self.fuzzed.receive(TIMEOUT)
            assert frame is not None, f"closed with {self.fuzzed.close_code}"
            assert set(frame) == {"type", "message", "timestamp"}, frame
            if frame["type"] == "ai_response_chunk":
                continue
            if until_reply is not None and frame == {**frame, "type": "ai_response",
                                                     "message": reply_to(until_reply)}:
                return got
            got.append(frame)
        return got

    async def check_bystander(self) -> None:
        await self.bystander.send({"content": f"still there {self.examples}?"})
        frame = await self.bystander.receive(TIMEOUT)
        assert frame is not None and frame["type"] == "ai_response", frame

    async def check(self, frames: list[tuple[str, object]]) -> None:
        await self.open()
        outcomes = [expected(kind, payload) for kind, payload in frames]
        for kind, payload in frames:
            await self.send(kind, payload)
        if outcomes[0][0] == CLOSE:
            code = await self.fuzzed.wait_closed(TIMEOUT)
            self.fuzzed = None  # reopened for the next example
            assert code in (None, 1006, 1007), f"invalid UTF-8 closed with {code}"
            return
        if len(frames) == 1:
            got = await self.answers(None, 1)
        else:  # a burst: a sentinel message marks the end of its answers
            self.sentinels += 1
            sentinel = f"sentinel {self.sentinels}"
            await self.fuzzed.send({"content": sentinel})
            got = await self.answers(sentinel, None)
        check_answers(outcomes, got)


def check_answers(outcomes: list[tuple[str, str | None]], got: list[dict]) -> None:
    """The answers to a burst: errors come at once, replies in order, and a
    cancel either finds nothing in flight (an error) or cancels one reply."""
    types = [frame["type"] for frame in got]
    assert set(types) <= {"error", "ai_response", "system"}, got
    for frame in got:
        assert "unexpected error" not in frame["message"], frame
        assert "could not save" not in frame["message"], frame
    replies = [content for outcome, content in outcomes if outcome == REPLY]
    received = [frame["message"] for frame in got if frame["type"] == "ai_response"]
    cancelled = [frame for frame in got if frame["type"] == "system"]
    assert all(f["message"] == "The reply was cancelled." for f in cancelled), got
    expected_replies = iter(reply_to(c) for c in replies)
    assert all(text in expected_replies for text in received), (received, replies)  # in order
    missing = len(replies) - len(received)  # each one cancelled, with a notice
    if TOLERATE_CANCELLED_AFTER_DELIVERY:
        assert missing <= len(cancelled), got
    else:
        assert missing == len(cancelled), got
    errors = sum(outcome in (ERROR, CANCEL) for outcome, _ in outcomes)
    cancels = sum(outcome == CANCEL for outcome, _ in outcomes)
    assert len(cancelled) <= cancels
    assert types.count("error") == errors - len(cancelled), got


HYPOTHESIS = dict(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is repeatable
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)


def test_fuzzed_frames_get_answers_and_never_break_the_server(
    io_loop, settings_for_fuzz, fake_agent, connect, records
):
    harness = Harness(io_loop, connect)
    on_sqlite = settings_for_fuzz.database.url.startswith("sqlite")
    # The full run on the default database; a shorter one on PostgreSQL,
    # which differs in what text it stores (NUL) and in its driver.
    count = EXAMPLES if on_sqlite else max(EXAMPLES // 8, 50)

    @settings(max_examples=count, **HYPOTHESIS)
    @given(frames=examples)
    @example(frames=[(TEXT, json.dumps({"content": "plain"}))])
    @example(frames=[(TEXT, '{"content": NaN}'), (TEXT, '{"content": "x", "stream": Infinity}')])
    @example(frames=[(INVALID, b'{"content": "\xff"}')])
    @example(frames=[(TEXT, "[" * 40000)])
    @example(frames=[(TEXT, json.dumps({"action": "cancel"}))])
    @example(frames=[(TEXT, json.dumps({"content": "go", "stream": True})),
                     (TEXT, json.dumps({"action": "cancel"}))])
    def one_example(frames):
        harness.examples += 1
        harness.run(lambda: harness.check(frames))
        if harness.examples % 100 == 0:
            harness.run(harness.check_bystander)
        assert records.take_bad() == []

    one_example()
    # After all examples: the other client is still served, nothing was logged.
    harness.run(harness.open)
    harness.run(harness.check_bystander)
    assert records.take_bad() == []
    assert harness.examples >= count


# Content the database cannot store: a targeted test of what the fuzzer found.

UNSTORABLE = {
    "lone high surrogate": '{"content": "a\\ud800b"}',
    "lone low surrogate": '{"content": "\\udfff"}',
    "reversed pair": '{"content": "\\udc00\\ud800"}',
    "NUL": '{"content": "nul\\u0000here"}',
}


@pytest.mark.gen_test(timeout=30)
async def test_unstorable_content_gets_an_error_frame(connect, fake_agent, records):
    client = await connect()
    for name, raw in UNSTORABLE.items():
        await client.send(raw)
        frame = await client.receive()
        assert frame is not None, f"{name}: closed with {client.close_code}"
        assert frame["type"] == "error", (name, frame)
        assert "could not save" not in frame["message"] and "unexpected" not in frame["message"]
        assert records.take_bad() == [], name
    await client.send({"content": "still open"})
    assert (await client.receive())["type"] == "ai_response"
    assert fake_agent.history == [] or all(
        storable(r.messages[-1]["content"]) for r in fake_agent.history)


class TestOneUsersBadContentOnSqlite:
    """On SQLite the exchange's statements share group commits (store.SqliteBatcher)."""

    @pytest.fixture
    def db_url(self, tmp_path):
        return f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"

    @pytest.mark.gen_test(timeout=60)
    async def test_does_not_fail_other_users_exchanges(self, connect, fake_agent, settings):
        settings.rate_limit.messages = 1000
        mallory = await connect("bad", user="mallory")
        others = [await connect(f"good-{n}", user=f"user{n}") for n in range(6)]
        for round_ in range(5):
            await asyncio.gather(mallory.send('{"content": "x\\ud800"}'),
                                 *(c.send({"content": f"hi {round_}"}) for c in others))
            for client in others:
                frame = await client.receive()
                assert frame is not None, f"closed with {client.close_code}"
                assert (frame["type"], frame["message"]) == ("ai_response", f"fake reply to: hi {round_}")
            await mallory.receive()


@pytest.mark.gen_test(timeout=60)
async def test_every_cancel_right_behind_a_message_is_answered(connect, fake_agent, settings):
    """Found by the fuzzer (bursts): a write timeout built on asyncio.wait_for
    swallowed a cancel landing on a finished write (CPython 3.11, gh-86296)."""
    settings.rate_limit.messages = 1000
    client = await connect()
    for number in range(30):
        await client.send({"content": f"go {number}", "stream": True})
        await client.send({"action": "cancel"})
        await client.send({"content": f"sentinel {number}"})
        answers = []
        while (frame := await client.receive())["message"] != f"fake reply to: sentinel {number}":
            if frame["type"] != "ai_response_chunk":
                answers.append((frame["type"], frame["message"]))
        # Either the cancel found the reply in flight, or it came too late:
        # one answer for the cancel either way.
        assert answers in (
            [("system", "The reply was cancelled.")],
            [("error", "There is no reply in progress to cancel."),
             ("ai_response", f"fake reply to: go {number}")],
            [("ai_response", f"fake reply to: go {number}"),
             ("error", "There is no reply in progress to cancel.")],
        ), (number, answers)


@pytest.mark.gen_test(timeout=60)
async def test_a_cancel_during_the_final_write_is_not_reported_as_cancelling(
    connect, fake_agent, service, store
):
    big = "x" * (24 * 1024 * 1024)  # more than loopback's socket buffers hold
    fake_agent.enqueue(big)
    client = await connect()
    # Tornado's client holds one unread frame and then stops reading the
    # socket: two error frames park it, so the big reply's write stays pending.
    await client.send(b"park 1")
    await client.send(b"park 2")
    await client.send({"content": "a big one"})
    # Wait until the reply is saved and its write is pending (the server's
    # side is only observable by polling).
    (sock,) = service.connections.sockets
    conversation = await store.open_conversation(1, "client-1")
    while not (sock.ws_connection.stream.writing()
               and (await saved_messages(store, conversation))[-1].role == "assistant"):
        await asyncio.sleep(0.01)
    await client.send({"action": "cancel"})
    frames = [await client.receive(30) for _ in range(4)]
    assert [f["type"] for f in frames[:3]] == ["error", "error", "ai_response"]
    assert frames[2]["message"] == big
    rows = await saved_messages(store, await store.open_conversation(1, "client-1"))
    assert (rows[-1].role, rows[-1].status) == ("assistant", "ok")
    # The reply was delivered whole: the cancel found nothing in flight.
    assert (frames[3]["type"], frames[3]["message"]) == (
        "error", "There is no reply in progress to cancel.")


def test_the_oracle_agrees_with_the_protocol_on_known_frames():
    """The oracle itself, on frames whose answer docs/protocol.md states."""
    cases = {
        '{"content": "hi"}': (REPLY, "hi"),
        '{"content": "hi", "stream": true}': (REPLY, "hi"),
        '{"content": "hi", "stream": "yes"}': (ERROR, None),
        '{"content": "   "}': (ERROR, None),
        '{"content": 5}': (ERROR, None),
        '{"action": "cancel"}': (CANCEL, None),
        '{"action": "stop", "content": "hi"}': (ERROR, None),
        "[]": (ERROR, None),
        "not json": (ERROR, None),
        '{"content": NaN}': (ERROR, None),
        json.dumps({"content": "x" * MAX_CHARS}): (REPLY, "x" * MAX_CHARS),
        json.dumps({"content": "x" * (MAX_CHARS + 1)}): (ERROR, None),
    }
    for raw, outcome in cases.items():
        assert expected(TEXT, raw) == outcome, raw
    assert expected(BINARY, b"{}") == (ERROR, None)
    assert expected(INVALID, b"\xff") == (CLOSE, None)
    assert math.isnan(json.loads("NaN"))  # Python's parser, like the server's, reads NaN
