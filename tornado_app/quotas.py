"""Budgets: what a reply costs, and the token and cost quotas that bound it.

The host reserves each reply's upper bound before the agent is called and
settles the real figures when the reply is saved (store/quotas.py holds the
statements and why they are exact). Here: prices, windows, the bound, and the
words a refused user reads.

The bound of a reply is the prompt's tokens (system prompt, history and the
message, as the first agent counts them; history turns first read in the
admit transaction at their UTF-8 bytes; never more than its context leaves
for the prompt) plus the largest reply any agent of the chain may write
(``Agent.reply_tokens``). The prompt is then cut to what was reserved
(chat.py), so a reply saved on time never spends more than its reservation.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from .config import PricingSettings, QuotaSettings
from .store.quotas import Bound, Limits, passed_limit

# Tokens counted per message for the chat template's role markers (as chat.py).
TOKENS_PER_MESSAGE = 4


def limits(settings: QuotaSettings) -> Limits:
    return Limits(settings.tokens_per_day, settings.tokens_per_month, settings.cost_per_month)


def has_override(user) -> bool:
    """Whether the user row carries a quota of its own (``users quota``)."""
    return any(getattr(user, name, None) is not None for name in (
        "quota_tokens_per_day", "quota_tokens_per_month", "quota_cost_per_month"))


class Pricing:
    """Prices by ``<agent>/<model>``, the first matching pattern winning."""

    def __init__(self, settings: PricingSettings):
        self.currency = settings.currency
        self._prices = list(settings.models.items())
        self._found: dict[tuple, object] = {}

    def price(self, agent: str | None, model: str | None):
        key = (agent, model)
        if key not in self._found:
            name = f"{agent or ''}/{model or ''}"
            self._found[key] = next((price for pattern, price in self._prices
                                     if fnmatch.fnmatchcase(name, pattern)), None)
        return self._found[key]

    def cost(self, agent: str | None, model: str | None, tokens_in: int | None,
             tokens_out: int | None) -> float | None:
        """The price of a reply; None when its model has no price (it costs 0)."""
        price = self.price(agent, model)
        if price is None:
            return None
        return ((tokens_in or 0) * price.input_per_million
                + (tokens_out or 0) * price.output_per_million) / 1_000_000


def prompt_base(agent, system: str, content: str) -> int:
    """The tokens of a prompt to ``agent`` before its history (see chat._prompt):
    the system prompt and the message. The history adds at most what the
    context leaves beside them and the reply."""
    return agent.count_tokens(system) + agent.count_tokens(content) + 2 * TOKENS_PER_MESSAGE


def reply_bound(chain, prompt_tokens: int, pricing: Pricing, tool_steps: int = 0) -> Bound:
    """The bound of a reply by any agent of the chain to a prompt of
    ``prompt_tokens``: the largest reply, and the dearest agent's price.

    With tools, the loop (tool_loop.py) may call the model ``tool_steps``
    more times, each with the prompt grown by the calls and results so far:
    each such call is reserved at its agent's whole context (``context_tokens``
    for the prompt and the reply together)."""
    tokens = prompt_tokens + max(agent.reply_tokens for agent in chain)
    cost = max((pricing.cost(agent.name, agent.model, prompt_tokens, agent.reply_tokens) or 0.0)
               for agent in chain)
    if tool_steps:
        tokens += tool_steps * max(agent.context_tokens for agent in chain)
        cost += tool_steps * max(
            (pricing.cost(agent.name, agent.model, agent.context_tokens - agent.reply_tokens,
                          agent.reply_tokens) or 0.0) for agent in chain)
    return Bound(tokens, cost, prompt_tokens)


@dataclass(frozen=True)
class Windows:
    """The UTC day and month a moment falls in, and when each resets."""

    today: date
    day_resets: datetime
    month_resets: datetime

    @classmethod
    def at(cls, now: float) -> "Windows":
        return _windows_of(int(now // 86400))  # the UTC day's number since the epoch


@functools.lru_cache(maxsize=4)
def _windows_of(day_number: int) -> Windows:
    """A day's windows, made once a day rather than for every message."""
    today = _EPOCH + timedelta(days=day_number)
    next_month = (today.replace(day=28) + timedelta(days=4)).replace(day=1)
    return Windows(today, _midnight(today + timedelta(days=1)), _midnight(next_month))


_EPOCH = date(1970, 1, 1)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def money(value: float) -> str:
    """At least two decimals, at most six (prices of single replies are small)."""
    text = f"{value:.6f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


def refusal(standing, bound: Bound, windows: Windows, currency: str) -> str:
    """The error frame's text for a message the quotas refuse: the first limit
    the bound would pass (day, month, cost). Used counts replies in flight."""
    which = passed_limit(standing, bound)
    if which == "day":
        return _tokens_text(standing.tokens_today + standing.reserved_tokens,
                            standing.tokens_per_day, "today", windows.day_resets)
    if which == "month":
        return _tokens_text(standing.tokens_month + standing.reserved_tokens,
                            standing.tokens_per_month, "this month", windows.month_resets)
    spent = min(standing.cost_month + standing.reserved_cost, standing.cost_per_month or 0.0)
    return (f"Cost quota reached: {money(spent)} of {money(standing.cost_per_month or 0.0)} "
            f"{currency} used this month; it resets at {iso(windows.month_resets)}.")


def _tokens_text(used: int, limit: int, when: str, resets: datetime) -> str:
    return (f"Token quota reached: {min(used, limit)} of {limit} tokens used {when}; "
            f"it resets at {iso(resets)}.")


def usage_report(standing, windows: Windows) -> dict:
    """GET /api/me/usage's body."""
    return {
        "tokens_today": int(standing.tokens_today),
        "tokens_month": int(standing.tokens_month),
        "cost_month": round(float(standing.cost_month), 6),
        "limits": {"tokens_per_day": standing.tokens_per_day,
                   "tokens_per_month": standing.tokens_per_month,
                   "cost_per_month": standing.cost_per_month},
        "resets": {"day": iso(windows.day_resets), "month": iso(windows.month_resets)},
    }
