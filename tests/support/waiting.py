"""Polling until something is true, for tests and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

DEFAULT_TIMEOUT_S = 30.0
_POLL_S = 0.05

T = TypeVar("T")


class WatchedProcess(Protocol):
    """What a wait needs of a process it watches: whether it is gone, and its log for the failure message."""

    def exit_code(self) -> int | None: ...

    def log_text(self) -> str: ...


def wait_for(condition: Callable[[], T], what: str, timeout: float = DEFAULT_TIMEOUT_S,
             proc: WatchedProcess | None = None) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` (and the log) at the
    deadline, or at once when ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.exit_code() is not None:
            raise AssertionError(f"service exited (rc={proc.exit_code()}) while waiting for {what}\n{proc.log_text()}")
        if time.monotonic() > deadline:
            tail = proc.log_text()[-6000:] if proc is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
        time.sleep(_POLL_S)


def poll_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` passes; return its last value
    (falsy on timeout): for callers that assert on the value themselves."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
