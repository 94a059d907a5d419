"""Reports as text: an aligned table for a terminal, CSV, or JSON.

JSON and CSV carry full values (times as ISO 8601 UTC with microseconds, like
the protocol's timestamps; floats as they are). The table rounds for reading:
milliseconds to one decimal, rates as percentages, times to the second.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from datetime import date, datetime

from ..quotas import money

FORMATS = ("table", "csv", "json")
RATE_COLUMNS = ("error_rate", "share")
# Decimals that CSV and JSON lines keep: a reply's cost is millionths of a
# currency unit, so cost keeps more than the 6 of every other figure.
DECIMALS = {"cost": 12}


def plain(value, column: str | None = None):
    """A value as JSON and CSV carry it."""
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        return round(value, DECIMALS.get(column, 6))
    return value


def json_line(row: dict) -> str:
    return json.dumps({key: plain(value, key) for key, value in row.items()}) + "\n"


def csv_line(values: Iterable, columns: Sequence[str] = ()) -> str:
    """One CSV line; ``columns`` names the values (for their decimals)."""
    values = list(values)
    names = list(columns) or [None] * len(values)
    return csv_lines([[plain(value, name) for value, name in zip(values, names)]])


def csv_lines(rows: Iterable[Sequence]) -> str:
    """Rows of plain values as CSV text (None is written as an empty field)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def render(report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.as_json(), default=plain, indent=2) + "\n"
    if fmt == "csv":
        return render_csv(report)
    return render_table(report)


def render_csv(report) -> str:
    """One CSV table. A report of several sections (conversations: longest and
    recent) gets a first column naming the section of each row."""
    sections = report.sections
    if len(sections) == 1:
        section = sections[0]
        lines = [csv_line(section.columns)]
        lines += [csv_line([row.get(c) for c in section.columns], section.columns)
                  for row in section.rows]
        return "".join(lines)
    columns: list[str] = []
    for section in sections:
        columns += [c for c in section.columns if c not in columns]
    lines = [csv_line(["section", *columns])]
    for section in sections:
        lines += [csv_line([section.name, *(row.get(c) for c in columns)],
                           ["section", *columns])
                  for row in section.rows]
    return "".join(lines)


def render_table(report) -> str:
    parts = []
    for section in report.sections:
        if len(report.sections) > 1:
            parts.append(f"{section.name.replace('_', ' ')}:")
        if section.single:
            parts.append(_key_values(section.columns, section.rows[0]))
        elif section.rows:
            parts.append(_grid(section.columns, section.rows))
        else:
            parts.append("(none)")
        parts.append("")
    return "\n".join(parts)


def _key_values(columns: Sequence[str], row: dict) -> str:
    width = max(len(c) for c in columns)
    return "\n".join(f"{c:<{width}}  {readable(c, row.get(c))}" for c in columns)


def _grid(columns: Sequence[str], rows: list[dict]) -> str:
    cells = [[readable(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, right in zip(values, widths, numeric)).rstrip()

    return "\n".join([line([c.upper() for c in columns]), *(line(cells_) for cells_ in cells)])


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def readable(column: str, value) -> str:
    if value is None:
        return "-"
    if column in RATE_COLUMNS:
        return f"{100 * value:.2f}%"
    if column == "cost":
        return money(value)
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if not column.endswith("_id") else str(value)
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)
