"""What every HTTP handler shares: the shared objects, JSON errors, safe logs."""

from __future__ import annotations

import json
import logging
import re

from tornado.web import RequestHandler

from ..auth import bearer_value

# The cookie POST /token sets (HttpOnly, SameSite=Strict).
COOKIE_NAME = "access_token"

access_log = logging.getLogger("tornado.access")

_TOKEN_IN_QUERY = re.compile(r"(?i)([?&](?:access_)?token=)[^&#\s]*")


def scrub_url(url: str) -> str:
    """The URL with the value of any ``token=`` query parameter hidden."""
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", url)


def request_summary(handler: RequestHandler) -> str:
    request = handler.request
    return f"{request.method} {scrub_url(request.uri or '')} ({request.remote_ip})"


def log_request(handler: RequestHandler) -> None:
    """Tornado's access log line, minus tokens (it logs full URLs by default)."""
    status = handler.get_status()
    if status < 400:
        log = access_log.info
    elif status < 500 or status == 503:
        # 503 is this service saying "not ready" on purpose (/readyz while the
        # model loads, polled every few seconds by a load balancer), not a fault.
        log = access_log.warning
    else:
        log = access_log.error
    elapsed_ms = 1000.0 * handler.request.request_time()
    log("%d %s %.2fms", status, request_summary(handler), elapsed_ms)


class BaseHandler(RequestHandler):
    @property
    def config(self):
        return self.settings["config"]

    @property
    def store(self):
        return self.settings["store"]

    @property
    def chat(self):
        return self.settings["chat"]

    @property
    def verifier(self):
        return self.settings["verifier"]

    def request_token(self) -> str | None:
        """The token of ``Authorization: Bearer`` or of the cookie; never of
        the query string (URLs end up in logs and browser history)."""
        return bearer_value(self.request.headers.get("Authorization")) or bearer_value(
            self.get_cookie(COOKIE_NAME))

    async def signed_in_user(self):
        """The active user the request's token names, or None. The WebSocket's
        own check: signature, expiry, revocation, disabled users."""
        token = self.request_token()
        found = await self.chat.authenticate(token) if token else None
        return None if found is None else found[0]

    def _request_summary(self) -> str:  # used by Tornado's own warning lines
        return request_summary(self)

    def write_json(self, status: int, body: dict) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs) -> None:
        """Every error is JSON; never a traceback or an HTML page."""
        self.write_json(status_code, {"error": self._reason.lower().replace(" ", "_"),
                                      "error_description": self._reason})
