"""Time every analytics report on SQLite and PostgreSQL with a million messages.

    python benchmarks/analytics_bench.py --generate            # make both databases, then time
    python benchmarks/analytics_bench.py --sqlite data/bench.db --postgres URL
    python benchmarks/analytics_bench.py --generate --purge    # and a retention purge, on copies

--generate fills the databases with scripts/generate_chats.py (1,000,000
messages over 90 days by default). Then, per database: the catch-up rollup of
every finished day (a fresh import has none; a running server does one day a
day), and each report over four ranges (all 90 days, the last 7 days, the most
active user, one agent), run --repeat times through the same code path as the
CLI and the API: the median and the slowest run are printed, as a Markdown
table. The export is timed over the last 24 hours. Nothing here asserts a
time; docs/analytics.md keeps the figures of a real run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import create_async_engine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import generate_chats  # noqa: E402  (a script, not a package)

from tornado_app.analytics import REPORTS, export_lines, make_filters, purge, run_report  # noqa: E402
from tornado_app.analytics.rollup import daily, daily_percentiles, roll_up, rollup_days  # noqa: E402
from tornado_app.store import Store  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL",
    os.environ.get("TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"),
)
SCENARIOS = {
    "90 days": {},
    "last 7 days": {"since": "7d"},
    "one user": {"user": "user00001"},  # the generator's most active user
    "one agent": {"agent": "openai"},
}


def postgres_url(name: str) -> str:
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


async def admin_sql(*statements: str) -> None:
    engine = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def generate(url: str, messages: int) -> None:
    args = generate_chats.build_parser().parse_args(["--url", url, "--messages", str(messages)])
    await generate_chats.generate(args)


async def time_rollup(store: Store) -> tuple[int, float]:
    """Forget every rollup, then roll every finished day up again."""
    async with store.engine.begin() as conn:
        for table in (daily, daily_percentiles, rollup_days):
            await conn.execute(delete(table))
    started = time.perf_counter()
    days = await roll_up(store.engine)
    return days, time.perf_counter() - started


async def time_report(store: Store, name: str, filters: dict, repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        await run_report(store.engine, name, make_filters(**filters))
        runs.append(time.perf_counter() - started)
    return runs


async def time_export(store: Store, since: str | None = "24h") -> tuple[int, float]:
    started = time.perf_counter()
    rows = -1  # the header
    async for text_ in export_lines(store.engine, make_filters(since=since), "csv"):
        rows += text_.count("\n")  # no message content holds a newline here
    return rows, time.perf_counter() - started


async def bench(label: str, url: str, repeat: int, names: list[str]) -> list[str]:
    store = Store.from_url(url)
    lines = []
    try:
        days, seconds = await time_rollup(store)
        lines.append(f"| {label} | rollup catch-up ({days} days) | | {seconds:.2f} s | |")
        for name in names:
            for scenario, filters in SCENARIOS.items():
                runs = await time_report(store, name, filters, repeat)
                lines.append(f"| {label} | {name} | {scenario} | "
                             f"{1000 * statistics.median(runs):.0f} ms | "
                             f"{1000 * max(runs):.0f} ms |")
                print(lines[-1], file=sys.stderr, flush=True)  # progress
        rows, seconds = await time_export(store)
        lines.append(f"| {label} | export, CSV | last 24 h ({rows} rows) | "
                     f"{1000 * seconds:.0f} ms | ({rows / seconds:,.0f} rows/s) |")
    finally:
        await store.close()
    return lines


async def time_purge(label: str, url: str) -> str:
    store = Store.from_url(url)
    try:
        started = time.perf_counter()
        result = await purge(store.engine, retention_days=30)
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    return (f"| {label} | purge, retention 30 days | {result.messages} messages, "
            f"{result.conversations} conversations | {seconds:.1f} s | |")


async def insert_cost(label: str, url: str, revision: str, exchanges: int = 2000) -> float:
    """Mean time to save one exchange (question + reply, one transaction each,
    as the Store does) at a schema revision: what the indexes add to the
    message path."""
    from tornado_app.store.models import ROLE_ASSISTANT, ROLE_USER, Message, utcnow
    from tornado_app.store.schema import upgrade

    store = Store.from_url(url)
    messages = Message.__table__
    try:
        await upgrade(store.engine, revision)
        async with store.engine.begin() as conn:
            await conn.execute(text("INSERT INTO users (id, username, is_admin, disabled, "
                                    "created_at) VALUES (1, 'u', false, false, '2025-01-01')"))
            await conn.execute(text("INSERT INTO conversations (id, user_id, client_id, "
                                    "created_at) VALUES (1, 1, 'c', '2025-01-01')"))
        started = time.perf_counter()
        for _ in range(exchanges):
            async with store.engine.begin() as conn:
                asked = (await conn.execute(messages.insert().values(
                    conversation_id=1, user_id=1, role=ROLE_USER, content="question " * 8,
                    status="ok", created_at=utcnow()).returning(messages.c.id))).scalar_one()
            async with store.engine.begin() as conn:
                await conn.execute(messages.insert().values(
                    conversation_id=1, user_id=1, role=ROLE_ASSISTANT, content="answer " * 40,
                    status="ok", reply_to_id=asked, agent="echo", model="echo", tokens_in=20,
                    tokens_out=40, latency_ms=12.5, ttft_ms=1.5, created_at=utcnow()))
        return (time.perf_counter() - started) / exchanges
    finally:
        await store.close()


async def insert_costs(args: argparse.Namespace) -> list[str]:
    lines = []
    for revision, name in (("0002", "before (0002)"), ("head", "with analytics (0003)")):
        if args.sqlite:
            path = Path(args.sqlite + f".insert-{revision}")
            path.unlink(missing_ok=True)
            seconds = await insert_cost("SQLite", f"sqlite+aiosqlite:///{path.resolve()}", revision)
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
            lines.append(f"| SQLite | save one exchange, schema {name} | | "
                         f"{1000 * seconds:.2f} ms | |")
        if args.postgres:
            scratch = args.postgres + "_insert"
            await admin_sql(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)',
                            f'CREATE DATABASE "{scratch}"')
            seconds = await insert_cost("PostgreSQL", postgres_url(scratch), revision)
            await admin_sql(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            lines.append(f"| PostgreSQL | save one exchange, schema {name} | | "
                         f"{1000 * seconds:.2f} ms | |")
    return lines


async def databases(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, URL) of the benchmark databases (``--sqlite``, ``--postgres``),
    made afresh first with ``--generate``. Also used by recall_bench.py."""
    targets = []
    if args.sqlite:
        sqlite_url = f"sqlite+aiosqlite:///{Path(args.sqlite).resolve()}"
        if args.generate:
            for suffix in ("", "-wal", "-shm"):
                Path(args.sqlite + suffix).unlink(missing_ok=True)
            await generate(sqlite_url, args.messages)
        targets.append(("SQLite", sqlite_url))
    if args.postgres:
        if args.generate:
            await admin_sql(f'DROP DATABASE IF EXISTS "{args.postgres}" WITH (FORCE)',
                            f'CREATE DATABASE "{args.postgres}"')
            await generate(postgres_url(args.postgres), args.messages)
        targets.append(("PostgreSQL", postgres_url(args.postgres)))
    return targets


async def main(args: argparse.Namespace) -> None:
    targets = await databases(args)
    lines = ["| database | report | range | median | slowest |", "| --- | --- | --- | --- | --- |"]
    for label, url in targets if args.reports else ():
        lines += await bench(label, url, args.repeat,
                             [n.strip() for n in args.only.split(",")] if args.only
                             else list(REPORTS))
    if args.purge:
        lines += await purge_copies(args)
    if args.insert_cost:
        lines += await insert_costs(args)
    print("\n".join(lines))


async def purge_copies(args: argparse.Namespace) -> list[str]:
    """Purge on copies, so that the benchmark databases stay whole."""
    lines = []
    if args.sqlite:
        copy = args.sqlite + ".purge"
        shutil.copyfile(args.sqlite, copy)
        lines.append(await time_purge("SQLite", f"sqlite+aiosqlite:///{Path(copy).resolve()}"))
        Path(copy).unlink()
    if args.postgres:
        copy = args.postgres + "_purge"
        await admin_sql(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)',
                        f'CREATE DATABASE "{copy}" TEMPLATE "{args.postgres}"')
        lines.append(await time_purge("PostgreSQL", postgres_url(copy)))
        await admin_sql(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sqlite", default="data/analytics-bench.db", help="SQLite file")
    parser.add_argument("--postgres", default="analytics_bench",
                        help="PostgreSQL database name (on BENCH_POSTGRES_URL's server)")
    parser.add_argument("--no-sqlite", dest="sqlite", action="store_const", const=None)
    parser.add_argument("--no-postgres", dest="postgres", action="store_const", const=None)
    parser.add_argument("--generate", action="store_true", help="(re)make the databases first")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", help="comma-separated reports to time (default: all)")
    parser.add_argument("--purge", action="store_true",
                        help="also time a 30-day retention purge, on copies")
    parser.add_argument("--no-reports", dest="reports", action="store_false",
                        help="skip the reports (to time only --purge or --insert-cost)")
    parser.add_argument("--insert-cost", action="store_true",
                        help="also time saving an exchange before and after migration 0003")
    return parser


if __name__ == "__main__":
    asyncio.run(main(build_parser().parse_args()))
