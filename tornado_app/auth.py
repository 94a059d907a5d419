"""Passwords (argon2id) and access tokens (JWT, HS256).

Tokens carry ``sub`` (the user name), ``iat``, ``exp`` and ``jti``. Decoding
pins the algorithm, so ``alg: none`` and key-confusion tokens are refused, and
requires every one of those claims.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ["exp", "iat", "sub", "jti"]
# Longer tokens are refused before any parsing (ours are about 250 bytes).
MAX_TOKEN_BYTES = 4096
LEEWAY_SECONDS = 30

_hasher = PasswordHasher()


class AuthError(Exception):
    """A token that must be refused. The text is safe to log; never the token."""


@dataclass(frozen=True)
class Claims:
    username: str
    jti: str
    issued_at: datetime
    expires_at: datetime

    @property
    def issued_at_naive(self) -> datetime:
        """``issued_at`` as the naive UTC datetime the database stores."""
        return self.issued_at.replace(tzinfo=None)

    @property
    def expires_at_naive(self) -> datetime:
        return self.expires_at.replace(tzinfo=None)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant work whether or not the user exists: with no hash, a dummy is
    checked, so response time does not tell which user names exist."""
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash(uuid.uuid4().hex)


def issue_token(secret: str, username: str, ttl_minutes: int) -> str:
    now = datetime.now(timezone.utc)
    payload = {
        "sub": username,
        "iat": now,
        "exp": now + timedelta(minutes=ttl_minutes),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def decode_token(secret: str, token: str) -> Claims:
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise AuthError("missing or oversized token")
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": REQUIRED_CLAIMS},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token ({type(exc).__name__})") from None
    if not isinstance(payload.get("sub"), str) or not isinstance(payload.get("jti"), str):
        raise AuthError("invalid token (claims of the wrong type)")
    return Claims(
        username=payload["sub"],
        jti=payload["jti"],
        issued_at=datetime.fromtimestamp(payload["iat"], timezone.utc),
        expires_at=datetime.fromtimestamp(payload["exp"], timezone.utc),
    )


def bearer_value(value: str | None) -> str | None:
    """The token in a cookie value, with or without a ``Bearer `` prefix."""
    if not value:
        return None
    value = value.strip().strip('"')
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return value or None
