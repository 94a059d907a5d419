"""Passwords (argon2id) and access tokens (JWT; see TokenVerifier)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ALGORITHM = "HS256"
# Accepted only from another issuer, with its configured public key.
EXTERNAL_ALGORITHMS = ("RS256", "ES256")
REQUIRED_CLAIMS = ["exp", "iat", "sub", "jti"]
# Longer tokens are refused before any parsing (ours are about 250 bytes).
MAX_TOKEN_BYTES = 4096
LEEWAY_SECONDS = 30
MAX_LEEWAY_SECONDS = 60

# A user name: what the CLI accepts, POST /token looks up and another issuer's
# token may name (the users.username column holds 64 characters).
USERNAME_MAX = 64
USERNAME_RULE = (f"user names are 1 to {USERNAME_MAX} printable characters "
                 "without surrounding spaces")

_hasher = PasswordHasher()


def valid_username(name: str) -> bool:
    return 0 < len(name) <= USERNAME_MAX and name.isprintable() and name.strip() == name


class AuthError(Exception):
    """A token that must be refused. The text is safe to log; never the token."""


@dataclass(frozen=True)
class Claims:
    username: str
    jti: str
    issued_at: datetime
    expires_at: datetime
    # Signed by another issuer's key rather than our secret.
    external: bool = False

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


class TokenVerifier:
    """Issues our tokens and checks every token, per RFC 8725.

    - Our own tokens are HS256 with the service's secret.
    - Optionally, tokens of another issuer (the main application) signed with
      RS256 or ES256 are checked with its public key (a PEM file or a JWKS
      file); no secret is shared.
    - The algorithm is chosen by the *key*, never trusted from the token:
      ``alg: none``, an HS256 token signed with the public key (key
      confusion) or any other algorithm is refused.
    - ``exp``, ``iat``, ``sub`` and ``jti`` are required; ``nbf`` is honoured;
      ``aud`` and ``iss`` are enforced when configured; the clock leeway is
      at most 60 s; tokens over 4 KiB are refused before any parsing.
    """

    def __init__(
        self,
        secret: str,
        leeway: float = LEEWAY_SECONDS,
        audience: str | None = None,
        issuer: str | None = None,
        external_keys: dict[str | None, tuple[object, str]] | None = None,
    ):
        self.secret = secret
        self.leeway = leeway
        self.audience = audience
        self.issuer = issuer
        # kid (None: the only key) -> (public key, its algorithm)
        self.external_keys = external_keys or {}

    @classmethod
    def from_settings(cls, settings) -> "TokenVerifier":
        """The verifier a tornado_app.config.Settings describes (reads key files)."""
        auth = settings.auth
        return cls(
            settings.jwt_secret,
            leeway=auth.leeway_seconds,
            audience=auth.audience,
            issuer=auth.issuer,
            external_keys=load_external_keys(auth.public_key_file, auth.jwks_file),
        )

    def issue(self, username: str, ttl_minutes: int) -> str:
        now = datetime.now(timezone.utc)
        payload = {
            "sub": username,
            "iat": now,
            "exp": now + timedelta(minutes=ttl_minutes),
            "jti": uuid.uuid4().hex,
        }
        if self.audience:
            payload["aud"] = self.audience
        if self.issuer:
            payload["iss"] = self.issuer
        return jwt.encode(payload, self.secret, algorithm=ALGORITHM)

    def decode(self, token: str) -> Claims:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthError("missing or oversized token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        key, algorithm, external = self._key_for(header)
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                options={"require": REQUIRED_CLAIMS},
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
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
            external=external,
        )

    def _key_for(self, header: dict) -> tuple[object, str, bool]:
        algorithm = header.get("alg")
        if algorithm == ALGORITHM:
            return self.secret, ALGORITHM, False
        if algorithm in EXTERNAL_ALGORITHMS and self.external_keys:
            kid = header.get("kid")
            entry = self.external_keys.get(kid) or (
                self.external_keys.get(None) if len(self.external_keys) == 1 else None
            )
            if entry is not None and entry[1] == algorithm:
                return entry[0], algorithm, True
        raise AuthError("token algorithm or key not accepted")


def load_external_keys(public_key_file: str | None, jwks_file: str | None) -> dict:
    """Public keys of another issuer, from a PEM file or a JWKS file.

    Raises ValueError with a message fit for a config error.
    """
    keys: dict[str | None, tuple[object, str]] = {}
    if public_key_file:
        try:
            jwk = jwt.PyJWK.from_dict(_pem_to_jwk(Path(public_key_file).read_bytes()))
        except (OSError, ValueError, jwt.PyJWKError) as exc:
            raise ValueError(f"cannot use {public_key_file} as a public key ({type(exc).__name__})")
        keys[None] = (jwk.key, jwk.algorithm_name)
    if jwks_file:
        try:
            jwks = jwt.PyJWKSet.from_json(Path(jwks_file).read_text(encoding="utf-8"))
        except (OSError, ValueError, jwt.PyJWKSetError) as exc:
            raise ValueError(f"cannot read {jwks_file} as a JWKS file ({type(exc).__name__})")
        for jwk in jwks.keys:
            keys[jwk.key_id] = (jwk.key, jwk.algorithm_name)
    for _key, algorithm in keys.values():
        if algorithm not in EXTERNAL_ALGORITHMS:
            raise ValueError(f"external keys must be for {' or '.join(EXTERNAL_ALGORITHMS)}")
    return keys


def _pem_to_jwk(pem: bytes) -> dict:
    """A PEM public key as a JWK dict, with the algorithm its type implies."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
        return {**jwk, "alg": "RS256"}
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
        return {**jwk, "alg": "ES256"}
    raise ValueError("only RSA and P-256 EC public keys are supported")


def bearer_value(value: str | None) -> str | None:
    """The token in a cookie value, with or without a ``Bearer `` prefix."""
    if not value:
        return None
    value = value.strip().strip('"')
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return value or None
