"""Preprocessing in worker processes: decode, orient, fit, encode, hash (and, for the indexer, save the
processed copies) on every core.

Why processes: Pillow releases the GIL in much of its C work, but not all of it, and the Python around
it holds it; decode threads contend (issue 8: ``preprocess_image`` tops out near 80 images/s on 16
threads). Processes share nothing, so they scale with cores.

Why not a ``multiprocessing`` context: both 'spawn' and 'forkserver' re-import the parent's ``__main__``
in every worker, whatever it is: the console script (``image_search.cli``, which pulls in psycopg2, the
store and the service's modules; torch only once a model is loaded, but a test runner's or a benchmark's
``__main__`` may import it at the top), for a process that only needs Pillow and numpy. When that
``__main__`` did import torch it was measured here at 3 s to start each worker and about 600 MB more
resident memory. A worker here is forked from a template (launcher.py): a bare interpreter started with
the parent's ``sys.path`` that imported this module once (preprocess, discover, numpy, Pillow: never
torch, never the parent's ``__main__``). It talks to the parent over one ``multiprocessing`` connection
(a socket pair carrying pickles; the JPEG bytes and the pixel array travel as flat buffers, a copy or two
of at most a few MB per file).

Each worker holds at most ``_TASKS_PER_WORKER`` files at a time and does them in order, so when one
dies (segfault in a codec, ``os._exit``, the kernel's OOM killer) the file it died on is known
exactly: that file, and only that one, comes back as ``PreprocessError(path, "decoder crashed (...)")``,
its queued successor is handed to another worker and a fresh worker takes the dead one's place.

A file that holds its worker past ``SLOW_FILE_S`` (a panorama, a slow share) holds back nothing else
it need not: the file sent to that worker behind it is sent to an idle worker too (the first outcome
counts; the slow worker still does its copy later, one file of work at most), and the service sets the
slow file aside (``set_aside_slow``), so that its batch, and the pictures dropped after it, go on.
While every worker is on a slow file and files wait, the pool starts one more worker for each that waits
on its read rather than computing (up to twice its size), and lets the extra ones go once they are idle
and no worker is slow.

What a worker's code logs (metadata.py's lines about a picture's EXIF, a Python warning from a decoder)
is sent to the parent beside the file's outcome, at most ``_LOG_LINES_PER_FILE`` lines a file (then how
many more there were), and logged there with the file's path, at its level. A worker is started with the
parent's configured level and builds no line below it. Its stdout goes nowhere; its stderr is the
parent's, for real tracebacks only.

Workers ignore SIGINT and SIGTERM: a terminal's Ctrl-C and systemd's stop signal reach every process of
the group; whether a batch is finished or dropped is the parent's decision. A worker exits when the
parent says so (``close()``) or when its connection closes, which includes the parent dying, so no
worker outlives its parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing.connection import Connection, Pipe, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path, PurePath
from typing import Any, Final

import structlog

from .entries import LinkPolicy
from .errors import WorkersError
from .launcher import LAUNCHER, ForkedProcess, how_it_ended, process_state
from .logs import collect_into, configured_level
from .preprocess import (IncompleteFile, ModelInput, PreparedImage, PreprocessError, preprocess_image,
                         processed_folder_present, processed_path_for, save_processed)
from .wording import counted

# Files handed to one worker before it has answered: two, so the next file is already waiting when a
# worker finishes (no idle gap while the parent's dispatcher thread waits for the GIL), and few, so a
# crash re-queues at most one innocent file.
_TASKS_PER_WORKER = 2
# A worker that dies before it is ready is restarted (a stray signal while it imports); this many such
# deaths in a row mean the environment is broken, and the pool says so instead of blaming files.
_START_ATTEMPTS = 3
# How long close() lets workers finish their current file before killing them (their results are
# discarded anyway, and workers write only through a temporary file and a rename, so a kill is always
# safe: at worst a temporary file is left in the processed folder).
_CLOSE_GRACE_SECONDS = 2.0
# The longest one file may take to be read and decoded before its worker is killed and the file skipped:
# a read that never returns (a network mount whose server is gone) costs that file, not the pool. The
# largest picture allowed (max-image-pixels) decodes in a few seconds here.
FILE_SECONDS_LIMIT = 60.0
# A file read and decoded for longer than this is slow: what waits behind it goes on without it (above).
# A 12 MP camera JPEG takes about 70 ms here, the largest picture allowed a few seconds.
SLOW_FILE_S = 3.0
# After a spare worker (every worker slow, files waiting) could not be started, how long before another try.
SPARE_RETRY_S = 60.0
# A spare is started only while the machine has this much memory available per pixel of max-image-pixels:
# one more worker's largest picture, decoded whole (measured peaks of one worker: up to 8.3 bytes a pixel,
# a uniform RGBA PNG of 144 MP at 1.20 GB; README).
SPARE_BYTES_PER_PIXEL = 9
# How often a caller that waits for the workers' files says it lives (the service's watchdog ping).
HEARTBEAT_EVERY_S = 1.0
# How long to wait for a killed worker to be gone before leaving it to the system (a process stuck in
# the kernel may take its time; the pool must not hang with it).
_KILL_WAIT_SECONDS = 5.0
# Log lines one file may send to the parent: a file whose header makes a line per tag must not flood the
# log, nor the socket; the rest are counted.
_LOG_LINES_PER_FILE = 20
# Each worker is one core: libraries that spawn a thread per core would oversubscribe N workers.
_ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

@dataclass(frozen=True)
class ProcessedFolders:
    """Where the workers save each picture's processed JPEG and thumbnail: the path ``processed_path_for``
    gives a file under ``source`` (the indexer's, so its main thread only checks ``saved_to``)."""

    source: Path
    processed: Path


@dataclass(frozen=True)
class PreprocessSettings:
    """What every worker needs to turn a path into a result (sent once, when the worker starts)."""

    max_size: tuple[int, int]
    max_pixels: int
    model_input: ModelInput | None = None
    links: LinkPolicy | None = None  # which symbolic links may be followed to a file (None: any)
    processed: ProcessedFolders | None = None  # where to save the processed copies (None: nowhere)


Outcome = PreparedImage | PreprocessError

log = structlog.get_logger(__name__)


class PoolError(WorkersError):
    """The pool cannot deliver: closed, or its workers cannot start (an environment problem, not a file's)."""


def preprocess_file(path: Path, settings: PreprocessSettings) -> PreparedImage:
    """One worker job, also usable in-process: ``preprocess_image`` with the model's input, without the
    PIL image (picklable: plain bytes, numbers and the pixel array); its processed copy saved when the
    settings say where (``saved_to``; the JPEG and thumbnail bytes are then left out, empty: they are
    in the files).

    Raises PreprocessError exactly as ``preprocess_image`` does.
    """
    path = Path(path)
    prepared = preprocess_image(path, max_size=settings.max_size, max_pixels=settings.max_pixels,
                                links=settings.links, model_input=settings.model_input).without_image()
    if settings.processed is None:
        return prepared
    saved_to = _saved(prepared, path, settings.processed)
    if saved_to is None:  # not written: the indexer writes it itself, from these bytes
        return prepared
    # Written: the bytes are in the files now, and nobody reads them from here; sending them back to the
    # parent would only cost a pickle, a socket copy and an unpickle per file.
    return replace(prepared, saved_to=saved_to, jpeg_bytes=b"", thumbnail_jpeg=b"")


def _saved(prepared: PreparedImage, path: Path, folders: ProcessedFolders) -> Path | None:
    """Save the processed copy of ``path`` where the indexer records it; where, or None when it could not be
    written. Why None rather than an error: the indexer then writes it itself, and a full or read-only disk
    ends as it always has, as ``OutputUnwritable`` naming the processed folder (a file is not to blame).
    Nothing is written while the processed folder is not the one the copies were made in (an unmounted disk:
    ``processed_folder_present``): the indexer's own write names that outage."""
    if not processed_folder_present(folders.processed):
        return None
    try:
        processed = processed_path_for(path, folders.source, folders.processed)
        save_processed(prepared, processed)
    except (OSError, ValueError):  # ValueError: not under the source folder, which the indexer refuses
        return None
    return processed


def _outcome_here(path: Path, settings: PreprocessSettings) -> Outcome:
    """``preprocess_file`` in this process (the pool's ``workers=0``), its error as a worker reports it."""
    try:
        return preprocess_file(path, settings)
    except PreprocessError as exc:
        return exc
    except Exception as exc:  # same wording as a worker's
        return PreprocessError(path, f"unexpected decoder error ({type(exc).__name__}: {exc})")


def available_memory() -> int:
    """The bytes this machine can still give (MemAvailable); 0 where it cannot say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def default_worker_count() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------
# Messages between the parent and a worker. Only these small records, paths, and PreparedImage cross.


@dataclass(frozen=True)
class _Ready:
    pid: int


@dataclass(frozen=True)
class _StartFailed:
    error: str


@dataclass(frozen=True)
class _Rejected:
    """A PreprocessError's reason and kind (the exception itself does not unpickle: its args are one
    message); ``incomplete`` keeps an ``IncompleteFile`` one, which the service waits for instead of failing."""

    reason: str
    incomplete: bool = False

    def error(self, path: Path) -> PreprocessError:
        return (IncompleteFile if self.incomplete else PreprocessError)(path, self.reason)


# Levels as structlog names them, least severe first.
_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class _Logged:
    """What a worker's code logged while it did ``path`` (None: while it started, before any file):
    ``lines`` of (level, fields with ``event``), and how many more it ``dropped`` past
    ``_LOG_LINES_PER_FILE`` (the most severe of them at ``dropped_level``)."""

    path: Path | None
    lines: tuple[tuple[str, dict[str, Any]], ...]
    dropped: int = 0
    dropped_level: str = "debug"

    def log_here(self) -> None:
        """Log the lines in this (the parent) process, as its own, each naming the file."""
        for level, fields in self.lines:
            fields = dict(fields)
            event = str(fields.pop("event", "worker_log"))
            if fields.get("path") is None and self.path is not None:
                fields["path"] = self.path
            try:
                getattr(log, level if level in _LEVELS else "warning")(event, **fields)
            except Exception:  # a line that cannot be logged (a field named like a parameter) never costs the pool
                log.warning("worker_log_unreadable", path=self.path, event_name=event)
        if self.dropped:
            getattr(log, self.dropped_level)(
                "worker_log_lines_dropped", path=self.path, dropped=self.dropped,
                reason=f"the worker logged more than {_LOG_LINES_PER_FILE} lines for this file; the first are above")


class _FileLog:
    """In a worker: the lines logged for the file in hand, at most ``_LOG_LINES_PER_FILE`` kept."""

    def __init__(self) -> None:
        self._lines: list[tuple[str, dict[str, Any]]] = []
        self._dropped = 0
        self._dropped_level = 0

    def keep(self, level: str, fields: dict[str, Any]) -> None:
        if len(self._lines) < _LOG_LINES_PER_FILE:
            self._lines.append((level, {key: _portable(value) for key, value in fields.items()}))
        else:
            self._dropped += 1
            self._dropped_level = max(self._dropped_level, _LEVELS.index(level) if level in _LEVELS else 2)

    def take(self, path: Path | None) -> _Logged | None:
        """The lines kept since the last take, for ``path`` (None: the worker's start); None when there were none."""
        if not self._lines and not self._dropped:
            return None
        logged = _Logged(path, tuple(self._lines), self._dropped, _LEVELS[self._dropped_level])
        self._lines, self._dropped, self._dropped_level = [], 0, 0  # the next file starts with none
        return logged


def _portable(value: object) -> object:
    """A field's value as it can cross to the parent: plain values and paths as they are, lists of them
    too, anything else as its repr (an object the parent could not unpickle must not cost the file)."""
    plain = (str, int, float, bool, type(None), PurePath)
    if isinstance(value, plain):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(item, plain) for item in value):
        return list(value)
    return repr(value)


def _send_start_lines(conn: Connection, file_log: _FileLog) -> None:
    if (logged := file_log.take(None)) is not None:
        conn.send(logged)


def _worker_main(fd: int, *, log_level: int) -> None:
    """A worker's whole life: settings, then one path at a time until told to stop or the parent is gone.

    Forked by the template (launcher.py), which ignores SIGINT and SIGTERM from its start. What its code
    logs at ``log_level`` or above goes to the parent with each file's outcome (``_Logged``).
    """
    file_log = _FileLog()
    collect_into(log_level, file_log.keep)
    conn = Connection(fd)
    try:
        try:
            settings = conn.recv()
            if not isinstance(settings, PreprocessSettings):
                raise TypeError(f"expected PreprocessSettings, got {type(settings).__name__}")
        except (EOFError, OSError):
            raise
        except Exception as exc:  # e.g. a model_input this interpreter cannot import: say so, then leave
            _send_start_lines(conn, file_log)
            conn.send(_StartFailed(f"{type(exc).__name__}: {exc}"))
            return
        # What reading the settings logged (a module their model input imports, warning as it loads) is the
        # start's, not the first file's.
        _send_start_lines(conn, file_log)
        conn.send(_Ready(os.getpid()))
    except (EOFError, OSError):  # closed while this worker was still starting
        return
    while True:
        try:
            path = conn.recv()
        except (EOFError, OSError):  # the parent closed the pool or died
            return
        if path is None:
            return
        own = settings
        if isinstance(path, tuple):  # a batch with a link rule of its own (a query's picture)
            path, links = path
            own = replace(settings, links=links)
        outcome: PreparedImage | _Rejected
        try:
            outcome = preprocess_file(path, own)
        except PreprocessError as exc:
            outcome = _Rejected(exc.reason, incomplete=isinstance(exc, IncompleteFile))
        except Exception as exc:  # a decoder bug on one odd file costs that file (as in the thread path)
            outcome = _Rejected(f"unexpected decoder error ({type(exc).__name__}: {exc})")
        try:
            if (logged := file_log.take(path)) is not None:  # before the outcome: the parent logs it first
                conn.send(logged)
            conn.send(outcome)
        except OSError:  # the parent is gone: nobody wants the result
            return


# ---------------------------------------------------------------------------------------------------
# The parent's side.


# A batch read with the pool's link rule (``PreprocessSettings.links``), not one of its own.
POOL_LINKS: Final = object()


class BatchHandle:
    """One submitted batch: its outcomes, in the order of its paths, once every file is done."""

    def __init__(self, paths: Sequence[Path], links: LinkPolicy | None | object = POOL_LINKS) -> None:
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        self.links = links  # the rule its files are read by: the pool's (``POOL_LINKS``), or its own
        self._outcomes: list[Outcome | None] = [None] * len(self.paths)
        self._remaining = len(self.paths)
        self._error: PoolError | None = None
        self._finished = threading.Event()
        if not self.paths:
            self._finished.set()

    def done(self) -> bool:
        """True when every outcome is in (or the pool failed): ``results()`` will not block."""
        return self._finished.is_set()

    def wait(self, timeout: float) -> bool:
        """``done()``, waiting up to ``timeout`` seconds for it."""
        return self._finished.wait(timeout)

    def results(self, timeout: float | None = None) -> list[Outcome]:
        """Block until the batch is done; one PreparedImage or PreprocessError per path, in input order.

        Raises PoolError if the pool was closed before the batch finished or its workers cannot start,
        and TimeoutError if ``timeout`` seconds pass first.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"batch of {counted(len(self.paths), 'file')} not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return list(self._outcomes)  # type: ignore[arg-type]  # all filled once finished without error

    # Called by the pool, under its lock.
    def _delivered(self, index: int) -> bool:
        """Its outcome is in: a copy of the file sent to another worker answered first (or the batch failed)."""
        return self._finished.is_set() or self._outcomes[index] is not None

    def _deliver(self, index: int, outcome: Outcome) -> bool:
        self._outcomes[index] = outcome
        self._remaining -= 1
        if self._remaining == 0:
            self._finished.set()
            return True
        return False

    def _fail(self, error: PoolError) -> None:
        if not self._finished.is_set():
            self._error = error
            self._finished.set()

    def _keep_only(self, kept: Sequence[int]) -> None:
        """Its files cut down to ``kept`` (indices, in order): the rest went to a batch of their own."""
        self.paths = tuple(self.paths[i] for i in kept)
        self._outcomes = [self._outcomes[i] for i in kept]
        self._remaining = sum(outcome is None for outcome in self._outcomes)
        if self._remaining == 0:
            self._finished.set()


@dataclass(frozen=True)
class _Task:
    handle: BatchHandle
    index: int

    @property
    def path(self) -> Path:
        return self.handle.paths[self.index]


@dataclass(eq=False)
class _Worker:
    """One worker process, as its parent sees it: the files sent to it, in the order it does them."""

    process: ForkedProcess
    conn: Connection
    ready: bool = False
    tasks: deque[_Task] = field(default_factory=deque)  # sent, not answered; the worker does them in order
    busy_since: float | None = None  # when it started on its first unanswered file
    overdue: bool = False  # killed for taking longer than the limit on one file
    lent: bool = False  # the files behind its current one were sent to another worker too

    @classmethod
    def start(cls, settings_message: bytes, sys_path_json: str, log_level: int) -> _Worker:
        parent_end, child_end = Pipe(duplex=True)
        try:
            process = LAUNCHER.start(child_end.fileno(), sys_path_json=sys_path_json,
                                     env={**os.environ, **_ONE_THREAD_ENV}, log_level=log_level)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()  # only the worker holds it now, so its death reads as EOF here
        # Fits the socket buffer or is read at once by the worker's first recv(): no deadlock while it starts.
        try:
            parent_end.send_bytes(settings_message)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died before reading them: the pool reads that death (EOF) as a failed start, as any other
        return cls(process=process, conn=parent_end)

    def take_from(self, queue: deque[_Task], reading: dict[Path, set[_Task]], *, up_to: int) -> None:
        """Send files from the front of ``queue`` until this worker holds ``up_to``; a file that another
        batch's read of the same path holds (``reading``: every worker's files) waits in the queue."""
        waiting: list[_Task] = []
        while self.ready and queue and len(self.tasks) < up_to:
            task = queue.popleft()
            if task.handle._delivered(task.index):  # its batch failed (pool closing), or another worker answered
                continue
            if task in self.tasks:  # lent by this worker while slow, and it is free again: it does its own
                continue
            if (held := reading.get(task.path)) and (len(held) > 1 or task not in held):
                # Read again (rewritten) while an earlier read of it is under way: after it, so that its
                # processed copy, saved as the read ends, is the newer one.
                waiting.append(task)
                continue
            try:
                self.conn.send(task.path if task.handle.links is POOL_LINKS else (task.path, task.handle.links))
            except OSError:  # it died idle: this file never reached it, so it is not to blame
                queue.appendleft(task)
                break  # its EOF comes through wait(), and a replacement is started there
            if not self.tasks:
                self.busy_since = time.monotonic()
            self.tasks.append(task)
            reading.setdefault(task.path, set()).add(task)
        queue.extendleft(reversed(waiting))

    def answered(self) -> _Task:
        """The file whose outcome just arrived (the first unanswered one)."""
        task = self.tasks.popleft()
        self.busy_since = time.monotonic() if self.tasks else None
        self.lent = False
        return task

    def is_slow(self, now: float) -> bool:
        """It has been on its current file for ``SLOW_FILE_S`` or more (and was not killed for it yet)."""
        return self.busy_since is not None and not self.overdue and now - self.busy_since >= SLOW_FILE_S

    def seconds_until_slow(self, now: float) -> float | None:
        """Seconds before its current file is slow, while files wait behind it (None: none do, or it is)."""
        if self.busy_since is None or self.overdue or self.lent or len(self.tasks) < 2:
            return None
        left = self.busy_since + SLOW_FILE_S - now
        return left if left > 0 else None

    def is_blocked(self, now: float) -> bool:
        """Slow, and waiting rather than computing (its process asleep: a read from a share that answers
        slowly, or not at all), so that another worker would not take its core."""
        return self.is_slow(now) and process_state(self.process.pid) in ("S", "D")

    def may_lend(self, now: float) -> bool:
        """Its current file is slow (or it was killed for it and lingers) and the files behind it were not
        sent to another worker yet."""
        return not self.lent and len(self.tasks) > 1 and (self.overdue or self.is_slow(now))

    def seconds_left(self, now: float) -> float | None:
        """Seconds before its current file passes ``FILE_SECONDS_LIMIT``; it is killed (its EOF then blames
        that file) once it has. None while it is idle or already killed."""
        if self.busy_since is None or self.overdue:
            return None
        left = self.busy_since + FILE_SECONDS_LIMIT - now
        if left <= 0:
            self.overdue = True
            self.process.kill()
            return None
        return left

    def reap(self) -> str:
        """After its connection closed: wait for the process (killing it if it lingers); how it ended."""
        self.conn.close()
        try:
            returncode: int | None = self.process.wait(timeout=_KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:  # EOF without exit: it is of no use any more either way
            returncode = _kill_and_reap(self.process)
        return _exit_description(returncode)

    def blame(self, description: str) -> tuple[_Task, PreprocessError]:
        """The file it died on (it does its files in order: the first unanswered one) and why it failed."""
        culprit = self.tasks.popleft()
        reason = (f"reading and decoding took longer than {FILE_SECONDS_LIMIT:g} s, so it was stopped (a file on "
                  "storage that no longer answers, or one far too slow to decode)"
                  if self.overdue else f"decoder crashed ({description})")
        return culprit, PreprocessError(culprit.path, reason)


def _stop_all(workers: list[_Worker]) -> None:
    """Ask every worker to leave, give them one grace period together, then kill the ones still there."""
    for worker in workers:
        try:
            worker.conn.send(None)
        except OSError:
            pass
        worker.conn.close()  # a worker busy on a file sees its send fail and leaves
    deadline = time.monotonic() + _CLOSE_GRACE_SECONDS
    lingering = []
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            lingering.append(worker.process)
    # Killed together and waited for together: a worker in a read from a share that does not answer cannot
    # die before the read returns, and each waited for in turn held a stop 5 s a worker (27.6 s for four).
    deadline = time.monotonic() + _KILL_WAIT_SECONDS
    for process in lingering:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # left to the system: it dies once its read returns


def _kill_and_reap(process: ForkedProcess) -> int | None:
    """Kill a worker and wait a little for it; its exit status, or None if it is not gone yet."""
    process.kill()
    try:
        return process.wait(timeout=_KILL_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        return None


def _exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "worker process stopped answering"
    return f"worker process {how_it_ended(returncode)}"


class PreprocessPool:
    """``preprocess_image`` (plus an optional ``model_input``) on a pool of worker processes.

    Use as a context manager, or call ``close()``. ``submit(paths)`` returns a BatchHandle at once and
    blocks only while ``max_batches_in_flight`` batches are still being processed, which bounds memory
    for a pipelined caller::

        with PreprocessPool(max_size=(1024, 1024), max_pixels=limit) as pool:
            ahead = pool.submit(first_batch)
            for batch in later_batches:
                current, ahead = ahead, pool.submit(batch)   # the workers decode the next batch...
                use(current.results())                       # ...while this one is embedded and stored
            use(ahead.results())

    ``workers=0`` runs everything in the calling thread inside ``submit`` (for debugging); the default is
    one worker process per available core.
    """

    def __init__(self, *, max_size: tuple[int, int], max_pixels: int, model_input: ModelInput | None = None,
                 links: LinkPolicy | None = None, processed: ProcessedFolders | None = None,
                 workers: int | None = None, max_batches_in_flight: int = 2) -> None:
        if max_batches_in_flight < 1:
            raise ValueError("max_batches_in_flight must be at least 1")
        self.settings = PreprocessSettings(max_size=tuple(max_size), max_pixels=max_pixels,  # type: ignore[arg-type]
                                           model_input=model_input, links=links, processed=processed)
        self.worker_count = default_worker_count() if workers is None else max(0, workers)
        self.max_batches_in_flight = max_batches_in_flight
        self.crashes = 0  # worker processes lost to a file (each cost exactly that file)
        self._failed_starts_in_a_row = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a batch finished, or the pool closed/failed
        self._queue: deque[_Task] = deque()
        self._unfinished: list[BatchHandle] = []
        # Slow files split off a batch (``set_aside_slow``): not counted against max_batches_in_flight (they
        # are the files some workers are on, two a worker at most), failed with the rest at close.
        self._set_aside: list[BatchHandle] = []
        self._workers: list[_Worker] = []
        self._no_spare_before = 0.0  # after a spare worker could not be started
        self._closed = False
        self._error: PoolError | None = None
        self._dispatcher: threading.Thread | None = None
        if self.worker_count == 0:
            return
        # Settings pickled once, here: an unpicklable model_input (a lambda, a local function) fails now, in
        # the caller, before any process exists. The workers import what the parent imports: same sys.path
        # ('' is the parent's cwd, as multiprocessing does).
        self._start_worker = partial(_Worker.start, bytes(ForkingPickler.dumps(self.settings)),
                                     json.dumps([os.getcwd() if entry == "" else entry for entry in sys.path]),
                                     configured_level())
        # The dispatcher sleeps in wait() on the workers' connections; submit() and close() wake it here.
        self._wake_reader, self._wake_writer = os.pipe()
        os.set_blocking(self._wake_writer, False)
        try:
            for _ in range(self.worker_count):
                self._workers.append(self._start_worker())
        except BaseException as exc:
            _stop_all(list(self._workers))
            os.close(self._wake_reader)
            os.close(self._wake_writer)
            if isinstance(exc, OSError):  # no process to be had, or the template died as it started
                raise PoolError(f"preprocessing workers could not start ({exc})") from exc
            raise
        self._dispatcher = threading.Thread(target=self._dispatch_forever, name="preprocess-pool", daemon=True)
        self._dispatcher.start()

    # -- public ---------------------------------------------------------------------------------------

    def submit(self, paths: Sequence[Path], *, links: LinkPolicy | None | object = POOL_LINKS) -> BatchHandle:
        """Queue ``paths`` for preprocessing; return its handle at once. ``links``: the rule they are read
        by, where it is not the pool's (a query's picture: the inbox's, or source-directory's).

        Blocks while ``max_batches_in_flight`` earlier batches are still being processed (never on the
        caller collecting results, so a single-threaded pipeline cannot deadlock itself).
        """
        handle = BatchHandle(paths, links)
        if self.worker_count == 0:
            if self._closed:
                raise PoolError("the preprocessing pool is closed")
            settings = self.settings if links is POOL_LINKS else replace(self.settings, links=links)
            for index, path in enumerate(handle.paths):
                handle._deliver(index, _outcome_here(path, settings))
            return handle
        with self._changed:
            while not self._closed and self._error is None and len(self._unfinished) >= self.max_batches_in_flight:
                self._changed.wait()
            if self._closed:
                raise PoolError("the preprocessing pool is closed")
            if self._error is not None:
                raise self._error
            if handle.done():
                return handle
            self._unfinished.append(handle)
            self._queue.extend(_Task(handle, i) for i in range(len(handle.paths)))
            self._wake_locked()  # under the lock: close() closes the wake pipe under it too
        return handle

    def set_aside_slow(self, handle: BatchHandle, *,
                       keep: Collection[int] = ()) -> tuple[BatchHandle, list[int]] | None:
        """Split ``handle``'s slow files (each one a worker has been on for ``SLOW_FILE_S`` or more), but those
        at the indices ``keep``, into a batch of their own, so that ``handle`` is done once its other files
        are: that batch, and the indices its files had in ``handle``, which now holds the rest, in order.
        None when it has no such file."""
        with self._changed:
            if handle.done() or handle not in self._unfinished:
                return None
            now = time.monotonic()
            slow = sorted({w.tasks[0].index for w in self._workers if w.is_slow(now) and w.tasks[0].handle is handle
                           and w.tasks[0].index not in keep and not handle._delivered(w.tasks[0].index)})
            if not slow:
                return None
            kept = [i for i in range(len(handle.paths)) if i not in slow]
            aside = BatchHandle([handle.paths[i] for i in slow], handle.links)
            moved = {old: _Task(aside, new) for new, old in enumerate(slow)}
            moved.update({old: _Task(handle, new) for new, old in enumerate(kept)})

            def renumbered(tasks: deque[_Task]) -> deque[_Task]:
                return deque(moved[t.index] if t.handle is handle else t for t in tasks)

            self._queue = renumbered(self._queue)
            for worker in self._workers:
                worker.tasks = renumbered(worker.tasks)
            handle._keep_only(kept)
            self._set_aside.append(aside)
            if handle.done():
                self._unfinished.remove(handle)
            self._lend_locked(now)
            self._changed.notify_all()
            self._wake_locked()
        return aside, slow

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has started (imports done, settings read); for a fail-fast start-up
        and for timing. Raises PoolError if they cannot start or the pool is closed, TimeoutError on timeout."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: self._closed or self._error is not None
                or (len(self._workers) >= self.worker_count and all(w.ready for w in self._workers)), timeout
            ):
                raise TimeoutError(f"preprocessing workers not ready after {timeout} s")
            if self._error is not None:
                raise self._error
            if self._closed:
                raise PoolError("the preprocessing pool is closed")

    def worker_pids(self) -> list[int]:
        """The process ids of the current workers (for tests and diagnostics)."""
        with self._lock:
            return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Stop the workers and wait for them; unfinished batches fail with PoolError. Idempotent."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._fail_unfinished_locked(PoolError("the preprocessing pool was closed before this batch finished"))
            if self._dispatcher is None:
                return
            self._wake_locked()
        self._dispatcher.join()
        _stop_all(self._workers)  # the dispatcher is gone: nothing else touches the workers now
        self._workers = []
        with self._lock:
            os.close(self._wake_reader)
            os.close(self._wake_writer)

    def __enter__(self) -> PreprocessPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the dispatcher thread ------------------------------------------------------------------------

    def _wake_locked(self) -> None:
        try:
            os.write(self._wake_writer, b"\0")
        except BlockingIOError:  # already full of wake-ups: the dispatcher will look anyway
            pass

    def _dispatch_forever(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or self._error is not None:
                        return
                    now = time.monotonic()
                    self._lend_locked(now)
                    grow = self._all_slow_while_files_wait_locked(now)
                    retired = self._retire_spares_locked(now)
                    if self._queue:
                        reading: dict[Path, set[_Task]] = {}
                        for worker in self._workers:
                            for task in worker.tasks:
                                reading.setdefault(task.path, set()).add(task)
                        # A file each first, the idle first: no file goes behind another worker's (maybe slow)
                        # file while one is free (filled to two at once, a worker took both of two slow files
                        # while another idled, and the second was read twice once lent). None to a worker
                        # killed for its file that lingers.
                        for up_to in range(1, _TASKS_PER_WORKER + 1):
                            for worker in sorted(self._members_locked(), key=lambda w: len(w.tasks)):
                                worker.take_from(self._queue, reading, up_to=up_to)
                    readable = {w.conn: w for w in self._workers}
                    timeout = min((left for w in self._workers
                                   for left in (w.seconds_left(now), w.seconds_until_slow(now)) if left is not None),
                                  default=None)
                if retired:  # on a thread of its own: the dispatcher goes on while they leave
                    threading.Thread(target=_stop_all, args=(retired,), name="preprocess-retire", daemon=True).start()
                if grow:
                    self._add_spare()
                    continue
                ready = wait([*readable, self._wake_reader], timeout)
                for item in ready:
                    if item == self._wake_reader:
                        os.read(self._wake_reader, 4096)
                    else:
                        self._receive(readable[item])  # type: ignore[index]
        except BaseException as exc:  # a bug here, or no process left to start, must not leave callers blocked
            with self._changed:
                self._break_locked(PoolError(f"the preprocessing pool failed ({type(exc).__name__}: {exc})"))
            raise

    def _receive(self, worker: _Worker) -> None:
        spare_failed = None
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._replace_dead(worker)
            return
        if isinstance(message, _Logged):
            message.log_here()  # outside the lock: writing a line must not hold up submit()
            return
        with self._changed:
            if isinstance(message, _Ready):
                worker.ready = True
                self._failed_starts_in_a_row = 0
                self._changed.notify_all()
            elif isinstance(message, _StartFailed):
                if not self._at_size_without_locked(worker):
                    self._break_locked(PoolError(f"a preprocessing worker could not start: {message.error}"))
                    return
                self._workers.remove(worker)
                spare_failed = message.error
            else:
                task = worker.answered()
                outcome: Outcome = message.error(task.path) if isinstance(message, _Rejected) else message
                self._deliver_locked(task, outcome)
        if spare_failed is not None:
            _stop_all([worker])
            self._spare_lost(spare_failed)

    def _replace_dead(self, worker: _Worker) -> None:
        description = worker.reap()
        with self._changed:
            self._workers.remove(worker)
            # A spare started while every worker was slow takes its place; a spare that died starting leaves
            # the pool at its size, and is no failed start.
            at_size = self._at_size_without_locked(worker)
            if not worker.ready and not at_size:
                # It died before it could take a file: no file is to blame. Once is a stray signal or a
                # transient failure; every time means a broken environment, which the caller must hear of.
                self._failed_starts_in_a_row += 1
                if self._failed_starts_in_a_row >= _START_ATTEMPTS:
                    self._break_locked(PoolError(f"preprocessing workers could not start ({description}, "
                                                 f"{_START_ATTEMPTS} times in a row)"))
                    return
            if worker.tasks:
                self.crashes += 1
                self._deliver_locked(*worker.blame(description))
                self._queue.extendleft(reversed(worker.tasks))  # innocent: first in line for another worker
                worker.tasks.clear()
            stopped = self._closed or self._error is not None
        if not worker.ready and at_size:
            self._spare_lost(description)
        if stopped or at_size:
            return
        replacement = self._start_worker()
        with self._lock:
            self._workers.append(replacement)

    def _members_locked(self) -> list[_Worker]:
        """The pool's workers but those killed for their file that linger (stuck in the kernel): they will
        read nothing more, and count for nothing."""
        return [w for w in self._workers if not w.overdue]

    def _at_size_without_locked(self, worker: _Worker) -> bool:
        """The pool has its size without ``worker``."""
        return sum(1 for w in self._members_locked() if w is not worker) >= self.worker_count

    def _spare_lost(self, reason: str) -> None:
        self._no_spare_before = time.monotonic() + SPARE_RETRY_S
        log.warning("preprocess_worker_not_added", reason=reason,
                    consequence=f"files wait for the slow ones; tried again in {SPARE_RETRY_S:g} s")

    def _all_slow_while_files_wait_locked(self, now: float) -> bool:
        """Every worker is on a slow file (or was killed for one and lingers) while files wait (queued, or
        behind a slow one), and more of them wait on their reads than there are spares already: one more
        worker is wanted. Not for workers that compute (a big decode: a spare would take their cores, and
        four 30 s decodes on two cores each took 60 s and were stopped at the per-file limit), nor while
        one is still starting (it is not slow), nor unless the machine has the memory for one more
        worker's largest picture."""
        members = self._members_locked()
        waiting = bool(self._queue) or any(w.may_lend(now) for w in self._workers)
        if not (waiting and len(members) < 2 * self.worker_count and now >= self._no_spare_before
                and all(w.ready and w.is_slow(now) for w in members)):
            return False
        blocked = sum(w.is_blocked(now) for w in members)
        return (blocked > len(members) - self.worker_count
                and available_memory() >= SPARE_BYTES_PER_PIXEL * self.settings.max_pixels)

    def _add_spare(self) -> None:
        try:
            spare = self._start_worker()  # outside the lock: submit() and the callers' waits go on meanwhile
        except OSError as exc:  # no process to be had (a limit, memory): the pool goes on at its size
            self._spare_lost(f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self._workers.append(spare)
            count = len(self._workers)
            slow = [str(w.tasks[0].path) for w in self._workers if w.tasks and w.is_slow(time.monotonic())]
        log.info("preprocess_worker_added", workers=count, slow_files=slow,
                 reason="every worker is on a slow file, and some wait on their reads, while other files wait",
                 detail="it is let go once no worker is slow")

    def _retire_spares_locked(self, now: float) -> list[_Worker]:
        """The idle workers beyond the pool's size once no more workers are slow than there are spares
        (nothing queued): taken out of the pool, for the caller to stop."""
        if self._queue:
            return []
        members = self._members_locked()
        excess = len(members) - self.worker_count - sum(w.is_slow(now) for w in members)
        retired = [w for w in members if w.ready and not w.tasks][:max(0, excess)]
        for worker in retired:
            self._workers.remove(worker)
        return retired

    def _lend_locked(self, now: float) -> None:
        """While a worker is idle, the files waiting behind a slow one go to it too (at the queue's front)."""
        if not any(w.ready and not w.tasks for w in self._workers):
            return
        for worker in self._workers:
            if worker.may_lend(now):
                worker.lent = True
                self._queue.extendleft(reversed(list(worker.tasks)[1:]))

    def _deliver_locked(self, task: _Task, outcome: Outcome) -> None:
        if task.handle._delivered(task.index):  # failed meanwhile (pool closed), or a copy answered first
            return
        if task.handle._deliver(task.index, outcome):
            (self._unfinished if task.handle in self._unfinished else self._set_aside).remove(task.handle)
            self._changed.notify_all()

    def _break_locked(self, error: PoolError) -> None:
        """The pool cannot go on: fail what is pending and every later submit with ``error``."""
        if self._error is None and not self._closed:
            self._error = error
        self._fail_unfinished_locked(error)

    def _fail_unfinished_locked(self, error: PoolError) -> None:
        for handle in (*self._unfinished, *self._set_aside):
            handle._fail(error)
        self._unfinished.clear()
        self._set_aside.clear()
        self._queue.clear()
        self._changed.notify_all()
