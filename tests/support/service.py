"""``image-search serve`` in a subprocess, for the end-to-end tests and the benchmark.

The process runs in its own session with stdout and stderr going to a log file. A background
thread follows that file as it grows and parses each complete ``event=`` line into a ``LogEvent``
stamped with when it was seen, so the benchmark can time events without polling for them; readers
also catch up at once when they ask, so a test sees every line written before its call. With
``sample_memory`` the same thread samples VmRSS/VmHWM every 0.2 s.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tests.support import warm
from tests.support.env import child_env
from tests.support.logs import LogEvent, parse_log_line
from tests.support.waiting import DEFAULT_TIMEOUT_S, wait_for

SERVICE_CLI = Path(sys.executable).with_name("image-search")
# Torch import, model load and the embedded server's start, on a shared 2-core machine.
START_TIMEOUT_S = 90.0
_FOLLOW_S = 0.02  # how stale an event's seen_at may be: well under what the benchmark measures
_MEMORY_EVERY_S = 0.2
_ABORT_WAIT_S = 15.0  # for the stacks of a service that outlived its stop to be written


@dataclass(frozen=True)
class MemorySample:
    seen_at: float
    rss_mb: float
    hwm_mb: float


def _command(config: Path, flags: tuple[str, ...]) -> list[str]:
    # The console script when the environment has one (uv sync), else the module.
    program = [str(SERVICE_CLI)] if SERVICE_CLI.exists() else [sys.executable, "-m", "image_search.cli"]
    return [*program, "serve", "--config", str(config), *flags]


class ServiceProcess:
    """``image-search serve --config CONFIG FLAGS...`` in its own session (cwd: the config's folder);
    stdout and stderr appended to ``log_path``."""

    def __init__(self, config: Path, *flags: str, log_path: Path, env: dict[str, str] | None = None,
                 sample_memory: bool = False) -> None:
        self.log_path = log_path
        self._log_out: BinaryIO = open(log_path, "ab")
        self._log_start = self._log_out.tell()  # this run's lines only, when a log is reused
        self._log_in: BinaryIO = open(log_path, "rb")
        self._log_in.seek(self._log_start)
        self._partial = b""
        self._events: list[LogEvent] = []
        self._read_lock = threading.Lock()
        self.memory_samples: list[MemorySample] = []
        self._sample_memory = sample_memory
        self.started_at = time.monotonic()
        self.popen = warm.popen(_command(config, flags), cwd=config.parent, env=env or child_env(),
                                stdin=subprocess.DEVNULL, stdout=self._log_out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self._closed = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="service-log-follower", daemon=True)
        self._follower.start()

    # --- the log ---------------------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Parse what was appended to the log since the last read (complete lines only)."""
        with self._read_lock:
            if self._log_in.closed:  # after close(): everything was read then
                return
            chunk = self._log_in.read()
            if not chunk:
                return
            seen_at = time.monotonic()
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", errors="replace")
                if "event=" in line:
                    self._events.append(LogEvent(seen_at, parse_log_line(line)))

    def _follow(self) -> None:
        next_sample = 0.0
        while not self._closed.wait(_FOLLOW_S):
            self._catch_up()
            if self._sample_memory and time.monotonic() >= next_sample:
                next_sample = time.monotonic() + _MEMORY_EVERY_S
                rss, hwm = self.memory_mb()
                if not math.isnan(rss):
                    self.memory_samples.append(MemorySample(time.monotonic(), rss, hwm))

    def log_text(self) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_start)
            return fh.read().decode("utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[LogEvent]:
        self._catch_up()
        with self._read_lock:
            return [e for e in self._events if name is None or e.name == name]

    def mark(self) -> int:
        """A position in the log: events after it are what an action caused."""
        return len(self.events())

    def events_since(self, mark: int, name: str | None = None) -> list[LogEvent]:
        return [e for e in self.events()[mark:] if name is None or e.name == name]

    def wait_event(self, name: str, *, since: int = 0, timeout: float = DEFAULT_TIMEOUT_S,
                   where: Callable[[LogEvent], bool] = lambda e: True) -> LogEvent:
        return wait_for(lambda: next((e for e in self.events_since(since, name) if where(e)), None),
                        f"log event {name}", timeout, proc=self)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> LogEvent:
        return self.wait_event("service_ready", timeout=timeout)

    # --- the process -----------------------------------------------------------------------------

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB; NaN once the process is gone."""
        rss = hwm = float("nan")
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        return rss, hwm

    def signal(self, signum: int, timeout: float = 60) -> int:
        """Send ``signum``; the exit code once it has exited. Past ``timeout``, SIGABRT as in ``stop``, and
        the failure shows the log's end: where every thread was."""
        self.popen.send_signal(signum)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(timeout=0)
            raise AssertionError(f"still running {timeout:g} s after {signal.Signals(signum).name}; the end of its "
                                 f"log (every thread's stack):\n{self.log_text()[-12000:]}") from None

    def pause(self) -> None:
        """SIGSTOP to its whole session (the service and its workers): it keeps what it holds (its database
        session, so it stays a live member) and does nothing until ``resume``."""
        os.killpg(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.popen.pid, signal.SIGCONT)

    def kill9(self) -> None:
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait, then close; the exit code. Past ``timeout``, SIGABRT, as systemd's watchdog
        sends: the service's faulthandler writes every thread's stack into its log (what held the stop is
        there to read), then SIGKILL if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGABRT)
            try:
                code = self.popen.wait(timeout=_ABORT_WAIT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                code = self.popen.wait()
        self.close()
        return code

    def close(self) -> None:
        """Kill the whole session if it still runs; stop following the log. Idempotent."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)
        self._closed.set()
        self._follower.join(timeout=5)
        self._catch_up()  # what the process wrote last stays readable through events()
        self._log_out.close()
        with self._read_lock:
            self._log_in.close()

