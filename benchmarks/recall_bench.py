"""Time the recall tool's search (tornado_app.memory.UserMessageSearch) on
SQLite and PostgreSQL with a million messages.

    python benchmarks/recall_bench.py --generate          # make both databases, then time
    python benchmarks/recall_bench.py --sqlite data/recall-bench.db --postgres recall_bench

--generate fills the databases with scripts/generate_chats.py (1,000,000
messages over 90 days; a small vocabulary, so common words match hundreds of
thousands of rows: the hard case). Then each query is run --repeat times for
the most active user and for a light one, through the same path as the tool
(Store.search_messages on the engine), with the tool's default limit of 5.
The median and the slowest run are printed as a Markdown table. Nothing here
asserts a time; docs/benchmarks.md keeps the figures of a real run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.analytics_bench import databases  # noqa: E402
from tornado_app.memory import Memories, MemoryCipher  # noqa: E402
from tornado_app.store import Store  # noqa: E402

USERS = {"most active": "user00001", "light": "user00400"}
QUERIES = {
    "one common word": "database",
    "two common words": "database index",
    "rare phrase": "percentile rollup retention window",
    "no match": "birthday",
}


async def bench(label: str, url: str, repeat: int) -> list[str]:
    store = Store.from_url(url)
    lines = []
    try:
        memories = Memories(store, MemoryCipher("x" * 32), 100)
        for who, username in USERS.items():
            user = await store.get_user(username)
            if user is None:
                raise SystemExit(f"no user {username}: generate the database first")
            search = memories.messages_of(user.id)
            for what, query in QUERIES.items():
                runs, found = [], 0
                for _ in range(repeat):
                    started = time.perf_counter()
                    found = len(await search.search(query, 5))
                    runs.append(time.perf_counter() - started)
                lines.append(f"| {label} | {who} | {what} ({found} found) | "
                             f"{1000 * statistics.median(runs):.1f} ms | "
                             f"{1000 * max(runs):.1f} ms |")
                print(lines[-1], file=sys.stderr, flush=True)
    finally:
        await store.close()
    return lines


async def main(args: argparse.Namespace) -> None:
    lines = ["| database | user | query | median | slowest |", "| --- | --- | --- | --- | --- |"]
    for label, url in await databases(args):
        lines += await bench(label, url, args.repeat)
    print("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sqlite", default="data/recall-bench.db", help="SQLite file")
    parser.add_argument("--postgres", default="recall_bench",
                        help="PostgreSQL database name (on BENCH_POSTGRES_URL's server)")
    parser.add_argument("--no-sqlite", dest="sqlite", action="store_const", const=None)
    parser.add_argument("--no-postgres", dest="postgres", action="store_const", const=None)
    parser.add_argument("--generate", action="store_true", help="(re)make the databases first")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    return parser


if __name__ == "__main__":
    asyncio.run(main(build_parser().parse_args()))
