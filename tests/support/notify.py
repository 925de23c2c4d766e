"""A stand-in for systemd's NOTIFY_SOCKET: what the service says over sd_notify, and when."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from tests.support.files import written_into


class NotifyListener:
    """A bound unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        self.output = output
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.bundles_at_ready: list[str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            if "READY=1" in text.splitlines() and self.bundles_at_ready is None:
                # what the service had produced when it said it was ready
                self.bundles_at_ready = [p.name for p in written_into(self.output) if not p.name.startswith(".")]
            self.messages.append((time.monotonic(), text))

    def with_field(self, line: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if line in m.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
