"""SQLAlchemy models: the one description of the schema that Alembic migrates.

Times are naive UTC datetimes (the same on SQLite and PostgreSQL). Messages
carry their user_id as well as their conversation, so that per-user and
per-time reports need no join.
"""

from __future__ import annotations

from datetime import date, datetime, timezone

from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Values of Message.role and Message.status.
ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # NULL for users who can only sign in with an externally issued token.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Tokens issued before this time are refused ("log out everywhere").
    tokens_revoked_before: Mapped[datetime | None] = mapped_column(DateTime)
    # Quota overrides (tornado_app/quotas.py): NULL takes the config's limit;
    # ``quota_unlimited`` lifts every limit.
    quota_tokens_per_day: Mapped[int | None] = mapped_column(Integer)
    quota_tokens_per_month: Mapped[int | None] = mapped_column(Integer)
    quota_cost_per_month: Mapped[float | None] = mapped_column(Float)
    quota_unlimited: Mapped[bool | None] = mapped_column(Boolean)


class Conversation(Base):
    """One per (user, client_id): a reconnect with the same id continues it."""

    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("user_id", "client_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    client_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # The newest message of the active branch (messages.id; no foreign key, like
    # parent_id): the next message's parent, and where the prompt's path ends.
    active_leaf_id: Mapped[int | None] = mapped_column(Integer)
    # The agent the user chose for this conversation (agent.selectable); NULL: agent.backend.
    agent: Mapped[str | None] = mapped_column(String(64))


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_id", "conversation_id", "id"),
        # With id: a user's newest messages in recall's order (migration 0010).
        Index("ix_messages_user_created", "user_id", "created_at", "id"),
        Index("ix_messages_created", "created_at"),
        Index("ix_messages_public_id", "public_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The id clients see (frames' message_id and reply_id, the history API):
    # random, so that it tells nothing and is unique across instances. Always
    # set; nullable only so that adding it needs no rebuild of a SQLite table.
    public_id: Mapped[str | None] = mapped_column(String(32))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=STATUS_OK)
    # For replies: the user message answered, and who answered it how fast.
    reply_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL")
    )
    agent: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(200))
    tokens_in: Mapped[int | None] = mapped_column(Integer)
    tokens_out: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    # Short id quoted to the user in an error frame, to find the log line.
    error_ref: Mapped[str | None] = mapped_column(String(16))
    # For failed replies: the class of failure (AgentError.kind, "timeout", "internal").
    error_kind: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Of a reply: its price when saved (pricing in the config), so that a
    # later change of prices does not rewrite history. NULL: not priced.
    cost: Mapped[float | None] = mapped_column(Float)
    # The message before this one on its branch (a reply's is the user message
    # it answers): the transcript is a tree. No foreign key: the retention
    # purge deletes old messages, and a message whose parent is gone is a root.
    parent_id: Mapped[int | None] = mapped_column(Integer)
    # A reply made by regenerate (another reply to a message that had one);
    # NULL on rows older than migration 0008, which counts as false.
    regenerated: Mapped[bool | None] = mapped_column(Boolean)


class ReplyStream(Base):
    """A reply while it is generated, and for ``chat.resume_window_seconds``
    after: what a socket on any instance needs to resume it (replies.py).

    The generating instance holds a lease on it, renewed while it works; a
    reply whose lease ran out is saved as interrupted by any instance. Once
    the reply is saved, ``chunk_lengths`` keeps where its chunks began, so
    that its saved text can be cut into the same chunks again.
    """

    __tablename__ = "reply_streams"

    reply_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # The user message it answers (messages.id).
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    instance: Mapped[str] = mapped_column(String(128))
    lease_until: Mapped[float] = mapped_column(Float)  # unix seconds
    last_seq: Mapped[int] = mapped_column(Integer)  # of the chunks saved so far (-1: none)
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    chunk_lengths: Mapped[str | None] = mapped_column(Text)  # "12,5,9": set when finished
    # The reply's tool_call / tool_result events so far, JSON (replies.py,
    # ToolMark): kept with the chunks so that a resume replays them in place.
    tool_events: Mapped[str | None] = mapped_column(Text)
    # The reply's quota reservation (store/quotas.py; NULL: no quota applied):
    # held while the stream is live (unfinished, lease not run out), so it is
    # renewed with the lease, and released by the finish that saves the reply.
    reserved_tokens: Mapped[int | None] = mapped_column(Integer)
    reserved_cost: Mapped[float | None] = mapped_column(Float)


# Partial indexes hold only replies in flight (and cancel requests): opening a
# stream adds their entries, closing it removes them, and a table of an hour
# of replies costs no more to search than the handful in flight.
_live = ReplyStream.finished_at.is_(None)
Index("ix_reply_streams_live_conversation", ReplyStream.conversation_id,
      sqlite_where=_live, postgresql_where=_live)
Index("ix_reply_streams_live_lease", ReplyStream.lease_until,
      sqlite_where=_live, postgresql_where=_live)
_cancel = _live & ReplyStream.cancel_requested.is_(True)
Index("ix_reply_streams_cancel_requested", ReplyStream.instance,
      sqlite_where=_cancel, postgresql_where=_cancel)
# A user's live quota reservations (store/quotas.py): the few rows to sum.
# Replies without a quota have no entry, so they pay nothing for it.
_reserved = _live & ReplyStream.reserved_tokens.is_not(None)
Index("ix_reply_streams_live_reserved", ReplyStream.user_id, ReplyStream.lease_until,
      sqlite_where=_reserved, postgresql_where=_reserved)
# Streams are forgotten by age (set once, unlike finished_at).
Index("ix_reply_streams_created", ReplyStream.created_at)


class ReplyChunk(Base):
    """A piece of a reply in flight, saved in batches; deleted when the reply is saved."""

    __tablename__ = "reply_chunks"

    reply_id: Mapped[str] = mapped_column(
        ForeignKey("reply_streams.reply_id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(Text)


class ToolStep(Base):
    """One tool call of a reply (tornado_app/tool_loop.py), saved with the reply.

    ``result`` keeps at most RESULT_CHARS characters (store/tool_steps.py);
    later prompts read it back. Deleted with its reply (and so by retention).
    """

    __tablename__ = "tool_steps"
    __table_args__ = (
        Index("ix_tool_steps_conversation", "conversation_id", "message_id"),
        Index("ix_tool_steps_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The reply (messages.id) it belongs to.
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    agent: Mapped[str | None] = mapped_column(String(64))
    turn: Mapped[int] = mapped_column(Integer)  # the model turn that asked, from 0
    call_id: Mapped[str] = mapped_column(String(128))
    tool: Mapped[str] = mapped_column(String(64))
    arguments: Mapped[str] = mapped_column(Text)  # JSON
    result: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # ok, error, timeout
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RateLimit(Base):
    """GCRA state per user: the theoretical arrival time of the next message."""

    __tablename__ = "rate_limits"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    tat: Mapped[float] = mapped_column(Float)  # unix seconds
    # Whether the last decision let the message through (read back by RETURNING).
    granted: Mapped[bool] = mapped_column(Boolean)


class RevokedToken(Base):
    """A single token revoked before its expiry (POST /logout)."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # After this the token is refused anyway, and the row can be purged.
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    revoked_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ConnectionLease(Base):
    """One open socket of a user, on some instance. Live sockets renew their
    lease; a process killed with -9 stops renewing, and its leases expire."""

    __tablename__ = "connection_leases"
    __table_args__ = (Index("ix_connection_leases_user_expires", "user_id", "expires_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    instance: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)  # unix seconds


class Memory(Base):
    """A user's saved memory: key -> value (tornado_app/memory.py). The value
    is encrypted (AES-GCM, bound to the user and key); the key stays plain
    for lookup. Deleting the user deletes them; retention never does."""

    __tablename__ = "memories"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)  # nonce + ciphertext + tag
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# Full-text search over messages (the recall tool): SQLite's FTS5 table
# ``messages_fts`` (kept by triggers) and PostgreSQL's GIN index
# ``ix_messages_fts`` are made by migration 0006 and are not described here
# (neither is a plain table or index); schema.include_object leaves them out
# of comparisons with these models.
FULL_TEXT_NAMES = ("messages_fts", "ix_messages_fts")


class QuotaUsage(Base):
    """Tokens and cost of a user's saved replies per UTC day: what the quotas
    count (a month is the sum of its days). Added to in the transaction that
    saves each reply."""

    __tablename__ = "quota_usage"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    tokens: Mapped[int] = mapped_column(Integer)
    cost: Mapped[float] = mapped_column(Float)


# Analytics (tornado_app/analytics): indexes for the reports, and daily rollups
# that the retention purge keeps. The rollups are written off the message path;
# the indexes cost each insert a little (measured in docs/analytics.md).

# The chat_turns view and the rollup join a user message to its reply; the
# purge deletes messages whose replies point at them (ON DELETE SET NULL).
Index("ix_messages_reply_to_id", Message.reply_to_id)
# Failed replies only (a few percent of rows): the errors report over any range.
Index(
    "ix_messages_error_created",
    Message.created_at,
    sqlite_where=Message.status == STATUS_ERROR,
    postgresql_where=Message.status == STATUS_ERROR,
)


def _ok_reply_index(name: str, *columns: str) -> Index:
    ok_reply = (Message.role == ROLE_ASSISTANT) & (Message.status == STATUS_OK)
    return Index(name, *(Message.__table__.c[c] for c in columns),
                 sqlite_where=ok_reply, postgresql_where=ok_reply)


# Successful replies in latency (and TTFT) order: an exact percentile is read at
# an offset along one of these, without sorting or visiting the table. The
# agent-and-model-first pair serves the per-agent report.
_ok_reply_index("ix_messages_ok_latency", "latency_ms", "created_at", "agent")
_ok_reply_index("ix_messages_ok_ttft", "ttft_ms", "created_at", "agent")
_ok_reply_index("ix_messages_ok_agent_latency", "agent", "model", "latency_ms", "created_at")
_ok_reply_index("ix_messages_ok_agent_ttft", "agent", "model", "ttft_ms", "created_at")
# One user's successful replies with everything their percentiles need (--user).
_ok_reply_index("ix_messages_ok_user", "user_id", "created_at", "agent", "model", "latency_ms",
                "ttft_ms")

# No index on messages.parent_id: every message insert would pay for it, and
# the one query that walks down to children (a switch) reads the
# conversation's later messages instead (branches.newest_descendant; 0011).


class Feedback(Base):
    """A user's rating of a reply (1 up, -1 down) and an optional comment; one
    per reply (only its own user may rate it), replaced when sent again."""

    __tablename__ = "message_feedback"
    __table_args__ = (Index("ix_message_feedback_created", "created_at"),)

    message_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    rating: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class DailyRollup(Base):
    """Additive counters per UTC day, conversation, agent and model.

    A user message counts under the agent and model of its reply ('' when it
    has none). conversation_id has no foreign key on purpose: the purge deletes
    old conversations, and their rollups must stay.
    """

    __tablename__ = "analytics_daily"
    __table_args__ = (Index("ix_analytics_daily_user_day", "user_id", "day"),)

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    agent: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    user_messages: Mapped[int] = mapped_column(Integer)
    replies: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    cancelled: Mapped[int] = mapped_column(Integer)
    tokens_in: Mapped[int] = mapped_column(Integer)
    tokens_out: Mapped[int] = mapped_column(Integer)
    # Sums and counts over successful replies, for averages that add up.
    latency_ms_sum: Mapped[float] = mapped_column(Float)
    latency_count: Mapped[int] = mapped_column(Integer)
    ttft_ms_sum: Mapped[float] = mapped_column(Float)
    ttft_count: Mapped[int] = mapped_column(Integer)
    # Regenerated replies (migration 0008; rollups made before it count none).
    regenerated: Mapped[int] = mapped_column(Integer, server_default="0")
    first_at: Mapped[datetime] = mapped_column(DateTime)
    last_at: Mapped[datetime] = mapped_column(DateTime)
    # The replies' stored cost, and the replies without a price (migration 0009).
    cost: Mapped[float] = mapped_column(Float, server_default="0")
    unpriced_replies: Mapped[int] = mapped_column(Integer, server_default="0")
    unpriced_tokens_in: Mapped[int] = mapped_column(Integer, server_default="0")
    unpriced_tokens_out: Mapped[int] = mapped_column(Integer, server_default="0")


class DailyPercentiles(Base):
    """Exact p50/p95 of one UTC day's successful replies, per agent ('' = all).

    Percentiles do not add up across days, so the daily report reads them
    from here; other reports compute theirs from the messages.
    """

    __tablename__ = "analytics_daily_percentiles"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    agent: Mapped[str] = mapped_column(String(64), primary_key=True)
    latency_count: Mapped[int] = mapped_column(Integer)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    ttft_count: Mapped[int] = mapped_column(Integer)
    ttft_p50_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p95_ms: Mapped[float | None] = mapped_column(Float)


class RollupDay(Base):
    """A UTC day whose rollups are written (and final: the day is over)."""

    __tablename__ = "analytics_rollup_days"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    rolled_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Set when the retention purge deleted the day's messages: its rollups no
    # longer match the rows left, so percentiles must count those instead.
    purged_at: Mapped[datetime | None] = mapped_column(DateTime)
