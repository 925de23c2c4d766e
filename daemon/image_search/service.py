"""The service loop: wires the watcher, the folder sync, the query inbox and the indexer together.

Watchdog threads put ``Change`` records on a queue; each pass of the loop hands them to their folder
(``FolderSync`` for images/, ``QueryInbox`` for inbox/), answers the queries that are complete first
(a query dropped during a large ingest jumps the backlog), then moves the ingest on by one batch (two
are in flight: the next one read while the oldest is embedded) before looking again. No step holds the loop long: a duplicates report, which can take minutes, is
written on a thread of its own (``QueryInbox``), so the watchdog is pinged, queries answered and
pictures indexed meanwhile, and a stop ends it. Everything that decides something lives in those
units; this module only schedules them, keeps systemd informed and rides out database outages.
"""

from __future__ import annotations

import faulthandler
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import psycopg2
import structlog

from . import sheet
from .config import Config
from .errors import DatabaseFailure, ExitCode, OutputUnwritable, describe
from .inbox import QueryInbox, QueryPictures
from .output import remove_abandoned
from .indexer import Indexer, model_input_for
from .ingest import ImageIngest
from .notify import Notifier, watchdog_interval
from .runtime import RestartRequested, Runtime, ShutdownRequested, install_stop_handlers, open_runtime
from .readiness import ReadinessTracker, still_being_written
from .store import DatabaseUnavailable
from .sync import FolderSync
from .watch import (
    Change,
    ChangeKind,
    Folder,
    WatchdogWarnings,
    WatchedFolder,
    WatchError,
    folder_identity,
    observer_problem,
    start_observer, stop_observer,
)
from .wording import counted

if TYPE_CHECKING:  # torch is imported by the loading thread, not by whoever imports this module
    from .embed import Embedder

log = structlog.get_logger(__name__)

STATUS_EVERY_S = 2.0
# A truncated or empty file modified less than this long ago (at least; 10 settle periods if longer) is
# taken as still being written: it waits again instead of being skipped or failed.
INCOMPLETE_GRACE_S = 30.0
MAX_BACKOFF_S = 30.0
IDLE_WAIT_S = 0.5  # the longest the loop sleeps before looking at the clock again


class Work(Enum):
    """The two kinds of work a full disk can hold up: each waits for its own folder."""

    QUERIES = "queries"  # results into output/, failed queries into inbox/failed/
    INGEST = "ingest"  # processed copies into processed/


@dataclass(frozen=True)
class _Unwritable:
    """A folder that refused a write: why, when to try again, the next backoff, and the work's count then."""

    reason: str
    retry_at: float
    backoff: float
    progress: int


@dataclass
class StopFlag:
    """Set by the first SIGTERM/SIGINT/SIGHUP (a later one only says that the stop is under way). The loop
    finishes what it is doing and stops, unless ``interruptible`` says it only waits (for the model, for
    files being read, for a query's picture): then the signal unwinds at once (``ShutdownRequested``), so that a model that takes
    minutes to load, or a read that never returns, cannot hold the stop."""

    event: threading.Event = field(default_factory=threading.Event)
    signum: int = 0
    interruptible: Callable[[], bool] = lambda: False

    def set(self, signum: int = 0) -> None:
        self.signum = signum
        self.event.set()
        if signum and self.interruptible():
            raise ShutdownRequested(signum)

    def is_set(self) -> bool:
        return self.event.is_set()

    def checkpoint(self) -> None:
        """Where a start waits and may end instead: ``ShutdownRequested`` once a stop was asked for."""
        if self.is_set():
            raise ShutdownRequested(self.signum)


class Service:
    """One running service over an open runtime. ``run`` returns the exit code, or raises
    ``RestartRequested`` when only a restart can help. Tests drive ``start`` and ``step`` directly."""

    def __init__(self, rt: Runtime, *, changes: queue.SimpleQueue[Change], stop: StopFlag, notifier: Notifier,
                 clock: Callable[[], float] = time.monotonic,
                 watch_problem: Callable[[], str | None] = lambda: None) -> None:
        self.rt = rt
        self.cfg: Config = rt.cfg
        self.changes = changes
        self.stop = stop
        self.notifier = notifier
        self.clock = clock
        self.watch_problem = watch_problem
        grace = max(INCOMPLETE_GRACE_S, 10 * self.cfg.settle_seconds)
        self.images = ReadinessTracker(self.cfg.settle_seconds, clock=clock)
        # The walks of the folders (the rescans, the queries waiting at start) end at the next entry once a
        # stop is asked for: one of a large library on a slow share takes longer than systemd waits.
        self.sync = FolderSync(self.cfg, rt.store, self.images, stopping=stop.is_set,
                               finish_reading=lambda stats: self.ingest is not None and self.ingest.finish_reading(stats),
                               reading=lambda: self.ingest is not None and self.ingest.reading,
                               heartbeat=self._ping_watchdog)
        self.inbox = QueryInbox(rt, clock=clock, incomplete_grace=grace, stopping=stop.is_set,
                                not_yet_indexed=lambda: self._ingest.not_yet_indexed)
        self._still_arriving = lambda path, error: still_being_written(path, error, grace)
        self.ingest: ImageIngest | None = None  # built once the model is there
        # The database away: all work waits, and is tried again after a backoff.
        self._retry_at = 0.0
        self._backoff = 1.0
        self._retry_after_reconnect = False  # the retry at once after a reconnect is taken (``_database_down``)
        # The disk of output/ (queries) or processed/ (the ingest) full or refusing writes: that work waits,
        # tried again after a backoff of its own; the other goes on.
        self._unwritable: dict[Work, _Unwritable] = {}
        self._needs_rescan = False  # a change could not be applied during an outage, or events were lost
        self._next_rescan = 0.0
        self._waiting_for_model = False
        stop.interruptible = lambda: self._waiting_for_model or (
            self.ingest is not None and self.ingest.indexer.waiting_for_files) or (
            self.inbox.pictures is not None and self.inbox.pictures.waiting)
        self._ping_every = watchdog_interval()
        self._next_ping = 0.0

    # --- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile the folder with the table (while the model may still be loading), hold the queries
        already waiting, wait for the model, then tell systemd we are ready. A stop asked for meanwhile cuts
        the walks short (nothing half-applied) and ends the start at the wait for the model."""
        remove_abandoned(self.cfg.output_directory)
        backlog = self.sync.rescan()
        held = self.inbox.hold_waiting()
        embedder = self._wait_for_model()
        indexer = Indexer(self.cfg, embedder, self.rt.store, defer=self._still_arriving,
                          heartbeat=self._ping_watchdog, refusals=self.sync.refusals)
        try:
            self.ingest = ImageIngest(self.rt, indexer, self.images, self.sync, startup_backlog=backlog)
        except BaseException:  # e.g. the bulk load cannot begin (a lost database): no writer or workers left
            indexer.close()
            raise
        self.inbox.pictures = QueryPictures(self.cfg, model_input_for(embedder), heartbeat=self._ping_watchdog)
        sheet.warm_up()  # the contact sheet's fonts, so the first query does not pay for loading them
        if self.stop.is_set():  # asked for while the workers started: a service on its way out is never ready
            raise ShutdownRequested(self.stop.signum)
        if self.cfg.rescan_interval > 0:
            self._next_rescan = self.clock() + self.cfg.rescan_interval
        self.notifier.ready(self.status_text())
        log.info("service_ready", source=self.cfg.source_directory, inbox=self.cfg.inbox_directory,
                 pending_images=len(self.images), pending_queries=held)

    def _wait_for_model(self) -> Embedder:
        """The model, once loaded. A stop asked for before then ends the start at once (``ShutdownRequested``,
        from the signal handler while waiting): loading can take minutes (a download, a large model on a CPU),
        longer than systemd waits for a stop, and cannot be cut short inside its thread, so the process ends
        without it."""
        self._waiting_for_model = True
        try:
            if self.stop.is_set():
                raise ShutdownRequested(self.stop.signum)
            self.rt.wait_for_model()
        finally:
            self._waiting_for_model = False
        return self.rt.model()  # now at once: creates the table the model's dimension confirmed

    def run(self) -> ExitCode:
        try:
            self.start()
        except ShutdownRequested as stopped:
            self.close()
            stopped_during_startup(stopped.signum, self.notifier)
            return ExitCode.OK
        except BaseException:
            self.close()
            raise
        return self.serve()

    def serve(self) -> ExitCode:
        """After ``start``: the loop until a stop, then the stop (the batches read finished, the service
        closed)."""
        try:
            try:
                self._loop()
            except ShutdownRequested:
                pass  # a stop that cut a wait short: for files being read, for a query's picture
            # The batches whose files are read by now are finished, whichever wait the stop cut: a read that
            # does not return (the wait cut short for it) costs STOP_READ_WAIT_S, and the rescan finds it.
            self._ingest.finish_in_flight()
        finally:
            self.close()
        log.info("service_stopping", signal=signal.Signals(self.stop.signum).name if self.stop.signum else None)
        self.notifier.stopping()
        return ExitCode.OK

    def _loop(self) -> None:
        next_status = 0.0
        while not self.stop.is_set():
            now = self.clock()
            if now >= next_status or (self._ping_every and now >= self._next_ping):
                self._check_watch()
                self._check_database()
                self._ping_watchdog()
                if now >= next_status:
                    self.notifier.status(self.status_text())
                    next_status = now + STATUS_EVERY_S
            if not self.step():
                self._wait(min(self._idle_timeout(), self._ping_every or IDLE_WAIT_S))

    def _ping_watchdog(self) -> None:
        """WATCHDOG=1 when due: from the loop, and while a batch waits for its files."""
        now = self.clock()
        if self._ping_every and now >= self._next_ping:
            self.notifier.watchdog()
            self._next_ping = now + self._ping_every

    def step(self) -> bool:
        """One pass: apply what was noticed, rescan if due, answer ready queries or index one batch.
        True if it did some work (the loop then goes round again at once)."""
        now = self.clock()
        if self._next_rescan and now >= self._next_rescan:
            self._needs_rescan = True
            self._next_rescan = now + self.cfg.rescan_interval
        self._drain_changes()
        if self.rt.claims.someone_left():
            self.images.retry_now()
            self.inbox.pending.retry_now()
        if now < self._retry_at:
            return False
        try:
            if self._needs_rescan and self._unless_unwritable(Work.INGEST, self._rescan):
                if self.stop.is_set():
                    return True  # the rescan was cut short: the loop stops, the next start rescans
                self.inbox.queue_waiting()  # lost events may have hidden queries too
            # Held until the start-up backlog is in, so they can rank it; but not behind a disk that refuses
            # the ingest's copies, which may last hours: then answered now, saying what is not indexed yet.
            if self._ingest.startup_backlog <= 0 or Work.INGEST in self._unwritable:
                self.inbox.release_held()
            did_work = (self._unless_unwritable(Work.QUERIES, self.inbox.answer_ready)
                        or self._unless_unwritable(Work.INGEST, self._ingest.step))
        except DatabaseUnavailable as exc:
            self._needs_rescan = True  # catch up on whatever happened meanwhile
            self._database_down(exc)
            return True
        # A pass without an outage: the next one starts its backoff afresh (an idle service kept 30 s).
        self._backoff, self._retry_after_reconnect = 1.0, False
        return did_work

    def _rescan(self) -> bool:
        """The rescan compares the folder with every row: the batches being read are finished and their rows
        committed first, or a file deleted meanwhile (its event lost) would get its row after the comparison,
        and keep it (until the next rescan). Not the slow files set aside: waited for, they held the loop up
        to the per-file limit at every rescan. A full processed/ raises out of that before anything is
        compared: tried again later."""
        self._ingest.settle_all_but_slow()
        self._needs_rescan = False
        self.sync.rescan()
        return True

    def _unless_unwritable(self, work: Work, do: Callable[[], bool]) -> bool:
        """``do()``, the work of one kind, unless its folder refused a write and its retry is not due. An
        ``OutputUnwritable`` is not a file's fault nor a query's: the query or the batch is pending again
        (nothing lost), and a restart would only load the model again to meet the same full disk."""
        outage = self._unwritable.get(work)
        if outage is not None and self.clock() < outage.retry_at:
            return False
        try:
            did = do()
        except OutputUnwritable as exc:
            self._output_unwritable(work, exc, outage)
            return False  # no progress: the other work still gets its turn, the database's backoff stays
        # A batch is counted once its rows are in, perhaps in an idle pass: progress, not ``did``, tells.
        if outage is not None and self._progress(work) != outage.progress:
            del self._unwritable[work]
            log.info("output_writable_again", work=work.value, pending_images=len(self.images),
                     pending_queries=len(self.inbox.pending))
        return did

    def _progress(self, work: Work) -> int:
        """What a write that went through counts: a query answered or failed into inbox/failed/ with its
        reason (a full disk refuses either), a picture indexed."""
        if work is Work.QUERIES:
            return self.inbox.answered + self.inbox.failures_recorded
        return self.indexed

    @property
    def _ingest(self) -> ImageIngest:
        assert self.ingest is not None, "start() builds the ingest"
        return self.ingest

    @property
    def indexed(self) -> int:
        return self.ingest.indexed if self.ingest is not None else 0

    @property
    def skipped(self) -> int:
        return self.ingest.skipped if self.ingest is not None else 0

    def close(self) -> None:
        self.sync.say_what_changed()  # changes applied while the loop waited, just before the stop
        try:
            self.inbox.close()  # a duplicates report being written ends, its document left for the next start
        except OutputUnwritable as exc:  # its query failing on a full disk: left in the inbox for the next start
            log.warning("output_unwritable", reason=str(exc), detail="stopping: the query waits for the next start")
        finally:
            if self.ingest is not None:
                self.ingest.close()

    def _check_watch(self) -> None:
        problem = self.watch_problem()
        if problem is not None:
            log.error("watch_lost", reason=problem, action="exiting so systemd restarts the service; "
                      "the restart rescans the folders")
            raise RestartRequested(problem, WatchError)

    def _check_database(self) -> None:
        """The fleet's heartbeat failed on the embedded server: the loop looks whether the server is gone
        now, rather than at its next statement. An idle service met a crashed one only at its look at the
        index a minute later, telling systemd it was fine meanwhile (41-51 s to exit 4). An external
        server's outage is left to the loop's own statements, as before: it comes back by itself."""
        failure = self.rt.fleet.heartbeat_failure if self.rt.fleet is not None else None
        if failure is None or not self.cfg.embedded_database or self.clock() < self._retry_at:
            return
        try:
            self.rt.store.index_valid()  # one catalog read: is the server there?
        except DatabaseUnavailable as exc:
            self._database_down(exc)
        except psycopg2.Error as exc:  # a server that died mid-session breaks the statement unwrapped
            self._database_down(DatabaseUnavailable(f"the embedded PostgreSQL does not answer ({describe(exc)})"))

    def _idle_timeout(self) -> float:
        now = self.clock()
        if now < self._retry_at:
            return min(self._retry_at - now, IDLE_WAIT_S)
        due = []
        for work, waiting in ((Work.QUERIES, self.inbox.pending), (Work.INGEST, self.images)):
            if (next_due := waiting.next_due()) is not None:
                # Work held up by a full disk is not due before its retry: no polling all the outage long.
                outage = self._unwritable.get(work)
                due.append(next_due if outage is None else max(next_due, outage.retry_at))
        return min([IDLE_WAIT_S, *(max(0.0, d - now) for d in due)])

    def _wait(self, timeout: float) -> None:
        """Sleep until a change arrives, the timeout passes, or a stop is requested."""
        try:
            change = self.changes.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return
        self._apply(change)

    def _database_down(self, exc: DatabaseUnavailable) -> None:
        log.warning("database_unavailable", reason=str(exc), retry_in_s=self._backoff,
                    pending_images=len(self.images), pending_queries=len(self.inbox.pending))
        self._retry_at = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        try:
            self.rt.store.reconnect()
            log.info("database_reconnected")
            # Back: the work goes on now, not a backoff of up to 30 s later; once, until a pass goes through (a
            # server that takes connections and fails every statement is waited for as before, not spun on).
            if not self._retry_after_reconnect:
                self._retry_at, self._retry_after_reconnect = self.clock(), True
        except DatabaseUnavailable:
            if self.cfg.embedded_database:
                # Our own server died: only a restart brings it back (systemd does that, we reconcile).
                log.error("service_failed", reason="the embedded PostgreSQL is gone",
                          action="exiting so systemd restarts the service")
                raise RestartRequested("the embedded PostgreSQL is gone", DatabaseUnavailable) from None

    def _output_unwritable(self, work: Work, exc: OutputUnwritable, outage: _Unwritable | None) -> None:
        reason = str(exc)
        backoff = outage.backoff if outage is not None else 1.0
        # Once per outage (and each time its reason changes): a disk full all night is one line, not 1,000.
        (log.debug if outage is not None and reason == outage.reason else log.warning)(
            "output_unwritable", reason=reason, work=work.value, retry_in_s=backoff,
            pending_images=len(self.images), pending_queries=len(self.inbox.pending),
            action=f"waiting, and trying again every {MAX_BACKOFF_S:g} s at most; nothing is lost")
        self._unwritable[work] = _Unwritable(reason, retry_at=self.clock() + backoff,
                                             backoff=min(backoff * 2, MAX_BACKOFF_S), progress=self._progress(work))

    def status_text(self) -> str:
        fleet = f", {self.rt.fleet.status_text()}" if self.rt.fleet is not None else ""
        queued = self.ingest.not_yet_indexed if self.ingest is not None else len(self.images)
        return (f"{self.indexed} indexed, {queued} queued, {self.sync.removed} removed, "
                f"{counted(self.inbox.answered, 'search', 'searches')} answered, "
                f"{counted(self.inbox.failed, 'failed query', 'failed queries')}, "
                f"{counted(self.skipped, 'skipped file')}{fleet}"
                f"{', writing a duplicates report' if self.inbox.report is not None else ''}"
                f"{''.join(f', {work.value} waiting: {outage.reason}' for work, outage in self._unwritable.items())}")

    # --- noticing ------------------------------------------------------------------------------

    def _drain_changes(self) -> None:
        try:
            while True:
                try:
                    change = self.changes.get_nowait()
                except queue.Empty:
                    return
                self._apply(change)
        finally:
            self.sync.say_what_changed()  # a folder's files removed one event each: one line

    def _apply(self, change: Change) -> None:
        try:
            if change.folder is Folder.WATCHING:
                log.warning("watch_events_lost", reason=change.detail, action="rescanning the folders")
                self._needs_rescan = True
            elif change.folder is Folder.INBOX:
                self.inbox.apply(change)
            else:
                if change.kind in (ChangeKind.DELETED, ChangeKind.MOVED) and self.ingest is not None:
                    # A row still being read or written lands before its file goes, or another takes its name.
                    self.ingest.settle(*(p for p in (change.path, change.dest) if p is not None))
                self.sync.apply(change)
        except DatabaseUnavailable as exc:
            # The change is not lost: the next rescan (or restart) reconciles it. Say so.
            log.warning("change_deferred", path=change.path, reason=str(exc))
            self._needs_rescan = True
        except OutputUnwritable as exc:
            # The batches being read, finished before the path leaves, met processed/ refusing their copies
            # (a full disk): they are pending again, the ingest waits as for any batch of its own, and the
            # rescan that follows the outage applies the change.
            self._output_unwritable(Work.INGEST, exc, self._unwritable.get(Work.INGEST))
            self._needs_rescan = True


def stopped_during_startup(signum: int, notifier: Notifier) -> None:
    """A stop asked for before the service was ready: it never was (no READY=1, no ``service_ready``)."""
    log.info("service_stopped_during_startup", signal=signal.Signals(signum).name if signum else None)
    notifier.stopping()


def watched_folders(cfg: Config) -> dict[Folder, WatchedFolder]:
    # Each folder's identity is kept: a disk that mounts there later (at boot, after an outage), or a
    # folder moved away and made again, is another folder, which only a restart watches (and rescans).
    return {Folder.IMAGES: WatchedFolder(cfg.source_directory, recursive=True,
                                         identity=folder_identity(cfg.source_directory)),
            Folder.INBOX: WatchedFolder(cfg.inbox_directory, recursive=False,
                                        identity=folder_identity(cfg.inbox_directory))}


def _watch_and_run(rt: Runtime, *, poll: bool, stop: StopFlag, notifier: Notifier) -> ExitCode:
    folders = watched_folders(rt.cfg)
    changes: queue.SimpleQueue[Change] = queue.SimpleQueue()
    try:
        # Watching starts before the reconciliation scan, so nothing that lands meanwhile is missed.
        observer = start_observer(folders, changes, poll=poll)
    except WatchError as exc:
        log.error("watch_failed", reason=str(exc))
        raise RestartRequested(str(exc), WatchError) from None
    lost_events = WatchdogWarnings(changes)
    logging.getLogger("watchdog").addHandler(lost_events)
    try:
        return Service(rt, changes=changes, stop=stop, notifier=notifier,
                       watch_problem=lambda: observer_problem(observer, folders)).run()
    finally:
        logging.getLogger("watchdog").removeHandler(lost_events)
        stop_observer(observer)


def serve(cfg: Config, *, cleanup: bool, poll: bool) -> int:
    """``image-search serve``: run until SIGTERM/SIGINT. Returns the exit code."""
    faulthandler.enable()  # a watchdog SIGABRT dumps every thread's stack into the journal
    stop = StopFlag()
    install_stop_handlers(stop.set)
    notifier = Notifier()
    notifier.status("loading the model and opening the store")
    started = False
    try:
        with open_runtime(cfg, cleanup=cleanup, with_inbox=True, checkpoint=stop.checkpoint) as rt:
            started = True
            if stop.is_set():  # asked for while the database started
                stopped_during_startup(stop.signum, notifier)
                code = ExitCode.OK
            else:
                code = _watch_and_run(rt, poll=poll, stop=stop, notifier=notifier)
    except ShutdownRequested:
        if started:
            raise
        stopped_during_startup(stop.signum, notifier)  # while a schema step waited for a table
        code = ExitCode.OK
    except RestartRequested as exc:
        code = exc.kind.exit_code  # non-zero: systemd's Restart=on-failure starts us again, and we reconcile
    except DatabaseFailure:
        if not stop.is_set():
            raise
        # A terminal's Ctrl-C reaches the whole process group: the initdb of a first start dies of it before
        # this process's handler has run, and its failure is the stop's, not the database's (the next start
        # makes the half-made pgdata again).
        stopped_during_startup(stop.signum, notifier)
        code = ExitCode.OK
    log.info("service_stopped", exit_code=int(code))
    return int(code)
