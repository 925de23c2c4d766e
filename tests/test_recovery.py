"""Lost events are not lost work, and a database outage does not kill the service.

- Outage: the "external" PostgreSQL is a second real server (pgserver) reached through its Unix-socket
  directory as ``postgres-host``, stopped and started under the running service.
- Lost events: a real inotify queue overflow. The service is started while the kernel's
  ``max_queued_events`` is tiny (it applies to inotify instances created meanwhile), then frozen with
  SIGSTOP while hundreds of files land, so the kernel must drop events.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.support.db import live_rows, running_server_rows
from tests.support.files import find_bundle, save_picture, write_config
from tests.support.service import ServiceProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def external_server(tmp_path_factory: pytest.TempPathFactory):
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("ext") / "pg", cleanup_mode="stop")
    yield server
    server.cleanup()


def _file_names(server) -> set[str] | None:
    """The file names in the external server's table; None while it is down."""
    rows = running_server_rows(Path(server.pgdata))
    return None if rows is None else {row["file_name"] for row in rows}


def test_service_survives_a_database_outage_and_catches_up(tmp_path: Path, tiny_model_dir: Path,
                                                           external_server) -> None:
    import pgserver

    info = external_server.get_postmaster_info()
    config = write_config(tmp_path, tiny_model_dir, postgres_host=str(info.socket_dir),
                          postgres_port=info.port or 5432, postgres_password="s3cret-outage")
    save_picture(tmp_path / "images" / "before.png", seed=1)
    service = ServiceProcess(config, "--no-cleanup", log_path=tmp_path / "service.log")
    try:
        service.wait_ready()
        wait_for(lambda: _file_names(external_server) == {"before.png"}, "the first row", proc=service)

        # The database goes away under the running service.
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=external_server.pgdata, user=external_server.system_user)
        mark = service.mark()
        save_picture(tmp_path / "images" / "during.png", seed=2)
        shutil.copy(tmp_path / "images" / "before.png", tmp_path / "inbox" / "q.png")
        service.wait_event("database_unavailable", since=mark)
        assert service.exit_code() is None, "the service died with its database"
        assert (tmp_path / "inbox" / "q.png").exists(), "the query must stay pending, not fail"
        assert not (tmp_path / "inbox" / "failed").exists()

        # It comes back: the pending image is indexed and the pending query answered, without a restart.
        external_server.ensure_postgres_running()
        wait_for(lambda: _file_names(external_server) == {"before.png", "during.png"}, "the row written after the outage",
                 timeout=60, proc=service)
        bundle = wait_for(lambda: find_bundle(tmp_path / "output", "q.png"), "the query answered", timeout=60,
                          proc=service)
        assert (bundle / "q.jsonl").read_text().splitlines()[0].find('"before.png"') > 0
        assert service.events_since(mark, "database_reconnected")
        assert "s3cret-outage" not in service.log_text()
        assert service.signal(signal.SIGTERM) == 0
    finally:
        service.close()


MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def test_inotify_overflow_is_logged_and_rescanned(tmp_path: Path, tiny_model_dir: Path) -> None:
    if not os.access(MAX_QUEUED_EVENTS, os.W_OK):
        pytest.skip("needs root to shrink fs.inotify.max_queued_events for the service's watch")
    config = write_config(tmp_path, tiny_model_dir)
    original = MAX_QUEUED_EVENTS.read_text().strip()
    service = None
    try:
        MAX_QUEUED_EVENTS.write_text("16")
        service = ServiceProcess(config, "--no-cleanup", log_path=tmp_path / "service.log")
        service.wait_ready()
    finally:
        MAX_QUEUED_EVENTS.write_text(original)  # only the service's own watch keeps the tiny queue
    try:
        mark = service.mark()
        os.kill(service.popen.pid, signal.SIGSTOP)  # nobody reads the queue: the kernel must overflow it
        try:
            names = {f"burst-{i:03d}.png" for i in range(120)}
            for i, name in enumerate(sorted(names)):
                save_picture(tmp_path / "images" / name, seed=1000 + i, size=(40, 30))
        finally:
            os.kill(service.popen.pid, signal.SIGCONT)
        lost = service.wait_event("watch_events_lost", since=mark)
        assert "overflow" in lost["reason"].lower()
        wait_for(lambda: set(live_rows(tmp_path / "state")) == {str(tmp_path / "images" / n) for n in names},
                 "every file of the burst indexed after the rescan", timeout=120, proc=service)
        assert service.signal(signal.SIGTERM) == 0
    finally:
        service.close()
