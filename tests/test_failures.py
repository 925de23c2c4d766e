"""What the machine can do to a run, through the real ``image-search`` console script: the worker
processes cannot start, the contact sheet's fonts are missing, the model is not there, the database
crashes mid-run, the output disk is full. Each run ends with one error line naming what happened,
the exit code of that kind (README "Exit codes") and no stack trace; ``index``, ``search`` and
``serve`` each meet every failure that can reach them, but for ``serve``'s full disk, which it waits
out (a restart would meet the same disk).

The failures are real ones (``tests/support/faults``): workers that exit as they start, a font package
that is not importable, a model path that does not exist, an embedded PostgreSQL shut down as by a
crash, a 4 KiB tmpfs over the folder written to. The runs of one command go at once (each is mostly a
torch import).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from image_search.errors import ExitCode, OutputUnwritable, writing_into
from image_search.output import OUTPUT_MARKER
from image_search.preprocess import SOURCE_MARKER
from tests.support import warm
from tests.support.env import child_env
from tests.support.failures import crash_embedded_database, error_lines, fault_env, remount, small_disk
from tests.support.files import find_bundle, inbox_files, read_jsonl, save_picture, write_config, written_into
from tests.support.service import ServiceProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

CLI = Path(sys.executable).parent / "image-search"
RUN_TIMEOUT_S = 240


@dataclass
class Case:
    """One run: its tree, config and the faults of its environment; what it printed once it ended."""

    root: Path
    config: Path
    env: dict[str, str]
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    log: str = field(default="", repr=False)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr + self.log


def make_case(tmp_path: Path, name: str, model_dir: Path, **faults: str) -> Case:
    """A tree with two pictures to index and a query picture beside it; ``faults`` may name ``ROOT``."""
    root = tmp_path / name
    config = write_config(root, model_dir)
    for i in range(2):
        save_picture(root / "images" / f"p{i}.png", seed=i)
    save_picture(root / "query.png", seed=9)
    env = fault_env(**{key: value.replace("ROOT", str(root)) for key, value in faults.items()})
    return Case(root, config, env)


def run_all(cases: dict[str, Case], *args: str) -> None:
    """``image-search ARGS --config C`` for every case at once; fills in how each ended."""
    procs = {name: warm.popen([str(CLI), *args, "--config", str(case.config)], cwd=case.root, env=case.env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, case in cases.items()}
    for name, proc in procs.items():
        cases[name].stdout, cases[name].stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        cases[name].code = proc.returncode


def assert_failed_as(case: Case, code: ExitCode, *words: str, ours_only: bool = False) -> None:
    """Exit code ``code``, exactly one error line and it names ``words``, no traceback anywhere."""
    assert case.code == code, (case.code, case.output[-3000:])
    assert "Traceback" not in case.output, case.output[-3000:]
    errors = error_lines(case.stderr + case.log, ours_only=ours_only)
    assert len(errors) == 1, errors
    for word in words:
        assert word in errors[0], (word, errors[0])


def machine_failures(tmp_path: Path, model_dir: Path, *, output: str) -> dict[str, Case]:
    """The failures every command meets; the full disk is under ``output`` (the folder it writes)."""
    return {
        "workers": make_case(tmp_path, "workers", model_dir, FAULT_WORKERS_DIE="1"),
        "fonts": make_case(tmp_path, "fonts", model_dir, FAULT_NO_FONTS="1"),
        "model": make_case(tmp_path, "model", tmp_path / "no-such-model"),
        "database": make_case(tmp_path, "database", model_dir, FAULT_KILL_DATABASE="ROOT/state/pgdata"),
        "disk": make_case(tmp_path, "disk", model_dir, FAULT_FULL_DISK=f"ROOT/{output}"),
    }


# --- index ---------------------------------------------------------------------------------------------


def test_index_ends_each_machine_failure_with_one_line_and_its_exit_code(tmp_path: Path, tiny_model_dir: Path) -> None:
    cases = machine_failures(tmp_path, tiny_model_dir, output="processed")  # index writes processed images only
    run_all(cases, "index")

    assert_failed_as(cases["workers"], ExitCode.WORKERS, "workers could not start", "uv sync")
    # Indexing draws no contact sheet: without the fonts it still does its whole job.
    assert cases["fonts"].code == ExitCode.OK, cases["fonts"].output[-3000:]
    assert "2 embedded" in cases["fonts"].stdout
    assert_failed_as(cases["model"], ExitCode.MODEL, str(tmp_path / "no-such-model"), "does not exist")
    assert_failed_as(cases["database"], ExitCode.DATABASE, "startup_failed", "database")
    assert_failed_as(cases["disk"], ExitCode.OUTPUT, "No space left on device", str(cases["disk"].root / "processed"),
                     "free space")


# --- search --------------------------------------------------------------------------------------------


def test_search_ends_each_machine_failure_with_one_line_and_its_exit_code(tmp_path: Path, tiny_model_dir: Path) -> None:
    cases = machine_failures(tmp_path, tiny_model_dir, output="output")
    run_all(cases, "search", "query.png")

    assert_failed_as(cases["workers"], ExitCode.WORKERS, "workers could not start")
    assert_failed_as(cases["fonts"], ExitCode.FONTS, "fonts cannot be loaded", "justmytype-intl-cjk")
    assert_failed_as(cases["model"], ExitCode.MODEL, str(tmp_path / "no-such-model"))
    assert_failed_as(cases["database"], ExitCode.DATABASE, "startup_failed", "database")
    disk = cases["disk"]
    assert_failed_as(disk, ExitCode.OUTPUT, "No space left on device", str(disk.root / "output"), "free space")
    assert (disk.root / "query.png").is_file()  # the query is the user's: never lost to a failed write
    assert written_into(disk.root / "output") == []  # the full tmpfs was only ever seen by the run


# --- serve ---------------------------------------------------------------------------------------------


def serve_all(cases: dict[str, Case], after_ready=None) -> None:
    """``image-search serve`` on every case at once; ``after_ready(case, service)`` once each is ready
    (for the failures that come mid-run); then wait for each to exit by itself."""
    services = {name: ServiceProcess(case.config, log_path=case.root / "service.log", env=case.env)
                for name, case in cases.items()}
    try:
        for name, service in services.items():
            if after_ready is not None:
                service.wait_ready()
                after_ready(cases[name], service)
        for name, service in services.items():
            cases[name].code = service.popen.wait(timeout=RUN_TIMEOUT_S)
            cases[name].log = service.log_text()
    finally:
        for service in services.values():
            service.close()


def crash_database_then_drop_an_image(case: Case, service: ServiceProcess) -> None:
    wait_for(lambda: service.events("images_indexed"), "the start-up images indexed", proc=service)
    crash_embedded_database(case.root / "state")
    save_picture(case.root / "images" / "late.png", seed=7)  # work that needs the database


def test_serve_ends_each_machine_failure_with_one_line_and_its_exit_code(tmp_path: Path, tiny_model_dir: Path) -> None:
    cases = machine_failures(tmp_path, tiny_model_dir, output="output")
    del cases["disk"]  # serve waits a full disk out (below)
    cases["database"].env = child_env()  # crashed by the test once the service is under way
    # The failures at start-up at once; those that come mid-run one at a time (they wait for "ready").
    serve_all({name: cases[name] for name in ("workers", "fonts", "model")})
    serve_all({"database": cases["database"]}, crash_database_then_drop_an_image)

    assert_failed_as(cases["workers"], ExitCode.WORKERS, "workers could not start")
    assert_failed_as(cases["fonts"], ExitCode.FONTS, "fonts cannot be loaded")
    assert_failed_as(cases["model"], ExitCode.MODEL, str(tmp_path / "no-such-model"))
    # pgserver logs its own failed stop of the server that is gone (see tests/support/failures.py).
    assert_failed_as(cases["database"], ExitCode.DATABASE, "PostgreSQL", ours_only=True)


def test_serve_started_on_a_read_only_or_full_disk_exits_7_for_a_restart_not_2(tmp_path: Path,
                                                                               tiny_model_dir: Path) -> None:
    """``mount -o remount,ro output`` then ``serve``: it ended with exit 2, config_error "... is not
    writable by this user", a permission problem it is not, and the one exit code systemd never restarts
    (RestartPreventExitStatus=2), so the service stayed down once the disk was back. A read-only output/ or
    processed/, or a processed/ whose disk is full at its first start (its record of the source folder
    cannot be written), is the disk's outage: exit 7, restarted; once the disk takes writes, serve starts."""
    cases = {name: make_case(tmp_path, name, tiny_model_dir)
             for name in ("read-only-output", "read-only-processed", "full-processed", "read-only-new-output")}
    disks = {name: cases[name].root / ("output" if name.endswith("output") else "processed") for name in cases}
    # A folder to make on the read-only disk: its mkdir's EROFS was a config error (exit 2) too.
    new_output = cases["read-only-new-output"]
    new_output.env["IMAGE_SEARCH_OUTPUT_DIRECTORY"] = str(disks["read-only-new-output"] / "results")
    with contextlib.ExitStack() as mounted:
        for name, folder in disks.items():
            mounted.enter_context(small_disk(folder, size="4k"))
            if name.startswith("read-only"):
                remount(folder, read_only=True)
            else:
                (folder / ".other-files").write_bytes(b"\0" * 4096)  # the disk's one page
        run_all(cases, "serve")

        for name in ("read-only-output", "read-only-processed"):
            assert_failed_as(cases[name], ExitCode.OUTPUT, str(disks[name]), "(Read-only file system)",
                             "mount it read-write", "ReadWritePaths=")
        assert_failed_as(new_output, ExitCode.OUTPUT, str(disks["read-only-new-output"] / "results"),
                         "(Read-only file system)", "mount it read-write")
        assert_failed_as(cases["full-processed"], ExitCode.OUTPUT, str(disks["full-processed"]),
                         "(No space left on device)", "free space")
        assert not any("config_error" in case.output for case in cases.values())

        remount(disks["read-only-output"], read_only=False)  # the disk is back: systemd's restart starts
        service = ServiceProcess(cases["read-only-output"].config, log_path=tmp_path / "restarted.log",
                                 env=cases["read-only-output"].env)
        try:
            service.wait_ready()
            assert service.stop() == ExitCode.OK
        finally:
            service.close()


def test_serve_idle_when_its_embedded_database_dies_exits_for_a_restart_within_seconds(tmp_path: Path,
                                                                                    tiny_model_dir: Path) -> None:
    """Nothing dropped, nothing to index: the service met the dead server only at its next look at the
    index, 41-51 s later, telling systemd it was fine meanwhile. Its fleet heartbeat sees it within
    seconds (every 2 s): the service acts on that."""
    case = make_case(tmp_path, "idle", tiny_model_dir)
    service = ServiceProcess(case.config, log_path=case.root / "service.log", env=case.env)
    try:
        service.wait_ready()
        wait_for(lambda: service.events("images_indexed"), "the start-up's pictures indexed", proc=service)
        crash_embedded_database(case.root / "state")
        assert service.popen.wait(timeout=30) == ExitCode.DATABASE, service.log_text()[-3000:]
        failed = service.events("service_failed")
        assert len(failed) == 1 and failed[0]["reason"] == "the embedded PostgreSQL is gone", service.log_text()[-3000:]
        assert service.events("fleet_heartbeat_failed")  # what made the loop look
    finally:
        service.close()


def _initdb_running(pid: int) -> bool:
    import psutil

    try:
        return any(child.name() == "initdb" for child in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


def test_ctrl_c_during_a_first_starts_initdb_is_a_stop_not_a_database_failure(tmp_path: Path,
                                                                              tiny_model_dir: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group: initdb died of it before the service's handler
    ran, and the service said the database had failed (exit 4). It is a stop (exit 0); the next start makes
    the half-made pgdata again."""
    root = tmp_path / "new"
    config = write_config(root, tiny_model_dir, fresh_pgdata=True)
    service = ServiceProcess(config, log_path=root / "service.log", env=child_env())
    try:
        deadline = time.monotonic() + 60
        while not _initdb_running(service.popen.pid) and time.monotonic() < deadline:
            assert service.popen.poll() is None, service.log_text()[-3000:]
            time.sleep(0.002)  # initdb runs for a fraction of a second: look often
        os.killpg(service.popen.pid, signal.SIGINT)  # the service runs in a session of its own: its group
        assert service.popen.wait(timeout=60) == ExitCode.OK, service.log_text()[-3000:]
        assert service.events("service_stopped_during_startup") and not service.events("startup_failed"), \
            service.log_text()[-3000:]
    finally:
        service.close()


def test_serve_waits_out_a_full_disk_and_goes_on_once_there_is_room(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The disk under output/ (a query's result) or processed/ (the pictures' copies) is full: the service
    says so once and waits, with the query still in the inbox and the pictures still queued; once there is
    room (the 4 KiB tmpfs unmounted, in the service's own mount namespace) both go through, no restart."""
    cases = {folder: make_case(tmp_path, folder, tiny_model_dir, FAULT_FULL_DISK=f"ROOT/{folder}")
             for folder in ("output", "processed")}
    # The folder under the tmpfs is the disk with room: it holds the folder's record as the tmpfs will, or
    # unmounting the tmpfs would read as the folder's disk unmounted (and waited out).
    under = cases["processed"].root / "processed"
    under.mkdir(exist_ok=True)
    (under / SOURCE_MARKER).write_bytes(os.fsencode((cases["processed"].root / "images").resolve()))
    under = cases["output"].root / "output"
    under.mkdir(exist_ok=True)
    (under / OUTPUT_MARKER).touch()
    services = {folder: ServiceProcess(case.config, log_path=case.root / "service.log", env=case.env)
                for folder, case in cases.items()}
    try:
        for service in services.values():
            service.wait_ready()
        for name, seed in (("q.png", 5), ("r.png", 6)):  # answered in one pass: neither may be dropped
            save_picture(cases["output"].root / "inbox" / name, seed=seed)
        for folder, service in services.items():
            full = service.wait_event("output_unwritable")
            assert "No space left on device" in full["reason"] and str(cases[folder].root / folder) in full["reason"]
            assert service.exit_code() is None  # waiting, not exiting into a restart that meets the same disk
        assert inbox_files(cases["output"].root / "inbox") == ["q.png", "r.png"]  # not the queries' fault: not failed
        assert not services["processed"].events("images_indexed")
        # processed/ full holds up the ingest only: a query is answered meanwhile, and is no sign of room
        save_picture(cases["processed"].root / "inbox" / "meanwhile.png", seed=7)
        wait_for(lambda: not inbox_files(cases["processed"].root / "inbox"), "a query answered while processed/ is full")
        assert not services["processed"].events("output_writable_again")

        for folder, service in services.items():  # room is made
            subprocess.run(["nsenter", "-t", str(service.popen.pid), "-m", "umount", str(cases[folder].root / folder)],
                           check=True)
        for service in services.values():
            service.wait_event("output_writable_again")
        wait_for(lambda: not inbox_files(cases["output"].root / "inbox"), "the queries answered")
        wait_for(lambda: len([p for p in (cases["output"].root / "output").iterdir()  # published: not hidden
                              if p.is_dir() and not p.name.startswith(".")]) == 2, "both result folders")
        wait_for(lambda: sum(e.get("embedded", 0) for e in services["processed"].events("images_indexed")) == 2,
                 "both pictures indexed")
        assert sorted(p.name for p in (cases["processed"].root / "processed").iterdir()) == [
            ".p0.png.jpg.thumb.jpg", ".p1.png.jpg.thumb.jpg", SOURCE_MARKER, "p0.png.jpg",
            "p1.png.jpg"]  # copies and thumbnails
        for folder, service in services.items():
            assert service.stop() == ExitCode.OK
            log = service.log_text()
            assert log.count("output_unwritable") == 1, log[-3000:]  # one line however long the wait
            assert "Traceback" not in log and not error_lines(log), log[-3000:]
    finally:
        for service in services.values():
            service.close()



def test_serve_follows_renames_while_a_processed_folder_is_read_only_and_starts_so(tmp_path: Path,
                                                                                   tiny_model_dir: Path) -> None:
    """processed/burst read-only (a disk mounted there that the kernel remounted read-only after errors; a
    folder this user may not write into is the same): a picture renamed in images/burst crashed the service
    (the rename of its processed copy refused: EROFS), and every restart crashed again in its start-up
    comparison, queries down too. Now each path follows its file at once, search results name the new
    paths, the ingest waits out the disk with one line, and once it takes writes the copies are made again
    from the files, with no model work. (processed/ itself read-only at start is exit 7, restarted: the test above.)"""
    root = tmp_path / "tree"
    config = write_config(root, tiny_model_dir, cleanup_on_exit=False)  # rows kept for the next start
    images, processed = root / "images", root / "processed"
    for name, seed in (("burst/p001.png", 1), ("burst/p002.png", 2), ("base/x.png", 3)):
        save_picture(images / name, seed=seed)
    first = ServiceProcess(config, log_path=root / "first.log")
    try:
        first.wait_ready()
        wait_for(lambda: sum(e.get("embedded", 0) for e in first.events("images_indexed")) == 3, "the three indexed")
        assert first.stop() == ExitCode.OK
    finally:
        first.close()
    os.rename(images / "burst/p001.png", images / "burst/p001-renamed.png")  # while nothing runs

    service = ServiceProcess(config, log_path=root / "service.log",
                             env=fault_env(FAULT_READ_ONLY=str(processed / "burst")))
    try:
        service.wait_ready()  # its start-up comparison crashed before, at every restart
        os.rename(images / "burst/p002.png", images / "burst/p002-renamed.png")
        renamed = [images / "burst/p001-renamed.png", images / "burst/p002-renamed.png"]
        wait_for(lambda: {str(p) for p in renamed} <= {str(e["path"]) for e in service.events("image_renamed")},
                 "both paths followed their files")
        full = service.wait_event("output_unwritable")  # the renamed pictures' copies, made again
        assert "Read-only file system" in full["reason"] and str(processed) in full["reason"]
        save_picture(root / "inbox" / "q.png", seed=2)  # p002's picture: answered meanwhile
        # Its result folder, not the inbox emptied: the query moves into the folder before it is published.
        bundle = wait_for(lambda: find_bundle(root / "output", "q.png"), "the query answered")
        hits = [hit["file_path"] for hit in read_jsonl(bundle / "q.jsonl")]
        assert hits[0] == str(renamed[1]) and sorted(hits) == sorted(map(str, [*renamed, images / "base/x.png"]))
        assert service.exit_code() is None

        subprocess.run(["nsenter", "-t", str(service.popen.pid), "-m", "mount", "-o", "remount,rw,bind",
                        str(processed / "burst")], check=True)
        service.wait_event("output_writable_again")
        copies = [processed / f"{p.relative_to(images)}.jpg" for p in renamed]
        wait_for(lambda: all(c.is_file() and (c.parent / f".{c.name}.thumb.jpg").is_file() for c in copies),
                 "the renamed pictures' copies and thumbnails")
        assert not sum(e.get("embedded", 0) for e in service.events("images_indexed"))  # no model work
        assert service.stop() == ExitCode.OK
        log = service.log_text()
        assert log.count("output_unwritable") == 1, log[-3000:]  # one line however long the wait
        assert "Traceback" not in log and "crashed" not in log and not error_lines(log), log[-3000:]
    finally:
        service.close()

# --- the mapping and the last resort, in process ----------------------------------------------------------


@pytest.mark.parametrize(("errno_name", "fix"), [("ENOSPC", "disk is full"), ("EDQUOT", "quota"),
                                                  ("EROFS", "read-only"), ("EACCES", "permissions")])
def test_a_folder_that_refuses_a_write_is_named_with_the_fix(errno_name: str, fix: str, tmp_path: Path) -> None:
    import errno
    import os

    code = getattr(errno, errno_name)
    with pytest.raises(OutputUnwritable) as refused, writing_into(tmp_path, "a result folder"):
        raise OSError(code, os.strerror(code))
    assert str(tmp_path) in str(refused.value) and fix in str(refused.value)
    assert refused.value.exit_code == ExitCode.OUTPUT


def test_other_os_errors_pass_unchanged(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), writing_into(tmp_path, "a result folder"):
        raise FileNotFoundError(2, "No such file or directory")


# A bug nobody foresaw, in a real process (main configures the process's logging for good).
A_BUG = """
import sys

from image_search import cli


def a_bug(args, cfg):
    raise ZeroDivisionError("division by zero\\nsecond line")

cli._run = a_bug
sys.exit(cli.main(sys.argv[1:]))
"""


A_READER_THAT_GOES = """
import sys

from image_search import cli


def prints(args, cfg):
    for _ in range(100_000):
        print("/output/20261207-010203")
    return 0

cli._run = prints
sys.exit(cli.main(sys.argv[1:]))
"""


def test_output_whose_reader_goes_away_ends_quietly_as_its_pipe_ended_it(tmp_path: Path) -> None:
    """``image-search search ... | head -1``: the rest of the output has nowhere to go. That ended as
    ``crashed`` (BrokenPipeError), exit 1; it is the shell's own 141 now, with nothing on stderr about it."""
    config = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", A_READER_THAT_GOES, "index", "--config", str(config)],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()  # what head does once it has its line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 128 + signal.SIGPIPE
    assert "crashed" not in stderr and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


A_BUG_ONCE_INDEXED = """
import sys

from image_search import indexer


def a_bug(self, **kwargs):
    raise ZeroDivisionError("division by zero")

indexer.Indexer.index_folder = a_bug
from image_search import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_crash_after_the_model_loaded_keeps_the_index_whatever_cleanup_says(tmp_path: Path,
                                                                              tiny_model_dir: Path) -> None:
    """README: "a crash or kill -9 never empties anything". A bug raised once the model was loaded went
    through the exit's cleanup and emptied the table: a full re-embedding for a bug."""
    config = write_config(tmp_path, tiny_model_dir)  # cleanup-on-exit: the default, true
    run = subprocess.run([sys.executable, "-c", A_BUG_ONCE_INDEXED, "index", "--config", str(config)],
                         env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == ExitCode.FAILED and "event='crashed'" in run.stderr, run.stderr[-3000:]
    assert "model_loaded" in run.stderr and "table_emptied" not in run.stderr, run.stderr[-3000:]


def test_an_unforeseen_error_is_one_line_and_exit_1_with_the_traceback_only_in_debug(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    run = subprocess.run([sys.executable, "-c", A_BUG, "index", "--config", str(config)], env=child_env(),
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == ExitCode.FAILED
    assert "Traceback" not in run.stderr, run.stderr
    errors = error_lines(run.stderr)
    assert len(errors) == 1 and "event='crashed'" in errors[0], run.stderr
    assert "reason='ZeroDivisionError: division by zero'" in errors[0]  # its first line only

    debug = subprocess.run([sys.executable, "-c", A_BUG, "index", "--config", str(config), "--log-level", "debug"],
                           env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert debug.returncode == ExitCode.FAILED
    assert "Traceback" in debug.stderr and "a_bug" in debug.stderr  # for whoever debugs it
