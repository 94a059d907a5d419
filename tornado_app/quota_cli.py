"""``users quota NAME ...``: a user's own quota, and how ``users list`` shows it."""

from __future__ import annotations

import argparse


def add_parser(users) -> None:
    quota = users.add_parser(
        "quota", help="set a user's own quota (the config's quota section is the default)")
    quota.add_argument("name")
    quota.add_argument("--tokens-per-day", type=int, metavar="N")
    quota.add_argument("--tokens-per-month", type=int, metavar="N")
    quota.add_argument("--cost-per-month", type=float, metavar="X",
                       help="in the currency of pricing")
    quota.add_argument("--unlimited", action="store_true", help="lift every limit")
    quota.add_argument("--reset", action="store_true",
                       help="forget the user's own quota: the config's applies again")


def describe(user) -> str:
    """The QUOTA column of ``users list``."""
    if user.quota_unlimited:
        return "unlimited"
    parts = [f"{label}={value:g}" for label, value in (
        ("day", user.quota_tokens_per_day), ("month", user.quota_tokens_per_month),
        ("cost", user.quota_cost_per_month)) if value is not None]
    return " ".join(parts) or "default"


async def run(store, args: argparse.Namespace, error) -> str:
    """Apply ``users quota``; the line to print. ``error`` is the CLI's exception."""
    given = {"tokens_per_day": args.tokens_per_day, "tokens_per_month": args.tokens_per_month,
             "cost_per_month": args.cost_per_month}
    for key, value in given.items():
        if value is not None and value < 0:
            raise error(f"--{key.replace('_', '-')} must be at least 0")
    if args.reset and (args.unlimited or any(v is not None for v in given.values())):
        raise error("--reset forgets the user's quota: give it alone")
    current = await store.quota_overrides(args.name)
    if current is None:
        raise error(f"no user named {args.name!r}")
    if args.reset:
        values, unlimited = dict.fromkeys(given), None
    else:
        values = {"tokens_per_day": current.quota_tokens_per_day,
                  "tokens_per_month": current.quota_tokens_per_month,
                  "cost_per_month": current.quota_cost_per_month}
        values.update({k: v for k, v in given.items() if v is not None})
        # A new limit ends "unlimited"; --unlimited alone keeps the limits for later.
        unlimited = True if args.unlimited else (
            None if any(v is not None for v in given.values()) else current.quota_unlimited)
    await store.set_quota(args.name, values["tokens_per_day"], values["tokens_per_month"],
                          values["cost_per_month"], unlimited)
    updated = await store.quota_overrides(args.name)
    return f"quota of {args.name}: {describe(updated)}"
