"""Every failure a user or the machine can cause, as one family: ``ImageSearchError`` and its kinds,
each naming the exit code the process ends with (``ExitCode``); and ``describe``, how any exception is
put in one line of a log field or a message.

Kept apart from the modules that raise them, so that naming them never imports torch: the CLI catches
the root before, or without, loading a model. The kinds that live in their own modules (``ConfigError``,
``StoreError``, ``PreprocessError``, ``TextQueryError``, ``PoolError``, ``FontUnavailable``...) derive
from a class here, so this file is the one place where a kind gets its exit code.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import ClassVar

from .wording import counted


class ExitCode(IntEnum):
    """The process's exit status, one per kind of failure (README "Exit codes"). A signal ends it with
    128 + the signal's number instead."""

    OK = 0
    # A query failed, an error nobody foresaw, or "restart me" (a lost watch): systemd's
    # Restart=on-failure starts the service again and it reconciles.
    FAILED = 1
    USAGE = 2  # the command line or the config file is wrong (argparse exits 2 too)
    MODEL = 3  # the model cannot be loaded, or cannot give the configured dimension
    DATABASE = 4  # the database cannot be reached, went away, or serves another model
    WORKERS = 5  # the preprocessing worker processes cannot start
    FONTS = 6  # the contact sheet's fonts cannot be loaded
    OUTPUT = 7  # a result or a processed image cannot be written: disk full, read-only, no permission
    # source-directory is missing, or processed-directory has lost its copies, while the index holds its
    # pictures (a disk or share not mounted yet): systemd's Restart=on-failure tries again until it is there.
    SOURCE_MISSING = 8


def describe(exc: BaseException) -> str:
    """``TypeName: the first line of its message`` (just the type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class ImageSearchError(Exception):
    """Something a user or the machine caused; the message says what happened and, as a rule, the fix.
    The CLI logs it as one line, event ``event`` (with ``action``, the fix, for a kind whose messages
    come from code that cannot know it), and exits with ``exit_code``."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED
    event: ClassVar[str] = "failed"
    action: ClassVar[str | None] = None


class UnusableFile(ImageSearchError):
    """A file given to the program (a picture to index, a query) that cannot be used: ``path`` and the
    specific ``reason``, shown to the user with the path. ``still_arriving``: the kind of problem a
    file that is still being written has (empty, truncated); whether it is still arriving or really
    broken is the caller's decision, by the file's age (``readiness.still_being_written``)."""

    still_arriving: ClassVar[bool] = False

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelError(ImageSearchError):
    """The model cannot do what the config asks of it."""

    exit_code = ExitCode.MODEL
    event = "startup_failed"


class ModelLoadError(ModelError):
    """The model cannot be loaded; the message says which model and what to do."""


class DimensionError(ModelError):
    """The configured ``dimension`` is one the model cannot produce."""


class NoTextTower(ModelError):
    """The loaded model cannot embed text (no text tower, or no tokenizer): text queries are impossible."""


class DatabaseFailure(ImageSearchError):
    """The database cannot be reached or used (``store.StoreError`` and its kinds derive from it)."""

    exit_code = ExitCode.DATABASE
    event = "startup_failed"


class WorkersError(ImageSearchError):
    """The preprocessing worker processes cannot start or deliver (``workers.PoolError`` derives from it)."""

    exit_code = ExitCode.WORKERS
    action = ("the workers are this same Python with the same packages: check that the installation is "
              "complete (uv sync) and that the machine can start more processes (memory, ulimit -u)")


class OutputUnwritable(ImageSearchError):
    """A folder the program writes into (results, processed images) refuses the write: the disk is
    full, it is read-only, or the service's user may not write there. Not the file's fault nor the
    query's: the message names the folder and the fix."""

    exit_code = ExitCode.OUTPUT


def _not_a_folder_now(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "is a link to nothing"
    return "is not a folder (a file holds its name)" if os.path.lexists(path) else "does not exist"


class SourceFolderMissing(ImageSearchError):
    """``source-directory`` is not there, but the index holds pictures from it: a disk or share that is
    not mounted (yet), or a folder moved away. Not a deletion of every picture: nothing is removed, and
    the run ends (the service is restarted until the folder is back)."""

    exit_code = ExitCode.SOURCE_MISSING
    event = "source_missing"

    def __init__(self, folder: Path, rows: int) -> None:
        super().__init__(
            f"source-directory {folder} {_not_a_folder_now(folder)}, but the index holds {counted(rows, 'path')} under it: "
            "not starting, "
            "so that a disk or share that is not mounted (yet) costs no row and no processed copy. Mount it or "
            "put the folder back; if it is gone for good, create it empty and empty the index (README "
            "\"A source folder that is missing or empty\")")
        self.folder = folder
        self.rows = rows


class ProcessedFolderMissing(ImageSearchError):
    """``processed-directory`` holds neither the record of its source folder nor any copy, but copies were
    made there (the index holds their pictures, or this installation's record of its claims names the
    folder): a disk or share that is not mounted (yet), or a folder emptied or moved. Not a reason to make
    every copy again, onto the disk under the mount point: nothing is written or made, and the run ends (the
    service is restarted until the folder is back), as for ``SourceFolderMissing``."""

    exit_code = ExitCode.SOURCE_MISSING
    event = "processed_missing"

    def __init__(self, folder: Path, marker: Path, *, rows: int | None = None, claims: Path | None = None,
                 state: str | None = None) -> None:
        """``state``: what the folder is now, where not the plain "does not exist" or "is empty"."""
        made = (f"the processed copies of {counted(rows, 'indexed path')} were made there" if rows is not None
                else f"this installation made its processed copies there (recorded in {claims})")
        state = state or (_not_a_folder_now(folder) if not os.path.isdir(folder) else "is empty")
        super().__init__(
            f"processed-directory {folder} {state}, "
            f"but {made}: not starting, so that a disk or share that is not mounted (yet) gets no copy written "
            "onto the disk under it. Mount it or put the folder back; if you emptied or removed it on purpose, "
            f"give it an empty record of its source folder (mkdir -p {folder} && touch {marker}): the copies are "
            "then made again from the source files")
        self.folder = folder
        self.rows = rows


# The errnos that say the disk under a folder takes no write now, whoever's the folder: an outage that
# passes (space is freed, the disk is mounted read-write again), not an entry or a permission to fix.
DISK_OUTAGES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

# The errnos that say "this folder cannot take a write", and the fix for each.
_UNWRITABLE_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, then run again",
    errno.EDQUOT: "the disk quota is used up: free space there or raise the quota, then run again",
    errno.EROFS: "it is on a read-only file system: mount it read-write or configure another folder",
    errno.EACCES: "this user may not write there: fix the folder's owner or permissions",
    errno.EPERM: "this user may not write there: fix the folder's owner or permissions",
    errno.ENOTDIR: "an entry that is not a folder holds its name (a file, a link): move it away or "
                   "configure another folder",
}


def holds_no_folder(folder: Path) -> bool:
    """An entry that is not a folder (a file, a link to one or to nothing) holds ``folder``'s own name:
    every write into it fails, as on a read-only disk, whatever file is written."""
    return os.path.lexists(folder) and not os.path.isdir(folder)


def is_disk_outage(exc: OSError) -> bool:
    """True when ``exc`` says the disk takes no write now (full, quota, read-only): ``DISK_OUTAGES``."""
    return exc.errno in DISK_OUTAGES


def unwritable(folder: Path, what: str, exc: OSError) -> OutputUnwritable | None:
    """``OutputUnwritable`` naming ``folder``, ``what`` was written and the fix, when ``exc`` says the folder
    cannot take a write (disk full, quota, read-only, permission); None for any other OSError."""
    code = errno.ENOTDIR if exc.errno == errno.EEXIST and holds_no_folder(folder) else exc.errno  # mkdir of it
    fix = _UNWRITABLE_FIXES.get(code) if code is not None else None
    if fix is None:
        return None
    return OutputUnwritable(f"cannot write {what} into {folder} ({exc.strerror or exc}): {fix}")


def read_only(folder: Path, what: str) -> OutputUnwritable:
    """``OutputUnwritable`` for ``folder`` found on a read-only file system before anything was written
    (``what`` the folder is): the words and fix a write's EROFS gets. Under systemd, a folder outside the
    unit's ReadWritePaths= is one too (ProtectSystem=strict)."""
    return OutputUnwritable(f"{what}: cannot write into {folder} ({os.strerror(errno.EROFS)}): "
                            f"{_UNWRITABLE_FIXES[errno.EROFS]}; under systemd, a folder outside the unit's "
                            "ReadWritePaths= is read-only too")


@contextmanager
def writing_into(folder: Path, what: str, *, disk_only: bool = False) -> Iterator[None]:
    """An OSError in the block that says ``folder`` cannot take a write (disk full, quota, read-only,
    permission, ``folder`` itself not a folder) becomes ``OutputUnwritable`` (``unwritable``); with
    ``disk_only``, only the disk's own (``DISK_OUTAGES``): a folder of the user's that refuses it is the
    caller's. Any other OSError passes unchanged."""
    try:
        yield
    except OSError as exc:
        refused = unwritable(folder, what, exc) if not disk_only or is_disk_outage(exc) else None
        if refused is None:
            raise
        raise refused from exc
