"""The Store: every SQL statement the service runs, behind small async methods.

It uses SQLAlchemy Core on an async engine (aiosqlite or asyncpg): each method
is one short transaction, so a reply is durable before it is sent.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event, select, text, update
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import ratelimit
from .models import (
    ROLE_ASSISTANT,
    ROLE_USER,
    STATUS_OK,
    Conversation,
    Message,
    User,
    utcnow,
)

users = User.__table__
conversations = Conversation.__table__
messages = Message.__table__

# SQLite: WAL lets readers run beside the writer; synchronous=NORMAL in WAL
# mode never loses a committed transaction when the process dies (kill -9),
# only, at worst, the last ones on a power cut. busy_timeout makes writers
# from several processes queue instead of failing with "database is locked".
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=30000",
    "PRAGMA foreign_keys=ON",
)


class StoreError(Exception):
    """A request the data does not allow (a duplicate user name, say)."""


def create_engine(url: str, echo: bool = False) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(parsed, echo=echo, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed, echo=echo)

    @event.listens_for(engine.sync_engine, "connect")
    def _set_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    return engine


class Store:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    @classmethod
    def from_url(cls, url: str, echo: bool = False) -> "Store":
        return cls(create_engine(url, echo))

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # Users

    async def create_user(
        self, username: str, password_hash: str | None, is_admin: bool = False
    ) -> Row:
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    users.insert()
                    .values(
                        username=username,
                        password_hash=password_hash,
                        is_admin=is_admin,
                        disabled=False,
                        created_at=utcnow(),
                    )
                    .returning(*users.c)
                )
                return result.one()
        except IntegrityError:
            raise StoreError(f"user {username!r} already exists") from None

    async def get_user(self, username: str) -> Row | None:
        async with self.engine.connect() as conn:
            result = await conn.execute(select(users).where(users.c.username == username))
            return result.one_or_none()

    async def list_users(self) -> list[Row]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(select(users).order_by(users.c.username)))

    async def set_disabled(self, username: str, disabled: bool = True) -> bool:
        """Returns False when there is no such user."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users).where(users.c.username == username).values(disabled=disabled)
            )
            return result.rowcount == 1

    # Conversations and messages

    async def open_conversation(self, user_id: int, client_id: str) -> int:
        """The conversation of (user, client_id), created on first use.

        INSERT .. ON CONFLICT DO NOTHING keeps two sockets that open the same
        conversation at once from failing on the unique constraint.
        """
        async with self.engine.begin() as conn:
            insert = ratelimit.dialect_insert(conn)(conversations)
            await conn.execute(
                insert.values(user_id=user_id, client_id=client_id, created_at=utcnow())
                .on_conflict_do_nothing(index_elements=["user_id", "client_id"])
            )
            result = await conn.execute(
                select(conversations.c.id).where(
                    conversations.c.user_id == user_id,
                    conversations.c.client_id == client_id,
                )
            )
            return result.scalar_one()

    async def add_user_message(self, conversation_id: int, user_id: int, content: str) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                messages.insert()
                .values(
                    conversation_id=conversation_id,
                    user_id=user_id,
                    role=ROLE_USER,
                    content=content,
                    status=STATUS_OK,
                    created_at=utcnow(),
                )
                .returning(messages.c.id)
            )
            return result.scalar_one()

    async def add_reply(
        self, conversation_id: int, user_id: int, reply_to_id: int, **fields
    ) -> int:
        """Save a reply (or the record of a failed or cancelled one).

        ``fields`` are Message columns: content, status, agent, model,
        tokens_in, tokens_out, latency_ms, ttft_ms, error_ref.
        """
        async with self.engine.begin() as conn:
            result = await conn.execute(
                messages.insert()
                .values(
                    conversation_id=conversation_id,
                    user_id=user_id,
                    reply_to_id=reply_to_id,
                    role=ROLE_ASSISTANT,
                    created_at=utcnow(),
                    **fields,
                )
                .returning(messages.c.id)
            )
            return result.scalar_one()

    async def history(self, conversation_id: int, before_id: int, limit: int) -> list[Row]:
        """The latest ``limit`` turns before a message, oldest first.

        User messages are all kept; of the replies only the delivered ones, so
        that an error text never becomes part of the model's context.
        """
        query = (
            select(messages.c.role, messages.c.content)
            .where(
                messages.c.conversation_id == conversation_id,
                messages.c.id < before_id,
                (messages.c.role == ROLE_USER) | (messages.c.status == STATUS_OK),
            )
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        rows.reverse()
        return rows

    async def conversation_messages(self, conversation_id: int) -> list[Row]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(messages)
                .where(messages.c.conversation_id == conversation_id)
                .order_by(messages.c.id)
            )
            return list(result)

    # Rate limit

    async def take_rate_limit(
        self, user_id: int, now: float, limit: int, per_seconds: float
    ) -> ratelimit.Decision:
        async with self.engine.begin() as conn:
            return await ratelimit.take(conn, user_id, now, limit, per_seconds)
