"""Preprocessing workers forked from a template (launcher.py): each is what a fresh interpreter started by
its pool at that moment would be (environment, sys.path, working directory, umask), how each ended is
known, and a template that is killed is replaced. The pool's own stories are in test_workers.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection, Pipe
from pathlib import Path

import pytest

from image_search import launcher as launcher_module
from image_search.launcher import ForkedProcess, Launcher
from image_search.workers import PreprocessSettings
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SYS_PATH = json.dumps([os.getcwd() if entry == "" else entry for entry in sys.path])


@pytest.fixture()
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


def start(launcher: Launcher, **env: str) -> tuple[ForkedProcess, Connection]:
    """A worker, started and ready (it has read its settings and said so)."""
    parent, child = Pipe(duplex=True)
    try:
        process = launcher.start(child.fileno(), sys_path_json=SYS_PATH, env={**os.environ, **env},
                                 log_level=logging.WARNING)
    finally:
        child.close()
    parent.send(PreprocessSettings(max_size=(64, 64), max_pixels=10**6))
    assert parent.poll(60), "the worker did not say it was ready"
    assert parent.recv().pid == process.pid
    return process, parent


def proc_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split()[1]
    raise AssertionError(f"no {name} for {pid}")


def environment(pid: int) -> dict[str, str]:
    """The environment process ``pid`` started with (a forked worker's: its template's)."""
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)


def stop(process: ForkedProcess, conn: Connection) -> int | None:
    conn.send(None)
    conn.close()
    return process.wait(timeout=10)


def test_each_worker_has_the_environment_cwd_and_umask_its_pool_had_when_it_started(launcher, tmp_path, monkeypatch):
    first, first_conn = start(launcher, IMAGE_SEARCH_TEST_MARK="one")
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o077)
    try:
        second, second_conn = start(launcher, IMAGE_SEARCH_TEST_MARK="two")
        third, third_conn = start(launcher, IMAGE_SEARCH_TEST_MARK="two", PYTEST_CURRENT_TEST="another test")
    finally:
        os.umask(previous)
    # Another environment, another template; the same one but for pytest's bookkeeping, the same template.
    templates = {int(proc_field(p.pid, "PPid")) for p in (first, second, third)}
    assert len(templates) == 2 and int(proc_field(second.pid, "PPid")) == int(proc_field(third.pid, "PPid"))
    assert environment(first.pid)["IMAGE_SEARCH_TEST_MARK"] == "one"
    assert environment(second.pid)["IMAGE_SEARCH_TEST_MARK"] == "two"
    assert Path(f"/proc/{first.pid}/cwd").resolve() != tmp_path.resolve()
    assert Path(f"/proc/{second.pid}/cwd").resolve() == tmp_path.resolve()
    assert int(proc_field(second.pid, "Umask"), 8) == 0o077
    assert int(proc_field(first.pid, "Umask"), 8) == previous
    # The first template, replaced, ends once its last worker has; the second stays for the next worker.
    old_template = int(proc_field(first.pid, "PPid"))
    assert stop(first, first_conn) == 0
    wait_for(lambda: not Path(f"/proc/{old_template}").exists() or proc_field(old_template, "State")[0] == "Z",
             what="the replaced template gone")
    assert stop(second, second_conn) == 0 and stop(third, third_conn) == 0


def test_a_json_py_in_the_working_directory_is_not_imported_by_the_template(launcher, tmp_path, monkeypatch):
    """``python -c`` puts the working directory first on sys.path: ``image-search index`` run in a project
    folder holding a json.py ran that file in the template, and no worker started (exit 5)."""
    for name in ("json.py", "signal.py"):
        (tmp_path / name).write_text(f"open({str(tmp_path / 'imported')!r}, 'a').write({name!r})\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    worker, conn = start(launcher, IMAGE_SEARCH_TEST_MARK="in a project folder")
    assert not (tmp_path / "imported").exists()
    assert stop(worker, conn) == 0


def test_a_worker_writes_its_errors_where_its_pool_writes_them_when_it_starts(launcher, tmp_path):
    """pytest gives each test a standard error of its own: the template's is that of the test that started
    it, where a worker's traceback would have gone unseen."""
    first, first_conn = start(launcher)
    saved = os.dup(2)
    try:
        with open(tmp_path / "stderr.txt", "wb") as redirected:
            os.dup2(redirected.fileno(), 2)
        second, second_conn = start(launcher)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert os.readlink(f"/proc/{second.pid}/fd/2") == str(tmp_path / "stderr.txt")
    assert os.readlink(f"/proc/{first.pid}/fd/2") == os.readlink("/proc/self/fd/2")
    assert int(proc_field(first.pid, "PPid")) == int(proc_field(second.pid, "PPid"))  # one template
    assert stop(first, first_conn) == 0 and stop(second, second_conn) == 0


def test_how_each_worker_ended_is_known(launcher):
    told, told_conn = start(launcher)
    killed, killed_conn = start(launcher)
    with pytest.raises(subprocess.TimeoutExpired):
        killed.wait(timeout=0.2)  # still there
    killed.kill()
    assert killed.wait(timeout=10) == -signal.SIGKILL
    killed.kill()  # once it is known to be gone, nothing is signalled
    assert stop(told, told_conn) == 0
    assert told.wait(timeout=0) == 0  # asked again: the same answer


def test_kill_signals_the_worker_and_not_whatever_process_has_its_number_now(launcher):
    """The template reaps a worker a moment before it says so; in that moment the worker's pid may already
    name another process. Here the number names another process of ours (the reuse, simulated): the
    worker is killed, the other is left alone."""
    worker, worker_conn = start(launcher)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        worker.pid = bystander.pid
        worker.kill()
        assert worker.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None, "the process that has the worker's number now was killed"
    finally:
        bystander.kill()
        bystander.wait()
        worker_conn.close()


def test_a_template_that_is_killed_is_replaced_and_its_worker_still_ends(launcher):
    orphan, orphan_conn = start(launcher)
    template = int(proc_field(orphan.pid, "PPid"))
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: int(proc_field(orphan.pid, "PPid")) != template, what="the worker's template gone")
    with pytest.raises(subprocess.TimeoutExpired):
        orphan.wait(timeout=0.2)  # nobody is left to say how it ends, but it has not
    after, after_conn = start(launcher)  # a new template
    assert int(proc_field(after.pid, "PPid")) not in (template, os.getpid())
    # Its connection closed, the orphan leaves as any worker does; how, only its new parent knows.
    assert stop(orphan, orphan_conn) is None
    assert stop(after, after_conn) == 0


def test_a_template_that_does_not_answer_is_killed_and_replaced(launcher):
    before, before_conn = start(launcher)
    template = int(proc_field(before.pid, "PPid"))
    # A second for this template's answer, not ANSWER_TIMEOUT_S; its replacement's first answer includes its
    # imports, which took longer than a second on a loaded CI machine.
    launcher._template._sock.settimeout(1.0)
    os.kill(template, signal.SIGSTOP)  # alive, but answers nothing
    after, after_conn = start(launcher)  # a second's wait, then a new template
    assert int(proc_field(after.pid, "PPid")) not in (template, os.getpid())
    wait_for(lambda: int(proc_field(before.pid, "PPid")) != template, what="the stuck template killed")
    assert stop(before, before_conn) is None and stop(after, after_conn) == 0


def test_a_start_cut_short_between_request_and_answer_leaves_no_answer_for_the_next(launcher, monkeypatch):
    """A stop's exception in the starting thread, after the request went out: its answer, still on its
    way, was read as the next start's, whose worker then had another's pid (killed in its place)."""
    real = launcher_module._receive_answer

    def cut_short(sock):
        monkeypatch.setattr(launcher_module, "_receive_answer", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher_module, "_receive_answer", cut_short)
    parent, child = Pipe(duplex=True)
    with pytest.raises(KeyboardInterrupt):
        launcher.start(child.fileno(), sys_path_json=SYS_PATH, env=dict(os.environ), log_level=logging.WARNING)
    child.close()
    parent.close()  # the worker it may have forked leaves
    for _ in range(2):
        process, conn = start(launcher)  # each answered with its own worker's pid
        assert stop(process, conn) == 0


def test_a_fork_of_the_process_starts_templates_of_its_own(launcher):
    """Forked while another thread held the launcher (a pool starting a worker), the child could not
    start one; and it held the parent's template open past the parent's stop."""
    first, first_conn = start(launcher)
    template = int(proc_field(first.pid, "PPid"))
    with launcher._lock:
        child = os.fork()
        if child == 0:  # pragma: no cover (the child's outcome is its exit code)
            code = 1
            try:
                signal.alarm(30)
                process, conn = start(launcher)
                code = 0 if int(proc_field(process.pid, "PPid")) != template and stop(process, conn) == 0 else 2
            finally:
                os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stop(first, first_conn) == 0
