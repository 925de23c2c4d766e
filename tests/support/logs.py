"""The service's log: structlog key=value lines, values rendered with repr."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

_FIELD = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


def parse_log_line(line: str) -> dict[str, Any]:
    """One structlog key=value line as a dict; values back to Python (str, int, ...) where they parse."""
    out: dict[str, Any] = {}
    for key, raw in _FIELD.findall(line):
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


@dataclass(frozen=True)
class LogEvent(Mapping[str, Any]):
    """One parsed log line with an ``event`` key, and when the reader saw it (``time.monotonic()``).

    A mapping of the line's fields, so ``event["path"]`` and ``event.get("embedded", 0)`` read them."""

    seen_at: float
    fields: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.fields.get("event", ""))

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


def logged_events(text: str) -> list[dict[str, Any]]:
    """The ``event=`` lines of a log's text, parsed, in order."""
    return [parse_log_line(line) for line in text.splitlines() if "event=" in line]


@contextmanager
def logging_to(stream: TextIO, level: str = "info") -> Iterator[TextIO]:
    """The service's own logging (``configure_logging`` at ``level``, the plain style) writing to ``stream``
    while the block runs; the process's default set up again after it."""
    from image_search.logs import configure_logging

    configure_logging(level, stream=stream)
    try:
        yield stream
    finally:
        configure_logging()
