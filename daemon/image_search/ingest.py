"""The service's ingest: files that are complete become rows, two batches in flight, as ``index`` does.

``ImageIngest.step`` keeps ``PIPELINE_DEPTH`` batches in flight (the next one is read and decoded by the
worker processes while the oldest is embedded, and the one before is written beside the loop: the
indexer's ``RowWriter``), claims each batch for this service, and finishes the oldest once no more can
start. A batch counts as indexed (its claims let go, counted for ``images_indexed``) once its rows are
committed; one whose write failed goes back to pending, as a batch that met a lost database always has.
A file that a worker has been reading for ``workers.SLOW_FILE_S`` is set aside in a batch of its own
(``Indexer.set_aside_slow``), finished once it is read: the rest of its batch, and the batches after it,
do not wait up to the per-file limit for it. A large backlog is bulk-loaded (``BulkLoad``), whether the
start-up reconciliation found it or a burst of files arrived while the service runs: its rows land
without per-row index insertion, and the index is built again beside the loop once it is in. The
service loop decides when to call it; everything about a batch's life is decided here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from .errors import OutputUnwritable
from .fleet import ClaimKind
from .indexer import BatchInFlight, Indexer
from .runtime import Runtime
from .store import BulkLoad, DatabaseUnavailable
from .store import embeddings as stored
from .sync import FolderSync, remove_processed
from .readiness import ReadinessTracker

log = structlog.get_logger(__name__)

# Batches in flight: one being embedded and written while the next is read and decoded (the worker
# pool holds two at most).
PIPELINE_DEPTH = 2
# The longest a pass waits for the oldest batch's files: a query dropped meanwhile waits for no reading
# (sixteen 8000 x 6000 PNGs take 2 s), only for the batch being embedded when it came.
READ_WAIT_SLICE_S = 0.05
# At a stop, the longest the batches being read are waited for: a read that does not return (a hung share)
# must not hold the stop; a batch of large photos is read within it.
STOP_READ_WAIT_S = 2.0
# How often a caught-up service with no bulk load under way asks whether the search index is valid, and
# repairs it if not: a build that failed during the run (the database restarted under it) is retried.
REPAIR_LOOK_EVERY_S = 60.0
# ``images_indexed`` is one line once the pictures noticed are in, and one this often while a long run of
# them lasts: a burst of 2,500 was 313 lines, one per batch, in a journal meant to be quiet.
INDEXED_LINE_EVERY_S = 10.0


@dataclass
class _IndexedSinceLastLine:
    """What ``images_indexed`` reports: the batches counted since the last line."""
    since: float
    embedded: int = 0
    relinked: int = 0
    copies: int = 0
    skipped: int = 0


class ImageIngest:
    """Pending images (``images``) to rows, through ``indexer``, for one service."""

    def __init__(self, rt: Runtime, indexer: Indexer, images: ReadinessTracker, sync: FolderSync, *,
                 startup_backlog: int) -> None:
        self.rt = rt
        self.indexer = indexer
        self.images = images
        self.sync = sync
        self.indexed = 0
        self.skipped = 0
        # Files queued by the start-up reconciliation whose rows are not committed yet: counted down as
        # batches commit (queries found at start wait for it). A batch that goes back to pending is not.
        self.startup_backlog = startup_backlog
        self._in_flight: deque[BatchInFlight] = deque()  # submitted to the indexer, not finished yet
        self._set_aside: list[BatchInFlight] = []  # slow files split off a batch in flight, not finished yet
        # Slow files deleted or moved away while being read: the copies their reads save are removed then.
        self._dropped_reads: list[BatchInFlight] = []
        self._writing: deque[BatchInFlight] = deque()  # finished, rows not committed yet
        # A large start-up backlog (a first start on a library) lands without per-row index insertion;
        # the index is built again in the background once it is in (searches are exact meanwhile). So is
        # an index that a crash or a stop left missing or invalid, whatever the backlog.
        self.bulk: BulkLoad | None = rt.store.begin_bulk_load(startup_backlog) or rt.store.repair_index()
        # The backlog a bulk load was last considered for: asked again only once it has doubled, so a
        # steady trickle costs no count of the table per batch.
        self._bulk_considered_at = max(startup_backlog, 1)
        self._next_repair_look = images.clock() + REPAIR_LOOK_EVERY_S  # the loop's clock; the start looked
        self._unreported: _IndexedSinceLastLine | None = None

    @property
    def not_yet_indexed(self) -> int:
        """The pictures noticed and not indexed yet: pending, or in a batch whose rows are not committed (a
        committed batch's files still being written go back to pending)."""
        writing = sum(len(batch.summary.deferred) if batch.committed else len(batch.paths) for batch in self._writing)
        return len(self.images) + sum(len(batch.paths) for batch in (*self._in_flight, *self._set_aside)) + writing

    def step(self) -> bool:
        """Start a batch if one can start; finish the oldest once no more can. True if it did some work."""
        self._report_indexed_if_due()
        self._consider_bulk_load()
        finished_aside = self._finish_set_aside_read()
        self._clean_up_after_dropped_reads()
        submitted = self._submit_ready()
        if not self._in_flight and self._set_aside:
            # Only slow files left being read: what was written meanwhile is counted; the loop answers a
            # query, then waits a slice for them again.
            self._confirm_written()
            if not submitted and not finished_aside:
                self._set_aside[0].read_within(READ_WAIT_SLICE_S)
            return True
        if not self._in_flight:
            # Caught up: nothing left to read but files that are not ready and have kept changing for a
            # while (or none at all): a file rewritten faster than it settles must not keep the index from
            # being built, or the queries found at start from being answered.
            caught_up = not submitted and self.images.only_restless()
            self._confirm_written(wait=caught_up)  # batches written while files still settle are counted too
            if caught_up:
                self.startup_backlog = 0  # whatever was queued at startup and could be read is in
                self._repair_if_due()
                if self.bulk is not None:
                    self.bulk.finish_in_background()
                self._report_indexed()
            return submitted or finished_aside
        if submitted and len(self._in_flight) < PIPELINE_DEPTH:
            return True  # the next pass starts another batch before this one is finished
        if not self._in_flight[0].read_within(READ_WAIT_SLICE_S):
            # The loop answers a query that came meanwhile, then waits again. Not a wait a stop cuts short: the
            # loop ends within a slice, and the stop finishes the batches read (``finish_in_flight``).
            self._set_aside_slow(self._in_flight[0])
            return True
        self._finish_oldest()
        return True

    def _set_aside_slow(self, batch: BatchInFlight) -> None:
        """The files of ``batch`` that have been read for long go into a batch of their own, finished once
        read (``_finish_set_aside_read``). Not one that a later batch reads again (rewritten meanwhile): the
        older read, its row and its processed copy, must land first, so it keeps its place."""
        again = {path for later in self._in_flight if later is not batch for path in later.paths}
        aside = self.indexer.set_aside_slow(batch, keep=again)
        if aside is None:
            return
        log.debug("slow_files_set_aside", paths=[str(p) for p in aside.paths],
                  detail="still being read: the pictures after them go on meanwhile")
        self._set_aside.append(aside)

    def _after_slow_reads(self, paths: list[Path]) -> list[Path]:
        """``paths`` but those a set-aside batch is still reading (rewritten meanwhile), or reads though they
        were dropped (replaced by a rename): pending again, read once that read is over, so that the older
        read's row and processed copy never land over the newer. Submitted at once, such a read waited in
        the pool for the older one, and held back the pictures of its batch with it."""
        reading = {path for batch in self._set_aside for path in (*batch.paths, *batch.dropped)}
        reading |= {path for batch in self._dropped_reads if not batch.read_within(0) for path in batch.dropped}
        later = [path for path in paths if path in reading]
        if later:
            marked = self.images.take_reread(later)
            for path in later:
                self.images.note(path, reread=path in marked)
        return [path for path in paths if path not in reading]

    def _finish_set_aside_read(self) -> bool:
        """The set-aside batches whose files are read, finished (their rows to the writer); True if one was."""
        read = [batch for batch in self._set_aside if batch.read_within(0)]
        for batch in read:
            self._set_aside.remove(batch)
            self._finish(batch)
        return bool(read)

    def _consider_bulk_load(self) -> None:
        """A burst (a folder of thousands copied in while the service runs) is bulk-loaded as a start-up
        backlog is; once an earlier bulk load's index is built, the next burst may have its own."""
        backlog = len(self.images)
        if not backlog:
            self._bulk_considered_at = 1
        if self.bulk is not None:
            if not self.bulk.ended:
                return
            self.bulk = None
        # Looked at from the least backlog a bulk load takes on, then each time it doubles: a burst copied in
        # file by file was looked at 2, 4, ... 512 files in, and one just over the least, being indexed as it
        # came, never reached 1,024 queued: its rows went into the index one by one.
        if backlog < max(stored.BULK_LOAD_MIN_ROWS, 2 * self._bulk_considered_at):
            return
        self._bulk_considered_at = backlog
        self.bulk = self.rt.store.begin_bulk_load(backlog)

    def _repair_if_due(self) -> None:
        """Now and then, with no bulk load under way: a ``repair_index`` bulk load if a build failed."""
        if self.bulk is not None and not self.bulk.ended:
            return
        now = self.images.clock()
        if now < self._next_repair_look:
            return
        self._next_repair_look = now + REPAIR_LOOK_EVERY_S
        self.bulk = self.rt.store.repair_index()

    def finish_in_flight(self) -> None:
        """At a stop: finish the batches already being read, each whose files are read within
        ``STOP_READ_WAIT_S``; the rest (a read that does not return) are dropped, and so are all of them when
        the database is lost: the next start's rescan finds their files again."""
        try:
            while self._in_flight and self._in_flight[0].read_within(STOP_READ_WAIT_S):
                self._finish_oldest()
            self._finish_set_aside_read()  # slow files: only those read by now
            self.wait_for_writes()
        except (DatabaseUnavailable, OutputUnwritable) as exc:
            log.warning("batches_left_unfinished", reason=str(exc), action="the next start's rescan indexes them")
            return
        if self._in_flight or self._set_aside:
            log.info("batches_left_unfinished",
                     files=sum(len(batch.paths) for batch in (*self._in_flight, *self._set_aside)),
                     reason=f"their files were still being read {STOP_READ_WAIT_S:g} s into the stop",
                     action="the next start's rescan indexes them")

    def close(self) -> None:
        self._report_indexed()  # whatever ends the run: what was indexed is said
        if self.bulk is not None:
            self.bulk.abandon()  # a stop before the index is built: the next start builds it
        self.indexer.close()

    def _submit_ready(self) -> bool:
        if len(self._in_flight) >= PIPELINE_DEPTH:
            return False
        ready: list[Path] = []
        reread: frozenset[Path] = frozenset()
        # Another service sharing the database may hold some: those come back after a lease. One that holds
        # all of them is ahead of this one in the same queue (every member pops in the order the files came):
        # look further along at once. Waiting for the next pass instead, this one stayed a batch behind at
        # every pass and left it nearly all the work (of 300 files, 268-289 to one of three members).
        while not ready and (popped := self.images.pop_ready(limit=self.indexer.read_batch_size)):
            popped = self._after_slow_reads(popped)
            ready = self.rt.claims.take(ClaimKind.IMAGE, popped, self.images)
            # Seen written: read whatever their stat says. A path another service holds loses its mark too:
            # that service reads it, and its row costs nothing once it is there.
            reread = self.images.take_reread(popped)
        if not ready:
            return False
        try:
            self._in_flight.append(self.indexer.submit(ready, reread=reread))
        except DatabaseUnavailable:
            self._requeue(ready, reread)
            raise
        return True

    def _requeue(self, paths: Sequence[Path], reread: frozenset[Path]) -> None:
        """Paths whose batch could not be written (the database went away, processed/ refused a copy):
        pending again, not lost; those seen written are still to be read whatever their stat says."""
        for path in paths:
            self.images.note(path, reread=path in reread)
        self.rt.claims.release(ClaimKind.IMAGE, paths)

    def _finish_oldest(self) -> None:
        self._finish(self._in_flight.popleft())

    def _finish(self, batch: BatchInFlight) -> None:
        try:
            self.indexer.finish(batch)
        except (DatabaseUnavailable, OutputUnwritable):  # the service waits, then reads them again
            self._requeue(batch.paths, batch.reread)
            raise
        self._remove_copies_of_dropped(batch)  # read now: its files' copies are saved
        self._writing.append(batch)
        self._confirm_written()

    def _look_again_at_paths_of(self, contents: set[str]) -> None:
        """The remaining paths of ``contents``, which a path read anew just left: each is read again if its
        size or mtime is no longer its row's. A hard link shares the rewritten file, a link to the path
        leads to it, and neither has an event of its own; a copy that still holds the old bytes is not read."""
        if not contents:
            return
        root = self.rt.cfg.source_directory
        for content in self.rt.store.contents(contents).values():
            for path in map(Path, content.paths):
                if path.is_relative_to(root) and path not in self.images:
                    self.images.note(path)

    @property
    def reading(self) -> bool:
        return bool(self._in_flight or self._set_aside)

    @property
    def slow_files(self) -> tuple[Path, ...]:
        """The files set aside as slow, still being read."""
        return tuple(path for batch in self._set_aside for path in batch.paths)

    def finish_reading(self, stats: Collection[tuple[int, int]] | None = None) -> bool:
        """The batches being read finished, their rows committed: every one, or (``stats``) up to the last
        that holds a file of one of these (size, mtime). True if one was. Raises as ``_confirm_written``."""
        finished = self._finish_up_to_last(
            lambda batch: stats is None or any((c.size, c.mtime_ns) in stats for c in batch.candidates))
        if finished or stats is None:
            self.wait_for_writes()
        return finished > 0

    def settle(self, *paths: Path) -> None:
        """Before the folder sync forgets or moves ``paths`` (files, or folders and all in them): the batches
        that read them are finished, and every finished batch's rows committed, so that the rows it acts on
        are in the table, not written after their files went. A slow file set aside among them is not
        waited for (up to the 60 s limit, the loop with it): its read is dropped, and the processed copy it
        saves as it ends is removed then; a file at its new path is read anew. Raises as
        ``_confirm_written`` does."""
        def under(read: Path) -> bool:
            return any(read.is_relative_to(path) for path in paths)

        for batch in [batch for batch in self._set_aside if not batch.read_within(0)]:
            gone = [read for read in batch.paths if under(read)]
            if not gone:
                continue
            batch.drop(gone)
            self.rt.claims.release(ClaimKind.IMAGE, gone)
            self.startup_backlog -= len(gone)
            if not batch.paths:
                self._set_aside.remove(batch)
                self._dropped_reads.append(batch)
        self._finish_up_to_last(lambda batch: any(under(read) for read in batch.paths))
        self.wait_for_writes()

    def settle_all_but_slow(self) -> None:
        """Before a rescan compares the folder with the rows: every batch being read finished but the slow
        files set aside (their rows land once read; the rescan's news of them waits for that:
        ``_after_slow_reads``), and every finished batch's rows committed. Raises as ``_confirm_written``."""
        self._finish_set_aside_read()
        while self._in_flight:
            self._finish_oldest()
        self.wait_for_writes()

    def _clean_up_after_dropped_reads(self) -> None:
        """The set-aside batches whose every file was dropped, once their reads have ended."""
        for batch in [batch for batch in self._dropped_reads if batch.read_within(0)]:
            self._dropped_reads.remove(batch)
            self._remove_copies_of_dropped(batch)

    def _remove_copies_of_dropped(self, batch: BatchInFlight) -> None:
        """Once ``batch`` is read: the processed copy each of its dropped reads saved, where nothing else has
        its path now (a file made there since is read after it, and saves its own)."""
        for path in batch.dropped:
            if not self._holds(path):
                remove_processed(self.rt.cfg, path)

    def _holds(self, path: Path) -> bool:
        """``path`` waits, is being read or written, or has a row."""
        return (path in self.images
                or any(path in batch.paths for batch in (*self._in_flight, *self._set_aside, *self._writing))
                or bool(self.rt.store.sources([str(path)])))

    def _finish_up_to_last(self, holds: Callable[[BatchInFlight], bool]) -> int:
        """The batches being read finished, oldest first, up to the last one ``holds``, and each set-aside
        batch that ``holds`` (waiting for its slow files); how many."""
        aside = [batch for batch in self._set_aside if holds(batch)]
        for batch in aside:
            self._set_aside.remove(batch)
            self._finish(batch)
        wanted = max((n for n, batch in enumerate(self._in_flight, 1) if holds(batch)), default=0)
        for _ in range(wanted):
            self._finish_oldest()
        return len(aside) + wanted

    def wait_for_writes(self) -> None:
        """Until every finished batch's rows are committed (and counted): before the folder sync changes
        rows, or compares the folder with them. A failed write is raised as ``_confirm_written`` does."""
        self._confirm_written(wait=True)

    def _confirm_written(self, *, wait: bool = False) -> None:
        """The finished batches whose rows are committed, in order, counted as indexed (``wait``: all of
        them, once their writes are done). A batch whose write failed is pending again; the failure is
        raised once the batches before it are counted."""
        if wait:
            self.indexer.wait_written()
        failure: BaseException | None = None
        while self._writing and self._writing[0].settled:
            batch = self._writing.popleft()
            if batch.write is not None and batch.write.error is not None:
                self._requeue(batch.paths, batch.reread)
                failure = failure or batch.write.error
            else:
                self._indexed(batch)
        if failure is not None:
            raise failure

    def _indexed(self, batch: BatchInFlight) -> None:
        summary = batch.summary
        read = {c.path for c in batch.candidates}.difference(summary.deferred)  # read, their rows committed
        self.rt.claims.release(ClaimKind.IMAGE, batch.paths, read=read)
        self.startup_backlog -= len(batch.paths) - len(summary.deferred)  # deferred: pending again
        for path in summary.deferred:
            self.images.note(path, reread=path in batch.reread)  # still being written: wait for it again
        self.indexed += summary.embedded + summary.relinked + summary.copies
        self._look_again_at_paths_of(summary.left)
        self.skipped += len(summary.skipped)
        self.sync.reported_elsewhere(summary.skipped)
        now = self.images.clock()
        tally = self._unreported = self._unreported or _IndexedSinceLastLine(since=now)
        tally.embedded += summary.embedded
        tally.relinked += summary.relinked
        tally.copies += summary.copies
        tally.skipped += len(summary.skipped)
        self._report_indexed_if_due()

    def _report_indexed_if_due(self) -> None:
        """The ``images_indexed`` line once its batches have waited ``INDEXED_LINE_EVERY_S`` for one: while
        a run lasts, and while its last files wait for something else (another service's claim)."""
        if self._unreported is not None and self.images.clock() - self._unreported.since >= INDEXED_LINE_EVERY_S:
            self._report_indexed()

    def _report_indexed(self) -> None:
        """The ``images_indexed`` line for the batches counted since the last one, if one indexed anything
        (a picture skipped has a line of its own)."""
        tally, self._unreported = self._unreported, None
        if tally is not None and (tally.embedded or tally.relinked or tally.copies):
            log.info("images_indexed", embedded=tally.embedded, relinked=tally.relinked, copies=tally.copies,
                     skipped=tally.skipped, queued=self.not_yet_indexed)
