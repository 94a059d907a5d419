"""The chat page and what it reads.

- ``GET /``: ``static/index.html``; ``GET /static/...``: its script, styles
  and vendored files. Plain files, no build step, nothing fetched from
  elsewhere (a strict Content-Security-Policy says so to the browser).
- ``GET /api/conversations/{client_id}/messages``: the signed-in user's
  messages of that conversation, oldest first, for the page to show the
  history when it is reopened. The token comes from ``Authorization: Bearer``
  or the ``access_token`` cookie, never the query; no valid token: 401.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from tornado.web import StaticFileHandler

from ..store.models import (
    ROLE_ASSISTANT,
    ROLE_USER,
    STATUS_CANCELLED,
    STATUS_OK,
    Conversation,
    Message,
)
from .base import BaseHandler
from .chat_socket import CLIENT_ID

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# The newest this many messages of a conversation are returned.
HISTORY_LIMIT = 500
# Only this origin's files and sockets; no inline script, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def set_page_headers(handler: BaseHandler) -> None:
    """The security headers of every page and of the files it loads."""
    handler.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Referrer-Policy", "no-referrer")
    handler.set_header("Cache-Control", "no-cache")


class PageFileHandler(StaticFileHandler, BaseHandler):
    """Static files with the page's security headers (errors are JSON, as everywhere)."""

    def set_extra_headers(self, path: str) -> None:
        set_page_headers(self)


class ConversationMessagesHandler(BaseHandler):
    async def get(self, client_id: str) -> None:
        user = await self.signed_in_user()
        if user is None:
            self.set_header("WWW-Authenticate", "Bearer")
            self.write_json(401, {"error": "invalid_token",
                                  "error_description": "A valid token is required."})
            return
        if not CLIENT_ID.fullmatch(client_id):
            self.write_json(400, {"error": "invalid_request",
                                  "error_description": "Invalid client_id."})
            return
        rows = await self._messages(user.id, client_id)
        self.write_json(200, {"client_id": client_id, "messages": [
            {"role": row.role, "content": row.content, "status": row.status,
             "created_at": iso_utc(row.created_at)}
            for row in rows
        ]})

    async def _messages(self, user_id: int, client_id: str) -> list:
        """The delivered turns (user messages, finished or stopped replies), oldest first."""
        messages, conversations = Message.__table__, Conversation.__table__
        query = (
            select(messages.c.role, messages.c.content, messages.c.status,
                   messages.c.created_at)
            .join(conversations, conversations.c.id == messages.c.conversation_id)
            .where(
                conversations.c.user_id == user_id,
                conversations.c.client_id == client_id,
                messages.c.role.in_((ROLE_USER, ROLE_ASSISTANT)),
                messages.c.status.in_((STATUS_OK, STATUS_CANCELLED)),
            )
            .order_by(messages.c.id.desc())
            .limit(HISTORY_LIMIT)
        )
        async with self.store.engine.connect() as conn:
            rows = list(await conn.execute(query))
        rows.reverse()
        return rows


def iso_utc(value: datetime) -> str:
    """A naive UTC time as ISO 8601 with a ``Z``, which every browser parses as UTC."""
    return value.isoformat(timespec="microseconds") + "Z"


routes = [
    (r"/()", PageFileHandler, {"path": str(STATIC_DIR), "default_filename": "index.html"}),
    (r"/static/(.+)", PageFileHandler, {"path": str(STATIC_DIR)}),
    (r"/api/conversations/([^/]+)/messages", ConversationMessagesHandler),
]
