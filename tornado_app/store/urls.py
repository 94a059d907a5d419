"""``database.url``: the URLs operators already have, mapped to the drivers this service ships.

Hosting platforms and database tools hand out plain URLs (``sqlite:///data/chat.db``,
``postgresql://user:pass@host/db``, or ``postgres://...``); SQLAlchemy's async engine
needs the async driver named (``sqlite+aiosqlite``, ``postgresql+asyncpg``). Anything
else is refused with a line that says what to write instead.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

# The async driver installed with the service, for each database it supports.
ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
# Other names for those databases: Heroku and others hand out postgres://.
ALIASES = {"postgres": "postgresql"}
EXAMPLES = "sqlite:///data/chat.db or postgresql://user:password@host/dbname"


class UnsupportedURL(ValueError):
    """A URL the service cannot use; the text says what to write instead."""


def async_url(url: str) -> str:
    """``url`` with the async driver named, e.g. ``sqlite:///x.db`` -> ``sqlite+aiosqlite:///x.db``.

    Raises UnsupportedURL for what is not a URL, another database, or another driver.
    The message never shows a password.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UnsupportedURL(f"not a database URL; write {EXAMPLES}") from None
    # The driver name is read from the text: SQLAlchemy's get_backend_name()
    # would import a dialect, and fail on names it does not know.
    backend, _, driver = parsed.drivername.partition("+")
    backend = ALIASES.get(backend, backend)
    if backend not in ASYNC_DRIVERS:
        raise UnsupportedURL(f"{backend!r} is not a database this service supports; write {EXAMPLES}")
    wanted = ASYNC_DRIVERS[backend]
    if driver not in ("", wanted):
        plain = parsed.set(drivername=backend).render_as_string(hide_password=True)
        raise UnsupportedURL(
            f"the driver {driver!r} is not supported; write {plain} (the service uses {wanted})"
        )
    parsed = parsed.set(drivername=f"{backend}+{wanted}")
    if backend == "postgresql":
        parsed = _ssl_for_asyncpg(parsed)
    return parsed.render_as_string(hide_password=False)


def _ssl_for_asyncpg(url: URL) -> URL:
    """libpq's ``sslmode=require`` (in most platforms' URLs) is asyncpg's ``ssl=require``;
    asyncpg refuses the libpq name."""
    if "sslmode" not in url.query:
        return url
    query = dict(url.query)
    sslmode = query.pop("sslmode")
    query.setdefault("ssl", sslmode)
    return url.set(query=query)


def sqlite_file_under(url: str, base: Path) -> str:
    """``url`` with a relative SQLite file taken relative to ``base`` (the config
    file's folder), so that the server may be started from any directory."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.drivername.partition("+")[0] != "sqlite" or database in (None, "", ":memory:"):
        return url
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str(base / database)).render_as_string(hide_password=False)
