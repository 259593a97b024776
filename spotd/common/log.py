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


class _JsonLines(logging.Handler):
    """Other libraries' stdlib log records (botocore, asyncio, httpx, urllib3) as spotd's JSON lines, written
    to `stream`, or to whatever sys.stderr is when the line is written."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            print(line, file=self._stream if self._stream is not None else sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def configure(level: str = "info", stream: Any = None) -> None:
    """spotd's events at `level` and up, and other libraries' records at WARNING and up (their debug chatter
    is not ours to print), as one JSON object per line with "logger" naming a library's logger."""
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # Without a stream, whatever sys.stderr is when a line is written (not when configured).
        logger_factory=structlog.PrintLoggerFactory(file=stream)
        if stream is not None
        else (lambda *args: structlog.PrintLogger(sys.stderr)),
        # Not cached: module-level loggers follow a later configure() (the simulation logs to a file, then back).
        cache_logger_on_first_use=False,
    )
    handler = _JsonLines(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _drop_secrets,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
        )
    )
    root = logging.getLogger()
    # A second configure() (the simulation's log file, then back) replaces ours; other handlers (pytest's) stay.
    for old in [h for h in root.handlers if isinstance(h, _JsonLines)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(threshold, logging.WARNING))
    # warnings.warn() from a library (a DeprecationWarning shown once) as a record of logger "py.warnings".
    logging.captureWarnings(True)


def get(name: str) -> Any:
    return structlog.get_logger(name)
