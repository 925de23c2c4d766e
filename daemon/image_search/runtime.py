"""Runtime: the loaded model, the open store and the exit-time cleanup, shared by every command."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import structlog

from .config import Config, ensure_directories
from .embed import Embedder
from .store import Database, EmbeddingStore

log = structlog.get_logger(__name__)


class ShutdownRequested(BaseException):
    """Raised by the signal handler of the one-shot commands: unwinds to the cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Runtime:
    cfg: Config
    embedder: Embedder
    database: Database
    store: EmbeddingStore
    cleanup: bool  # empty the table at exit; a service exiting for a restart turns it off

    def reconnect(self) -> None:
        """Replace a broken connection; raises DatabaseUnavailable while the database is still away."""
        try:
            self.store.close()
        except Exception:  # already broken: that is why we are here
            pass
        self.store = self.database.open_store(dimension=self.embedder.dimension, model_name=self.cfg.model_name)


@contextmanager
def open_runtime(cfg: Config, *, cleanup: bool, with_inbox: bool = False) -> Iterator[Runtime]:
    """Load the model, start or reach the database, open the store; on exit empty the table if
    ``cleanup`` (the original tool's behaviour), close the store and stop an embedded server."""
    ensure_directories(cfg, with_inbox=with_inbox)
    started = time.monotonic()
    embedder = Embedder.load(cfg.model_name, device=cfg.device, dimension=cfg.dimension)
    database = Database(cfg)
    try:
        store = database.open_store(dimension=embedder.dimension, model_name=cfg.model_name)
        log.info("store_ready", rows=store.count(), embedded_database=cfg.embedded_database,
                 duration_ms=round((time.monotonic() - started) * 1000))
        rt = Runtime(cfg, embedder, database, store, cleanup)
        try:
            yield rt
        finally:
            store = rt.store
            if rt.cleanup:
                try:
                    store.clear()
                    log.info("table_emptied", reason="cleanup-on-exit (keep the index with --no-cleanup "
                                                     "or \"cleanup-on-exit\": false)")
                except Exception as exc:  # a dead database must not hide the original error
                    log.error("cleanup_failed", reason=str(exc))
            store.close()
    finally:
        database.close()


def raise_on_signals() -> None:
    """One-shot commands: SIGTERM and SIGINT unwind through the cleanup; a second one exits at once."""
    def handler(signum: int, _: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signum))
        signal.signal(signal.SIGINT, lambda *_: os._exit(128 + signum))
        raise ShutdownRequested(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
