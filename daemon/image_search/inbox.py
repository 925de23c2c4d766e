"""The query inbox: a file dropped into ``inbox/`` is a question; its answer is a result folder.

A query waits until it is complete (``ReadinessTracker``), is answered (the result bundle is written
and the query moves into it), or fails into ``inbox/failed/`` beside a ``<name>.error.txt`` saying why
(an entry of the user's named ``failed`` that is no folder is left alone: the query then stays where it is;
a disk that takes no write, full or read-only, is an outage the service waits out, the query pending).
A query document ``<stem>.json`` (``querydoc``) may bring its pictures in a folder ``inbox/<stem>/``:
the files there are never queries of their own; the document waits until they too are settled, and
the folder moves (into the result, or into ``failed/``) with it.
A ``{"duplicates": true}`` document is answered by a report that can take minutes: it is written on a
thread of its own (``duplicates.ReportThread``) while the loop goes on, one report at a time (another
such document waits for it), and a stop ends it with its document left in the inbox for the next start.
Queries already waiting at start-up are held until the start-up backlog is indexed, so their answers
see the whole folder; queries dropped later jump the ingest queue. Nothing dropped here is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .discover import IMAGE_EXTENSIONS, broken_link, is_ignored_name, supported_formats_for_people
from .config import Config
from .entries import FileIdentity, LinkPolicy
from .errors import ImageSearchError, NoTextTower, OutputUnwritable, UnusableFile, describe, writing_into
from .fleet import ClaimKind
from .names import escape, fit_name
from .output import move_folder, move_out
from .preprocess import ModelInput, PreparedImage, PreprocessError, write_atomically
from .query import DuplicatesRequest
from .runtime import Runtime
from .search import PictureReader, search_file
from .store import DatabaseUnavailable
from .querydoc import is_query_document, pictures_folder, read_query_document
from .textquery import is_text_query
from .readiness import ReadinessTracker, still_being_written
from .watch import Change, ChangeKind
from .workers import PreprocessPool

if TYPE_CHECKING:  # the grouping code is imported once a report is asked for
    from .duplicates import ReportThread

log = structlog.get_logger(__name__)

FAILED_FOLDER = "failed"
ERROR_SUFFIX = ".error.txt"
ANSWERS_PER_PASS = 4  # then the loop looks at its other work again
# A stop waits this long for the duplicates report to reach its next checkpoint (well under a second of
# work apart, seconds for the one sort of millions of pairs), well within systemd's TimeoutStopSec.
REPORT_STOP_WAIT_S = 10.0


# How often the loop, waiting for a query's picture, tells the watchdog it lives.
PICTURE_WAIT_SLICE_S = 1.0
# How long all the pictures of one query may take to be read, after which the next fails the query unread:
# the loop waits for them, and a document may name 64, each taking up to ``workers.FILE_SECONDS_LIMIT``
# (64 minutes of the ingest and the other queries held up). A 12 MP camera JPEG takes about 70 ms here.
QUERY_PICTURES_LIMIT_S = 300.0


class QueryPictures:
    """The service's query pictures, read and decoded in a worker process of their own, as the ingest's
    are: a picture that takes longer than ``workers.FILE_SECONDS_LIMIT`` (a network mount gone dead, a file
    made to decode slowly: 100 s for one JPEG of 16,000 scans) or crashes its decoder fails its query, not
    the service; the memory a decode takes is the worker's (a 16-bit PNG of 100 MP took the service from
    0.8 to 3.3 GB). Meanwhile the loop waits, telling the watchdog that it lives (``heartbeat``): a wait
    bounded per file is no hang. One worker: the loop answers one query at a time."""

    def __init__(self, cfg: Config, model_input: ModelInput, heartbeat: Callable[[], None]) -> None:
        self._pool = PreprocessPool(max_size=(cfg.resize_width, cfg.resize_height), max_pixels=cfg.max_image_pixels,
                                    model_input=model_input, workers=1, max_batches_in_flight=1)
        self._heartbeat = heartbeat
        # True while the loop only waits for a picture: a stop may cut that wait short (``StopFlag``), the
        # query left in the inbox for the next start, rather than wait out the limit (60 s per picture).
        self.waiting = False

    def __call__(self, path: Path, links: LinkPolicy | None) -> PreparedImage:
        handle = self._pool.submit([path], links=links)
        self.waiting = True
        try:
            while not handle.wait(PICTURE_WAIT_SLICE_S):
                self._heartbeat()
        finally:
            self.waiting = False
        [outcome] = handle.results()
        if isinstance(outcome, PreprocessError):
            raise outcome
        return outcome

    def for_one_query(self) -> PictureReader:
        """This reader, for the pictures of one query: once ``QUERY_PICTURES_LIMIT_S`` have gone, the next
        fails the query unread (the one being read may still take its own limit)."""
        deadline = time.monotonic() + QUERY_PICTURES_LIMIT_S

        def read(path: Path, links: LinkPolicy | None) -> PreparedImage:
            if time.monotonic() > deadline:
                raise PreprocessError(path, f"not read: the query's pictures took longer than "
                                            f"{QUERY_PICTURES_LIMIT_S:g} s to read in all (the service waits for "
                                            "them, and its other work with it); ask with fewer or smaller pictures")
            return self(path, links)
        return read

    def close(self) -> None:
        self._pool.close()


class QueryInbox:
    """The queries of one inbox folder, from noticed to answered or failed."""

    def __init__(self, rt: Runtime, *, clock: Callable[[], float], incomplete_grace: float,
                 stopping: Callable[[], bool] = lambda: False, not_yet_indexed: Callable[[], int]) -> None:
        self.rt = rt
        # Where the service reads its queries' pictures, once the model is there (None: in this process).
        self.pictures: QueryPictures | None = None
        self.folder = rt.cfg.inbox_directory
        self._stopping = stopping  # a look at the whole folder ends at the next entry once a stop is asked for
        # The pictures noticed and not indexed yet: each answer says how many (it is answered ahead of them).
        self._not_yet_indexed = not_yet_indexed
        self.pending = ReadinessTracker(rt.cfg.settle_seconds, clock=clock)
        self.incomplete_grace = incomplete_grace
        self.answered = 0
        self.failed = 0
        # Failures written into failed/ with their reason: with ``answered``, the queries' progress that
        # ends an outage of the disk (``Service``); a query left in place for a user's entry is none.
        self.failures_recorded = 0
        self._held: list[Path] = []  # found at start-up: answered once the start-up backlog is indexed
        self._reports_begun: set[Path] = set()  # duplicates documents whose report was begun, not answered yet
        self._folder_looks: dict[Path, list[tuple[str, int, int]]] = {}  # documents' folders, as last seen
        # Failed queries that could not move into failed/ (``fail``), as they looked then: not tried again
        # until they change or failed/ is free, so one such query is one log line, not one per rescan.
        self._left_in_place: dict[Path, FileIdentity | None] = {}  # a query left in place waits for it to change
        # Queries answered that this user may not remove from the inbox (``output.move_answered_query``), as they
        # looked then: answered anew only once they change, not at every look at the folder.
        self._answered_in_place: dict[Path, FileIdentity | None] = {}
        self._lone_folders: set[Path] = set()  # folders without their document, each named once
        self._lone_since: dict[Path, float] = {}  # when each was first seen without it
        self.report: ReportThread | None = None  # the duplicates report being written
        self._after_report: list[Path] = []  # duplicates documents waiting for it, answered next

    def _is_query_candidate(self, path: Path) -> bool:
        # failed/ is the service's own folder; a file of that name is the user's, and fails as any other.
        return (path.parent == self.folder and not is_ignored_name(path.name)
                and not (path.name == FAILED_FOLDER and path.is_dir()))

    def waiting(self) -> list[Path]:
        """Entries in the folder now that are not queued yet (lost events can hide some): anything but a
        folder, so that a pipe or a link the rules refuse fails into failed/ with its reason, unopened."""
        return [p for p in self._entries()
                if not p.is_dir() and self._is_query_candidate(p) and p not in self.pending
                and not self._left_as_it_was(p) and not self._reporting_on(p)]

    def _reporting_on(self, path: Path) -> bool:
        return self.report is not None and self.report.document == path

    def _entries(self) -> Iterator[Path]:
        """The folder's entries in name order, one stat or so each for the caller: none more once a stop
        is asked for (the service is then on its way out, and the next start looks again)."""
        for path in sorted(self.folder.iterdir()):
            if self._stopping():
                return
            yield path

    def _left_as_it_was(self, path: Path) -> bool:
        """True for a failed query left in the inbox (``fail``), or an answered one it may not leave
        (``_after_answer``), that has not changed since."""
        left = self._left_in_place if path in self._left_in_place else self._answered_in_place
        return path in left and left[path] == FileIdentity.of(path, follow_links=False)

    def hold_waiting(self) -> int:
        """Start-up: hold the queries already there until ``release_held``. Returns how many. The folders
        there are looked at once settled (``answer``), as a folder dropped later is."""
        self._held = self.waiting()
        for folder in self._entries():
            if folder.is_dir() and self._is_query_candidate(folder):
                self._lone_since[folder] = float("-inf")  # there before this start: no document is on its way
                self.pending.note(folder)
        return len(self._held)

    def release_held(self) -> None:
        for path in self._held:
            self.pending.note(path)
        self._held = []

    def queue_waiting(self) -> None:
        """After lost events: queue what is in the folder (held start-up queries stay held)."""
        for path in self.waiting():
            if path not in self._held:
                self.pending.note(path)

    def apply(self, change: Change) -> None:
        if change.kind in (ChangeKind.DELETED, ChangeKind.MOVED):
            self.pending.forget(change.path)
            self._folder_looks.pop(change.path, None)
            self._left_in_place.pop(change.path, None)
            self._answered_in_place.pop(change.path, None)
            self._lone_folders.discard(change.path)
            self._lone_since.pop(change.path, None)
            if change.path == self.folder / FAILED_FOLDER:
                self._retry_left_in_place()  # what was in failed/'s way has gone
        if change.kind is ChangeKind.DELETED:
            return
        path = change.final_path
        if self._left_as_it_was(path):
            return
        self._left_in_place.pop(path, None)
        self._answered_in_place.pop(path, None)
        if self._is_query_candidate(path):
            # A folder waits like a file (its mtime changes while entries are added), then ``answer`` says
            # whether it holds a document's pictures. A rename into place is how careful writers finish a
            # file: as good as a close.
            self.pending.note(path, closed=change.kind in (ChangeKind.CLOSED, ChangeKind.MOVED))

    def _retry_left_in_place(self) -> None:
        for path in self._left_in_place:
            if os.path.lexists(path):
                self.pending.note(path)
        self._left_in_place.clear()

    def answer_ready(self) -> bool:
        """Answer the queries that are complete now (a few per call), or the duplicates report once it is
        written. True if there were any."""
        reported = self._finish_report()
        ready = self.pending.pop_ready(limit=ANSWERS_PER_PASS)
        # Each query is answered by one service: one that another service holds comes back after a lease.
        mine = self.rt.claims.take(ClaimKind.QUERY, ready, self.pending)
        try:
            for done, path in enumerate(mine):
                try:
                    self.answer(path)
                except (DatabaseUnavailable, OutputUnwritable):
                    for later in mine[done + 1:]:  # not tried: pending again, with the one that met the outage
                        self.pending.note(later)
                    raise
        finally:
            # A report being written keeps its document's claim until it is done (``_finish_report``).
            self.rt.claims.release(ClaimKind.QUERY, [p for p in mine if not self._reporting_on(p)])
        return reported or bool(ready)

    def answer(self, path: Path) -> None:
        """A picture is searched by its looks, a ``.txt`` file by its words, a ``.json`` file is a query
        document; anything else fails. A folder is never a query (``_lone_folder``)."""
        if self._reporting_on(path):  # written again while its report is made: answered anew once it is done
            if path not in self._after_report:
                self._after_report.append(path)
            return
        if path.is_dir():
            self._lone_folder(path)
            return
        broken = broken_link(path)
        if broken is not None:
            self.fail(path, broken)
            return
        if not is_text_query(path) and not is_query_document(path) and path.suffix.lower() not in IMAGE_EXTENSIONS:
            self.fail(path, f"not a supported query type '{escape(path.suffix or path.name)}': drop a picture "
                            f"({supported_formats_for_people()}), a .txt file of words or a .json query document")
            return
        if is_query_document(path) and path.stem == FAILED_FOLDER:
            self.fail(path, f"a query document may not be named {FAILED_FOLDER}.json: inbox/{FAILED_FOLDER}/ holds the "
                            "failed queries, not this document's pictures; rename it (e.g. query.json) and drop it again")
            return
        if is_query_document(path) and self._folder_settling(path):
            self.pending.note(path)
            return
        self._settle(path, lambda: self._search(path))

    def _search(self, path: Path) -> bool:
        """Answer the query at ``path`` (True), or begin the duplicates report it asks for (False: it is
        answered once the report is written, ``_finish_report``)."""
        cfg = self.rt.cfg
        read_as = FileIdentity.of(path)  # before it is read: the bundle moves it in only if it is still that file
        document = read_query_document(path, cfg, cfg.inbox_links) if is_query_document(path) else None
        if document is not None and isinstance(document.asks, DuplicatesRequest):
            self._begin_report(path, document.asks, read_as=(read_as, document.data))
            return False
        search_file(path, cfg=cfg, embedder=self.rt.model(), store=self.rt.store, move_query=True,
                    links=cfg.inbox_links, document=document, not_yet_indexed=self._not_yet_indexed(),
                    read_as=read_as, read_picture=self.pictures.for_one_query() if self.pictures else None)
        self._after_answer(path, read_as)
        return True

    def _after_answer(self, path: Path, read_as: FileIdentity | None) -> None:
        """A query answered and still in the inbox: written again while it was answered, it is answered anew;
        the very file answered, which this user may not remove (``output.move_answered_query``), waits until
        it changes."""
        if not os.path.lexists(path):
            return
        if read_as is not None and FileIdentity.of(path) == read_as:
            self._answered_in_place[path] = FileIdentity.of(path, follow_links=False)
        else:
            self.pending.note(path)

    def _begin_report(self, path: Path, request: DuplicatesRequest, *, read_as: tuple[FileIdentity, bytes]) -> None:
        if self.report is not None:  # one at a time: each takes the CPU and memory it can get
            if path not in self._after_report:
                self._after_report.append(path)
            return
        from .duplicates import Kind, ReportThread

        self.report = ReportThread(self.rt.cfg, self.rt.store, kinds=[Kind(k) for k in request.kinds],
                                   folders=request.folders, document=path, read_as=read_as)
        # Begun again after a full disk refused it: said once for the whole wait, as the outage is.
        (log.debug if path in self._reports_begun else log.info)(
            "duplicates_report_begun", query=path,
            detail="written beside the loop: queries are answered and pictures indexed meanwhile")
        self._reports_begun.add(path)

    def _finish_report(self) -> bool:
        """The report being written, once it is done: answered (or failed) as any query. True if it was."""
        report = self.report
        if report is None or not report.done:
            return False
        self.report = None

        def answered() -> bool:
            done = bool(report.result())
            self._after_answer(report.document, report.read_as)
            return done

        try:
            self._settle(report.document, answered)
        finally:
            if not os.path.lexists(report.document):  # answered or failed: a document of that name is news
                self._reports_begun.discard(report.document)
            self.rt.claims.release(ClaimKind.QUERY, [report.document])
            for path in self._after_report:
                self.pending.note(path)
            self._after_report = []
        return True

    def close(self) -> None:
        """A stop: the report being written ends at its next checkpoint, its document left in the inbox,
        which the next start answers; one that was whole before the stop reached it is answered now."""
        if self.pictures is not None:
            self.pictures.close()
            self.pictures = None
        if self.report is None:
            return
        if self.report.stop(REPORT_STOP_WAIT_S) and self.report.written:  # whole before the stop reached it
            self._finish_report()
        elif self.report.done:
            log.info("duplicates_report_stopped", query=self.report.document,
                     detail="the document stays in the inbox; the next start writes the report")
        else:
            log.warning("duplicates_report_abandoned", query=self.report.document, waited_s=REPORT_STOP_WAIT_S,
                        detail="a step of the report overran its checkpoint; the service stops without it")
        self.report = None

    def _settle(self, path: Path, answer: Callable[[], bool]) -> None:
        """Run ``answer`` for the query at ``path`` and settle the query by what it raised: a bad query fails
        with its reason, one still arriving waits, the machine's trouble is the loop's. Counted as answered
        when ``answer`` says it was."""
        try:
            answered = answer()
        except NoTextTower as exc:
            self.fail(path, str(exc))
            return
        except UnusableFile as exc:
            if still_being_written(self._newest(path), exc, self.incomplete_grace):
                self.pending.note(path)
                return
            self.fail(path, self._failure_reason(path, exc))
            return
        except (DatabaseUnavailable, OutputUnwritable):
            # The machine's, not the query's: answered once the database is back or output/ takes writes
            # again (the bundle put the query back in the inbox).
            self.pending.note(path)
            raise
        except ImageSearchError:
            # The machine's fault, which no waiting mends (fonts missing): the query stays in the inbox
            # (the bundle puts it back) for the next start, and the service exits saying why.
            raise
        except Exception as exc:  # one odd query must not stop the service
            log.error("query_crashed", path=path, error=describe(exc))
            self.fail(path, f"unexpected error: {describe(exc)}")
            return
        if answered:
            self.answered += 1

    def _lone_folder(self, folder: Path) -> None:
        """A folder in the inbox holds a query document's pictures, read when its document
        ``inbox/<name>.json`` is answered. One line for a folder without its document (once, however
        often it is seen); it stays where it is."""
        if folder in self._lone_folders or any(
                is_query_document(p) and p.stem == folder.name for p in self.folder.iterdir()):
            return
        # The README has the pictures dropped first, then the document: a folder alone is named only once
        # its document has had the time a half-written file has (it was a warning at every such query).
        first_seen = self._lone_since.setdefault(folder, self.pending.clock())
        if self.pending.clock() - first_seen < self.incomplete_grace:
            self.pending.note(folder)  # looked at again once settled; its document's answer moves it away
            return
        self._lone_folders.add(folder)
        log.warning("inbox_folder_ignored", path=folder,
                    reason=f"ignored: a folder in the inbox is no query; it holds the pictures of a query document "
                           f"{escape(folder.name)}.json dropped beside it, and there is none (yet); pictures to "
                           f"index go into source-directory ({escape(self.rt.cfg.source_directory)})")

    def _pictures_of(self, path: Path) -> list[Path]:
        """The files in a query document's ``inbox/<stem>/`` folder (none for any other query)."""
        folder = self.pictures_folder(path)
        if folder is None:
            return []
        # os.walk follows no link to a folder (a loop of links would never end); a link is an entry as it is.
        return [Path(top, name) for top, _, names in os.walk(folder) for name in names]

    def pictures_folder(self, path: Path) -> Path | None:
        """A query document's ``inbox/<stem>/`` (``querydoc.pictures_folder``), never ``failed/`` (the
        folder of a ``failed.json``, which is refused, is the inbox's own)."""
        if not is_query_document(path) or path.stem == FAILED_FOLDER:
            return None
        return pictures_folder(path)

    def _newest(self, path: Path) -> Path:
        """The query, or the file of its document folder changed last: how long ago that was decides
        whether a query that cannot be read yet is still arriving."""
        def modified(p: Path) -> float:
            try:
                return p.lstat().st_mtime
            except OSError:
                return float("-inf")
        return max([path, *self._pictures_of(path)], key=modified)

    def _folder_settling(self, path: Path) -> bool:
        """True until a document's folder has looked the same (its files' names, sizes and times) at two
        looks a settle period apart: the folder is not watched file by file, so its pictures are
        looked at when the document is due. A document without a folder never waits here."""
        if self.pictures_folder(path) is None:
            self._folder_looks.pop(path, None)
            return False
        look = []
        for picture in self._pictures_of(path):
            try:
                st = picture.lstat()
            except OSError:
                continue
            look.append((str(picture), st.st_size, st.st_mtime_ns))
        if self._folder_looks.get(path) == sorted(look):
            del self._folder_looks[path]
            return False
        self._folder_looks[path] = sorted(look)
        return True

    def _failure_reason(self, path: Path, exc: UnusableFile) -> str:
        """The error's reason, naming the picture when it is one of a document's, and the wait it had."""
        reason = exc.reason
        if exc.path != path:
            reason = f"{escape(exc.path.name)}: {reason}"
        if exc.still_arriving:
            reason += f" (waited {self.incomplete_grace:g} s for it to be complete)"
        return reason

    def fail(self, path: Path, reason: str) -> None:
        """Move a query that cannot be answered to inbox/failed/ with a <name>.error.txt saying why. When
        failed/ cannot take it (an entry of the user's holds that name), the query stays where it is,
        untouched, until it changes or failed/ is free again. When the disk takes no write (full,
        read-only), the query stays too, pending: ``OutputUnwritable``, and the service waits the outage
        out as it does for an answer, then fails it again."""
        failed = self.folder / FAILED_FOLDER
        # backslashreplace: a reason quoting what no UTF-8 holds must not cost the service its run.
        why = f"{escape(path.name)}: {reason}\n".encode(errors="backslashreplace")
        try:
            with writing_into(failed, "a failed query and its reason", disk_only=True):
                target = _move_into(failed, path, why)
        except OutputUnwritable:
            self.pending.note(path)  # the disk's, not the query's: tried again once the outage's retry is due
            raise
        except FileNotFoundError:
            log.warning("query_vanished", path=path)
            return
        except OSError as exc:
            # An entry of the user's in the way costs this query its move, never the service its run.
            self.failed += path not in self._left_in_place  # one failed query, however often it is tried
            self._left_in_place[path] = FileIdentity.of(path, follow_links=False)
            log.warning("query_failed", path=path, reason=reason, left_in_inbox=_not_moved_reason(failed, exc))
            return
        self.failed += 1
        self.failures_recorded += 1
        folder = self.pictures_folder(path)
        if folder is not None:
            # Its pictures go with it, beside it: <name>.json and <name>/ (the stem of the target).
            try:
                move_folder(folder, _free_path(target.with_name(target.stem)))
            except OSError as exc:  # the folder's, not the service's: it stays, whole, in the inbox
                log.warning("query_folder_not_moved", path=folder, reason=exc.strerror or str(exc),
                            detail=f"its document failed and moved to {escape(target)}; the folder stays in the inbox")
        log.warning("query_failed", path=path, moved_to=target, reason=reason)


def _move_into(failed: Path, query: Path, why: bytes) -> Path:
    """Move ``query`` into the folder ``failed`` (made if missing) under its own name, else name-2,
    name-3...: never onto an entry there, and within 255 bytes with ".error.txt" added. Its error file,
    holding ``why``, is written first: a full disk leaves the query where it was, never in failed/
    without its reason. Returns where it went."""
    failed.mkdir(exist_ok=True)
    if failed.is_symlink():  # mkdir's exist_ok takes a link to a folder: the link is the user's, not failed/
        raise FileExistsError(errno.EEXIST, "a symbolic link, not the service's folder", str(failed))
    n = 1
    while True:
        name = query.name if n == 1 else f"{query.stem}-{n}{query.suffix}"
        target = failed / fit_name(name, keep_suffix=query.suffix, reserve=len(ERROR_SUFFIX))
        if not (os.path.lexists(target) or os.path.lexists(_error_file(target))):
            break
        n += 1
    error_file = _error_file(target)
    write_atomically(error_file, why)
    try:
        move_out(query, target)  # a pipe or a link moves as what it is, unopened (``move_out``)
    except BaseException:
        with contextlib.suppress(OSError):  # the service's own file: no reason without its query
            error_file.unlink(missing_ok=True)
        raise
    return target


def _not_moved_reason(failed: Path, exc: OSError) -> str:
    """Why a failed query stays in the inbox, and what frees its way, for its log line."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        why = f"{escape(failed)} is not a folder of the service's (an entry of yours, left as it is)"
    else:
        why = f"it cannot be moved into {escape(failed)}/ ({exc.strerror or describe(exc)})"
    return (f"{why}: the query stays in the inbox, untouched, and is tried again when it changes, when "
            f"{FAILED_FOLDER} is moved away or deleted, or at the next start")


def _free_path(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... whichever does not exist yet."""
    candidate, n = path, 2
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


def _error_file(failed_query: Path) -> Path:
    """The ``<name>.error.txt`` beside a failed query."""
    return failed_query.with_name(failed_query.name + ERROR_SUFFIX)
