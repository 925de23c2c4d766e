"""The embedded PostgreSQL's handles: the server stops with the last process that uses it, and each
process says what its own stop did. A command run beside the service (its own process, the point of
this test) leaves the server running for the service and says so, rather than "stopped"."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import psycopg2
import pytest
from structlog.testing import capture_logs

from image_search.store.embedded import EmbeddedPostgres, another_users_server
from tests.support.env import child_env
from tests.support.failures import crash_embedded_database
from tests.support.privileges import give_to_unprivileged, reachable_dir, unprivileged
from tests.support.waiting import wait_for

# The service's side: holds a handle until its stdin closes, then stops as the service does.
SERVICE_SIDE = """
import sys
from pathlib import Path
from image_search.store.embedded import EmbeddedPostgres
server = EmbeddedPostgres(Path(sys.argv[1]))
print(server.uri, flush=True)
sys.stdin.read()
server.stop()
"""


@pytest.mark.e2e
def test_a_command_beside_the_service_leaves_the_server_running_and_says_so(tmp_path) -> None:
    pgdata = tmp_path / "state" / "pgdata"
    service = subprocess.Popen([sys.executable, "-c", SERVICE_SIDE, str(pgdata)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    try:
        uri = next(line for line in service.stdout if line.startswith("postgresql://")).strip()  # after its log line
        with capture_logs() as logs:
            command = EmbeddedPostgres(pgdata)  # `image-search search` run beside the service
            command.stop()
        assert [e["event"] for e in logs] == ["embedded_postgres_started", "embedded_postgres_left_running"]
        psycopg2.connect(uri).close()  # still serving the service
        service.stdin.close()  # the service stops: the last handle
        output = service.stdout.read()
        service.wait(timeout=60)
        assert "embedded_postgres_stopped" in output and "left_running" not in output, output
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(uri, connect_timeout=5)
    finally:
        service.kill()
        service.wait()
        if (pgdata / "postmaster.pid").exists():  # a failed run leaves no server behind
            crash_embedded_database(tmp_path / "state")


def _holders(pgdata, count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SERVICE_SIDE, str(pgdata)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
            for _ in range(count)]


def _uri_of(holder: subprocess.Popen) -> str:
    return next(line for line in holder.stdout if line.startswith("postgresql://")).strip()  # after its log line


@pytest.mark.e2e
def test_two_processes_starting_at_once_on_a_new_machine_share_the_server_one_of_them_makes(tmp_path) -> None:
    """The service and `index` started together on a new machine: the second took the first's mark of a
    first start under way for one a stop left, deleted the pgdata being made, and both failed."""
    pgdata = tmp_path / "state" / "pgdata"
    holders = _holders(pgdata, 2)
    try:
        uris = [_uri_of(holder) for holder in holders]
        assert uris[0] == uris[1]
        psycopg2.connect(uris[0]).close()
        outputs = []
        for holder in holders:
            holder.stdin.close()
            outputs.append(holder.stdout.read())
            assert holder.wait(timeout=60) == 0, outputs[-1]
        assert not any("setup_unfinished" in output for output in outputs), outputs
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
        if (pgdata / "postmaster.pid").exists():
            crash_embedded_database(tmp_path / "state")


@pytest.mark.e2e
def test_the_last_process_left_stops_the_server_though_another_was_killed(tmp_path) -> None:
    """A process that shared the server died by kill -9, its handle never given up: the last live one's
    stop left the server running, with no process left to stop it."""
    pgdata = tmp_path / "state" / "pgdata"
    [service] = _holders(pgdata, 1)
    try:
        uri = _uri_of(service)
        command = EmbeddedPostgres(pgdata)
        service.kill()
        service.wait()
        with capture_logs() as logs:
            command.stop()
        assert [e["event"] for e in logs] == ["embedded_postgres_stale_handles_dropped", "embedded_postgres_stopped"]
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(uri, connect_timeout=5)
    finally:
        service.kill()
        service.wait()
        if (pgdata / "postmaster.pid").exists():
            crash_embedded_database(tmp_path / "state")


class _ServerKilledMeanwhile:
    """pgserver's handle when the postmaster died (kill -9) as it stopped it: psutil finds no process."""

    class global_process_id_list:  # noqa: N801  # pgserver's name
        @staticmethod
        def get() -> list[int]:
            return [os.getpid()]

    def cleanup(self) -> None:
        raise psutil.NoSuchProcess(12345, "postgres")


@pytest.mark.unit
def test_a_server_that_died_while_being_stopped_is_stopped_not_a_crash() -> None:
    server = EmbeddedPostgres.__new__(EmbeddedPostgres)
    server._server = _ServerKilledMeanwhile()
    with capture_logs() as logs:
        server.stop()
    assert [(e["event"], e["note"]) for e in logs] == [("embedded_postgres_stopped", "it had exited already")]


@pytest.mark.integration
def test_a_first_start_stopped_during_initdb_is_made_again_at_the_next(tmp_path) -> None:
    """Ctrl-C in a first start's first seconds stopped initdb after it wrote PG_VERSION, which is what
    pgserver looks for to skip initdb: every later start failed ('database "postgres" does not exist').
    The mark a first start leaves beside pgdata until its server is up says the pgdata is unfinished."""
    from image_search.store.embedded import INITIALISING_SUFFIX

    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("18\n")  # as far as an interrupted initdb got, or not much further
    (tmp_path / f"pgdata{INITIALISING_SUFFIX}").touch()
    with capture_logs() as logs:
        server = EmbeddedPostgres(pgdata)
    try:
        with psycopg2.connect(server.uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        server.stop()
    assert [e["event"] for e in logs if e["event"].startswith("embedded_postgres_setup")] == [
        "embedded_postgres_setup_unfinished"]
    assert not (tmp_path / f"pgdata{INITIALISING_SUFFIX}").exists()


@pytest.mark.integration
@pytest.mark.parametrize("holder", ["a zombie", "another program", "this process", "another server"])
def test_a_lock_left_by_a_dead_server_naming_a_live_pid_is_started_over_and_that_process_spared(
        tmp_path, holder: str) -> None:
    """After a kill -9 (the dead postmaster not reaped yet) or a container restart (its PID another
    program's, or ours), postmaster.pid names a live PID: pgserver took it for the server, failed to
    connect, and killed that process. The start now goes on, and the process lives."""
    pgdata = tmp_path / "pgdata"
    server = EmbeddedPostgres(pgdata)
    lock = (pgdata / "postmaster.pid").read_text()
    server.stop()
    process = other = None
    if holder == "this process":
        pid = os.getpid()
    elif holder == "another server":  # another service's embedded server, which took the PID after a power loss
        other = EmbeddedPostgres(tmp_path / "other")
        pid = int((tmp_path / "other" / "postmaster.pid").read_text().split()[0])
    else:
        process = subprocess.Popen(["true"] if holder == "a zombie" else ["sleep", "60"])
        if holder == "a zombie":  # exited, never waited for: a zombie child of this test
            wait_for(lambda: psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE, "the zombie", timeout=10)
        pid = process.pid
    (pgdata / "postmaster.pid").write_text(f"{pid}\n" + lock.split("\n", 1)[1])
    try:
        with capture_logs() as logs:
            server = EmbeddedPostgres(pgdata)
        try:
            with psycopg2.connect(server.uri) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            server.stop()
        assert [e["pid"] for e in logs if e["event"] == "embedded_postgres_stale_lock"] == [pid]
        if holder == "another program":
            assert process.poll() is None  # spared
        if other is not None:
            psycopg2.connect(other.uri).close()  # spared, serving its own service
    finally:
        if process is not None:
            process.kill()
            process.wait()
        if other is not None:
            other.stop()


# --- another user's server ---------------------------------------------------------------------------


def test_a_command_run_as_root_on_the_services_database_refuses_and_changes_nothing(tmp_path) -> None:
    """`sudo image-search index` beside a service that runs as its own user: pgserver, run as root, handed
    pgdata to its own user and opened up the folders above it, and the service could no longer open its
    database, at every start after. Now the command refuses at once, naming the user to run it as."""
    from image_search.config import ConfigError

    if os.geteuid() != 0:
        pytest.skip("a command run as root: this story needs root (CI runs as root)")
    state = tmp_path / "state"
    pgdata = state / "pgdata"
    pgdata.mkdir(parents=True)
    state.chmod(0o700)
    give_to_unprivileged(state)
    give_to_unprivileged(pgdata)
    before = [(p, p.stat().st_uid, p.stat().st_mode) for p in (tmp_path, state, pgdata)]
    with pytest.raises(ConfigError, match=r"belongs to the user 'nobody' \(the service's\): run this command as "
                                          r"that user \(sudo -u nobody image-search \.\.\.\).*locking the service out"):
        EmbeddedPostgres(pgdata)
    assert [(p, p.stat().st_uid, p.stat().st_mode) for p in (tmp_path, state, pgdata)] == before
    assert sorted(os.listdir(state)) == ["pgdata"]  # not even its start-up lock was made


def test_another_users_server_is_refused_in_its_words_and_ones_own_is_not(tmp_path) -> None:
    pgdata = tmp_path / "pgdata"
    assert another_users_server(pgdata) is None  # a first start makes it
    pgdata.mkdir()
    assert another_users_server(pgdata) is None  # this user's
    with reachable_dir() as reachable:
        (reachable / "pgdata").mkdir()
        os.chown(reachable / "pgdata", 0, 0)
        with unprivileged():  # ``nobody`` on root's
            refusal = another_users_server(reachable / "pgdata")
    assert refusal is not None and "belongs to the user 'root'" in refusal and "locking" not in refusal


@pytest.mark.e2e
def test_handles_a_power_loss_left_do_not_keep_the_server_running(tmp_path) -> None:
    """After a power loss, the last boot's handles name pids that other processes have now (here: init's).
    Taken for live, they kept every later stop from stopping the server."""
    pgdata = tmp_path / "state" / "pgdata"
    EmbeddedPostgres(pgdata).stop()  # made, and stopped
    (pgdata / ".handle_pids.json").write_text("[1]")  # the last boot's process, init's pid now
    server = EmbeddedPostgres(pgdata)
    uri = server.uri
    try:
        with capture_logs() as logs:
            server.stop()
        assert [e["event"] for e in logs] == ["embedded_postgres_stopped"]
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(uri, connect_timeout=5)
    finally:
        if (pgdata / "postmaster.pid").exists():
            crash_embedded_database(tmp_path / "state")


@pytest.mark.unit
def test_a_start_waits_while_the_server_recovers(tmp_path, monkeypatch) -> None:
    """A postmaster that runs but says "starting" in its postmaster.pid (a crash recovery over a large WAL):
    pgserver's start asserted "ready" and failed the run, and each restart met the same. It is waited for."""
    import threading

    from image_search.store import embedded

    monkeypatch.setattr(embedded, "_may_be_the_postmaster", lambda pid, data_directory: True)
    lock = tmp_path / "postmaster.pid"

    def postmaster_pid(status: str) -> None:  # as PostgreSQL writes it: never seen half written
        (tmp_path / "new").write_text(f"4242\n{tmp_path}\n1700000000\n5432\n{tmp_path}\n\n  1234  5678\n{status:<9}\n")
        (tmp_path / "new").replace(lock)

    assert not embedded.wait_while_starting(tmp_path)  # no server at all
    postmaster_pid("ready")
    assert not embedded.wait_while_starting(tmp_path)  # ready: nothing waited for
    postmaster_pid("starting")
    threading.Timer(1.0, postmaster_pid, ("ready",)).start()
    with capture_logs() as logs:
        assert embedded.wait_while_starting(tmp_path, limit_s=30)
    assert [e["event"] for e in logs] == ["embedded_postgres_recovering"]
    postmaster_pid("starting")
    assert not embedded.wait_while_starting(tmp_path, limit_s=0.6)  # not ready in time: the start says so
