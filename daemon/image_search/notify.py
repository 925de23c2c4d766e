"""systemd notification: READY, STATUS, WATCHDOG and STOPPING through ``sdnotify``, errors not swallowed.

``sdnotify`` hides every failure and knows nothing of the watchdog; this wrapper connects only when
``NOTIFY_SOCKET`` is set, logs the first failure instead of hiding it, and reads ``WATCHDOG_USEC``
(honouring ``WATCHDOG_PID``) to tell the service loop how often to ping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import sdnotify
import structlog

log = structlog.get_logger(__name__)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is armed for us."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid.strip() != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends sd_notify messages when run under systemd (NOTIFY_SOCKET set); does nothing otherwise."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._failed = False
        if self.enabled:
            try:
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError as exc:
                self._report(exc)

    def _report(self, exc: BaseException) -> None:
        if not self._failed:  # one line, not one per ping
            log.warning("sd_notify_failed", socket=os.environ.get("NOTIFY_SOCKET", ""), reason=str(exc))
        self._failed = True

    def send(self, *fields: str) -> bool:
        if self._notifier is None:
            return False
        try:
            self._notifier.notify("\n".join(fields))
            return True
        except OSError as exc:
            self._report(exc)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")
