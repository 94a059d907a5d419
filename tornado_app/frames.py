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
# Conversation controls (v2).
FEEDBACK_THANKS = "Thanks for your feedback."
NOW_ANSWERING = "Now answering with {agent}."
AGENT_GONE = "{agent} is no longer available; now answering with {backend}."
UNKNOWN_MESSAGE = "There is no such message of yours."
SWITCHED = "Switched branches."
UNKNOWN_AGENT = "There is no agent {agent!r} to choose; choose one of: {choices}."
NOTHING_TO_REGENERATE = "There is no message to regenerate a reply to."

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
    content: str  # "" for a regenerate: the saved message is answered again
    stream: bool = False
    # v2: "edit" (a new version of message ``target``) or "regenerate" (a new
    # reply to reply ``target``'s message, or to the active branch's last one).
    branch: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Feedback:
    reply_id: str
    rating: int  # 1, -1, or 0 to remove
    comment: str | None = None


@dataclass(frozen=True)
class Switch:
    message_id: str


@dataclass(frozen=True)
class UseAgent:
    agent: str


@dataclass(frozen=True)
class Cancel:
    reply_id: str | None = None  # v2: any reply of the user's; None: this socket's


@dataclass(frozen=True)
class Resume:
    reply_id: str
    after_seq: int = -1
    tools_seen: int | None = None  # tool frames of the reply already received


# Longest reply id accepted in a client frame (ours have 32 characters).
MAX_ID_CHARS = 64
# Longest feedback comment.
MAX_COMMENT_CHARS = 1000
V2_ACTIONS = ("cancel", "resume", "feedback", "regenerate", "edit", "switch", "use_agent")


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
        return _parse_v2_action(data, max_chars) if v2 else _parse_v1_action(data)
    if "content" not in data:
        raise FrameError("Invalid message format: the \"content\" field is required.")
    return ChatMessage(content=_content(data, max_chars), stream=_stream(data))


def _content(data: dict, max_chars: int) -> str:
    content = data.get("content")
    if not isinstance(content, str) or not content.strip():
        raise FrameError("Invalid message format: \"content\" must be a non-empty string.")
    if len(content) > max_chars:
        raise FrameError(f"Message too long: \"content\" is limited to {max_chars} characters.")
    if "\x00" in content or not _is_encodable(content):
        # JSON allows "\u0000" and lone surrogates ("\ud800"); no database stores them.
        raise FrameError("Invalid message format: \"content\" must be valid Unicode text.")
    return content


def _stream(data: dict) -> bool:
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise FrameError("Invalid message format: \"stream\" must be true or false.")
    return stream


def _parse_v1_action(data: dict) -> Cancel:
    if data["action"] == "cancel":
        return Cancel()  # a reply_id is v2's: a v1 client's is ignored like any unknown field
    raise FrameError("Invalid message format: the only action is \"cancel\".")


def _parse_v2_action(data: dict, max_chars: int):
    action = data["action"]
    if action == "cancel":
        return Cancel(_reply_id(data, required=False))
    if action == "resume":
        after_seq = data.get("after_seq", -1)
        if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < -1:
            raise FrameError("Invalid message format: \"after_seq\" must be an integer >= -1.")
        tools_seen = data.get("tools_seen")
        if tools_seen is not None and (not isinstance(tools_seen, int)
                                       or isinstance(tools_seen, bool) or tools_seen < 0):
            raise FrameError("Invalid message format: \"tools_seen\" must be an integer >= 0.")
        return Resume(_reply_id(data, required=True), after_seq, tools_seen)
    if action == "feedback":
        return parse_feedback(data, _reply_id(data, required=True))
    if action == "regenerate":
        return ChatMessage("", _stream(data), "regenerate", _reply_id(data, required=False))
    if action == "edit":
        return ChatMessage(_content(data, max_chars), _stream(data), "edit",
                           _id(data, "message_id", "a message's id"))
    if action == "switch":
        return Switch(_id(data, "message_id", "a message's id"))
    if action == "use_agent":
        return UseAgent(_id(data, "agent", "an agent's name"))
    raise FrameError("Invalid message format: \"action\" must be one of "
                     + ", ".join(f'"{name}"' for name in V2_ACTIONS) + ".")


def parse_feedback(data: dict, reply_id: str) -> Feedback:
    """A feedback's rating and comment (the v2 action's, or PUT's JSON body)."""
    rating = data.get("rating")
    if not isinstance(rating, int) or isinstance(rating, bool) or rating not in (1, -1, 0):
        raise FrameError("Invalid feedback: \"rating\" must be 1, -1 or 0 (to remove it).")
    comment = data.get("comment")
    if comment is not None:
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS:
            raise FrameError(f"Invalid feedback: \"comment\" must be a string of at most "
                             f"{MAX_COMMENT_CHARS} characters.")
        if "\x00" in comment or not _is_encodable(comment):
            raise FrameError("Invalid feedback: \"comment\" must be valid Unicode text.")
        comment = comment.strip() or None
    return Feedback(reply_id, rating, comment)


def _reply_id(data: dict, required: bool) -> str | None:
    if data.get("reply_id") is None and not required:
        return None
    return _id(data, "reply_id", "a reply's id")


def _id(data: dict, name: str, what: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise FrameError(f"Invalid message format: \"{name}\" must be {what}.")
    return value


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
