"""Prometheus metrics (prometheus-client), correct with several processes.

With ``server.processes`` > 1 every worker writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR``, which must be set before this module is
imported (tornado_app.__main__ does so); ``GET /metrics`` on any worker then
answers for all of them. Several independent instances are scraped one by one.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

open_sockets = Gauge(
    "chat_open_sockets", "Open, authenticated WebSocket connections",
    multiprocess_mode="livesum",
)
messages = Counter(
    "chat_messages_total",
    "Chat messages by outcome: ok, error, cancelled, rate_limited, quota, invalid, queue_full",
    ["outcome"],
)
reply_seconds = Histogram(
    "chat_reply_seconds", "Time from a message to its whole reply", ["agent"], buckets=SECONDS
)
first_token_seconds = Histogram(
    "chat_first_token_seconds", "Time from a message to the first piece of its reply",
    ["agent"], buckets=SECONDS,
)
rejections = Counter(
    "chat_rejections_total",
    "Refused sockets and messages: auth, origin, rate_limit, quota, user_connections, "
    "process_connections",
    ["reason"],
)
errors = Counter(
    "chat_errors_total",
    "Errors by kind: the agent's (timeout, upstream, connection, ...), database, internal",
    ["kind"],
)

mcp_server_up = Gauge(
    "chat_mcp_server_up", "1 while the MCP server (mcp.servers) is connected, 0 while it is not",
    ["server"], multiprocess_mode="livemax",
)


def observe_reply(reply) -> None:
    """Count one finished exchange (a tornado_app.chat.Reply)."""
    messages.labels(reply.status).inc()
    agent = reply.agent or "none"
    if reply.latency_ms is not None:
        reply_seconds.labels(agent).observe(reply.latency_ms / 1000)
    if reply.ttft_ms is not None:
        first_token_seconds.labels(agent).observe(reply.ttft_ms / 1000)
    if reply.error_kind:
        errors.labels(reply.error_kind).inc()


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type, summed over worker processes."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the sum)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
