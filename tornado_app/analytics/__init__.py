"""Analytics over the saved chats: reports, export, rollups and retention.

- ``filters``: the request (time range, user, agent, limit), parsed alike for
  the CLI and the JSON API;
- ``rollup``: daily rollups, written off the message path, and the "facts"
  every report aggregates (rollups for whole days, messages for the rest);
- ``percentiles``: exact p50/p95 (linear interpolation) on both databases;
- ``reports``: summary, users, daily, agents, conversations, errors;
- ``export``: the messages themselves, streamed as CSV or JSON lines;
- ``render``: tables, CSV and JSON;
- ``retention``: the purge of old transcripts, and the service's periodic task;
- ``cli``: ``python -m tornado_app analytics ...``.

docs/analytics.md describes the definitions, what is exact, and the figures.
"""

from .export import export_lines, export_rows
from .filters import Filters, ReportError, UnknownUser, make_filters
from .reports import REPORTS, Report, run_report
from .retention import AnalyticsTask, PurgeResult, purge
from .rollup import roll_up

__all__ = [
    "REPORTS", "AnalyticsTask", "Filters", "PurgeResult", "Report", "ReportError",
    "UnknownUser", "export_lines", "export_rows", "make_filters", "purge", "roll_up",
    "run_report",
]
