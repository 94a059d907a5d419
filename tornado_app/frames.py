"""The wire format: frames the server sends and the client frames it accepts.

Server frames are ``{"type", "message", "timestamp"}`` exactly as the spec
shows; the timestamp is UTC with microseconds and no zone suffix. A client
that asked for the ``ai-chat.v2`` subprotocol also gets ids on the frames about
a reply, an ``ack`` for each message, and more actions (docs/protocol.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone

# The WebSocket subprotocol of protocol v2.
V2 = "ai-chat.v2"

# Server frame types. The first three are the spec; the chunk is the opt-in
# streaming extension, the ack is v2's (docs/protocol.md).
SYSTEM = "system"
AI_RESPONSE = "ai_response"
ERROR = "error"
AI_RESPONSE_CHUNK = "ai_response_chunk"
ACK = "ack"
# v2 with "stream": true: a reply's tool calls (docs/protocol.md).
TOOL_CALL = "tool_call"
TOOL_RESULT = "tool_result"

WELCOME = "Welcome to AI Chat, {username}! How can I assist you today?"
CANCELLED = "The reply was cancelled."
IN_PROGRESS = "A reply is in progress."

# A conversation's name in /ws/ai/ai-chat/{client_id} and the history API.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")


def valid_client_id(client_id: str) -> bool:
    return _CLIENT_ID.fullmatch(client_id) is not None


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def frame(kind: str, message: str, **ids) -> str:
    """A server frame; ``ids`` (v2 only: reply_id, message_id, seq) follow the
    spec's three fields."""
    return json.dumps(
        {"type": kind, "message": message, "timestamp": timestamp(), **ids}, ensure_ascii=False
    )


def tool_frame(event, reply_id: str) -> str:
    """A v2 ``tool_call`` (``event.ok`` None) or ``tool_result`` frame: exactly
    the fields of the protocol. A result itself is never sent (it may hold
    data the page should not show)."""
    if event.ok is None:
        body = {"type": TOOL_CALL, "name": event.name, "arguments": event.arguments,
                "call_id": event.call_id, "reply_id": reply_id}
    else:
        body = {"type": TOOL_RESULT, "name": event.name, "call_id": event.call_id,
                "ok": event.ok, "reply_id": reply_id}
    return json.dumps(body, ensure_ascii=False)


class FrameError(ValueError):
    """A client frame that gets an ``error`` frame back; the text is the reply."""


@dataclass(frozen=True)
class ChatMessage:
    content: str
    stream: bool = False


@dataclass(frozen=True)
class Cancel:
    reply_id: str | None = None  # v2: any reply of the user's; None: this socket's


@dataclass(frozen=True)
class Resume:
    reply_id: str
    after_seq: int = -1


# Longest reply id accepted in a client frame (ours have 32 characters).
MAX_ID_CHARS = 64


def parse_client_frame(
    raw: str | bytes, max_chars: int, v2: bool = False
) -> ChatMessage | Cancel | Resume:
    """Read one client frame or raise FrameError with the text to send back."""
    if isinstance(raw, bytes):
        raise FrameError("Binary frames are not supported: send JSON text.")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise FrameError("Invalid message format: expected a JSON object.") from None
    if not isinstance(data, dict):
        raise FrameError("Invalid message format: expected a JSON object.")
    if "action" in data:
        return _parse_v2_action(data) if v2 else _parse_v1_action(data)
    if "content" not in data:
        raise FrameError("Invalid message format: the \"content\" field is required.")
    content = data["content"]
    if not isinstance(content, str) or not content.strip():
        raise FrameError("Invalid message format: \"content\" must be a non-empty string.")
    if len(content) > max_chars:
        raise FrameError(f"Message too long: \"content\" is limited to {max_chars} characters.")
    if "\x00" in content or not _is_encodable(content):
        # JSON allows "\u0000" and lone surrogates ("\ud800"); no database stores them.
        raise FrameError("Invalid message format: \"content\" must be valid Unicode text.")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise FrameError("Invalid message format: \"stream\" must be true or false.")
    return ChatMessage(content=content, stream=stream)


def _parse_v1_action(data: dict) -> Cancel:
    if data["action"] == "cancel":
        return Cancel()  # a reply_id is v2's: a v1 client's is ignored like any unknown field
    raise FrameError("Invalid message format: the only action is \"cancel\".")


def _parse_v2_action(data: dict) -> Cancel | Resume:
    action = data["action"]
    if action == "cancel":
        return Cancel(_reply_id(data, required=False))
    if action == "resume":
        after_seq = data.get("after_seq", -1)
        if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < -1:
            raise FrameError("Invalid message format: \"after_seq\" must be an integer >= -1.")
        return Resume(_reply_id(data, required=True), after_seq)
    raise FrameError(
        "Invalid message format: \"action\" must be one of \"cancel\", \"resume\".")


def _reply_id(data: dict, required: bool) -> str | None:
    reply_id = data.get("reply_id")
    if reply_id is None and not required:
        return None
    if not isinstance(reply_id, str) or not 0 < len(reply_id) <= MAX_ID_CHARS:
        raise FrameError("Invalid message format: \"reply_id\" must be a reply's id.")
    return reply_id


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
