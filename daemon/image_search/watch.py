"""Watching: the watchdog handler only notices; readiness is decided apart (readiness.py), on an injected clock.

watchdog 7 with inotify, as checked: a file moved in from an unwatched folder yields only a created
event; temp-file-then-rename yields closed on the temp name, then moved to the final name; an
exception in a handler kills the observer thread silently; a deleted watched folder kills its
emitter for good; inotify overflow is dropped silently. Hence: the handler enqueues plain
``Change`` records and never raises, and the service loop checks ``observer_problem`` every pass.

Links: inotify watches a folder given as a symbolic link not at all (watchdog adds IN_DONT_FOLLOW), and
watchdog's polling snapshot follows every link to a folder (``images/sub/up -> ..`` is walked again and
again, a second such link makes it endless). Hence each folder is watched at its real path, its events
carry the path as configured, and the polling observer looks at entries with ``lstat``.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from pathlib import Path

import structlog
from watchdog.events import (
    DirAttribEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
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
from watchdog.observers.polling import PollingEmitter

from .errors import ImageSearchError

log = structlog.get_logger(__name__)


class Folder(IntEnum):
    """Where a change happened."""

    IMAGES = 1  # source-directory, watched recursively
    INBOX = 2  # inbox-directory, its top level only
    WATCHING = 3  # the watching itself (lost events): no path of its own


class ChangeKind(IntEnum):
    TOUCHED = 1  # created or modified: its content may be new, whatever its size and mtime say
    CLOSED = 2  # closed after writing: the writer is probably done
    DELETED = 3
    MOVED = 4  # ``dest`` holds the new path
    LOST = 5  # events were dropped (inbox overflow, failed re-watch): only a rescan can tell what happened
    # permissions, owner, times or link count changed (chmod -R, touch): the content is as it was, unless
    # its size or mtime says otherwise (a write reports TOUCHED and CLOSED besides)
    ATTRIBUTES = 6
    # a file a snapshot (--poll) saw appear, or its size or mtime change: read if its stat differs from its
    # row's (a snapshot cannot see a rewrite that keeps both: no write was seen as such)
    STAT_CHANGED = 7


@dataclass(frozen=True)
class Change:
    """What happened at a path, reduced to what the service acts on."""

    folder: Folder
    kind: ChangeKind
    path: Path
    is_directory: bool = False
    dest: Path | None = None
    detail: str = ""
    # When the watcher saw it (time.monotonic), which may be well before the loop applies it.
    seen_at: float | None = field(default=None, compare=False)

    @property
    def final_path(self) -> Path:
        """Where the file is now: the destination of a move, else the path itself."""
        return self.dest if self.kind is ChangeKind.MOVED and self.dest is not None else self.path


@dataclass(frozen=True)
class WatchedFolder:
    path: Path
    recursive: bool
    # (st_dev, st_ino) when the watch began: a disk mounted over the folder (or unmounted from it) makes
    # another folder of the same path, whose events the watch never sees. None: not checked.
    identity: tuple[int, int] | None = None


def folder_identity(path: Path) -> tuple[int, int] | None:
    """Which folder ``path`` is now: its (st_dev, st_ino); None when it cannot be looked at."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
    """Turns watchdog events into ``Change`` records on a queue; never raises (that would kill the observer).
    ``configured`` and ``real``: the folder as the config names it and where it really is (the same
    unless it is reached through a link): events name the real path, the service knows the configured one."""

    def __init__(self, folder: Folder, changes: queue.SimpleQueue[Change], *, configured: Path | None = None,
                 real: Path | None = None, snapshots: bool = False) -> None:
        self.folder = folder
        self.changes = changes
        self.configured = configured
        self.real = real
        self.snapshots = snapshots  # events come from comparing snapshots (--poll), not from the kernel

    def _as_configured(self, raw: bytes | str) -> Path:
        path = Path(os.fsdecode(raw))
        if self.configured is None or self.real is None or self.real == self.configured:
            return path
        return self.configured / path.relative_to(self.real) if path.is_relative_to(self.real) else path

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)):
                return  # reads, including our own, change nothing
            if isinstance(event, DirModifiedEvent):
                # Sent for the parent of every file created, deleted or moved: the file's own event
                # carries the news. Acting on it would rescan (and restart the wait of) a whole
                # folder once per file copied into it.
                return
            if event.is_synthetic and isinstance(event, (FileMovedEvent, DirMovedEvent)):
                # watchdog's walk of a folder just moved, one event per entry in it: the folder's own move
                # says it all (the folder sync moves every row under it). Passed on, each file's old path
                # was unknown by then, and every picture of a renamed folder was decoded again.
                return
            path = self._as_configured(event.src_path)
            seen = time.monotonic()
            if isinstance(event, (FileMovedEvent, DirMovedEvent)):
                dest = self._as_configured(event.dest_path)
                self.changes.put(Change(self.folder, ChangeKind.MOVED, path, event.is_directory, dest, seen_at=seen))
            elif isinstance(event, (FileDeletedEvent, DirDeletedEvent)):
                self.changes.put(Change(self.folder, ChangeKind.DELETED, path, event.is_directory, seen_at=seen))
            elif isinstance(event, FileClosedEvent):
                self.changes.put(Change(self.folder, ChangeKind.CLOSED, path, seen_at=seen))
            elif isinstance(event, (FileAttribEvent, DirAttribEvent)):
                self.changes.put(Change(self.folder, ChangeKind.ATTRIBUTES, path, event.is_directory, seen_at=seen))
            elif self.snapshots and not event.is_directory:
                self.changes.put(Change(self.folder, ChangeKind.STAT_CHANGED, path, seen_at=seen))
            else:
                self.changes.put(Change(self.folder, ChangeKind.TOUCHED, path, event.is_directory, seen_at=seen))
        except Exception:  # pragma: no cover - last line of defence for the observer thread
            log.exception("watch_handler_failed")


class WatchError(ImageSearchError):
    """The folders cannot be watched; the message says why and what to do."""


# --poll: a folder is polled every POLL_INTERVAL_S, or POLL_PACE times as long as its last poll took, whichever
# is longer. A poll lstats every entry under the folder and compares the whole snapshot with the last one:
# over 40,000 files, 0.55-0.73 s of CPU here. At a fixed 2 s that was a quarter of a core (and on a share, 40,000
# requests to its server every 2 s); paced, under a tenth, and a new picture is seen within ~7 s instead of
# ~3. The inbox's polls are tiny: its queries keep the 2 s.
POLL_INTERVAL_S = 2.0
POLL_PACE = 10.0


class PacedPollingEmitter(PollingEmitter):
    """watchdog's polling emitter, waiting ``POLL_PACE`` times as long as its last poll (snapshot and
    comparison) took when that is longer than its interval."""

    last_poll_s = 0.0

    def queue_events(self, timeout: float) -> None:
        if self.stopped_event.wait(max(timeout, POLL_PACE * self.last_poll_s)):
            return
        started = time.monotonic()
        super().queue_events(0)  # waited above: the poll itself
        self.last_poll_s = time.monotonic() - started


def _polling_observer() -> BaseObserver:
    """Snapshots that, like inotify, never follow a link (``os.lstat``)."""
    return BaseObserver(partial(PacedPollingEmitter, stat=os.lstat, listdir=os.scandir), timeout=POLL_INTERVAL_S)


# The message of the inotify watch limit, and its fix.
WATCH_LIMIT_FIX = ("raise it, e.g. `sysctl fs.inotify.max_user_watches=524288` (persist it in /etc/sysctl.d/), "
                   "or run with --poll")


def _saying_the_watch_limit(add_watch):
    """watchdog's ``InotifyFD._get_or_create_watch``, saying once per inotify instance that the watch limit is
    reached. watchdog swallows that error for every folder but the top one: a new folder past the limit
    went unwatched without a word, and the pictures copied into it were never indexed until a restart.
    (Not ``add_callback``, its caller: a frame more there moves the warning it gives to another module.)"""
    def add_watch_saying_the_limit(self, path, *args, **kwargs):
        try:
            return add_watch(self, path, *args, **kwargs)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not getattr(self, "_watch_limit_said", False):
                self._watch_limit_said = True
                log.error("watch_limit_reached", path=os.fsdecode(path),
                          reason="the inotify watch limit is reached (ENOSPC): this folder and the folders made "
                                 "after it are not watched, and what comes into them is found by a rescan only",
                          action=WATCH_LIMIT_FIX)
            raise
    add_watch_saying_the_limit.says_the_limit = True
    return add_watch_saying_the_limit


def _say_the_watch_limit() -> None:
    from watchdog.observers import inotify_c

    if not getattr(inotify_c.InotifyFD._get_or_create_watch, "says_the_limit", False):
        inotify_c.InotifyFD._get_or_create_watch = _saying_the_watch_limit(inotify_c.InotifyFD._get_or_create_watch)


def start_observer(folders: Mapping[Folder, WatchedFolder], changes: queue.SimpleQueue[Change], *,
                   poll: bool) -> BaseObserver:
    """Watch each folder at its real path (the module's docstring says why); with ``poll``, by snapshots
    (network filesystems: ``PacedPollingEmitter``) that, like inotify, never follow a link."""
    observer: BaseObserver = _polling_observer() if poll else Observer()
    if not poll:
        _say_the_watch_limit()
    # A folder moved into one made just before (``mkdir new; mv 2023/ new/``) is watched twice, through the
    # move and through the new folder's walk, and watchdog warns that its callback replaces itself; nothing
    # is lost. Left in, each such move wrote a python_warning line of ~400 characters to the journal.
    # Here rather than at import: a test's warning capture would drop a filter added while it ran.
    warnings.filterwarnings("ignore", message=r"Callback with id .* already exists for watch", category=RuntimeWarning,
                            module=r"watchdog\.")
    try:
        for name, folder in folders.items():
            real = Path(os.path.realpath(folder.path))
            observer.schedule(FolderHandler(name, changes, configured=folder.path, real=real, snapshots=poll),
                              str(real), recursive=folder.recursive)
        observer.start()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise WatchError(f"the inotify watch limit is reached (ENOSPC): {WATCH_LIMIT_FIX}") from None
        if exc.errno == errno.EMFILE:
            raise WatchError("too many inotify instances (EMFILE): raise fs.inotify.max_user_instances") from None
        raise WatchError(f"cannot watch the folders: {exc}") from None
    return observer


# watchdog's emitter thread, caught mid-read by the observer's own stop, logs this at error level and
# returns (watchdog 6's InotifyEmitter.queue_events): nothing is lost, the watching is being ended on
# purpose. Seen once in CI as a second error line after a start-up failure.
_STOPPING_RACE = "InotifyEmitter.queue_events() called when the thread is inactive"


def _not_the_stopping_race(record: logging.LogRecord) -> bool:
    return record.getMessage() != _STOPPING_RACE


def stop_observer(observer: BaseObserver, *, timeout: float = 5.0) -> None:
    """End the watching: stop the observer and wait for its threads, without watchdog's own stop race
    reaching the log as an error."""
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    inotify_log.addFilter(_not_the_stopping_race)
    try:
        observer.stop()
        observer.join(timeout=timeout)
    finally:
        inotify_log.removeFilter(_not_the_stopping_race)


def observer_problem(observer: BaseObserver, folders: Mapping[Folder, WatchedFolder]) -> str | None:
    """Why the watching is no longer trustworthy, or None when it is."""
    for name, folder in folders.items():
        if not folder.path.is_dir():
            return f"the watched {name.name.lower()} folder {folder.path} is gone"
        if folder.identity is not None and folder_identity(folder.path) != folder.identity:
            how = ("the symbolic link it is points elsewhere now" if folder.path.is_symlink()
                   else "a disk mounted over it or unmounted from it, or the folder moved away and made again")
            return (f"the watched {name.name.lower()} folder {folder.path} is another folder now ({how}): its "
                    "watch sees nothing there")
    if not observer.is_alive():
        return "the watch observer thread died"
    emitters = list(observer.emitters)
    if len(emitters) < len(folders) or not all(e.is_alive() for e in emitters):
        return "a folder's watch emitter died"
    watched = {e.watch.path for e in emitters}
    for name, folder in folders.items():
        real = os.path.realpath(folder.path)
        if real not in watched:  # the link was pointed elsewhere: the watch still looks at the old folder
            return f"the watched {name.name.lower()} folder {folder.path} now leads to {real}"
    return None
