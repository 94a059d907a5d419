"""Typed settings, read once from YAML and the environment.

Precedence: built-in defaults < the YAML file < ``TORNADO_APP_<SECTION>__<KEY>``
environment variables. ``DATABASE_URL``, which hosting platforms set, fills
``database.url`` when neither the file nor ``TORNADO_APP_DATABASE__URL`` does.
Relative paths (``data_dir``, a relative SQLite file) are taken relative to the
folder of the config file, so a service manager may start the server from any
working directory.

Every mistake is reported as one :class:`ConfigError` line that names the key
and the fix; ``__main__`` turns it into exit code 2.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .store import urls

ENV_PREFIX = "TORNADO_APP_"
# Set by hosting platforms (Heroku, Render, Fly.io...); see load_settings.
PLATFORM_DATABASE_URL = "DATABASE_URL"
MIN_SECRET_BYTES = 32


class ConfigError(Exception):
    """A configuration mistake, phrased for the operator in one line."""


class Section(BaseModel):
    # Unknown keys are mistakes (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Largest WebSocket frame accepted; a bigger one closes the socket with 1009.
    max_message_bytes: int = Field(64 * 1024, ge=1024)
    ping_interval_seconds: float = Field(20.0, ge=0)
    ping_timeout_seconds: float = Field(20.0, gt=0)
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    # Pre-forked worker processes sharing the port (1: this process serves).
    processes: int = Field(1, ge=1, le=256)
    # Browser origins (scheme://host[:port]) allowed to open the WebSocket.
    # Empty: only the page's own origin. Requests without Origin (scripts) pass.
    allowed_origins: list[str] = []
    # A frame the client does not take within this time closes its socket.
    write_timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _ping_timeout_within_interval(self):
        # Tornado silently shortens a timeout longer than the interval; say so instead.
        if self.ping_interval_seconds and self.ping_timeout_seconds > self.ping_interval_seconds:
            raise ValueError("ping_timeout_seconds must not exceed ping_interval_seconds")
        return self


class DatabaseSettings(Section):
    # sqlite:///file or postgresql://user:password@host/db (or the +aiosqlite /
    # +asyncpg forms); always held as the async form (tornado_app.store.urls).
    url: str = "sqlite:///data/chat.db"
    echo: bool = False
    # Longest wait for the database: connecting and each statement on
    # PostgreSQL, the write lock (busy timeout) on SQLite. Past it the client
    # gets an error frame instead of waiting for ever.
    timeout_seconds: float = Field(10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _async_url(cls, value: str) -> str:
        try:
            return urls.async_url(value)
        except urls.UnsupportedURL as exc:
            # A custom error type keeps pydantic's "Value error, " off the line.
            raise PydanticCustomError("database_url", str(exc)) from None


class AuthSettings(Section):
    # HS256 secret. Left empty, one is generated on first run into jwt_secret_file.
    jwt_secret: SecretStr | None = None
    jwt_secret_file: str = "jwt_secret"  # relative to data_dir
    token_ttl_minutes: int = Field(60, ge=1)
    # Set true when the service is reached over HTTPS (adds Secure to the cookie).
    cookie_secure: bool = False
    # How often each process re-checks its open sockets for revoked tokens and
    # disabled users (they are closed with 1008).
    recheck_seconds: float = Field(30.0, gt=0)
    # Clock skew tolerated on exp, nbf and iat (RFC 8725: keep it small).
    leeway_seconds: float = Field(30.0, ge=0, le=60)
    # When set, tokens must carry this aud / iss (ours do).
    audience: str | None = None
    issuer: str | None = None
    # Another issuer's public key (RS256 or ES256), so that its tokens are
    # accepted without sharing a secret: a PEM file or a JWKS file.
    public_key_file: str | None = None
    jwks_file: str | None = None
    # Create users named by a valid token of that issuer on first sight.
    auto_create_users: bool = False


class RateLimitSettings(Section):
    messages: int = Field(20, ge=1)
    per_seconds: float = Field(60.0, gt=0)
    # Messages refused in a row before the socket is closed with 1008.
    max_rejections: int = Field(5, ge=1)


class ChatSettings(Section):
    max_content_chars: int = Field(4000, ge=1)
    # Unanswered messages one socket may have, the one being answered included.
    max_pending: int = Field(5, ge=1)
    # A reply whose socket closes goes on to its end (false: it is cancelled).
    finish_after_disconnect: bool = True
    # How long after its end a reply can still be resumed chunk by chunk
    # (later, a resume gets its whole text at once).
    resume_window_seconds: float = Field(3600.0, ge=0)


class LimitsSettings(Section):
    # Open sockets one process accepts; past it new sockets are closed with 1013.
    connections_per_process: int = Field(10000, ge=1)
    # Open sockets one user may have across all processes and instances.
    connections_per_user: int = Field(10, ge=1)
    # A socket's slot is a lease row renewed while it lives: a killed process's
    # slots free themselves within this time.
    lease_seconds: float = Field(30.0, ge=3)


class AgentSettings(BaseModel):
    """The agent section. Plugin option sections (``agent.<plugin>``) are extra
    keys here; each plugin validates its own (see tornado_app.agents)."""

    model_config = ConfigDict(extra="allow", validate_default=True)

    backend: str = "echo"
    # Small models answer better when the name is a separate fact.
    system_prompt: str = "You are a helpful assistant. The user's name is {username}."
    fallbacks: list[str] = []
    # Deadline for one whole reply, first token to last.
    timeout_seconds: float = Field(120.0, gt=0)
    # The tools (tornado_app.toolbox) an agent that supports them may call.
    tools: list[str] = []
    # Model turns that may call tools; then the host asks for an answer without them.
    max_tool_steps: int = Field(4, ge=0, le=32)

    def plugin_options(self, name: str) -> dict[str, Any]:
        return _plugin_section(self, "agent", name)


def _plugin_section(settings: BaseModel, section: str, name: str) -> dict[str, Any]:
    """The extra key ``name`` of a section: a plugin's options."""
    value = (settings.model_extra or {}).get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{section}.{name}: must be a mapping of options")
    return value


class ToolsSettings(BaseModel):
    """The tools section. Tool option sections (``tools.<name>``) are extra
    keys here; each tool validates its own (see tornado_app.toolbox)."""

    model_config = ConfigDict(extra="allow", validate_default=True)

    # Longest a tool call may take (the reply's own deadline may cut it shorter).
    timeout_seconds: float = Field(10.0, gt=0, le=600)

    def plugin_options(self, name: str) -> dict[str, Any]:
        return _plugin_section(self, "tools", name)


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class AnalyticsSettings(Section):
    # Transcripts (messages, then emptied conversations) older than this many
    # whole UTC days are purged; the daily rollups are kept. None: keep forever.
    retention_days: int | None = Field(None, ge=1)
    # How often the server rolls up finished days and applies the retention.
    rollup_interval_seconds: float = Field(3600.0, ge=1)


class MemorySettings(Section):
    """Each user's saved memories (tornado_app/memory.py)."""

    # Encrypts memory values at rest (AES-GCM, key derived by HKDF). Left
    # empty, one is generated on first run into key_file. Losing it loses
    # the memories: back it up with the database.
    key: SecretStr | None = None
    key_file: str = "memory_key"  # relative to data_dir
    # Memories one user may save.
    max_items: int = Field(100, ge=1, le=10000)
    # Share of the prompt's budget (agent context minus reply) the memories
    # may take in the system prompt; the most recently updated come first.
    prompt_share: float = Field(0.25, gt=0, le=0.9)


class Settings(Section):
    data_dir: str = "data"
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    chat: ChatSettings = ChatSettings()
    limits: LimitsSettings = LimitsSettings()
    agent: AgentSettings = AgentSettings()
    tools: ToolsSettings = ToolsSettings()
    logging: LoggingSettings = LoggingSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()
    memory: MemorySettings = MemorySettings()

    @property
    def jwt_secret(self) -> str:
        assert self.auth.jwt_secret is not None, "load_settings() fills the secret"
        return self.auth.jwt_secret.get_secret_value()

    @property
    def memory_key(self) -> str:
        assert self.memory.key is not None, "load_settings() fills the key"
        return self.memory.key.get_secret_value()


def load_settings(
    path: str | os.PathLike | None, environ: dict[str, str] | None = None
) -> Settings:
    """Read, merge and validate; resolve paths; make sure a JWT secret exists."""
    environ = os.environ if environ is None else environ
    raw = _read_yaml(Path(path)) if path else {}
    from_env: dict[tuple, str] = {}
    for name, keys, value in _env_overrides(environ):
        _set_nested(raw, keys, value)
        from_env[tuple(keys)] = name
    database = raw.get("database", {})
    if environ.get(PLATFORM_DATABASE_URL) and isinstance(database, dict) and "url" not in database:
        _set_nested(raw, ["database", "url"], environ[PLATFORM_DATABASE_URL])
        from_env[("database", "url")] = PLATFORM_DATABASE_URL
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, from_env=from_env)) from None
    base = Path(path).resolve().parent if path else Path.cwd()
    _resolve_paths(settings, base)
    _ensure_jwt_secret(settings)
    _ensure_memory_key(settings)
    _check_external_keys(settings)
    return settings


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (server:, auth:, ...)")
    return data


def _env_overrides(environ: dict[str, str]):
    """Yield (variable, key path, value) for every TORNADO_APP_SECTION__KEY variable.

    Values stay strings (pydantic converts "8001" or "true"); a value that
    starts with [ or { is read as YAML, for lists such as agent.fallbacks.
    """
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        if value.strip()[:1] in ("[", "{"):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{name}: not a valid YAML list or mapping") from None
        yield name, keys, value


def _set_nested(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = tree[key] = {}
        tree = child
    tree[keys[-1]] = value


def env_name(loc: tuple) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def describe_error(
    exc: ValidationError,
    prefix: tuple = (),
    model: type[BaseModel] | None = None,
    from_env: dict[tuple, str] | None = None,
) -> str:
    """One line for the first error: the key, what is wrong, how to fix it.

    ``prefix`` and ``model`` place a plugin's options (validated on their own)
    at their key, e.g. ``("agent", "openai")``. ``from_env`` maps key paths to
    the environment variables that set them, so the line can name the variable.
    """
    error = exc.errors()[0]
    inner = tuple(part for part in error["loc"] if not isinstance(part, int))
    loc = prefix + inner
    key = ".".join(str(part) for part in loc)
    variable = _env_variable(loc, from_env or {})
    origin = f" (set by {variable})" if variable else ""
    if error["type"] == "extra_forbidden":
        known = _known_keys(model or Settings, inner[:-1])
        return f"{key}: unknown key{origin}; remove it or use one of: {', '.join(known)}"
    got = error.get("input")
    # Secrets are never echoed, nor URLs, which may carry a password.
    hidden = any(word in key for word in ("secret", "key", "password", "url"))
    shown = "" if isinstance(got, (dict, list)) or hidden else f" (got {got!r})"
    where = variable or f"the config file or {env_name(loc)}"
    return f"{key}: {error['msg']}{shown}; fix it in {where}"


def _env_variable(loc: tuple, from_env: dict[tuple, str]) -> str | None:
    """The environment variable that set this key or one below it, if one did."""
    for keys, name in from_env.items():
        if keys[: len(loc)] == loc:
            return name
    return None


def _known_keys(model: type[BaseModel], section: tuple) -> list[str]:
    for part in section:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _resolve_paths(settings: Settings, base: Path) -> None:
    data_dir = Path(settings.data_dir)
    settings.data_dir = str(data_dir if data_dir.is_absolute() else base / data_dir)
    for key in ("public_key_file", "jwks_file"):
        value = getattr(settings.auth, key)
        if value and not Path(value).is_absolute():
            setattr(settings.auth, key, str(base / value))
    settings.database.url = urls.sqlite_file_under(settings.database.url, base)


def _ensure_jwt_secret(settings: Settings) -> None:
    """Use the configured secret, or the one saved under data_dir, or make one."""
    auth = settings.auth
    if auth.jwt_secret is None or not auth.jwt_secret.get_secret_value():
        auth.jwt_secret = SecretStr(_stored_secret(Path(settings.data_dir) / auth.jwt_secret_file))
    if len(settings.jwt_secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"auth.jwt_secret: must be at least {MIN_SECRET_BYTES} bytes; "
            f"generate one with: python -c 'import secrets; print(secrets.token_hex(32))' "
            f"or leave it empty to have one generated"
        )


def _ensure_memory_key(settings: Settings) -> None:
    """Like the JWT secret: the configured key, or the one saved under data_dir."""
    memory = settings.memory
    if memory.key is None or not memory.key.get_secret_value():
        path = Path(settings.data_dir) / memory.key_file
        memory.key = SecretStr(_stored_secret(path, "memory.key"))
    if len(settings.memory_key.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"memory.key: must be at least {MIN_SECRET_BYTES} bytes; "
            f"generate one with: python -c 'import secrets; print(secrets.token_hex(32))' "
            f"or leave it empty to have one generated"
        )


def _stored_secret(path: Path, setting: str = "auth.jwt_secret") -> str:
    try:
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(MIN_SECRET_BYTES)  # 32 random bytes, hex encoded
        # Write a private temporary file, then link it into place: the link
        # fails if another process got there first, and nobody ever reads a
        # half-written file.
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            secret = path.read_text(encoding="utf-8").strip()
        finally:
            temporary.unlink()
        return secret
    except OSError as exc:
        raise ConfigError(
            f"{setting}_file: cannot use {path} ({exc.strerror}); "
            f"set {setting} or {env_name(tuple(setting.split('.')))} instead"
        ) from None


def _check_external_keys(settings: Settings) -> None:
    from .auth import load_external_keys  # auth needs config's types, not the reverse

    auth = settings.auth
    try:
        load_external_keys(auth.public_key_file, auth.jwks_file)
    except ValueError as exc:
        key = "auth.public_key_file" if auth.public_key_file else "auth.jwks_file"
        raise ConfigError(f"{key}: {exc}; give a PEM public key or a JWKS file") from None
    if auth.auto_create_users and not (auth.public_key_file or auth.jwks_file):
        raise ConfigError(
            "auth.auto_create_users: only for tokens of another issuer; "
            "set auth.public_key_file or auth.jwks_file, or turn it off"
        )

