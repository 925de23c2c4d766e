"""The service: keep the model loaded, watch ``images/`` and ``inbox/``, answer queries, index changes.

The loop only wires the stages together. Watchdog threads enqueue ``Change`` records; this loop
decides readiness (``ReadinessTracker``), answers waiting queries first (a query dropped during a
large ingest jumps the backlog), then indexes at most one batch of images before looking again.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import structlog

from .config import Config
from .discover import IMAGE_EXTENSIONS, discover_images, is_ignored_name, is_ignored_path
from .indexer import Indexer
from .notify import Notifier, watchdog_interval
from .preprocess import PreprocessError, processed_path_for, write_atomically
from .runtime import Runtime, open_runtime
from .search import search_image
from .store import DatabaseUnavailable
from .watch import Change, ReadinessTracker, WatchdogWarnings, WatchError, observer_problem, start_observer

log = structlog.get_logger(__name__)

FAILED_FOLDER = "failed"
EXIT_OK = 0
EXIT_RESTART = 1  # non-zero: systemd's Restart=on-failure starts us again and we reconcile
STATUS_EVERY_S = 2.0
# A truncated or empty file modified less than this long ago (at least; 10 settle periods if longer) is
# taken as still being written: it waits again instead of being skipped or failed. Stability alone is
# not proof of completeness: a slow writer can pause longer than settle-seconds between chunks, and a
# writer that reopens the file for each chunk sends a close event after every one.
INCOMPLETE_GRACE_S = 30.0
_INCOMPLETE_REASONS = ("truncated or incomplete image", "empty file")
MAX_BACKOFF_S = 30.0


@dataclass
class Counters:
    indexed: int = 0
    removed: int = 0
    searches: int = 0
    failed_queries: int = 0
    skipped: int = 0


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT; a second signal exits at once."""

    event: threading.Event = field(default_factory=threading.Event)
    signum: int = 0

    def install(self) -> None:
        def handler(signum: int, _: FrameType | None) -> None:
            if self.event.is_set():
                os._exit(128 + signum)
            self.signum = signum
            self.event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def is_set(self) -> bool:
        return self.event.is_set()


class Service:
    """One running service over an open runtime. ``run`` returns the process exit code."""

    def __init__(self, rt: Runtime, *, poll: bool, stop: StopFlag, notifier: Notifier,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rt = rt
        self.cfg: Config = rt.cfg
        self.poll = poll
        self.stop = stop
        self.notifier = notifier
        self.clock = clock
        self.changes: queue.SimpleQueue[Change] = queue.SimpleQueue()
        self.images = ReadinessTracker(self.cfg.settle_seconds, clock=clock)
        self.queries = ReadinessTracker(self.cfg.settle_seconds, clock=clock)
        self.indexer = Indexer(self.cfg, rt.embedder, rt.store, defer=self._still_arriving)
        self.incomplete_grace = max(INCOMPLETE_GRACE_S, 10 * self.cfg.settle_seconds)
        self.counters = Counters()
        self.folders = {
            "images": (self.cfg.source_directory, True),
            "inbox": (self.cfg.inbox_directory, False),
        }
        self._db_retry_at = 0.0
        self._db_backoff = 1.0
        self._needs_rescan = False  # a change could not be applied during an outage
        self._fatal: str | None = None  # set when only a restart can help
        self._startup_backlog = 0  # files queued by the startup reconciliation not yet indexed
        self._held_queries: list[Path] = []  # queries found at startup, answered after that backlog

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            observer = start_observer(self.folders, self.changes, poll=self.poll)
        except WatchError as exc:
            log.error("watch_failed", reason=str(exc))
            return EXIT_RESTART
        watchdog_warnings = WatchdogWarnings(self.changes)
        logging.getLogger("watchdog").addHandler(watchdog_warnings)
        try:
            # Watching starts before the reconciliation scan, so nothing that lands meanwhile is missed.
            self.reconcile()
            self.notifier.ready(self.status_text())
            log.info("service_ready", source=str(self.cfg.source_directory), inbox=str(self.cfg.inbox_directory),
                     pending_images=len(self.images), pending_queries=len(self._held_queries))
            return self._loop(observer)
        finally:
            logging.getLogger("watchdog").removeHandler(watchdog_warnings)
            observer.stop()
            observer.join(timeout=5)
            self.indexer.close()

    def _loop(self, observer: object) -> int:
        ping_every = watchdog_interval()
        next_ping = next_status = next_rescan = 0.0
        if self.cfg.rescan_interval > 0:
            next_rescan = self.clock() + self.cfg.rescan_interval
        while not self.stop.is_set():
            if self._fatal is not None:
                log.error("service_failed", reason=self._fatal, action="exiting so systemd restarts the service")
                self.rt.cleanup = False
                return EXIT_RESTART
            now = self.clock()
            if now >= next_status or (ping_every and now >= next_ping):
                problem = observer_problem(observer, self.folders)  # type: ignore[arg-type]
                if problem is not None:
                    log.error("watch_lost", reason=problem, action="exiting so systemd restarts the service; "
                              "the restart rescans the folders")
                    self.rt.cleanup = False  # a restart must find the index, not an empty table
                    return EXIT_RESTART
                if ping_every and now >= next_ping:
                    self.notifier.watchdog()
                    next_ping = now + ping_every
                if now >= next_status:
                    self.notifier.status(self.status_text())
                    next_status = now + STATUS_EVERY_S
            if next_rescan and now >= next_rescan:
                self._needs_rescan = True
                next_rescan = now + self.cfg.rescan_interval
            self._drain_changes()
            if now < self._db_retry_at:
                self._wait(min(self._db_retry_at - now, 0.5))
                continue
            try:
                if self._needs_rescan:
                    self._needs_rescan = False
                    self.rescan()
                    for path in self._waiting_queries():  # lost events may have hidden queries too
                        self.queries.note(path)
                self._release_held_queries()
                if self._answer_queries() or self._index_one_batch():
                    self._db_backoff = 1.0
                    continue
            except DatabaseUnavailable as exc:
                self._needs_rescan = True  # catch up on whatever happened meanwhile
                self._database_down(exc)
                continue
            self._wait(self._idle_timeout(ping_every))
        log.info("service_stopping", signal=signal.Signals(self.stop.signum).name if self.stop.signum else None)
        self.notifier.stopping()
        return EXIT_OK

    def _idle_timeout(self, ping_every: float | None) -> float:
        due = [d for d in (self.images.next_due(), self.queries.next_due()) if d is not None]
        timeout = min([0.5, *(max(0.0, d - self.clock()) for d in due)])
        return min(timeout, ping_every or timeout)

    def _wait(self, timeout: float) -> None:
        """Sleep until a change arrives, the timeout passes, or a stop is requested."""
        try:
            change = self.changes.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return
        self._apply(change)

    def _database_down(self, exc: DatabaseUnavailable) -> None:
        log.warning("database_unavailable", reason=str(exc), retry_in_s=self._db_backoff,
                    pending_images=len(self.images), pending_queries=len(self.queries))
        self._db_retry_at = self.clock() + self._db_backoff
        self._db_backoff = min(self._db_backoff * 2, MAX_BACKOFF_S)
        try:
            self.rt.reconnect()
            self.indexer.store = self.rt.store
            log.info("database_reconnected")
        except DatabaseUnavailable:
            if self.cfg.embedded_database:
                # Our own server died: only a restart brings it back (systemd does that, we reconcile).
                self._fatal = "the embedded PostgreSQL is gone"

    def status_text(self) -> str:
        c = self.counters
        return (f"{c.indexed} indexed, {len(self.images)} queued, {c.searches} searches answered, "
                f"{c.failed_queries} failed queries, {c.skipped} skipped files")

    # --- noticing ------------------------------------------------------------------------------

    def _drain_changes(self) -> None:
        while True:
            try:
                change = self.changes.get_nowait()
            except queue.Empty:
                return
            self._apply(change)

    def _apply(self, change: Change) -> None:
        try:
            if change.folder == "watch":
                log.warning("watch_events_lost", reason=change.detail, action="rescanning the folders")
                self._needs_rescan = True
            elif change.folder == "inbox":
                self._apply_inbox(change)
            else:
                self._apply_images(change)
        except DatabaseUnavailable as exc:
            # The change is not lost: the next rescan (or restart) reconciles it. Say so.
            log.warning("change_deferred", path=str(change.path), reason=str(exc))
            self._needs_rescan = True

    def _is_query_candidate(self, path: Path) -> bool:
        return path.parent == self.cfg.inbox_directory and not is_ignored_name(path.name)

    def _apply_inbox(self, change: Change) -> None:
        if change.kind == "deleted":
            self.queries.forget(change.path)
            return
        path = change.dest if change.kind == "moved" and change.dest is not None else change.path
        if change.kind == "moved":
            self.queries.forget(change.path)
        if not change.is_directory and self._is_query_candidate(path):
            # A rename into place is how careful writers finish a file: as good as a close.
            self.queries.note(path, closed=change.kind in ("closed", "moved"))

    def _is_image(self, path: Path) -> bool:
        root = self.cfg.source_directory
        return path.suffix.lower() in IMAGE_EXTENSIONS and not is_ignored_path(path, root)

    def _apply_images(self, change: Change) -> None:
        root = self.cfg.source_directory
        if change.kind == "deleted":
            self._source_gone(change.path, change.is_directory)
        elif change.kind == "moved" and change.dest is not None:
            dest_inside = change.dest.is_relative_to(root)
            if change.is_directory:
                self._folder_moved(change.path, change.dest if dest_inside else None)
            elif dest_inside and self._is_image(change.dest):
                self._file_moved(change.path, change.dest)
            else:
                self._source_gone(change.path, False)
        elif change.is_directory:
            if change.kind == "touched" and change.path.is_dir() and change.path != root:
                # A folder moved or copied in: its files may have produced no events of their own.
                for path in discover_images(change.path):
                    self.images.note(path)
        elif self._is_image(change.path):
            self.images.note(change.path, closed=change.kind == "closed")

    def _source_gone(self, path: Path, is_directory: bool) -> None:
        if is_directory:
            self.images.forget_under(path)
            removed = self.rt.store.delete_under(str(path))
        else:
            self.images.forget(path)
            removed = [str(path)] if self.rt.store.delete_paths([str(path)]) else []
        for source in removed:
            self.indexer.remove_processed(Path(source))
        if removed:
            self.counters.removed += len(removed)
            log.info("rows_removed", path=str(path), count=len(removed), reason="source deleted or moved out")

    def _file_moved(self, src: Path, dest: Path) -> None:
        """A rename inside the folder: the embedding follows the file, no model work."""
        self.images.forget(src)
        if dest in self.images:
            return  # still settling; it will be indexed (or relinked by hash) when ready
        file_hash = self.rt.store.hash_for_path(str(src))
        if file_hash is None:
            self.images.note(dest, closed=True)  # not indexed yet (a temp name renamed into place)
            return
        self._relink(src, dest, file_hash)

    def _relink(self, src: Path, dest: Path, file_hash: str) -> None:
        root, processed_root = self.cfg.source_directory, self.cfg.processed_directory
        old_processed = processed_path_for(src, root, processed_root)
        new_processed = processed_path_for(dest, root, processed_root)
        try:
            st = dest.stat()
            new_processed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old_processed, new_processed)
        except FileNotFoundError:
            self.images.note(dest)  # the processed copy is missing: index it properly
            return
        self.rt.store.update_source(file_hash, file_path=str(dest), file_name=dest.name,
                                    processed_path=str(new_processed), source_size=st.st_size,
                                    source_mtime_ns=st.st_mtime_ns)
        log.info("image_renamed", path=str(dest), previous=str(src), file_hash=file_hash)

    def _folder_moved(self, src: Path, dest: Path | None) -> None:
        if dest is None:
            self._source_gone(src, True)
            return
        self.images.forget_under(src)
        moved = {p: r for p, r in self.rt.store.sources().items() if Path(p).is_relative_to(src)}
        for old, record in moved.items():
            new = dest / Path(old).relative_to(src)
            if new.is_file():
                self._relink(Path(old), new, record.file_hash)
        for path in discover_images(dest):
            if str(src / path.relative_to(dest)) not in moved:
                self.images.note(path)

    # --- doing ---------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Startup: drop rows whose source is gone, queue what the table lacks; queries already waiting
        are held until that backlog is indexed, so their answers see the whole folder (queries dropped
        later still jump the queue)."""
        self._startup_backlog = self.rescan()
        self._held_queries = self._waiting_queries()

    def _waiting_queries(self) -> list[Path]:
        return [p for p in sorted(self.cfg.inbox_directory.iterdir())
                if p.is_file() and self._is_query_candidate(p) and p not in self.queries]

    def _release_held_queries(self) -> None:
        if self._held_queries and self._startup_backlog <= 0:
            for path in self._held_queries:
                self.queries.note(path)
            self._held_queries = []

    def rescan(self) -> int:
        """Compare the folder with the table by size and mtime alone; queue differences, drop the gone.
        Returns how many files were queued."""
        started = self.clock()
        state = self.indexer.compare_folder()
        self.counters.removed += len(state.removed)
        queued = 0
        for path in state.changed:
            if path not in self.images:
                self.images.note(path)
                queued += 1
        log.info("rescan_complete", files=state.files, queued=queued, removed=len(state.removed),
                 duration_ms=round((self.clock() - started) * 1000))
        return queued

    def _answer_queries(self) -> bool:
        ready = self.queries.pop_ready(limit=4)
        for path in ready:
            self.answer_query(path)
        return bool(ready)

    def answer_query(self, path: Path) -> None:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            self._fail_query(path, f"not a supported query type '{path.suffix or path.name}': drop a JPEG, PNG, "
                                   "WebP, GIF, BMP or TIFF image")
            return
        try:
            search_image(path, cfg=self.cfg, embedder=self.rt.embedder, store=self.rt.store, move_query=True)
        except PreprocessError as exc:
            if self._still_arriving(path, exc):
                self.queries.note(path)
                return
            self._fail_query(path, exc.reason)
            return
        except DatabaseUnavailable:
            self.queries.note(path)  # answered once the database is back
            raise
        except Exception as exc:  # one odd query must not stop the service
            log.error("query_crashed", path=str(path), error=f"{type(exc).__name__}: {exc}")
            self._fail_query(path, f"unexpected error: {type(exc).__name__}: {exc}")
            return
        self.counters.searches += 1

    def _still_arriving(self, path: Path, exc: PreprocessError) -> bool:
        """A truncated or empty file that was written to recently: a slow writer is not done yet."""
        if not exc.reason.startswith(_INCOMPLETE_REASONS):
            return False
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        if age >= self.incomplete_grace:
            return False
        log.debug("file_incomplete", path=str(path), reason=exc.reason, modified_s_ago=round(age, 3))
        return True

    def _fail_query(self, path: Path, reason: str) -> None:
        """Move a query that cannot be answered to inbox/failed/ with a <name>.error.txt saying why."""
        self.counters.failed_queries += 1
        failed = self.cfg.inbox_directory / FAILED_FOLDER
        failed.mkdir(exist_ok=True)
        target = failed / path.name
        n = 2
        while target.exists() or target.with_name(target.name + ".error.txt").exists():
            target = failed / f"{path.stem}-{n}{path.suffix}"
            n += 1
        try:
            shutil.move(path, target)
        except FileNotFoundError:
            log.warning("query_vanished", path=str(path))
            return
        write_atomically(target.with_name(target.name + ".error.txt"), f"{path.name}: {reason}\n".encode())
        log.warning("query_failed", path=str(path), moved_to=str(target), reason=reason)

    def _index_one_batch(self) -> bool:
        ready = self.images.pop_ready(limit=self.cfg.batch_size)
        if not ready:
            if not len(self.images):
                self._startup_backlog = 0  # nothing left to index: whatever was queued at startup is done
            return False
        self._startup_backlog -= len(ready)
        try:
            summary = self.indexer.index_paths(ready)
        except DatabaseUnavailable:
            for path in ready:
                self.images.note(path)  # pending, not lost
            raise
        for path in summary.deferred:
            self.images.note(path)  # still being written: wait for it again
        self.counters.indexed += summary.embedded + summary.relinked
        self.counters.skipped += len(summary.skipped)
        if summary.embedded or summary.relinked:
            log.info("images_indexed", embedded=summary.embedded, relinked=summary.relinked,
                     duplicates=summary.duplicates, skipped=len(summary.skipped), queued=len(self.images))
        return True


def serve(cfg: Config, *, cleanup: bool, poll: bool) -> int:
    """``image-search serve``: run until SIGTERM/SIGINT. Returns the exit code."""
    faulthandler.enable()  # a watchdog SIGABRT dumps every thread's stack into the journal
    stop = StopFlag()
    stop.install()
    notifier = Notifier()
    notifier.status("loading the model and opening the store")
    with open_runtime(cfg, cleanup=cleanup, with_inbox=True) as rt:
        if stop.is_set():
            notifier.stopping()
            return EXIT_OK
        code = Service(rt, poll=poll, stop=stop, notifier=notifier).run()
    log.info("service_stopped", exit_code=code)
    return code
