"""Inducing the machine's failures in an ``image-search`` process, and reading how it ended.

``fault_env`` is the environment of a child with ``tests/support/faults`` on PYTHONPATH: that folder's
``sitecustomize.py`` reads the ``FAULT_*`` variables given and makes one thing fail (see its
docstring). ``error_lines`` are the log lines at level error that a run wrote. ``small_disk`` and
``remount`` give a folder of this process a disk a test can fill or make read-only (as root: mount needs it).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.db import Postmaster, service_pgdata
from tests.support.env import child_env
from tests.support.logs import parse_log_line
from tests.support.waiting import wait_for

FAULTS = Path(__file__).with_name("faults")
# pgserver's own log line when the server it is asked to stop has died already: the library's line
# about the consequence, not the process's account of the failure (that one comes from our handler).
_LIBRARY_LOG = "library_log"


def fault_env(**faults: str) -> dict[str, str]:
    """The environment of an ``image-search`` child in which ``faults`` (``FAULT_NAME=value``) happen."""
    return child_env(PYTHONPATH=os.pathsep.join(filter(None, (str(FAULTS), os.environ.get("PYTHONPATH")))),
                     **faults)


def error_lines(log: str, *, ours_only: bool = False) -> list[str]:
    """The lines at level error in ``log`` (structlog's plain ``level='error'`` lines); ``ours_only``
    leaves out the lines third-party libraries logged through us."""
    lines = [line for line in log.splitlines() if "level='error'" in line]
    if ours_only:
        lines = [line for line in lines if parse_log_line(line).get("event") != _LIBRARY_LOG]
    return lines


def crash_embedded_database(state_dir: Path) -> None:
    """Stop the embedded PostgreSQL under ``state_dir`` as a crash does (SIGQUIT: an immediate shutdown,
    no checkpoint) and wait until its postmaster is gone, reaped and all."""
    postmaster = Postmaster.of(service_pgdata(state_dir))
    assert postmaster is not None, "no embedded PostgreSQL is running"
    os.kill(postmaster.pid, signal.SIGQUIT)
    wait_for(lambda: not Path(f"/proc/{postmaster.pid}").exists(), "the crashed postmaster gone")


def moves_as_onto_another_filesystem(monkeypatch, source: Path) -> None:
    """In this process, a rename of the folder ``source`` is refused as onto another filesystem (EXDEV): a
    move copies it, then deletes the original."""
    import errno

    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src) == source:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


def a_folder_move_that_stops_part_way(monkeypatch, source: Path) -> None:
    """In this process, a move of the folder ``source`` as onto another filesystem copies, then deletes the
    original; that deletion removes ``a.png``, then meets a file it may not delete (an immutable file, a
    mount point: as root, no permission stops it)."""
    import errno
    import shutil

    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) == source:
            (source / "a.png").unlink()
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(source / "sub"))
        return real_rmtree(path, *args, **kwargs)

    moves_as_onto_another_filesystem(monkeypatch, source)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


@contextmanager
def small_disk(folder: Path, *, size: str = "64k", inodes: int | None = None) -> Iterator[Path]:
    """``folder`` on a fresh tmpfs of ``size`` bytes (and ``inodes`` entries, the folder itself one of
    them) for the block: a disk a test fills with a file or two, as a real one fills (ENOSPC). Whatever
    ``folder`` held is hidden meanwhile, and what the block wrote there goes with the tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a disk")
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes is not None else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def remount(folder: Path, *, read_only: bool) -> None:
    """The disk mounted at ``folder`` (``small_disk``) read-only (EROFS for every write) or read-write again."""
    subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(folder)], check=True)
