"""Why the server closes a WebSocket: each close code with its reason, in one place.

Codes are RFC 6455's (docs/protocol.md has the table). Reasons are short fixed texts,
under the protocol's 123 bytes, and never carry a token or an exception's
text. docs/protocol.md lists them for clients.
"""

from __future__ import annotations

from typing import NamedTuple

NORMAL = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009  # sent by Tornado itself (websocket_max_message_size)
SERVER_ERROR = 1011
TRY_AGAIN_LATER = 1013


class Close(NamedTuple):
    code: int
    reason: str


SHUTTING_DOWN = Close(GOING_AWAY, "Server shutting down")
ORIGIN_NOT_ALLOWED = Close(POLICY_VIOLATION, "Origin not allowed")
AUTHENTICATION_FAILED = Close(POLICY_VIOLATION, "Authentication failed")
INVALID_CLIENT_ID = Close(POLICY_VIOLATION, "Invalid client_id")
RATE_LIMIT_EXCEEDED = Close(POLICY_VIOLATION, "Rate limit exceeded")
CLIENT_TOO_SLOW = Close(POLICY_VIOLATION, "Client too slow")
ACCOUNT_DISABLED = Close(POLICY_VIOLATION, "Account disabled")
TOKEN_REVOKED = Close(POLICY_VIOLATION, "Token revoked")
SERVICE_UNAVAILABLE = Close(SERVER_ERROR, "Service unavailable")
UNEXPECTED_ERROR = Close(SERVER_ERROR, "Unexpected server error")
TOO_MANY_CONNECTIONS = Close(TRY_AGAIN_LATER, "Too many connections")
TOO_MANY_USER_CONNECTIONS = Close(TRY_AGAIN_LATER, "Too many connections for this user")
