"""Runtime: the model, the open store and the exit-time cleanup, shared by every command.

The model loads in a background thread (importing torch and transformers takes seconds) while the
folder is compared with the table; whoever first needs the model waits for it.
``open_runtime`` alone decides whether the table is emptied at exit.
"""

from __future__ import annotations

import atexit
import gc
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from .config import Config, ensure_directories
from .errors import ImageSearchError, SourceFolderMissing
from .fleet import FleetMember, WorkClaims
from .logs import log_from_signal_handler
from .output import prepare_output_folder
from .store import Database, EmbeddingStore
from .sync import check_processed_folder, claim_processed_folder, ensure_source_folder

if TYPE_CHECKING:  # torch is imported by the loading thread, not by whoever imports this module
    from .embed import Embedder

log = structlog.get_logger(__name__)


class ShutdownRequested(BaseException):
    """Raised by the signal handler of the one-shot commands, and by the service's when it only waits (for
    the model, for files being read): unwinds to the cleanup. ``signum`` 0: a stop asked for without a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name if signum else "stop")
        self.signum = signum


class RestartRequested(ImageSearchError):
    """Only a restart can help (the watch was lost, the embedded database died): the process exits
    non-zero, with the exit code of ``kind`` (the kind of failure behind it), and the table is kept,
    so the restarted service finds the index and reconciles."""

    def __init__(self, reason: str, kind: type[ImageSearchError] = ImageSearchError) -> None:
        super().__init__(reason)
        self.kind = kind


# SIGHUP: the terminal of a foreground run was closed (or someone sent it); it stops as SIGTERM does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def install_stop_handlers(on_first: Callable[[int], None]) -> None:
    """SIGTERM, SIGINT and SIGHUP call ``on_first(signum)`` (set a flag, or raise to unwind). A later one
    only says that the stop is under way: exiting there would leave the embedded PostgreSQL running,
    orphaned, and skip the cleanup. A stop that hangs is ended by systemd's SIGKILL after TimeoutStopSec,
    which KillMode=mixed sends to PostgreSQL too."""
    stopping = False

    def handler(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            log_from_signal_handler("stop_already_under_way", signal=signal.Signals(signum).name,
                                    detail="finishing the work in hand and stopping the database first")
            return
        stopping = True
        on_first(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


class ModelLoading:
    """``Embedder.load`` in a daemon thread; ``result`` waits for it and re-raises its error."""

    def __init__(self, cfg: Config) -> None:
        self._embedder: Embedder | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, args=(cfg,), name="model-load", daemon=True)
        self._thread.start()

    def _load(self, cfg: Config) -> None:
        try:
            from .embed import Embedder

            self._embedder = Embedder.load(cfg.model_name, device=cfg.device, dimension=cfg.dimension,
                                            compile_model=cfg.compile_model)
        except BaseException as exc:  # handed to the thread that waits for the model
            self._error = exc
            return
        # torch's, transformers' and the model's objects are most of the heap (440,000 with the tiny test
        # model) and live as long as the process. Frozen, the cyclic garbage collector no longer walks
        # them at each full collection: measured on a 2-core host, `index` of 3,000 small pictures ran
        # one full collection after the load, a 0.74 s pause of every thread (a query dropped then waits
        # it out), and none frozen. Objects the start-up frees later are still freed (by their reference
        # counts); only a cycle among them would stay, so the load's own garbage is collected first (66-81
        # objects with the test models, none a tensor; a real checkpoint's loader may leave a host copy of its
        # weights in one). Unfrozen at exit, for the interpreter's last collection: left frozen, triton's
        # bindings (torch imports them) report their objects leaked on stderr.
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    def result(self) -> Embedder:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._embedder is not None
        return self._embedder


class Runtime:
    """The configuration, the open store and the model (loading in the background) of one run."""

    def __init__(self, cfg: Config, store: EmbeddingStore, load_model: Callable[[], Embedder], *,
                 fleet: FleetMember | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self._load_model = load_model
        self.fleet = fleet  # None: not registered (a Runtime built by hand); every claim is granted
        self.claims = WorkClaims(store, fleet)

    def wait_for_model(self) -> Embedder:
        """The loaded model: waits for it the first time (raising its load error)."""
        return self._load_model()

    def model(self) -> Embedder:
        """The loaded model, waited for as ``wait_for_model`` does. The model has then confirmed
        'dimension', so the table can be created."""
        embedder = self.wait_for_model()
        if not self.store.has_table:
            self.store.create_table()
        return embedder


def prepare_folders(cfg: Config, *, with_inbox: bool = False) -> None:
    """The folders a run writes to, made where missing and checked, before the database starts (a config
    error costs nothing to find); none made on the disk under a processed or output folder whose own disk is
    away (``check_processed_folder`` first, before any folder is made; ``prepare_output_folder``)."""
    check_processed_folder(cfg)
    ensure_directories(cfg, with_inbox=with_inbox)
    prepare_output_folder(cfg)


@contextmanager
def open_runtime(cfg: Config, *, cleanup: bool, with_inbox: bool = False,
                 checkpoint: Callable[[], None] = lambda: None) -> Iterator[Runtime]:
    """Start or reach the database, open the store, start loading the model. At exit, close the store
    and stop an embedded server, and empty the table if ``cleanup`` (the original tool's behaviour),
    but only after a run that had its model (a start-up error never costs the index) and ended or was
    stopped (a signal): never when the block raised anything else (a crash, the machine's failure, a
    restart asked of systemd, a source folder gone), and never while another service
    sharing the database is still live (the last member to leave empties it). ``source-directory`` is
    created here on a fresh install only (``ensure_source_folder``), and ``processed-directory`` serves
    one source folder only, and is refused when it has lost the copies the index holds (an unmounted disk:
    ``claim_processed_folder``). ``checkpoint`` is called while a schema step
    waits for a table another session holds: what it raises (a stop) ends the start."""
    prepare_folders(cfg, with_inbox=with_inbox)
    started = time.monotonic()
    database = Database(cfg)
    try:
        # Joining first: a service whose model differs from the running members' is told so before
        # anything else about the table is checked. Model name and dimension come from the config.
        member = FleetMember.join(cfg, database)
        loading: ModelLoading | None = None
        keep = False  # the run ended as one that keeps the index whatever cleanup says
        try:
            # The table is created once the model has confirmed the dimension; until then it is only read.
            store = database.open_store(dimension=cfg.dimension, create_table=False, checkpoint=checkpoint)
            try:
                ensure_source_folder(cfg, store)  # before the model loads: a retry while a disk is not mounted is cheap
                claim_processed_folder(cfg, store.sources)
            except BaseException:
                store.close()
                raise
            # The model starts loading once the database is up, not before: importing torch holds the
            # GIL for long stretches, and starting it first slowed the database start and the rescan
            # (2.0-2.5 s from process start to a done rescan of 2,000 unchanged files, against 1.6-1.9 s)
            # for no earlier READY (about 12 s either way, measured here on 2 cores).
            loading = ModelLoading(cfg)
            log.info("store_ready", rows=store.count(), embedded_database=cfg.embedded_database,
                     members=member.live_members, duration_ms=round((time.monotonic() - started) * 1000))
            try:
                yield Runtime(cfg, store, loading.result, fleet=member)
            except (RestartRequested, SourceFolderMissing):  # the folder's disk may come back: keep its index
                keep = True
                raise
            except (ShutdownRequested, KeyboardInterrupt):  # a stop: the cleanup, as at any exit
                raise
            except BaseException:
                # A crash (a bug, a failure nobody foresaw) or the machine's failure mid-run: the index is kept
                # for the run after, as after a kill -9 (it was emptied: a full re-embedding for a bug).
                keep = True
                raise
            finally:
                store.close()
        finally:
            # A start-up that failed (no store, no model) leaves and keeps the table.
            member.leave(empty_table=cleanup and loading is not None and loading.loaded and not keep)
    finally:
        database.close()
