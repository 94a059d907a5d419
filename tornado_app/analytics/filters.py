"""What a report is asked for: a time range, a user, an agent, a row limit.

The CLI and the JSON API parse the same strings here, so ``--since 7d`` and
``?since=7d`` mean the same thing. Times are naive UTC, like the database's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

DEFAULT_LIMIT = 20
MAX_LIMIT = 10_000
RELATIVE = re.compile(r"(\d{1,6})([mhdw])")
UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
TIME_HELP = "YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS], or an age such as 30m, 12h, 7d, 2w"


class ReportError(Exception):
    """A report request that cannot be answered. The text is safe to show."""


class UnknownUser(ReportError):
    pass


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    user: str | None = None
    agent: str | None = None
    limit: int = DEFAULT_LIMIT  # rows of the list reports (users, conversations, errors)

    def as_dict(self) -> dict:
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "user": self.user,
            "agent": self.agent,
            "limit": self.limit,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def parse_time(text: str, now: datetime, name: str, end_of_day: bool = False) -> datetime:
    """A point in time from a date, a date and time, or an age before ``now``.

    A bare date given as the end of a range (``end_of_day``) means the end of
    that day, so ``--until 2025-10-31`` includes the 31st.
    """
    text = text.strip()
    relative = RELATIVE.fullmatch(text)
    if relative:
        amount, unit = relative.groups()
        return now - timedelta(**{UNITS[unit]: int(amount)})
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=end_of_day), time())
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"{name}: cannot read {text!r}; use {TIME_HELP}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def parse_limit(text: str | int | None) -> int:
    if text is None or text == "":
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except (TypeError, ValueError):
        raise ReportError(f"limit: {text!r} is not a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ReportError(f"limit: must be between 1 and {MAX_LIMIT}")
    return limit


def make_filters(
    since: str | None = None,
    until: str | None = None,
    user: str | None = None,
    agent: str | None = None,
    limit: str | int | None = None,
    now: datetime | None = None,
) -> Filters:
    """Filters from the strings a user typed; ReportError names the bad one."""
    now = now or utcnow()
    start = parse_time(since, now, "since") if since else None
    end = parse_time(until, now, "until", end_of_day=True) if until else None
    if start is not None and end is not None and start > end:
        raise ReportError("since: must not be after until")
    return Filters(start, end, user or None, agent or None, parse_limit(limit))
