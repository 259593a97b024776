"""structlog set-up: JSON, one event per line, secrets never written."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(token|password|secret|authorization|credential)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(://)[^/@\s]+@")


def redact(value: Any) -> Any:
    """Basic-auth user info in URLs becomes '***@'; other values pass through."""
    if isinstance(value, str) and "@" in value:
        return _URL_USERINFO.sub(r"\1***@", value)
    return value


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if _SECRET_KEYS.search(key):
            event[key] = "***"
        else:
            event[key] = redact(event[key])
    return event


def configure(level: str = "info", stream: Any = None) -> None:
    # Libraries log through the stdlib; their debug chatter (httpcore) is not ours to print.
    logging.basicConfig(format="%(message)s", stream=stream or sys.stderr, level=logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # Without a stream, whatever sys.stderr is when a line is written (not when configured).
        logger_factory=structlog.PrintLoggerFactory(file=stream)
        if stream is not None
        else (lambda *args: structlog.PrintLogger(sys.stderr)),
        # Not cached: module-level loggers follow a later configure() (the simulation logs to a file, then back).
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)
