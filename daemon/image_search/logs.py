"""Logging: structlog to stderr, shaped for where stderr goes.

- journald (``JOURNAL_STREAM`` names our stderr): one line per event with a ``<N>`` syslog priority
  prefix, so ``journalctl -p warning`` filters work, then ``event key=value ...``;
- a TTY: structlog's readable console renderer;
- anything else (a pipe, a file): timestamped ``key=value`` lines.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# sd-daemon(3) priorities.
SYSLOG_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}
_SECRET_MARKERS = ("password", "secret", "token")


def stderr_is_journal(stream: TextIO | None = None, environ: MutableMapping[str, str] | None = None) -> bool:
    """True when stderr is connected to the journal: ``JOURNAL_STREAM`` (dev:ino) matches its fstat."""
    environ = os.environ if environ is None else environ
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def _redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            event[key] = "***"
    return event


def _syslog_prefix(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["_priority"] = SYSLOG_PRIORITY.get(method, 6)
    return event


class _JournalRenderer:
    def __init__(self) -> None:
        self._kv = structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        priority = event.pop("_priority", 6)
        event.pop("timestamp", None)  # journald stamps every line itself
        event.pop("level", None)
        return f"<{priority}>" + self._kv(logger, method, event)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> str:
    """Configure structlog once for the process; return the style chosen (journal, console or plain)."""
    stream = stream or sys.stderr
    if stderr_is_journal(stream):
        style = "journal"
        renderer: Any = _JournalRenderer()
        extra: list[Any] = [_syslog_prefix]
    elif stream.isatty():
        style = "console"
        renderer = structlog.dev.ConsoleRenderer()
        extra = [structlog.processors.TimeStamper(fmt="%H:%M:%S")]
    else:
        style = "plain"
        renderer = structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"], drop_missing=True)
        extra = [structlog.processors.TimeStamper(fmt="iso")]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _redact_secrets,
            *extra,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return style
