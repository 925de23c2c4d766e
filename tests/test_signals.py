"""How ``image-search serve`` stops, whatever signal asks and whenever it comes: the real process, real
signals, the real embedded PostgreSQL. Every stop ends with the server stopped, never left running
orphaned for the next start to clean up after.

- SIGHUP (the terminal of a foreground run closed) stops it as SIGTERM does;
- a second signal while it stops says so and the stop goes on, to the end;
- a stop while the model is still loading ends the start at once, never ready;
- so does a stop during the start-up rescan of a folder on a slow share.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.support.db import postgres_running, stop_leftover_postgres
from tests.support.failures import fault_env
from tests.support.files import write_config
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.e2e

# A model that would take this long to load: far longer than any stop may wait.
SLOW_MODEL_S = 300
# A start-up rescan of 300 files at 0.2 s a stat: a minute, longer than a stop may wait.
SLOW_SHARE_FILES, SLOW_STAT_S = 300, 0.2


def started(root: Path, tiny_model_dir: Path, env: dict[str, str] | None = None) -> ServiceProcess:
    return ServiceProcess(write_config(root, tiny_model_dir), log_path=root / "service.log", env=env)


def test_sighup_stops_the_service_as_sigterm_does(tmp_path: Path, tiny_model_dir: Path) -> None:
    proc = started(tmp_path, tiny_model_dir)
    try:
        proc.wait_ready()
        assert proc.signal(signal.SIGHUP) == 0, proc.log_text()[-4000:]
        (stopping,) = proc.events("service_stopping")
        assert stopping["signal"] == "SIGHUP"
        assert [e["exit_code"] for e in proc.events("service_stopped")] == [0]
        assert not postgres_running(tmp_path / "state"), "the embedded PostgreSQL was left running"
    finally:
        proc.close()
        stop_leftover_postgres(tmp_path / "state")


def test_a_second_signal_during_the_stop_is_logged_and_the_stop_still_stops_postgres(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """An impatient Ctrl-C after SIGTERM: the stop goes on to its end instead of exiting on the spot."""
    proc = started(tmp_path, tiny_model_dir)
    try:
        proc.wait_ready()
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(timeout=60) == 0, proc.log_text()[-4000:]
        (stopping,) = proc.events("service_stopping")
        (repeated,) = proc.events("stop_already_under_way")
        assert {stopping["signal"], repeated["signal"]} == {"SIGTERM", "SIGINT"}
        names = [e.name for e in proc.events()]
        assert names[-1] == "service_stopped" and "embedded_postgres_stopped" in names, names
        assert not postgres_running(tmp_path / "state"), "the embedded PostgreSQL was left running"
    finally:
        proc.close()
        stop_leftover_postgres(tmp_path / "state")


def test_sigterm_while_the_model_loads_ends_the_start_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    proc = started(tmp_path, tiny_model_dir, env=fault_env(FAULT_SLOW_MODEL=str(SLOW_MODEL_S)))
    try:
        proc.wait_event("store_ready")  # the database is up, the model has begun to load
        asked = time.monotonic()
        assert proc.signal(signal.SIGTERM, timeout=30) == 0, proc.log_text()[-4000:]
        took = time.monotonic() - asked
        names = [e.name for e in proc.events()]
        assert "service_ready" not in names and "model_loaded" not in names, names
        (stopped,) = proc.events("service_stopped_during_startup")
        assert stopped["signal"] == "SIGTERM"
        assert names[-2:] == ["embedded_postgres_stopped", "service_stopped"], names
        assert not postgres_running(tmp_path / "state"), "the embedded PostgreSQL was left running"
        assert took < 20, f"the stop took {took:.1f} s"  # about 1 s here: the server's own stop
    finally:
        proc.close()
        stop_leftover_postgres(tmp_path / "state")


def test_sigterm_during_the_startup_rescan_ends_the_start_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A library on a share that answers slowly: the rescan would take a minute; SIGTERM ends it at the next
    file, and the start as a stop during the model's load does, PostgreSQL stopped."""
    config = write_config(tmp_path, tiny_model_dir)
    for i in range(SLOW_SHARE_FILES):
        (tmp_path / "images" / f"p{i:03}.png").touch()
    proc = ServiceProcess(config, log_path=tmp_path / "service.log", env=fault_env(FAULT_SLOW_STAT=str(SLOW_STAT_S)))
    try:
        proc.wait_event("fault_slow_stat", timeout=120)  # the rescan is under way
        asked = time.monotonic()
        assert proc.signal(signal.SIGTERM, timeout=30) == 0, proc.log_text()[-4000:]
        took = time.monotonic() - asked
        names = [e.name for e in proc.events()]
        assert "rescan_stopped" in names and "rescan_complete" not in names and "service_ready" not in names, names
        (stopped,) = proc.events("service_stopped_during_startup")
        assert stopped["signal"] == "SIGTERM"
        # The model loads on a thread of its own, beside the start: on a loaded machine its line may come last.
        assert [n for n in names if n != "model_loaded"][-2:] == ["embedded_postgres_stopped", "service_stopped"], names
        assert [e["exit_code"] for e in proc.events("service_stopped")] == [0]
        assert not postgres_running(tmp_path / "state"), "the embedded PostgreSQL was left running"
        assert took < 20, f"the stop took {took:.1f} s"  # the rescan alone would have taken a minute
    finally:
        proc.close()
        stop_leftover_postgres(tmp_path / "state")
