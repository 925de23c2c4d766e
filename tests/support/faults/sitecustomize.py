"""Failures of the machine, induced in an ``image-search`` process for ``tests/test_failures.py``: with
this folder on PYTHONPATH, each variable set makes one thing fail as it does on a real machine.

- ``FAULT_WORKERS_DIE=1``: the template the preprocessing workers are forked from (launcher.py) exits as
  it starts, as an interpreter that cannot start does (a broken install, no memory for another process).
- ``FAULT_NO_FONTS=1``: the font package cannot be imported, as when justmytype-intl-cjk is missing.
- ``FAULT_FULL_DISK=DIR``: DIR becomes a fresh 4 KiB tmpfs that only this process and its children
  see (a mount namespace of its own): a write of more than a few KB there finds the disk full.
- ``FAULT_READ_ONLY=DIR``: DIR, as it is, becomes read-only for this process and its children (a
  read-only bind mount of it onto itself in a mount namespace of their own), as a disk the kernel
  remounted read-only after errors is; ``nsenter -t PID -m mount -o remount,rw,bind DIR`` makes it
  writable again.
- ``FAULT_KILL_DATABASE=PGDATA``: the first time the run asks for the model (the database is up, the
  run under way), the embedded PostgreSQL on PGDATA is stopped as a crash does (SIGQUIT: an
  immediate shutdown), and this waits until its postmaster is gone.
- ``FAULT_SLOW_MODEL=SECONDS``: loading the model takes that much longer, as a large model on a CPU or
  its first download does (the loading thread waits before it loads).
- ``FAULT_SLOW_STAT=SECONDS``: each ``stat`` of a picture by the rescan (``sync.stat_or_none``) takes
  that much longer, as on a network share that answers slowly; the first one logs ``fault_slow_stat``,
  so a test knows the rescan is under way.
"""

import os
import sys

if os.environ.get("FAULT_WORKERS_DIE") and "_template_main" in " ".join(sys.orig_argv):
    os._exit(1)

if os.environ.get("FAULT_NO_FONTS"):
    sys.modules["justmytype_intl_cjk"] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError


def _mount_namespace_of_our_own() -> None:
    """Mounts made from here on are seen by this process and its children only."""
    import ctypes
    import subprocess

    if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed: the test needs root")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


if os.environ.get("FAULT_FULL_DISK"):
    import subprocess

    _folder = os.environ.pop("FAULT_FULL_DISK")  # the children (workers, PostgreSQL) are in it already
    _mount_namespace_of_our_own()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", _folder], check=True)

if os.environ.get("FAULT_READ_ONLY"):
    import subprocess

    _folder = os.environ.pop("FAULT_READ_ONLY")  # the children are in it already
    _mount_namespace_of_our_own()
    subprocess.run(["mount", "--bind", _folder, _folder], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", _folder], check=True)

if os.environ.get("FAULT_KILL_DATABASE"):
    import signal
    import time

    import image_search.runtime as _runtime

    _model = _runtime.Runtime.model

    def _model_after_the_database_died(self):  # type: ignore[no-untyped-def]
        pgdata = os.environ.pop("FAULT_KILL_DATABASE", None)
        if pgdata is not None:
            with open(os.path.join(pgdata, "postmaster.pid")) as pid_file:
                pid = int(pid_file.readline())
            os.kill(pid, signal.SIGQUIT)
            while os.path.exists(f"/proc/{pid}"):  # gone, reaped and all
                time.sleep(0.05)
        return _model(self)

    _runtime.Runtime.model = _model_after_the_database_died

if os.environ.get("FAULT_SLOW_MODEL"):
    import time

    import image_search.runtime as _runtime

    _load = _runtime.ModelLoading._load
    _delay = float(os.environ["FAULT_SLOW_MODEL"])

    def _slow_load(self, cfg):  # type: ignore[no-untyped-def]
        time.sleep(_delay)
        return _load(self, cfg)

    _runtime.ModelLoading._load = _slow_load

if os.environ.get("FAULT_SLOW_STAT"):
    import time

    import structlog

    import image_search.sync as _sync

    _stat = _sync.stat_or_none
    _stat_delay = float(os.environ["FAULT_SLOW_STAT"])
    _stats = 0

    def _slow_stat(path):  # type: ignore[no-untyped-def]
        global _stats
        _stats += 1
        if _stats == 1:
            structlog.get_logger("faults").info("fault_slow_stat", seconds=_stat_delay)
        time.sleep(_stat_delay)
        return _stat(path)

    _sync.stat_or_none = _slow_stat
