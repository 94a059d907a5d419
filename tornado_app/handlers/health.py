"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from .. import metrics
from ..store import StoreUnavailable
from .base import BaseHandler

logger = logging.getLogger(__name__)


class HealthHandler(BaseHandler):
    """Alive: the process answers HTTP."""

    def get(self) -> None:
        self.write_json(200, {"status": "ok"})


class ReadyHandler(BaseHandler):
    """Ready: the database answers and the agent is loaded (503 otherwise).
    ``mcp`` gives each MCP server's state; one that is down is never a 503."""

    async def get(self) -> None:
        checks = {"database": "ok", "agent": "ok"}
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            logger.warning("readiness: %s", exc)
            checks["database"] = "unavailable"
        if not self.chat.pool.ready:
            checks["agent"] = "loading"
        ready = all(value == "ok" for value in checks.values())
        body = {"status": "ready" if ready else "not ready", **checks}
        if (mcp := self.settings.get("mcp")) and mcp.connections:
            # Informational: an MCP server that is down leaves out its tools, not the service.
            body["mcp"] = mcp.states()
        self.write_json(200 if ready else 503, body)


class MetricsHandler(BaseHandler):
    """Prometheus metrics (see tornado_app.metrics)."""

    def get(self) -> None:
        body, content_type = metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(body)


routes = [
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
    (r"/metrics", MetricsHandler),
]
