"""The built-in ``clock`` tool: the current UTC time and weekday.

Arguments ``{}``; result ``{"utc": "2026-11-28T10:00:00Z", "weekday": "Saturday"}``.
It registers through ``register_tools`` like any third-party tool.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict

from tornado_app.hookspecs import hookimpl
from tornado_app.tools import Tool, ToolContext


class NoArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClockTool(Tool):
    description = ("The current date and time in UTC, and the weekday. Use it whenever the "
                   "answer depends on today's date or the time.")
    Arguments = NoArguments

    async def call(self, arguments: NoArguments, context: ToolContext) -> dict:
        now = datetime.now(timezone.utc)
        return {"utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "weekday": now.strftime("%A")}


@hookimpl
def register_tools(register):
    register("clock", lambda options, settings: ClockTool())
