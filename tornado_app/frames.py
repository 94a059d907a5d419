"""The wire format: frames the server sends and the client frames it accepts.

Server frames are ``{"type", "message", "timestamp"}`` exactly as the spec
shows; the timestamp is UTC with microseconds and no zone suffix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone

# Server frame types. The first three are the spec; the last is the opt-in
# streaming extension (docs/protocol.md).
SYSTEM = "system"
AI_RESPONSE = "ai_response"
ERROR = "error"
AI_RESPONSE_CHUNK = "ai_response_chunk"

WELCOME = "Welcome to AI Chat, {username}! How can I assist you today?"

# A conversation's name in /ws/ai/ai-chat/{client_id} and the history API.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")


def valid_client_id(client_id: str) -> bool:
    return _CLIENT_ID.fullmatch(client_id) is not None


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def frame(kind: str, message: str) -> str:
    return json.dumps(
        {"type": kind, "message": message, "timestamp": timestamp()}, ensure_ascii=False
    )


class FrameError(ValueError):
    """A client frame that gets an ``error`` frame back; the text is the reply."""


@dataclass(frozen=True)
class ChatMessage:
    content: str
    stream: bool = False


@dataclass(frozen=True)
class Cancel:
    pass


def parse_client_frame(raw: str | bytes, max_chars: int) -> ChatMessage | Cancel:
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
        if data["action"] == "cancel":
            return Cancel()
        raise FrameError("Invalid message format: the only action is \"cancel\".")
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


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
