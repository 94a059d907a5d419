"""Fill an empty database with realistic chats, fast (for the analytics benchmark).

    python scripts/generate_chats.py --url sqlite:///data/bench.db [--messages 1000000]
    python scripts/generate_chats.py --url postgresql://postgres@127.0.0.1/bench
    python scripts/generate_chats.py --config config.yaml        # its database.url

What is made, over ``--days`` days ending now (UTC):
- users with a long tail of activity (a few heavy users, many light ones);
- conversations of a few to dozens of turns, some resumed hours later or the
  next day; more on weekdays and in the (UTC) afternoon; growth over time;
- replies from four agent/model pairs (one per conversation) whose share
  changes over the period, each with its own log-normal latency and time to
  first token, token counts that grow with the conversation's history;
- failures by kind (rate limits, timeouts, upstream and connection errors,
  local model failures), cancelled replies, and a few unanswered messages;
- branches: a few replies regenerated (a second reply to the same message,
  which the conversation then goes on from), and feedback (thumbs up or down,
  sometimes with a comment) on some replies, more often up for the stronger
  models. Every message has its parent, every conversation its active leaf.

The schema comes from the service's own migrations; the database must hold no
messages yet. SQLite is written through the standard library's driver with
executemany in one transaction; PostgreSQL through asyncpg's COPY. Message ids
follow time, as they do in a live database. The same --seed gives the same data.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import random
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateIndex, DropIndex

from tornado_app.store import Store, schema
from tornado_app.store.models import Message
from tornado_app.store.urls import UnsupportedURL, async_url

BATCH = 20_000
MESSAGE_COLUMNS = (
    "id", "conversation_id", "user_id", "role", "content", "status", "reply_to_id", "agent",
    "model", "tokens_in", "tokens_out", "latency_ms", "ttft_ms", "error_ref", "error_kind",
    "created_at", "parent_id", "regenerated", "cost",
)
FEEDBACK_COLUMNS = ("message_id", "user_id", "rating", "comment", "created_at")
CONVERSATION_COLUMNS = ("id", "user_id", "client_id", "created_at")
USER_COLUMNS = ("id", "username", "password_hash", "is_admin", "disabled", "created_at")
WORDS = (
    "the model answer question please explain how what why when data table query python "
    "service socket token user error time fast slow help write code test list summary day "
    "report agent reply chat message latency deploy server database index join group order "
    "count average percentile window rollup retention purge config key value stream cancel "
    "hello thanks great sure here is an example of a function that returns result first then "
    "next step run install file path import class method return loop if else while for in"
).split()


@dataclass(frozen=True)
class Profile:
    """One agent/model pair: its speed and how it fails."""

    agent: str
    model: str
    latency_median_ms: float
    latency_sigma: float
    ttft_median_ms: float
    error_rate: float
    error_kinds: tuple[tuple[str, float], ...]
    context_tokens: int


PROFILES = (
    Profile("transformers", "SmolLM2-135M-Instruct", 5200, 0.55, 140, 0.012,
            (("local_model", 0.4), ("timeout", 0.6)), 2048),
    Profile("openai", "gpt-4o-mini", 1900, 0.5, 380, 0.022,
            (("rate_limited", 0.4), ("upstream", 0.25), ("connection", 0.15), ("timeout", 0.1),
             ("bad_reply", 0.1)), 8192),
    Profile("openai", "gpt-4o", 3600, 0.5, 620, 0.03,
            (("rate_limited", 0.5), ("upstream", 0.2), ("timeout", 0.2), ("connection", 0.1)),
            8192),
    Profile("echo", "echo", 6, 0.4, 2, 0.002, (("internal", 1.0),), 8192),
)
# USD per million tokens (in, out), as a pricing section would set them; the
# other models are unpriced (their replies' cost is NULL).
PRICES = {("openai", "gpt-4o-mini"): (0.15, 0.60), ("openai", "gpt-4o"): (2.50, 10.00)}
CANCEL_RATE = 0.008
UNANSWERED_RATE = 0.002  # the process died before the reply was saved
TIMEOUT_MS = 120_000.0
REGENERATE_RATE = 0.02
FEEDBACK_RATE = 0.06  # of delivered replies
COMMENT_RATE = 0.3  # of feedback
UP_SHARE = {"SmolLM2-135M-Instruct": 0.55, "gpt-4o-mini": 0.75, "gpt-4o": 0.85, "echo": 0.3}
COMMENTS = {1: ("Helpful, thanks.", "Exactly what I needed.", "Clear and short."),
            -1: ("Wrong answer.", "Too long.", "It did not answer the question.")}


def shares(progress: float) -> list[float]:
    """Agent mix at a point of the period (0..1): the local model gives way to gpt-4o-mini."""
    return [0.55 - 0.35 * progress, 0.25 + 0.35 * progress, 0.12, 0.08]


class Generator:
    """Makes users, conversations and messages in time order, one day at a time."""

    def __init__(self, messages: int, users: int, days: int, end: datetime, seed: int):
        self.rng = random.Random(seed)
        self.target, self.days, self.end = messages, days, end
        self.start = (end - timedelta(days=days)).replace(hour=0, minute=0, second=0,
                                                          microsecond=0)
        self.user_ids = range(1, users + 1)
        self.user_cum_weights = list(itertools.accumulate(1 / (rank ** 0.9) for rank in self.user_ids))
        self.user_count = users
        self.pending: list = []  # heap of (time, seq, kind, payload)
        self.seq = 0
        self.emitted = 0
        self.next_message_id = 1
        self.next_conversation_id = 1
        self.last_in_conversation: dict[int, int] = {}  # the next message's parent
        self.feedback: list[tuple] = []  # rows for message_feedback, written after their replies
        # Texts are drawn from pools (by length): making a million sentences
        # word by word would be most of the run time.
        self.questions = {n: [t[:-1] + "?" for t in self._text(n)] for n in range(3, 41)}
        self.replies = {n: self._text(n) for n in range(1, 161)}

    def _text(self, words: int) -> list[str]:
        return [" ".join(self.rng.choices(WORDS, k=words)).capitalize() + "." for _ in range(8)]

    def users(self) -> list[tuple]:
        created = self.start - timedelta(days=30)
        return [(n, f"user{n:05d}", None, n == 1, False, created)
                for n in range(1, self.user_count + 1)]

    def day_weights(self) -> list[float]:
        weights = []
        for n in range(self.days + 1):
            day = self.start + timedelta(days=n)
            weekday = 1.0 if day.weekday() < 5 else 0.55
            weights.append(weekday * (0.7 + 0.6 * n / self.days))
        return weights

    def run(self):
        """Yield (conversation rows, message rows) per day until the target is met."""
        weights = self.day_weights()
        for n, weight in enumerate(weights):
            day_start = self.start + timedelta(days=n)
            if day_start >= self.end:
                break
            # Aim at what is still missing, so the total lands on the target.
            left = self.target - self.emitted - len(self.pending)
            exchanges = max(0, left) / 2 * weight / sum(weights[n:])
            conversations = self._start_conversations(day_start, exchanges, n / self.days)
            yield conversations, self._emit(min(day_start + timedelta(days=1), self.end))
        while self.emitted < self.target:  # top up the last hours
            missing = (self.target - self.emitted) / 2 + 10
            conversations = self._start_conversations(self.end - timedelta(hours=2), missing,
                                                      1.0, window_hours=2)
            yield conversations, self._emit(self.end)

    def _start_conversations(self, day_start, exchanges, progress, window_hours=24):
        rows = []
        planned = 0
        while planned < exchanges:
            hour = (self.rng.gauss(15, 4) % 24) if window_hours == 24 else self.rng.uniform(0, 2)
            at = day_start + timedelta(hours=hour)
            conversation_id = self.next_conversation_id
            self.next_conversation_id += 1
            user_id = self.rng.choices(self.user_ids, cum_weights=self.user_cum_weights)[0]
            rows.append((conversation_id, user_id, f"web-{conversation_id:x}",
                         at - timedelta(seconds=2)))
            planned += self._plan_turns(conversation_id, user_id, at, progress)
        return rows

    def _plan_turns(self, conversation_id, user_id, at, progress) -> int:
        turns = min(200, 1 + int(self.rng.expovariate(1 / 7)))
        history = 0
        # The server's agent at the time answers the whole conversation.
        profile = self.rng.choices(PROFILES, shares(progress))[0]
        for _ in range(turns):
            words = self.rng.randint(3, 40)
            reply = self._reply(profile, history + 30 + int(words * 1.3))
            exchange = {"conversation_id": conversation_id, "user_id": user_id, "id": None}
            self._push(at, "user", (exchange, words))
            if self.rng.random() >= UNANSWERED_RATE:
                self._push(at + timedelta(milliseconds=reply["latency_ms"]), "reply",
                           (exchange, reply))
            at += timedelta(milliseconds=reply["latency_ms"])
            if self.rng.random() < REGENERATE_RATE:  # the user asks for another reply
                again = {**self._reply(profile, reply["tokens_in"]), "regenerated": True}
                at += timedelta(seconds=3, milliseconds=again["latency_ms"])
                self._push(at, "reply", (exchange, again))
                reply = again
            history = min(profile.context_tokens, history + int(words * 1.3) +
                          reply["tokens_out"] + 8)
            # Mostly a quick follow-up; sometimes a break of hours (across midnight).
            if self.rng.random() < 0.03:
                at += timedelta(hours=self.rng.uniform(2, 20))
            else:
                at += timedelta(seconds=5 + self.rng.expovariate(1 / 40))
        return turns

    def _reply(self, profile: Profile, tokens_in: int) -> dict:
        rng = self.rng
        latency = profile.latency_median_ms * rng.lognormvariate(0, profile.latency_sigma)
        ttft = min(latency, profile.ttft_median_ms * rng.lognormvariate(0, 0.35))
        tokens_out = max(1, int(120 * rng.lognormvariate(0, 0.6)))
        reply = {"agent": profile.agent, "model": profile.model, "status": "ok",
                 "tokens_in": tokens_in, "tokens_out": tokens_out, "latency_ms": latency,
                 "ttft_ms": ttft, "error_kind": None, "error_ref": None}
        roll = rng.random()
        if roll < profile.error_rate:
            kind = rng.choices(*zip(*profile.error_kinds))[0]
            slow = TIMEOUT_MS + rng.uniform(0, 50) if kind == "timeout" else latency * 0.2
            reply.update(status="error", error_kind=kind, error_ref=f"{rng.getrandbits(32):08x}",
                         latency_ms=slow, ttft_ms=None, tokens_out=0)
        elif roll < profile.error_rate + CANCEL_RATE:
            reply.update(status="cancelled", latency_ms=latency * rng.uniform(0.2, 0.9),
                         tokens_out=tokens_out // 3)
        return reply

    def _push(self, at: datetime, kind: str, payload) -> None:
        self.seq += 1
        heapq.heappush(self.pending, (at, self.seq, kind, payload))

    def _emit(self, until: datetime) -> list[tuple]:
        rows = []
        while self.pending and self.pending[0][0] < until and self.emitted < self.target:
            at, _seq, kind, payload = heapq.heappop(self.pending)
            exchange, detail = payload
            if kind == "reply" and exchange["id"] is None:
                continue  # its question was never emitted (past the end)
            rows.append(self._row(at, kind, exchange, detail))
            self.emitted += 1
        if until >= self.end:
            self.pending.clear()  # past the end: never happened
        return rows

    def _row(self, at, kind, exchange, detail) -> tuple:
        message_id = self.next_message_id
        self.next_message_id += 1
        conversation_id = exchange["conversation_id"]
        base = (message_id, conversation_id, exchange["user_id"])
        # A user message follows the conversation's last message; a reply
        # (a regenerated one too) answers its message.
        parent = self.last_in_conversation.get(conversation_id)
        self.last_in_conversation[conversation_id] = message_id
        if kind == "user":
            exchange["id"] = message_id
            text = self.rng.choice(self.questions[detail])
            return (*base, "user", text, "ok", None, None, None, None, None, None, None, None,
                    None, at, parent, False, None)
        r = detail
        words = min(160, max(1, r["tokens_out"] * 3 // 4))
        text = self.rng.choice(self.replies[words]) if r["tokens_out"] else ""
        if r["status"] == "ok" and self.rng.random() < FEEDBACK_RATE:
            rating = 1 if self.rng.random() < UP_SHARE[r["model"]] else -1
            comment = (self.rng.choice(COMMENTS[rating])
                       if self.rng.random() < COMMENT_RATE else None)
            self.feedback.append((message_id, exchange["user_id"], rating, comment,
                                  at + timedelta(seconds=20)))
        return (*base, "assistant", text, r["status"], exchange["id"], r["agent"], r["model"],
                r["tokens_in"], r["tokens_out"], round(r["latency_ms"], 3),
                None if r["ttft_ms"] is None else round(r["ttft_ms"], 3), r["error_ref"],
                r["error_kind"], at, exchange["id"], r.get("regenerated", False), reply_cost(r))


def reply_cost(reply: dict) -> float | None:
    price = PRICES.get((reply["agent"], reply["model"]))
    if price is None:
        return None
    return (reply["tokens_in"] * price[0] + reply["tokens_out"] * price[1]) / 1_000_000


# Writers. Both load with the messages indexes dropped and build them after:
# one sort per index instead of a million b-tree inserts into each.


def index_statements(dialect) -> tuple[list[str], list[str]]:
    indexes = sorted(Message.__table__.indexes, key=lambda index: index.name)
    return ([str(DropIndex(index).compile(dialect=dialect)) for index in indexes],
            [str(CreateIndex(index).compile(dialect=dialect)) for index in indexes])


def sqlite_time(value: datetime) -> str:
    # SQLAlchemy's own SQLite format (always with microseconds), so strings compare as times.
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


# Each conversation's active leaf: its newest message (the branch it went on with).
SET_LEAVES = ("UPDATE conversations SET active_leaf_id = (SELECT max(m.id) FROM messages m "
              "WHERE m.conversation_id = conversations.id)")


class SqliteWriter:
    def __init__(self, path: str):
        self.conn = sqlite3.connect(path)
        # A bulk load into a fresh file: a crash means starting over anyway.
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("BEGIN")
        self.drop, self.create = index_statements(sqlite.dialect())
        for statement in self.drop:
            self.conn.execute(statement)

    async def write(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        rows = [tuple(sqlite_time(v) if isinstance(v, datetime) else v for v in row)
                for row in rows]
        marks = ", ".join("?" * len(columns))
        self.conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    async def finish(self) -> None:
        for statement in self.create:
            self.conn.execute(statement)
        self.conn.execute(SET_LEAVES)
        self.conn.commit()
        self.conn.close()


class PostgresWriter:
    def __init__(self, dsn: str):
        self.dsn = dsn
        self.conn = None

    async def write(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if self.conn is None:
            import asyncpg

            self.conn = await asyncpg.connect(self.dsn)
            self.drop, self.create = index_statements(postgresql.dialect())
            for statement in self.drop:
                await self.conn.execute(statement)
        await self.conn.copy_records_to_table(table, records=rows, columns=list(columns))

    async def finish(self) -> None:
        for statement in self.create:
            await self.conn.execute(statement)
        await self.conn.execute(SET_LEAVES)
        for table in ("users", "conversations", "messages"):
            await self.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))")
        # Fresh statistics and visibility map, as autovacuum would leave them.
        await self.conn.execute("VACUUM ANALYZE")
        await self.conn.close()


async def prepare(url: str) -> None:
    """The service's schema, on a database without messages."""
    store = Store.from_url(url)
    try:
        await schema.ensure_schema(store.engine)
        async with store.engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(Message))).scalar()
    finally:
        await store.close()
    if count:
        raise SystemExit(f"error: the database already holds {count} messages; use an empty one")


def writer_for(url: str):
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return SqliteWriter(parsed.database)
    return PostgresWriter(parsed.set(drivername="postgresql").render_as_string(False))


async def generate(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    await prepare(args.url)
    end = datetime.now(timezone.utc).replace(tzinfo=None, second=0, microsecond=0)
    generator = Generator(args.messages, args.users, args.days, end, args.seed)
    writer = writer_for(args.url)
    await writer.write("users", USER_COLUMNS, generator.users())
    batch: list[tuple] = []
    written = 0  # the last message id written

    async def write_messages():
        nonlocal written
        await writer.write("messages", MESSAGE_COLUMNS, batch)
        written = batch[-1][0] if batch else written
        batch.clear()
        # Feedback after the replies it rates (foreign keys); the rest waits.
        ready = [row for row in generator.feedback if row[0] <= written]
        await writer.write("message_feedback", FEEDBACK_COLUMNS, ready)
        generator.feedback = [row for row in generator.feedback if row[0] > written]

    for conversations, messages in generator.run():
        if conversations:
            # Conversations before their messages (foreign keys).
            await write_messages()
            await writer.write("conversations", CONVERSATION_COLUMNS, conversations)
        batch.extend(messages)
        if len(batch) >= BATCH:
            await write_messages()
    await write_messages()
    await writer.finish()
    print(f"{generator.emitted} messages, {generator.next_conversation_id - 1} conversations, "
          f"{args.users} users over {args.days} days to {end:%Y-%m-%d %H:%M} UTC "
          f"in {time.perf_counter() - started:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="SQLAlchemy URL of an empty (or new) database")
    where.add_argument("--config", help="a service config file: its database.url")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        from tornado_app.config import load_settings

        args.url = load_settings(args.config).database.url
    else:
        try:
            args.url = async_url(args.url)
        except UnsupportedURL as exc:
            parser.error(f"--url: {exc}")
    if args.messages < 1 or args.users < 1 or args.days < 1:
        parser.error("--messages, --users and --days must be positive")
    asyncio.run(generate(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
