"""``python -m tornado_app --config F analytics REPORT [filters] [--format F]``.

Reports print to stdout (an aligned table by default); ``export`` streams the
messages as CSV or JSON lines; ``purge`` applies the retention now; ``rollup``
rolls up finished days now (the server does both every
``analytics.rollup_interval_seconds``). A bad filter is one line on stderr and
exit code 2; an unknown user, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import Settings
from ..store import Store
from ..store.executor import store_errors
from .export import FORMATS as EXPORT_FORMATS
from .export import export_lines
from .filters import TIME_HELP, ReportError, UnknownUser, make_filters
from .render import FORMATS, render
from .reports import run_report
from .retention import purge
from .rollup import roll_up

EXIT_FAILURE = 1
EXIT_USAGE = 2

REPORT_HELP = {
    "summary": "totals: users, conversations, messages, errors, tokens, cost, latency and TTFT",
    "users": "per user, most active first (cost included)",
    "daily": "per UTC day",
    "agents": "per agent and model",
    "conversations": "the longest and the most recently active conversations",
    "errors": "failed replies by kind, and the latest ones",
    "tools": "tool calls per tool and per agent: calls, errors, timeouts, latency",
    "feedback": "per agent and model: replies, rated, up, down, share of up; latest comments",
    "cost": "cost per UTC day, user, agent and model, with totals and the unpriced models",
}


def add_parser(commands) -> None:
    """Add ``analytics`` and its reports to the CLI's subcommands."""
    parser = commands.add_parser("analytics", help="reports over the saved chats")
    reports = parser.add_subparsers(dest="report", metavar="REPORT", required=True)
    for name, text in REPORT_HELP.items():
        report = reports.add_parser(name, help=text)
        _add_filters(report, limit=name in ("users", "conversations", "errors", "feedback"))
        report.add_argument("--format", choices=FORMATS, default="table")
        if name == "cost":
            report.add_argument("--unpriced", action="store_true",
                                help="only the agents and models that have no price")
    export = reports.add_parser("export", help="the messages themselves, streamed")
    _add_filters(export, limit=False)
    export.add_argument("--format", choices=EXPORT_FORMATS, default="csv",
                        help="csv (default) or json (one object per line)")
    purge_parser = reports.add_parser(
        "purge", help="delete transcripts older than analytics.retention_days; keep rollups")
    purge_parser.add_argument("--days", type=int,
                              help="keep this many days instead of analytics.retention_days")
    reports.add_parser("rollup", help="roll up every finished day now")


def _add_filters(parser: argparse.ArgumentParser, limit: bool) -> None:
    parser.add_argument("--since", help=f"from this time on (UTC): {TIME_HELP}")
    parser.add_argument("--until", help="before this time; a date includes that day")
    parser.add_argument("--user", help="only this user's conversations")
    parser.add_argument("--agent", help="only exchanges answered by this agent")
    if limit:
        parser.add_argument("--limit", type=int, help="rows to show (default 20)")


async def run(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    with store_errors():
        return await _run(store, settings, args)


async def _run(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.report == "purge":
            return await _purge(store, settings, args.days)
        if args.report == "rollup":
            print(f"rolled up {await roll_up(store.engine)} day(s)")
            return 0
        filters = make_filters(args.since, args.until, args.user, args.agent,
                               getattr(args, "limit", None))
        if args.report == "export":
            await _export(store, filters, args.format)
        else:
            report = await run_report(store.engine, args.report, filters)
            if getattr(args, "unpriced", False):
                report.sections = [s for s in report.sections if s.name == "unpriced"]
            sys.stdout.write(render(report, args.format))
    except UnknownUser as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from
        # complaining about the closed stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


async def _export(store: Store, filters, fmt: str) -> None:
    async for line in export_lines(store.engine, filters, fmt):
        sys.stdout.write(line)
    sys.stdout.flush()


async def _purge(store: Store, settings: Settings, days: int | None) -> int:
    days = settings.analytics.retention_days if days is None else days
    if days is None:
        print("error: analytics.retention_days is not set; set it or pass --days N",
              file=sys.stderr)
        return EXIT_USAGE
    if days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    result = await purge(store.engine, days)
    print(f"purged {result.messages} messages and {result.conversations} conversations "
          f"from before {result.cutoff:%Y-%m-%d} (UTC); rollups kept")
    return 0
