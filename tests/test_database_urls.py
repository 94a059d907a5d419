"""``database.url`` as operators write it (tornado_app/store/urls.py).

Plain ``sqlite:///`` and ``postgresql://`` URLs (and ``postgres://``) reach the
real SQLite file and the real PostgreSQL through the async drivers, as do the
explicit ``+aiosqlite`` / ``+asyncpg`` forms; ``DATABASE_URL`` fills the key
when neither the file nor ``TORNADO_APP_DATABASE__URL`` does; anything else
stops every command with one line naming ``database.url``, exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tornado_app.config import load_settings
from tornado_app.store import Store
from tornado_app.store.schema import ensure_schema
from tornado_app.store.urls import async_url

from .servers import SECRET, Call, cli, ok, one_line_error, run_all, write_config

PASSWORD_IN_URL = "hunter2-in-the-url"


def settings_for(url: str, config=None, **environ: str):
    """Settings with ``url`` as TORNADO_APP_DATABASE__URL (none if empty) over ``config``."""
    environ = {"TORNADO_APP_AUTH__JWT_SECRET": SECRET, **environ}
    if url:
        environ["TORNADO_APP_DATABASE__URL"] = url
    return load_settings(config, environ)


async def add_and_list(url: str, name: str) -> list[str]:
    """Add user ``name`` through a Store on ``url``; every user name it then sees."""
    store = Store.from_url(url)
    try:
        await ensure_schema(store.engine)
        await store.create_user(name, None)
        return sorted(user.username for user in await store.list_users())
    finally:
        await store.close()


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///data/chat.db", "sqlite+aiosqlite:///data/chat.db"),
    ("sqlite+aiosqlite:////srv/chat.db", "sqlite+aiosqlite:////srv/chat.db"),
    ("sqlite://", "sqlite+aiosqlite://"),
    ("postgresql://u:p@db.example:5433/chat", "postgresql+asyncpg://u:p@db.example:5433/chat"),
    ("postgres://u:p@db.example/chat", "postgresql+asyncpg://u:p@db.example/chat"),
    ("postgresql+asyncpg://u:p@db.example/chat", "postgresql+asyncpg://u:p@db.example/chat"),
    ("postgres://u:p@db.example/chat?sslmode=require",
     "postgresql+asyncpg://u:p@db.example/chat?ssl=require"),
])
def test_plain_forms_map_to_the_async_drivers(url, expected):
    assert async_url(url) == expected


# Each form against the real databases


@pytest.mark.gen_test(timeout=60)
async def test_sqlite_forms_reach_the_same_file(tmp_path):
    path = tmp_path / "data" / "chat.db"
    config = write_config(tmp_path, database=None)
    forms = {
        "plain": f"sqlite:///{path}",
        "explicit": f"sqlite+aiosqlite:///{path}",
        "relative": "sqlite:///data/chat.db",  # to the config file's folder
    }
    for name, url in forms.items():
        settings = settings_for(url, config)
        assert settings.database.url == f"sqlite+aiosqlite:///{path}", name
        seen = await add_and_list(settings.database.url, name)
    assert seen == sorted(forms)
    assert path.exists()


@pytest.mark.gen_test(timeout=60)
async def test_postgresql_forms_reach_the_same_database(postgres_url, tmp_path):
    assert postgres_url.startswith("postgresql+asyncpg://")
    rest = postgres_url.split("://", 1)[1]
    forms = {
        "plain": f"postgresql://{rest}",
        "platform": f"postgres://{rest}",
        "explicit": postgres_url,
        "sslmode": f"postgresql://{rest}?sslmode=disable",
    }
    url = make_url(postgres_url)
    socket_dir = Path("/var/run/postgresql")
    if url.port in (None, 5432) and (socket_dir / ".s.PGSQL.5432").exists():
        # The same server over its Unix socket (README: on one host).
        forms["unix socket"] = f"postgresql://{url.username}@/{url.database}?host={socket_dir}"
    for name, url in forms.items():
        settings = settings_for(url, TORNADO_APP_DATA_DIR=str(tmp_path))
        assert settings.database.url.startswith("postgresql+asyncpg://"), name
        seen = await add_and_list(settings.database.url, name)
    assert seen == sorted(forms)


# DATABASE_URL, the variable hosting platforms set


def test_database_url_fills_only_an_unset_key(tmp_path, repo_root):
    platform = "postgres://u:p@db.example/chat"
    mapped = "postgresql+asyncpg://u:p@db.example/chat"
    unset = write_config(tmp_path / "unset", database=None)
    in_file = write_config(tmp_path / "in-file")  # database.url: sqlite:///data/chat.db
    file_db = f"sqlite+aiosqlite:///{tmp_path / 'in-file' / 'data' / 'chat.db'}"
    default_db = f"sqlite+aiosqlite:///{tmp_path / 'unset' / 'data' / 'chat.db'}"

    assert settings_for("", unset, DATABASE_URL=platform).database.url == mapped
    assert settings_for("", in_file, DATABASE_URL=platform).database.url == file_db
    env_wins = settings_for("sqlite:///elsewhere.db", unset, DATABASE_URL=platform)
    assert env_wins.database.url == f"sqlite+aiosqlite:///{tmp_path / 'unset' / 'elsewhere.db'}"
    assert settings_for("", unset).database.url == default_db
    assert settings_for("", unset, DATABASE_URL="").database.url == default_db
    # The shipped config.yaml leaves database.url unset, so platforms' variable works.
    shipped = settings_for("", repo_root / "config.yaml", DATABASE_URL=platform,
                           TORNADO_APP_DATA_DIR=str(tmp_path / "shipped"))
    assert shipped.database.url == mapped


def test_the_cli_honours_database_url_below_the_file_and_the_environment(tmp_path, postgres_url):
    platform = "postgres://" + postgres_url.split("://", 1)[1]
    unset = write_config(tmp_path / "unset", database=None)
    in_file = write_config(tmp_path / "in-file")
    ok(cli(unset, "users", "add", "alice", "--password-stdin", input="long enough password\n",
           DATABASE_URL=platform))
    from_platform, from_file, from_env = run_all(
        Call(unset, ("users", "list"), env={"DATABASE_URL": platform}),
        Call(in_file, ("users", "list"), env={"DATABASE_URL": platform}),
        Call(in_file, ("users", "list"), env={"DATABASE_URL": "mysql://nowhere/x",
                                              "TORNADO_APP_DATABASE__URL": platform}),
    )
    assert "alice" in ok(from_platform)
    assert "alice" not in ok(from_file)  # the file's SQLite database
    assert (tmp_path / "in-file" / "data" / "chat.db").exists()
    assert "alice" in ok(from_env)


# What the service cannot use: one line, exit code 2, every command

BAD_URLS = {
    # id: (URL, words the line must hold)
    "another database": (f"mysql://chat:{PASSWORD_IN_URL}@db.example/chat",
                         ["'mysql'", "sqlite:///", "postgresql://"]),
    "another driver": (f"postgresql+psycopg2://chat:{PASSWORD_IN_URL}@db.example/chat",
                       ["'psycopg2'", "write postgresql://chat:***@db.example/chat", "asyncpg"]),
    "a typo in the database": ("sqlte:///data/chat.db", ["'sqlte'", "sqlite:///"]),
    "a typo in the driver": ("postgresql+asycpg://db.example/chat",
                             ["'asycpg'", "postgresql://db.example/chat"]),
    "not a URL": ("data/chat.db", ["not a database URL", "sqlite:///"]),
}
COMMANDS = [(), ("db", "upgrade"), ("db", "current"), ("users", "list"), ("token", "alice"),
            ("analytics", "summary")]


@pytest.fixture(scope="module")
def bad_url_results(tmp_path_factory):
    """Every bad URL through ``users add`` and TORNADO_APP_DATABASE__URL; the first also
    through every other command (serving first) and through DATABASE_URL. All at once."""
    config = write_config(tmp_path_factory.mktemp("bad-urls"), database=None)
    calls = {
        (case, ("users", "add", "alice")): Call(
            config, ("users", "add", "alice"), env={"TORNADO_APP_DATABASE__URL": url})
        for case, (url, _words) in BAD_URLS.items()
    }
    url = BAD_URLS["another database"][0]
    for args in COMMANDS:
        calls[("another database", args)] = Call(
            config, args or ("--port", "0"), env={"TORNADO_APP_DATABASE__URL": url})
    calls[("DATABASE_URL", ())] = Call(config, ("--port", "0"), env={"DATABASE_URL": url})
    return dict(zip(calls, run_all(*calls.values())))


@pytest.mark.parametrize("case", list(BAD_URLS))
def test_a_bad_url_is_one_line_and_exit_2(bad_url_results, case):
    line = one_line_error(bad_url_results[(case, ("users", "add", "alice"))], 2,
                          "config error: database.url: ", *BAD_URLS[case][1],
                          "TORNADO_APP_DATABASE__URL")
    assert PASSWORD_IN_URL not in line


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args) or "serve")
def test_every_command_stops_on_a_bad_url(bad_url_results, args):
    one_line_error(bad_url_results[("another database", args)], 2,
                   "config error: database.url: 'mysql'", "TORNADO_APP_DATABASE__URL")


def test_a_bad_database_url_variable_is_named(bad_url_results):
    line = one_line_error(bad_url_results[("DATABASE_URL", ())], 2,
                          "config error: database.url: 'mysql'", "fix it in DATABASE_URL")
    assert PASSWORD_IN_URL not in line
