"""The operator dashboard and the analytics API it draws from, for admins.

- ``GET /api/admin/analytics/{report}``: the analytics reports as JSON. Query
  parameters are the CLI's filters: ``since``, ``until``, ``user``, ``agent``,
  ``limit``. The ``export`` report streams CSV or JSON lines
  (``format=csv|json``). No valid token: 401; a valid one without the admin
  flag: 403.
- ``GET /admin``: the dashboard page (``templates/admin.html``, rendered here so
  that the server, not the script, decides what a visitor gets): the charts
  for an admin, "Administrators only" with a 403 for anyone else signed in,
  the sign-in form for a visitor without a valid token. Same security headers
  as the chat page; the data itself comes from the API above.

The token comes from ``Authorization: Bearer`` or the ``access_token`` cookie
(never the query string: URLs end up in logs and browser history).
"""

from __future__ import annotations

from pathlib import Path

from tornado.iostream import StreamClosedError
from tornado.template import Loader

from ..analytics import REPORTS, ReportError, UnknownUser, export_lines, make_filters, run_report
from ..analytics.render import render
from .base import BaseHandler
from .pages import set_page_headers

EXPORT_TYPES = {"csv": "text/csv; charset=UTF-8", "json": "application/x-ndjson"}
# Bytes of export gathered before each write to the socket.
EXPORT_CHUNK = 64 * 1024
_templates = Loader(str(Path(__file__).resolve().parents[1] / "templates"))


class AdminPageHandler(BaseHandler):
    """GET /admin: the page shows one of three views, chosen here."""

    async def get(self) -> None:
        user = await self.signed_in_user()
        if user is None:
            view = "login"
        elif user.is_admin:
            view = "dashboard"
        else:
            view = "forbidden"
            self.set_status(403)
        set_page_headers(self)
        self.set_header("Cache-Control", "no-store")  # the view depends on who asks
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        page = _templates.load("admin.html").generate(
            view=view, username=None if user is None else user.username)
        self.finish(page)


class AnalyticsHandler(BaseHandler):
    async def get(self, report: str) -> None:
        if not await self._admin():
            return
        if report != "export" and report not in REPORTS:
            self._error(404, "not_found",
                        f"No such report; available: {', '.join([*REPORTS, 'export'])}.")
            return
        try:
            filters = make_filters(*(self.get_query_argument(name, None) for name in
                                     ("since", "until", "user", "agent", "limit")))
        except ReportError as exc:
            self._error(400, "invalid_request", str(exc))
            return
        if report == "export":
            await self._export(filters)
            return
        try:
            result = await run_report(self.store.engine, report, filters)
        except UnknownUser as exc:
            self._error(404, "not_found", str(exc))
            return
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(render(result, "json"))

    async def _admin(self) -> bool:
        """Whether the request is an admin's; if not, the 401 or 403 is written."""
        user = await self.signed_in_user()
        if user is None:
            self.set_header("WWW-Authenticate", "Bearer")
            self._error(401, "unauthorized",
                        "Send an access token (Authorization: Bearer, or the cookie).")
            return False
        if not user.is_admin:
            self._error(403, "forbidden", "Analytics are for administrators.")
            return False
        return True

    async def _export(self, filters) -> None:
        fmt = self.get_query_argument("format", "csv")
        if fmt not in EXPORT_TYPES:
            self._error(400, "invalid_request", "format: csv or json")
            return
        lines = export_lines(self.store.engine, filters, fmt)
        try:
            first = await anext(lines, "")
        except UnknownUser as exc:
            self._error(404, "not_found", str(exc))
            return
        self.set_header("Content-Type", EXPORT_TYPES[fmt])
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Disposition",
                        f'attachment; filename="messages.{"csv" if fmt == "csv" else "jsonl"}"')
        chunk = [first]
        size = len(first)
        try:
            async for line in lines:
                chunk.append(line)
                size += len(line)
                if size >= EXPORT_CHUNK:
                    self.write("".join(chunk))
                    await self.flush()  # waits for the client: memory stays bounded
                    chunk, size = [], 0
            self.finish("".join(chunk))
        except StreamClosedError:
            pass  # the client went away
        finally:
            await lines.aclose()

    def _error(self, status: int, error: str, description: str) -> None:
        self.write_json(status, {"error": error, "error_description": description})


routes = [(r"/admin", AdminPageHandler), (r"/api/admin/analytics/([a-z_]+)", AnalyticsHandler)]
