"""Logging: text or JSON lines, and a filter that keeps secrets out of every line.

The filter sits on the root handler, so it sees every logger's records: it
redacts anything shaped like a JWT, an ``sk-`` API key, or a ``token=``
query value, in the message and in its arguments.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import datetime, timezone

from .config import LoggingSettings

_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # a JWT
    r"|\bsk-[A-Za-z0-9_-]{8,}"  # OpenAI-style API key
    r"|(?<=token=)[^&#\s\"']+"  # a token in a query string
)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    return _SECRETS.sub(REDACTED, text)


# Ids of the exchange being handled (set per asyncio task, see chat_socket),
# so that one exchange can be followed across lines and loggers.
context: contextvars.ContextVar[dict] = contextvars.ContextVar("log_context", default={})


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        record.msg = redact(str(record.msg))
        return True


class TextFormatter(logging.Formatter):
    def formatException(self, ei) -> str:
        return redact(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context.get(),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: LoggingSettings, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # Alembic narrates every connection at INFO; the service says what it did.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
