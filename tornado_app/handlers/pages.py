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

from tornado.web import StaticFileHandler

from ..frames import valid_client_id
from .base import BaseHandler

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
        if not valid_client_id(client_id):
            self.write_json(400, {"error": "invalid_request",
                                  "error_description": "Invalid client_id."})
            return
        rows = await self.store.transcript(user.id, client_id, HISTORY_LIMIT)
        self.write_json(200, {"client_id": client_id, "messages": [
            {"role": row.role, "content": row.content, "status": row.status,
             "created_at": iso_utc(row.created_at)}
            for row in rows
        ]})


def iso_utc(value: datetime) -> str:
    """A naive UTC time as ISO 8601 with a ``Z``, which every browser parses as UTC."""
    return value.isoformat(timespec="microseconds") + "Z"


routes = [
    (r"/()", PageFileHandler, {"path": str(STATIC_DIR), "default_filename": "index.html"}),
    (r"/static/(.+)", PageFileHandler, {"path": str(STATIC_DIR)}),
    (r"/api/conversations/([^/]+)/messages", ConversationMessagesHandler),
]
