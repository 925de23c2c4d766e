"""Readiness: when a noticed path is complete enough to read, decided apart from the watching and on an
injected clock. The folder sync (``images/``), the inbox and the fleet's claims all wait through it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from .errors import UnusableFile

log = structlog.get_logger(__name__)


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    due: float
    closed: bool
    since: float  # when the path was first noticed; kept while it keeps changing


# A path first noticed this many settle periods ago and still waiting is restless: a file rewritten faster
# than it settles (a webcam's snapshot). Waiting for it must not hold up what waits for the rest to be in
# (``only_restless``).
RESTLESS_AFTER_SETTLES = 10


# How much sooner than a mark another service's read must have begun for the mark to go (``read_elsewhere``):
# the two durations are taken on two clocks a statement apart.
READ_ELSEWHERE_MARGIN_S = 0.05


class ReadinessTracker:
    """Paths waiting until they are complete: size and mtime unchanged for ``settle`` seconds, or a
    close-after-write event followed by a short ``closed_grace`` with no change.

    Entries live in three queues, one per wait length (settle, closed grace, and ``retry_after``: a
    path another service holds, looked at again after a lease), each kept in due order (a refreshed
    entry moves to the end of its queue), so ``pop_ready`` only looks at the fronts and costs nothing
    while files are still arriving. One queue would not do: a closed file noted after a settling one
    is due first and must not wait behind it.

    A path noted ``reread`` (the watcher saw it written) keeps that mark, whatever notes follow, until
    whoever reads it takes the mark (``take_reread``) or the path is forgotten: a picture rewritten with
    its size and mtime kept (``exiftool -P``) looks unchanged to a stat, and must be read all the same.
    """

    def __init__(self, settle: float, *, clock: Callable[[], float], closed_grace: float = 0.05) -> None:
        self.settle = settle
        self.closed_grace = min(closed_grace, settle)
        self.clock = clock
        self._settling: dict[Path, _Pending] = {}
        self._closed: dict[Path, _Pending] = {}
        self._retrying: dict[Path, _Pending] = {}
        self._retry_wait: float | None = None  # one length for the whole queue keeps it in due order
        # Seen written since they were last taken (read whatever their stat), each with when it was last seen.
        self._reread: dict[Path, float] = {}
        self._by_stat: dict[tuple[int, int], set[Path]] = {}  # (size, mtime_ns) as noted -> paths (``waiting_as``)
        self._newest = float("-inf")  # when the last path that was not waiting already was noticed

    def _queues(self) -> tuple[dict[Path, _Pending], ...]:
        return (self._settling, self._closed, self._retrying)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues())

    def __contains__(self, path: Path) -> bool:
        return any(path in q for q in self._queues())

    def _put(self, target: dict[Path, _Pending], path: Path, entry: _Pending) -> None:
        target[path] = entry
        self._by_stat.setdefault((entry.size, entry.mtime_ns), set()).add(path)

    def _drop(self, path: Path) -> None:
        for queue_ in self._queues():
            entry = queue_.pop(path, None)
            if entry is not None:
                key = (entry.size, entry.mtime_ns)
                self._by_stat[key].discard(path)
                if not self._by_stat[key]:
                    del self._by_stat[key]

    def waiting_as(self, size: int, mtime_ns: int) -> list[Path]:
        """The waiting paths whose size and mtime, when last noted, were these: where a file that was
        renamed (which keeps both) may have been noticed before its old name was seen to go."""
        return sorted(self._by_stat.get((size, mtime_ns), ()))

    def note(self, path: Path, *, closed: bool = False, reread: bool = False, written_at: float | None = None,
             retry_after: float | None = None) -> None:
        """A path was created, written or closed: (re)start its wait. ``reread``: it was seen written, to be
        read whatever its stat says (``take_reread``), when the watcher saw it (``written_at``, on this
        tracker's clock; now if not given). ``retry_after``: look at it again only after that many seconds
        (always the same length, e.g. the fleet's lease)."""
        since = self._first_noticed(path)
        self._drop(path)
        if reread:  # kept for a path gone already (renamed on): the rename asks whether its row still holds
            # The watcher's moment, not the loop's: a loop busy for a second (a bulk load beginning, a query)
            # stamped its marks after another member began reading, and read those files again.
            at = self.clock() if written_at is None else min(written_at, self.clock())
            self._reread[path] = max(at, self._reread.get(path, at))
        st = _look(path)
        if st is None:
            return
        if retry_after is not None:
            if self._retry_wait not in (None, retry_after):
                raise ValueError("one retry length per tracker: the retry queue must stay in due order")
            self._retry_wait = retry_after
            wait, target = retry_after, self._retrying
        else:
            wait = self.closed_grace if closed else self.settle
            target = self._closed if closed else self._settling
        self._put(target, path, _Pending(st.st_size, st.st_mtime_ns, self.clock() + wait, closed, since))

    def _first_noticed(self, path: Path) -> float:
        for queue_ in self._queues():
            if path in queue_:
                return queue_[path].since
        self._newest = self.clock()
        return self._newest

    def only_restless(self) -> bool:
        """True when nothing waits, or everything waiting was first noticed more than
        ``RESTLESS_AFTER_SETTLES`` settle periods ago and has not been ready since: what is due has all been
        taken, and what is left may never settle. A path another service holds is not restless: it is
        waited for (its row comes from the other service, within a lease)."""
        return not self or (not self._retrying
                            and self.clock() - self._newest >= RESTLESS_AFTER_SETTLES * self.settle)

    def forget(self, path: Path) -> None:
        self._drop(path)
        self._reread.pop(path, None)

    def seen_written(self, path: Path) -> bool:
        """``path`` was noted ``reread`` and its mark not taken yet."""
        return path in self._reread

    def forget_marks_of_gone(self) -> None:
        """The marks of paths that hold nothing any more and wait for nothing (a write whose rename or
        deletion was never applied: its event was lost, or the database was away): a later file of that
        name has not been seen written."""
        self._reread = {p: at for p, at in self._reread.items() if p in self or os.path.lexists(p)}

    def take_reread(self, paths: Iterable[Path]) -> frozenset[Path]:
        """The ``paths`` seen written since they were last taken (to be read whatever their stat says); their
        marks go: a write after this one marks them again."""
        return frozenset(p for p in paths if self._reread.pop(p, None) is not None)

    def read_elsewhere(self, path: Path, ago: float) -> None:
        """Another service began reading ``path`` ``ago`` seconds ago: a mark set before then goes, for that
        read saw the write it marks. Taken for it, the row that service wrote would be read a second time
        (in a burst, a member a batch behind read again most of what the others had read)."""
        marked = self._reread.get(path)
        if marked is not None and self.clock() - marked > ago + READ_ELSEWHERE_MARGIN_S:
            del self._reread[path]

    def retry_now(self) -> None:
        """The paths waiting on another service's claim are due at once: a member has gone, and what it
        held is free now rather than a lease later. All become due at the same moment, so the retry
        queue stays in due order."""
        now = self.clock()
        for entry in self._retrying.values():
            entry.due = min(entry.due, now)

    def forget_under(self, folder: Path) -> None:
        for path in [p for queue_ in self._queues() for p in queue_ if p.is_relative_to(folder)]:
            self._drop(path)
        self._reread = {p: at for p, at in self._reread.items() if not p.is_relative_to(folder)}

    def _front(self) -> tuple[Path, _Pending] | None:
        """The entry due first: the earliest of the three queue fronts."""
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
            st = _look(path)
            if st is None:
                self._reread.pop(path, None)
                continue
            if (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns):
                ready.append(path)
            else:  # still being written: wait a full settle period again
                self._put(self._settling, path, _Pending(st.st_size, st.st_mtime_ns, now + self.settle, False, entry.since))
        return ready


def _look(path: Path) -> os.stat_result | None:
    """What ``path`` leads to, by stat; for a link that leads nowhere (its target missing, a loop of
    links), the link itself: it is there, and whoever takes it says what is wrong with it (dropping it
    here would leave it unexplained). None when nothing is there."""
    try:
        return path.stat()
    except OSError:
        try:
            return path.lstat()
        except OSError:
            return None


# How far ahead of the clock a file's mtime may be and still be a writer's now (a coarse file system clock, a
# writer on another host of a share).
FUTURE_MTIME_SLACK_S = 5.0


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
    # A time well ahead of now is no writer's (one writing stamps the file now): a card's local time read
    # as UTC, kept by cp -p or rsync -t east of Greenwich. Waited for, such a file was read again at every
    # settle period for hours, and a start-up backlog holding it was never caught up.
    if age >= grace_s or age < -FUTURE_MTIME_SLACK_S:
        return False
    log.debug("file_incomplete", path=path, reason=error.reason, modified_s_ago=round(age, 3))
    return True
