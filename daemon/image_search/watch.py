"""Watching: the watchdog handler only notices; readiness is decided here, apart, with an injected clock.

watchdog 7 with inotify, as checked: a file moved in from an unwatched folder yields only a created
event; temp-file-then-rename yields closed on the temp name, then moved to the final name; an
exception in a handler kills the observer thread silently; a deleted watched folder kills its
emitter for good; inotify overflow is dropped silently. Hence: the handler enqueues plain
``Change`` records and never raises, and the service loop checks ``observer_problem`` every pass.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import structlog
from watchdog.events import (
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from .errors import ImageSearchError, UnusableFile

log = structlog.get_logger(__name__)


class Folder(IntEnum):
    """Where a change happened."""

    IMAGES = 1  # source-directory, watched recursively
    INBOX = 2  # inbox-directory, its top level only
    WATCHING = 3  # the watching itself (lost events): no path of its own


class ChangeKind(IntEnum):
    TOUCHED = 1  # created or modified
    CLOSED = 2  # closed after writing: the writer is probably done
    DELETED = 3
    MOVED = 4  # ``dest`` holds the new path
    LOST = 5  # events were dropped (inbox overflow, failed re-watch): only a rescan can tell what happened


@dataclass(frozen=True)
class Change:
    """What happened at a path, reduced to what the service acts on."""

    folder: Folder
    kind: ChangeKind
    path: Path
    is_directory: bool = False
    dest: Path | None = None
    detail: str = ""

    @property
    def final_path(self) -> Path:
        """Where the file is now: the destination of a move, else the path itself."""
        return self.dest if self.kind is ChangeKind.MOVED and self.dest is not None else self.path


@dataclass(frozen=True)
class WatchedFolder:
    path: Path
    recursive: bool


class WatchdogWarnings(logging.Handler):
    """watchdog reports lost events (inotify queue overflow) and failed re-watches only as stdlib
    warnings on its own logger: turn each into a ``lost`` Change, so the service logs it and rescans."""

    def __init__(self, changes: queue.SimpleQueue[Change]) -> None:
        super().__init__(level=logging.WARNING)
        self.changes = changes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.changes.put(Change(Folder.WATCHING, ChangeKind.LOST, Path(), detail=record.getMessage()))
        except Exception:  # pragma: no cover - never raise into watchdog's threads
            pass


class FolderHandler(FileSystemEventHandler):
    """Turns watchdog events into ``Change`` records on a queue; never raises (that would kill the observer)."""

    def __init__(self, folder: Folder, changes: queue.SimpleQueue[Change]) -> None:
        self.folder = folder
        self.changes = changes

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)):
                return  # reads, including our own, change nothing
            if isinstance(event, DirModifiedEvent):
                # Sent for the parent of every file created, deleted or moved: the file's own event
                # carries the news. Acting on it would rescan (and restart the wait of) a whole
                # folder once per file copied into it.
                return
            path = Path(os.fsdecode(event.src_path))
            if isinstance(event, (FileMovedEvent, DirMovedEvent)):
                dest = Path(os.fsdecode(event.dest_path))
                self.changes.put(Change(self.folder, ChangeKind.MOVED, path, event.is_directory, dest))
            elif isinstance(event, (FileDeletedEvent, DirDeletedEvent)):
                self.changes.put(Change(self.folder, ChangeKind.DELETED, path, event.is_directory))
            elif isinstance(event, FileClosedEvent):
                self.changes.put(Change(self.folder, ChangeKind.CLOSED, path))
            else:
                self.changes.put(Change(self.folder, ChangeKind.TOUCHED, path, event.is_directory))
        except Exception:  # pragma: no cover - last line of defence for the observer thread
            log.exception("watch_handler_failed")


class WatchError(ImageSearchError):
    """The folders cannot be watched; the message says why and what to do."""


def start_observer(folders: Mapping[Folder, WatchedFolder], changes: queue.SimpleQueue[Change], *,
                   poll: bool) -> BaseObserver:
    """Watch each folder; PollingObserver for network filesystems."""
    observer: BaseObserver = PollingObserver(timeout=2.0) if poll else Observer()
    try:
        for name, folder in folders.items():
            observer.schedule(FolderHandler(name, changes), str(folder.path), recursive=folder.recursive)
        observer.start()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise WatchError(
                "the inotify watch limit is reached (ENOSPC). Raise it, e.g. "
                "`sysctl fs.inotify.max_user_watches=524288` (persist it in /etc/sysctl.d/), or run with --poll"
            ) from None
        if exc.errno == errno.EMFILE:
            raise WatchError("too many inotify instances (EMFILE): raise fs.inotify.max_user_instances") from None
        raise WatchError(f"cannot watch the folders: {exc}") from None
    return observer


def observer_problem(observer: BaseObserver, folders: Mapping[Folder, WatchedFolder]) -> str | None:
    """Why the watching is no longer trustworthy, or None when it is."""
    for name, folder in folders.items():
        if not folder.path.is_dir():
            return f"the watched {name.name.lower()} folder {folder.path} is gone"
    if not observer.is_alive():
        return "the watch observer thread died"
    emitters = list(observer.emitters)
    if len(emitters) < len(folders) or not all(e.is_alive() for e in emitters):
        return "a folder's watch emitter died"
    return None


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    due: float
    closed: bool


class ReadinessTracker:
    """Paths waiting until they are complete: size and mtime unchanged for ``settle`` seconds, or a
    close-after-write event followed by a short ``closed_grace`` with no change.

    Entries live in three queues, one per wait length (settle, closed grace, and ``retry_after``: a
    path another service holds, looked at again after a lease), each kept in due order (a refreshed
    entry moves to the end of its queue), so ``pop_ready`` only looks at the fronts and costs nothing
    while files are still arriving. One queue would not do: a closed file noted after a settling one
    is due first and must not wait behind it.
    """

    def __init__(self, settle: float, *, clock: Callable[[], float], closed_grace: float = 0.05) -> None:
        self.settle = settle
        self.closed_grace = min(closed_grace, settle)
        self.clock = clock
        self._settling: dict[Path, _Pending] = {}
        self._closed: dict[Path, _Pending] = {}
        self._retrying: dict[Path, _Pending] = {}
        self._retry_wait: float | None = None  # one length for the whole queue keeps it in due order

    def _queues(self) -> tuple[dict[Path, _Pending], ...]:
        return (self._settling, self._closed, self._retrying)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues())

    def __contains__(self, path: Path) -> bool:
        return any(path in q for q in self._queues())

    def _drop(self, path: Path) -> None:
        for queue_ in self._queues():
            queue_.pop(path, None)

    def note(self, path: Path, *, closed: bool = False, retry_after: float | None = None) -> None:
        """A path was created, written or closed: (re)start its wait. ``retry_after``: look at it again
        only after that many seconds (always the same length, e.g. the fleet's lease)."""
        self._drop(path)
        try:
            st = path.stat()
        except OSError:
            return
        if retry_after is not None:
            if self._retry_wait not in (None, retry_after):
                raise ValueError("one retry length per tracker: the retry queue must stay in due order")
            self._retry_wait = retry_after
            wait, target = retry_after, self._retrying
        else:
            wait = self.closed_grace if closed else self.settle
            target = self._closed if closed else self._settling
        target[path] = _Pending(st.st_size, st.st_mtime_ns, self.clock() + wait, closed)

    def forget(self, path: Path) -> None:
        self._drop(path)

    def retry_now(self) -> None:
        """The paths waiting on another service's claim are due at once: a member has gone, and what it
        held is free now rather than a lease later. All become due at the same moment, so the retry
        queue stays in due order."""
        now = self.clock()
        for entry in self._retrying.values():
            entry.due = min(entry.due, now)

    def forget_under(self, folder: Path) -> None:
        for queue_ in self._queues():
            for path in [p for p in queue_ if p.is_relative_to(folder)]:
                del queue_[path]

    def _front(self) -> tuple[Path, _Pending] | None:
        """The entry due first: the earlier of the two queue fronts."""
        fronts = [next(iter(q.items())) for q in (self._closed, self._settling, self._retrying) if q]
        return min(fronts, key=lambda item: item[1].due) if fronts else None

    def next_due(self) -> float | None:
        front = self._front()
        return front[1].due if front else None

    def pop_ready(self, limit: int) -> list[Path]:
        """Up to ``limit`` paths that are complete now; changed ones wait again, vanished ones are dropped."""
        now = self.clock()
        ready: list[Path] = []
        while len(ready) < limit:
            front = self._front()
            if front is None or front[1].due > now:
                break
            path, entry = front
            self._drop(path)
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns):
                ready.append(path)
            else:  # still being written: wait a full settle period again
                self._settling[path] = _Pending(st.st_size, st.st_mtime_ns, now + self.settle, False)
        return ready


def still_being_written(path: Path, error: UnusableFile, grace_s: float, *,
                        wall_clock: Callable[[], float] = time.time) -> bool:
    """True for an empty or truncated file modified less than ``grace_s`` ago: a slow writer that is not
    done yet, to wait for again rather than reject. Stability alone is not proof of completeness: a
    writer can pause longer than settle-seconds between chunks, and one that reopens the file for each
    chunk sends a close event after every one."""
    if not error.still_arriving:
        return False
    try:
        age = wall_clock() - path.stat().st_mtime
    except OSError:
        return False
    if age >= grace_s:
        return False
    log.debug("file_incomplete", path=path, reason=error.reason, modified_s_ago=round(age, 3))
    return True
