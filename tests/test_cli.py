"""The command line, run as an operator runs it: ``python -m tornado_app --config F ...``.

Every call is a real subprocess with a temporary config and SQLite database.
Each start costs about a second, so calls that do not depend on each other run
concurrently (``run_all``) and one test walks through a whole scenario.
Failures must be a non-zero exit and one line on stderr, never a traceback.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import stat
import time
from pathlib import Path

import jwt
import pytest

from tornado_app.store import schema

from .helpers import on_engine
from .servers import (
    PASSWORD,
    SECRET,
    Call,
    cli,
    free_port,
    ok,
    one_line_error,
    run_all,
    sqlite_url,
    write_config,
)

TTL_MINUTES = 45  # configured; differs from the built-in default on purpose


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path, auth={"token_ttl_minutes": TTL_MINUTES})


def add_user(config, name: str = "alice", **env: str) -> None:
    ok(cli(config, "users", "add", name, "--password-stdin", input=PASSWORD + "\n", **env))


def decode(token: str, secret: str = SECRET) -> dict:
    return jwt.decode(token.strip(), secret, algorithms=["HS256"])


# Users


def test_users_add_list_disable(config):
    assert "added user alice" in ok(cli(config, "users", "add", "alice", "--password-stdin",
                                        input=PASSWORD + "\n"))
    duplicate, short, no_tty, bad_name, admin = run_all(
        Call(config, ("users", "add", "alice", "--password-stdin"), PASSWORD + "\n"),
        Call(config, ("users", "add", "bob", "--password-stdin"), "short\n"),
        Call(config, ("users", "add", "carol")),  # stdin is /dev/null: no terminal
        Call(config, ("users", "add", " spaced ", "--password-stdin"), PASSWORD + "\n"),
        Call(config, ("users", "add", "dave", "--admin", "--password-stdin"), PASSWORD + "\n"),
    )
    one_line_error(duplicate, 1, "alice")
    one_line_error(short, 1, "at least 8 characters")
    one_line_error(no_tty, 1, "--password-stdin")
    one_line_error(bad_name, 1, "user names")
    assert "added user dave (admin)" in ok(admin)

    disabled, unknown = run_all(Call(config, ("users", "disable", "alice")),
                                Call(config, ("users", "disable", "nobody")))
    assert "disabled user alice" in ok(disabled)
    one_line_error(unknown, 1, "nobody")

    listing, token = run_all(Call(config, ("users", "list")), Call(config, ("token", "alice")))
    rows = {line.split()[0]: line.split()[1:3] for line in ok(listing).splitlines()[1:]}
    assert rows == {"alice": ["no", "yes"], "dave": ["yes", "no"]}  # [admin, disabled]
    assert "bob" not in listing.stdout and "carol" not in listing.stdout
    one_line_error(token, 1, "alice", "disabled")
    assert token.stdout == ""


# Tokens


def test_token_claims_and_ttl(config):
    add_user(config)
    default, five, unknown, negative = run_all(
        Call(config, ("token", "alice")),
        Call(config, ("token", "alice", "--ttl-minutes", "5")),
        Call(config, ("token", "nobody")),
        Call(config, ("token", "alice", "--ttl-minutes", "-1")),
    )
    claims = decode(ok(default))
    assert set(claims) >= {"sub", "iat", "exp", "jti"}
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == TTL_MINUTES * 60
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(default.stdout.strip())["alg"] == "HS256"
    short = decode(ok(five))
    assert short["exp"] - short["iat"] == 5 * 60
    assert short["jti"] != claims["jti"]
    one_line_error(unknown, 1, "nobody")
    one_line_error(negative, 1, "--ttl-minutes")


def test_token_ttl_zero_is_refused(config):
    add_user(config)
    one_line_error(cli(config, "token", "alice", "--ttl-minutes", "0"), 1, "--ttl-minutes")


# Database schema


def test_db_current_upgrade_current(config):
    head = schema.head_revision()
    assert ok(cli(config, "db", "current")).startswith("empty (no schema yet")
    assert ok(cli(config, "db", "upgrade")).strip() == f"database at revision {head} (was None)"
    again, current = run_all(Call(config, ("db", "upgrade")), Call(config, ("db", "current")))
    assert ok(again).strip() == f"database at revision {head}"
    assert ok(current).strip() == f"{head} (head)"


def upgraded(config: Path) -> Path:
    """Bring the config's database to head in-process (set-up, not under test)."""
    on_engine(sqlite_url(config.parent), schema.upgrade)
    return config


def set_sqlite(config: Path, *statements: str) -> None:
    with sqlite3.connect(config.parent / "data" / "chat.db") as conn:
        for statement in statements:
            conn.execute(statement)


def test_tables_without_a_revision_stop_the_server_and_the_commands(config):
    set_sqlite(upgraded(config), "DROP TABLE alembic_version")
    served, listed = run_all(Call(config, ("--port", "0")), Call(config, ("users", "list")))
    for result in (served, listed):
        one_line_error(result, 2, "database error", "no schema revision", "database.url")


def test_unknown_revision_stops_the_server_and_the_db_commands(config):
    set_sqlite(upgraded(config), "UPDATE alembic_version SET version_num = 'ffffffffffff'")
    results = run_all(*(Call(config, args) for args in
                        [("--port", "0"), ("db", "current"), ("db", "upgrade")]))
    for result in results:
        one_line_error(result, 2, "ffffffffffff", "newer version")


def test_a_database_downgraded_to_base_counts_as_empty(config):
    upgraded(config)
    # This leaves an empty alembic_version table behind.
    on_engine(sqlite_url(config.parent), lambda engine: schema.downgrade(engine, "base"))
    assert "added user" in ok(cli(config, "users", "add", "alice", "--password-stdin",
                                  input="long enough password\n"))


def test_older_revision_names_db_upgrade(config, monkeypatch):
    # One migration exists, so "older" is simulated: the code's head moves past 0001.
    upgraded(config)
    current = schema.head_revision()
    monkeypatch.setattr(schema, "head_revision", lambda: "9999_future")
    with pytest.raises(schema.SchemaError) as caught:
        on_engine(sqlite_url(config.parent), schema.ensure_schema)
    message = str(caught.value)
    assert f"at revision {current}" in message and "9999_future" in message
    assert "db upgrade" in message and "\n" not in message


# Configuration mistakes: each is exit 2 and one line naming the key, no traceback.

BAD_CONFIGS = {
    # id: (config text or None for the valid one, env, extra args, words in the line)
    "unknown top-level key": ("colour: blue\n", {}, (), ["colour", "unknown key"]),
    "unknown key in a section": ("server:\n  prot: 8000\n", {}, (),
                                 ["server.prot", "unknown key", "port"]),
    "wrong type": ('server:\n  port: "abc"\n', {}, (), ["server.port", "integer", "'abc'"]),
    "short jwt secret": ("auth:\n  jwt_secret: tooshort\n", {}, (),
                         ["auth.jwt_secret", "32 bytes"]),
    "unknown agent": ("agent:\n  backend: nope\n", {}, ("--port", "0"),
                      ["agent.backend", "'nope'", "echo"]),
    "unknown agent section": ("agent:\n  nope: {}\n", {}, ("--port", "0"), ["agent.nope", "echo"]),
    "bad plugin option": ("agent:\n  echo:\n    bogus: 1\n", {}, ("--port", "0"),
                          ["agent.echo.bogus", "unknown key"]),
    "bad YAML": ("server:\n  port: [8000\n", {}, (), ["not valid YAML", "line"]),
    "not a mapping": ("- server\n- auth\n", {}, (), ["mapping"]),
    "missing file": (None, {}, (), ["cannot read config file", "missing.yaml"]),
    "env wrong type": ("", {"TORNADO_APP_SERVER__PORT": "abc"}, (),
                       ["server.port", "TORNADO_APP_SERVER__PORT"]),
    "env bad list": ("", {"TORNADO_APP_AGENT__FALLBACKS": "[echo"}, (),
                     ["TORNADO_APP_AGENT__FALLBACKS"]),
    "env unknown key": ("", {"TORNADO_APP_SERVR__PORT": "1"}, (),
                        ["servr", "TORNADO_APP_SERVR__PORT"]),
}


@pytest.fixture(scope="module")
def bad_config_results(tmp_path_factory):
    """Run every BAD_CONFIGS case at once (they are independent) and keep the results."""
    calls = []
    for number, (text, env, args) in enumerate(v[:3] for v in BAD_CONFIGS.values()):
        folder = tmp_path_factory.mktemp(f"bad-config-{number}")
        if text is None:
            path = folder / "missing.yaml"
        else:
            path = folder / "config.yaml"
            path.write_text(text)  # data_dir defaults to "data" beside it
        calls.append(Call(path, args or ("users", "list"), env=env))
    return dict(zip(BAD_CONFIGS, run_all(*calls)))


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_and_exit_2(bad_config_results, case):
    result = bad_config_results[case]
    line = one_line_error(result, 2, *BAD_CONFIGS[case][3])
    assert line.startswith("config error: ")
    assert "tooshort" not in line  # a secret is never echoed


# Environment overrides and the JWT secret


def test_env_overrides_database_url_and_jwt_secret(config, tmp_path):
    other_db = tmp_path / "elsewhere" / "other.db"
    env_secret = "env-secret-" + "e" * 40
    env = {"TORNADO_APP_DATABASE__URL": f"sqlite+aiosqlite:///{other_db}"}
    add_user(config, **env)
    assert other_db.exists()
    assert not (config.parent / "data" / "chat.db").exists()
    token, listing = run_all(
        Call(config, ("token", "alice"), env={**env, "TORNADO_APP_AUTH__JWT_SECRET": env_secret}),
        Call(config, ("users", "list")),  # the config's own database: no alice there
    )
    assert decode(ok(token), env_secret)["sub"] == "alice"
    with pytest.raises(jwt.InvalidSignatureError):
        decode(token.stdout, SECRET)
    assert "alice" not in ok(listing)


def test_jwt_secret_is_generated_once_and_reused(tmp_path):
    config = write_config(tmp_path, data_dir="state", auth={"jwt_secret": None})
    secret_file = tmp_path / "state" / "jwt_secret"
    assert not secret_file.parent.exists()
    add_user(config)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 43  # 32 random bytes take at least 43 characters in any text form
    assert len(set(secret)) >= 10
    first, second = run_all(Call(config, ("token", "alice")), Call(config, ("token", "alice")))
    assert decode(ok(first), secret)["sub"] == decode(ok(second), secret)["sub"] == "alice"
    assert secret_file.read_text().strip() == secret


# Serving


def test_serve_on_env_port_and_flag_port_then_sigterm(tmp_path, servers):
    unused, env_port = free_port(), free_port()
    from_env = servers(write_config(tmp_path / "a", server={"port": unused}),
                       port=env_port, env={"TORNADO_APP_SERVER__PORT": str(env_port)})
    # --port (a free port the fixture picks) beats both the file and the environment.
    from_flag = servers(write_config(tmp_path / "b", server={"port": unused}),
                        env={"TORNADO_APP_SERVER__PORT": str(unused)})
    for server in (from_env, from_flag):
        server.signal(signal.SIGTERM)
    for server in (from_env, from_flag):
        started = time.monotonic()
        assert server.wait(10) == 0, server.log()
        assert time.monotonic() - started < 8  # a bound, not a speed: the suite runs in parallel
        assert "Traceback" not in server.log()


def test_port_already_in_use_is_one_line(config):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(config, "--port", str(port))
    assert result.returncode != 0
    one_line_error(result, result.returncode, "cannot listen", str(port), "in use")
