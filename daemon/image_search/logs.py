"""Logging: structlog to stderr, shaped for where stderr goes.

- journald (``JOURNAL_STREAM`` names our stderr): one line per event with a ``<N>`` syslog priority
  prefix, so ``journalctl -p warning`` filters work, then ``event key=value ...``;
- a TTY: structlog's readable console renderer;
- anything else (a pipe, a file): timestamped ``key=value`` lines.

Third-party output joins the same pipeline instead of reaching stderr raw: Python warnings
(``logging.captureWarnings``) become one ``python_warning`` line each, and records of the standard
``logging`` module (the model's remote code logs that way) one ``library_log`` line each. Deprecation
notices (timm's "Importing from timm.models.layers is deprecated") are for developers: priority info;
any other warning (jina's "Flash attention ... disabling") is a warning.

The preprocessing worker processes write nothing: ``collect_into`` hands each event of theirs, at the
level the main process was configured with (``configured_level``), to the worker's protocol, and the
main process logs it as its own (``workers.py``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, MutableMapping
from pathlib import PurePath
from typing import Any, TextIO

import structlog

from .errors import describe
from .names import escape

# sd-daemon(3) priorities.
SYSLOG_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}
# A field is a secret when one of its key's words (split at ``_``, ``-`` or ``.``) is, or ends with, one of
# these: ``postgres_password``, ``pgpassword``, ``auth_token``, ``client_secret``, ``dsn``. Whole words, so
# that a count such as ``tokens`` (``text_query_truncated tokens=90``) is shown.
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credentials", "dsn")
_KEY_WORD = re.compile(r"[^a-z0-9]+")
_SURROGATE = re.compile("[\udc80-\udcff]")


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


def is_secret_key(key: str) -> bool:
    """Whether a log field named ``key`` holds a secret (a password, a credential token, a DSN)."""
    return any(word.endswith(_SECRET_WORDS) for word in _KEY_WORD.split(key.lower()) if word)


def _redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if is_secret_key(key):
            event[key] = "***"
    return event


def _show_names(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Paths as ``names.escape`` text, as the table and result files show them: a name in bytes that are
    not UTF-8, or with a newline, stays one unambiguous line. Paths are logged as Path objects for this."""
    for key, value in event.items():
        if isinstance(value, PurePath):
            event[key] = escape(value)
        elif isinstance(value, list) and any(isinstance(v, (str, PurePath)) for v in value):
            event[key] = [escape(v) if isinstance(v, PurePath) else _without_surrogates(v) for v in value]
        elif isinstance(value, str):
            event[key] = _without_surrogates(value)
    return event


def _without_surrogates(value: Any) -> Any:
    """Free text that quotes a name (an OS error's message) with its undecodable bytes as ``\\xNN``."""
    if isinstance(value, str) and _SURROGATE.search(value):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


class _LinePrinter(structlog.PrintLogger):
    """structlog's ``PrintLogger``, except that a line the stream refuses is dropped: after the terminal
    of a foreground run is closed every write fails (EIO), and a lost log line must never cut a stop short
    (the embedded PostgreSQL is stopped after several lines)."""

    def __init__(self, file: TextIO, *, beside_progress_bars: bool = False) -> None:
        super().__init__(file)
        self._bars: Any = None  # tqdm's class, on a terminal: imported once, by the first logger made there
        if beside_progress_bars:
            from tqdm import tqdm

            self._bars = tqdm

    def msg(self, message: str) -> None:
        try:
            if self._bars is not None:
                # On a terminal a line written while a tqdm bar is drawn (`index`'s, a migration's) was glued
                # to the end of the bar's line, and the bar was not drawn again below it: tqdm clears its bars
                # on this stream, the line is written, and the bars are drawn again.
                with self._bars.external_write_mode(file=self._file):
                    super().msg(message)
            else:
                super().msg(message)
        except (OSError, ValueError):  # EIO, EPIPE; ValueError: the stream is closed
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


# Where configure_logging sends the lines, and from which level: log_from_signal_handler writes there too.
_output: TextIO = sys.stderr
_level = logging.INFO


def log_from_signal_handler(event: str, **fields: Any) -> None:
    """One info line, written from a signal handler. A handler runs between two bytecodes of the main
    thread, perhaps inside a log call that holds the stream's lock (logging through structlog would then
    wait for ever) or has half a line in its buffer: so the line is rendered by the configured processors
    and written with one ``os.write`` on the stream's descriptor, past both."""
    if _level > logging.INFO:
        return
    line: Any = {"event": event, **fields}
    for processor in structlog.get_config()["processors"]:
        line = processor(None, "info", line)
    try:
        os.write(_output.fileno(), f"{line}\n".encode("utf-8", "backslashreplace"))
    except (OSError, ValueError):  # no descriptor, or a closed terminal: the line is lost, the stop goes on
        pass


def configured_level() -> int:
    """The level ``configure_logging`` set (info until it is called): the one the worker processes are
    started with, so that they do not even build the lines it would drop."""
    return _level


def collect_into(level: int, keep: Callable[[str, dict[str, Any]], None]) -> None:
    """For a worker process: every structlog event at ``level`` or above, and as in the main process every
    Python warning and standard-library record, goes to ``keep(level_name, fields)`` (``event`` and the
    caller's fields, a traceback as text) instead of being written: the main process renders it. A call
    below ``level`` costs nothing (structlog's filtering logger does not build its event)."""
    def handed_over(_: Any, __: str, event: MutableMapping[str, Any]) -> Any:
        level_name = event.pop("level")
        keep(level_name, dict(event))
        raise structlog.DropEvent

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info, handed_over],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(logging.getLevelName(level))


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


# warnings.formatwarning's shape: "<file>:<line>: <Category>: <message>\n[  <source line>\n]".
_FORMATTED_WARNING = re.compile(r"^(?P<source>.*?):(?P<line>\d+): (?P<category>\w+): (?P<message>.*)$", re.S)
# Notices addressed to whoever maintains the code, not to whoever runs the service.
_DEVELOPER_WARNINGS = frozenset({"DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"})
_CORRUPT_EXIF = "Corrupt EXIF data."
_bridge_log = structlog.get_logger("image_search.logs")


def _method_for(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


class StdlibToStructlog(logging.Handler):
    """A root ``logging`` handler that re-emits every record, and every captured Python warning, as one
    structlog event, so that third-party output has our format and priorities."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.name == "py.warnings":
                method, event, fields = self._warning_fields(record.getMessage())
            else:
                method, event = _method_for(record.levelno), "library_log"
                fields = {"logger": record.name, "message": " ".join(record.getMessage().split())}
                if record.exc_info and record.exc_info[1] is not None:
                    fields["error"] = describe(record.exc_info[1])
            getattr(_bridge_log, method)(event, **fields)
        except Exception:  # a logging failure must never take the program down
            self.handleError(record)

    @staticmethod
    def _warning_fields(formatted: str) -> tuple[str, str, dict[str, Any]]:
        match = _FORMATTED_WARNING.match(formatted)
        if match is None:
            return "warning", "python_warning", {"message": " ".join(formatted.split())}
        lines = match["message"].rstrip("\n").split("\n")
        if len(lines) > 1 and lines[-1].startswith("  "):
            lines = lines[:-1]  # the offending source line formatwarning appends: noise in a log
        category, message = match["category"], " ".join(" ".join(lines).split())
        if category == "UserWarning" and message.startswith(_CORRUPT_EXIF):
            # Pillow's, at open, for an EXIF block it cannot read: the picture is still good (its date and
            # camera are not read), as metadata.py's own line says, at debug.
            return "debug", "exif_unreadable", {"error": message}
        return ("info" if category in _DEVELOPER_WARNINGS else "warning", "python_warning",
                {"category": category, "message": message, "source": f"{match['source']}:{match['line']}"})


def _route_stdlib_logging(level: str) -> None:
    """Python warnings and standard-library logging records into structlog, replacing any handler
    (and the last-resort one that prints raw lines to stderr) on the root logger."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StdlibToStructlog):
            root.removeHandler(handler)
    root.addHandler(StdlibToStructlog())
    # Libraries' own info and debug chatter (PIL, urllib3, fontTools...) stays out unless asked for.
    root.setLevel(max(logging.WARNING, getattr(logging, level.upper(), logging.INFO)))


def configure_logging(level: str = "info", stream: TextIO | None = None) -> str:
    """Configure structlog once for the process; return the style chosen (journal, console or plain)."""
    global _output, _level
    stream = stream or sys.stderr
    _output, _level = stream, getattr(logging, level.upper(), logging.INFO)
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
            _show_names,
            *extra,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=lambda *_: _LinePrinter(stream, beside_progress_bars=style == "console"),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(level)
    return style
