"""The chat page and what it reads.

- ``GET /``: ``static/index.html``; ``GET /static/...``: its script, styles
  and vendored files. Plain files, no build step, nothing fetched from
  elsewhere (a strict Content-Security-Policy says so to the browser).
- ``GET /api/conversations/{client_id}/messages``: the signed-in user's
  messages of that conversation, oldest first, for the page to show the
  history when it is reopened: the active branch's path, or with ``?all=1``
  the whole tree; each message with its parent, its siblings and its
  feedback, each reply with its tool steps (never their results). The token comes from ``Authorization: Bearer`` or the
  ``access_token`` cookie, never the query; no valid token: 401.
- ``PUT /api/replies/{reply_id}/feedback``: the signed-in user's feedback on
  a reply of theirs (JSON ``{"rating": 1 | -1 | 0, "comment": ...}``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from tornado.web import StaticFileHandler

from ..frames import MAX_ID_CHARS, FrameError, parse_feedback, valid_client_id
from ..store.models import ROLE_ASSISTANT, STATUS_ERROR, STATUS_OK
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


class UserApiHandler(BaseHandler):
    async def user_or_401(self):
        user = await self.signed_in_user()
        if user is None:
            self.set_header("WWW-Authenticate", "Bearer")
            self.write_json(401, {"error": "invalid_token",
                                  "error_description": "A valid token is required."})
        return user


class ConversationMessagesHandler(UserApiHandler):
    async def get(self, client_id: str) -> None:
        user = await self.user_or_401()
        if user is None:
            return
        if not valid_client_id(client_id):
            self.write_json(400, {"error": "invalid_request",
                                  "error_description": "Invalid client_id."})
            return
        leaf, rows, steps = await self.store.conversation_tree(user.id, client_id)
        whole = self.get_query_argument("all", "0") not in ("0", "", "false")
        self.write_json(200, {"client_id": client_id,
                              "messages": tree_messages(rows, leaf, whole, steps)})


class ReplyFeedbackHandler(UserApiHandler):
    async def put(self, reply_id: str) -> None:
        user = await self.user_or_401()
        if user is None:
            return
        try:
            body = json.loads(self.request.body or b"null")
            if not isinstance(body, dict):
                raise FrameError("Invalid feedback: expected a JSON object.")
            feedback = parse_feedback(body, reply_id)
        except (ValueError, RecursionError) as exc:
            text = str(exc) if isinstance(exc, FrameError) else "Invalid feedback: not JSON."
            self.write_json(422, {"error": "invalid_request", "error_description": text})
            return
        if len(reply_id) > MAX_ID_CHARS or not await self.store.set_feedback(
                user.id, reply_id, feedback.rating, feedback.comment):
            self.write_json(404, {"error": "not_found",
                                  "error_description": "There is no such reply of yours."})
            return
        self.write_json(200, {"reply_id": reply_id, "rating": feedback.rating or None,
                              "comment": feedback.comment if feedback.rating else None})


def tree_messages(rows: list, leaf: int | None, whole: bool,
                  steps: dict[int, list]) -> list[dict]:
    """The history API's messages: the active path from the root to ``leaf``
    (or, ``whole``, every message), oldest first. A message whose parent was
    purged counts as a root; ``siblings`` are the ids of its parent's
    children (itself included), oldest first; a reply has its ``tool_steps``
    (``steps``: by message row id)."""
    by_id = {row.id: row for row in rows}
    children = defaultdict(list)
    for row in rows:
        children[row.parent_id if row.parent_id in by_id else None].append(row.public_id)
    if whole:
        chosen = rows
    else:
        chosen, current = [], by_id.get(leaf)
        while current is not None and len(chosen) < HISTORY_LIMIT:
            chosen.append(current)
            current = by_id.get(current.parent_id)
        chosen.reverse()
        # As in the prompt: a failed reply's text (an error reference) is left out.
        chosen = [row for row in chosen
                  if not (row.role == ROLE_ASSISTANT and row.status == STATUS_ERROR)]
    return [
        {"id": row.public_id,
         "parent_id": by_id[row.parent_id].public_id if row.parent_id in by_id else None,
         "role": row.role, "content": row.content, "status": row.status,
         "created_at": iso_utc(row.created_at),
         "siblings": children[row.parent_id if row.parent_id in by_id else None],
         "feedback": None if row.rating is None else {"rating": row.rating,
                                                      "comment": row.comment},
         **({"tool_steps": [tool_step(step) for step in steps.get(row.id, ())]}
            if row.role == ROLE_ASSISTANT else {})}
        for row in chosen
    ]


def tool_step(row) -> dict:
    """One tool call of a reply as the history API gives it: what was called
    and how it went, never its result (as the v2 frames)."""
    return {"call_id": row.call_id, "name": row.name, "arguments": json.loads(row.arguments),
            "ok": row.status == STATUS_OK, "status": row.status, "turn": row.turn,
            "latency_ms": round(row.latency_ms, 1)}


def iso_utc(value: datetime) -> str:
    """A naive UTC time as ISO 8601 with a ``Z``, which every browser parses as UTC."""
    return value.isoformat(timespec="microseconds") + "Z"


routes = [
    (r"/()", PageFileHandler, {"path": str(STATIC_DIR), "default_filename": "index.html"}),
    (r"/static/(.+)", PageFileHandler, {"path": str(STATIC_DIR)}),
    (r"/api/conversations/([^/]+)/messages", ConversationMessagesHandler),
    (r"/api/replies/([^/]+)/feedback", ReplyFeedbackHandler),
]
