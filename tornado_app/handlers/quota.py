"""Quotas over HTTP (tornado_app/quotas.py has the rules).

- ``GET /api/me/usage``: the signed-in user's tokens today and this month,
  cost this month, the limits that apply to them and when the windows reset.
- ``GET /api/admin/users/{name}/quota``: a user's overrides, the limits that
  apply and their usage; ``PUT`` the same path with a JSON object of
  ``tokens_per_day``, ``tokens_per_month``, ``cost_per_month`` (a number, or
  null for the config's limit) and ``unlimited`` (true or false) sets them;
  keys left out keep their value. Admins only.

The token comes from ``Authorization: Bearer`` or the ``access_token`` cookie.
"""

from __future__ import annotations

import json
import time

from .. import quotas
from .base import BaseHandler

OVERRIDES = ("tokens_per_day", "tokens_per_month", "cost_per_month", "unlimited")


class QuotaHandler(BaseHandler):
    async def _user(self, admin: bool = False):
        """The signed-in user (an admin if ``admin``); else None, the 401/403 written."""
        user = await self.signed_in_user()
        if user is None:
            self.set_header("WWW-Authenticate", "Bearer")
            self._error(401, "unauthorized",
                        "Send an access token (Authorization: Bearer, or the cookie).")
            return None
        if admin and not user.is_admin:
            self._error(403, "forbidden", "Quotas are set by administrators.")
            return None
        return user

    async def _usage(self, user_id: int) -> dict:
        now = time.time()
        windows = quotas.Windows.at(now)
        standing = await self.store.quota_standing(user_id, self.chat.limits, now, windows.today)
        return {**quotas.usage_report(standing, windows), "currency": self.chat.pricing.currency}

    def _error(self, status: int, error: str, description: str) -> None:
        self.write_json(status, {"error": error, "error_description": description})


class MyUsageHandler(QuotaHandler):
    async def get(self) -> None:
        user = await self._user()
        if user is not None:
            self.write_json(200, await self._usage(user.id))


class UserQuotaHandler(QuotaHandler):
    async def get(self, username: str) -> None:
        if await self._user(admin=True) is not None:
            await self._answer(username)

    async def put(self, username: str) -> None:
        if await self._user(admin=True) is None:
            return
        try:
            changes = parse_overrides(self.request.body)
        except ValueError as exc:
            self._error(400, "invalid_request", str(exc))
            return
        current = await self.store.quota_overrides(username)
        if current is None:
            self._error(404, "not_found", f"No user named {username!r}.")
            return
        values = {**overrides_of(current), **changes}
        await self.store.set_quota(username, values["tokens_per_day"],
                                   values["tokens_per_month"], values["cost_per_month"],
                                   values["unlimited"] or None)
        await self._answer(username)

    async def _answer(self, username: str) -> None:
        current = await self.store.quota_overrides(username)
        if current is None:
            self._error(404, "not_found", f"No user named {username!r}.")
            return
        self.write_json(200, {"user": username, "overrides": overrides_of(current),
                              **await self._usage(current.id)})


def overrides_of(row) -> dict:
    return {"tokens_per_day": row.quota_tokens_per_day,
            "tokens_per_month": row.quota_tokens_per_month,
            "cost_per_month": row.quota_cost_per_month,
            "unlimited": bool(row.quota_unlimited)}


def parse_overrides(body: bytes) -> dict:
    """The overrides a PUT body sets; ValueError with the reason otherwise."""
    try:
        data = json.loads(body or b"null")
    except ValueError:
        raise ValueError("The body must be a JSON object.") from None
    if not isinstance(data, dict):
        raise ValueError("The body must be a JSON object.")
    unknown = sorted(set(data) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"Unknown key {unknown[0]!r}; use: {', '.join(OVERRIDES)}.")
    for key, value in data.items():
        if key == "unlimited":
            if not isinstance(value, bool):
                raise ValueError("unlimited: true or false.")
        elif value is not None and (isinstance(value, bool) or not isinstance(
                value, int if key.startswith("tokens") else (int, float)) or value < 0):
            kind = "a whole number" if key.startswith("tokens") else "a number"
            raise ValueError(f"{key}: {kind} of at least 0, or null for the config's limit.")
    return data


routes = [(r"/api/me/usage", MyUsageHandler),
          (r"/api/admin/users/([^/]+)/quota", UserQuotaHandler)]
