"""A slow file (a panorama, a file on a slow share) holds back nothing else in the preprocessing pool:
the files behind it are lent to a free worker, a batch's slow files can be set aside, a worker waiting on
its read gets a spare beside it, and a stop does not wait for reads that do not return. Slow reads are
held in the workers by ``tests/support/held_reads.py``; the pool's other stories are in test_workers.py."""

from __future__ import annotations

import os
import subprocess
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from image_search.preprocess import processed_path_for
from image_search.workers import PoolError
from tests.support.files import claimed_folders, save_picture
from tests.support.held_reads import hold_reads
from tests.support.waiting import wait_for
from tests.test_workers import assert_same, good_pictures, pool, reference

pytestmark = pytest.mark.integration


@pytest.fixture()
def good_files(tmp_path: Path) -> list[Path]:
    return good_pictures(tmp_path)


# --- slow files -------------------------------------------------------------------------------------------

SLOW_S = 6.0  # how long a ``slow*`` file holds its worker: far longer than the waits below


@pytest.fixture
def slow_reads(tmp_path, monkeypatch, request) -> Path:
    """``slow*`` files held SLOW_S in their worker (or what ``@pytest.mark.held(seconds)`` says: where no
    test waits within the hold); a file is slow after 0.3 s. The mark: one was begun."""
    import image_search.workers as workers

    held = request.node.get_closest_marker("held")
    monkeypatch.setattr(workers, "SLOW_FILE_S", 0.3)
    hold_reads(monkeypatch, tmp_path / "slow-begun", slow_s=held.args[0] if held else SLOW_S)
    return tmp_path / "slow-begun"


def test_a_file_sent_behind_a_slow_one_is_read_by_the_worker_that_is_free(tmp_path, good_files, slow_reads):
    """Two workers each hold two files: the one after the slow file waited behind it for the whole read.
    Now the idle worker reads it too, and the batch that holds it is done long before the slow file."""
    slow = save_picture(tmp_path / "slow.png", 60)
    with pool(workers=2) as workers:
        workers.wait_ready(timeout=60)
        started = time.monotonic()
        first = workers.submit([slow])
        second = workers.submit(good_files[:2])  # one goes behind the slow file, one to the other worker
        outcomes = second.results(timeout=SLOW_S - 2)
        assert time.monotonic() - started < SLOW_S and not first.done()
        [slow_outcome] = first.results(timeout=60)
        # The slow worker still reads its own copy of the lent file afterwards: that answer is not taken twice.
        again = workers.submit(good_files[2:4]).results(timeout=60)
    for path, outcome in zip([*good_files[:2], slow, *good_files[2:4]], [*outcomes, slow_outcome, *again], strict=True):
        assert_same(outcome, reference(path))


def test_while_every_worker_is_on_a_slow_file_one_more_reads_the_files_waiting(tmp_path, good_files, slow_reads):
    """As many slow files as workers held back every file sent after them, for as long as they were read
    (up to FILE_SECONDS_LIMIT). Now the pool starts one more worker for the files waiting, and goes back
    to its size once no worker is slow."""
    from structlog.testing import capture_logs

    slow = save_picture(tmp_path / "slow.png", 65)
    with pool(workers=1) as workers, capture_logs() as logs:
        workers.wait_ready(timeout=60)
        started = time.monotonic()
        first = workers.submit([slow])
        second = workers.submit(good_files[:3])
        outcomes = second.results(timeout=SLOW_S - 1)
        assert time.monotonic() - started < SLOW_S and not first.done()
        assert len(workers.worker_pids()) == 2
        [slow_outcome] = first.results(timeout=60)
        wait_for(lambda: len(workers.worker_pids()) == 1, what="the pool back to its one worker")
        again = workers.submit(good_files[3:5]).results(timeout=60)
    for path, outcome in zip([*good_files[:3], slow, *good_files[3:5]], [*outcomes, slow_outcome, *again],
                             strict=True):
        assert_same(outcome, reference(path))
    [added] = [e for e in logs if e["event"] == "preprocess_worker_added"]
    assert added["slow_files"] == [str(slow)] and added["workers"] == 2


@pytest.mark.held(2.0)
def test_two_slow_files_go_to_two_workers_and_each_is_read_once(tmp_path, slow_reads):
    """Filled to two files at once, the first worker took both slow files while the second idled; lent to
    it 0.3 s later, the second slow file was read twice (the first worker still read its own copy)."""
    slow = [save_picture(tmp_path / "slow1.png", 69), save_picture(tmp_path / "slow2.png", 70)]
    with pool(workers=2) as workers:
        workers.wait_ready(timeout=60)
        outcomes = workers.submit(slow).results(timeout=60)
        time.sleep(1.0)  # a second read of either, had one begun, is over by now
    for path, outcome in zip(slow, outcomes, strict=True):
        assert_same(outcome, reference(path))
    reads = Path(f"{slow_reads}.reads").read_text().split()
    assert sorted(reads) == ["slow1.png", "slow2.png"], reads


def test_a_worker_computing_on_a_slow_file_gets_no_spare(tmp_path, good_files, monkeypatch):
    """A big decode computes all along: a spare beside it takes its core. Four 30 s decodes on two cores,
    each with a worker of its own, took 60 s each and were stopped at the per-file limit. So the files
    waiting wait for it, as before spares."""
    import image_search.workers as workers_module

    monkeypatch.setattr(workers_module, "SLOW_FILE_S", 0.3)
    hold_reads(monkeypatch, tmp_path / "slow-begun", slow_s=3.0, spin=True)
    slow = save_picture(tmp_path / "slow.png", 68)
    with pool(workers=1) as workers:
        workers.wait_ready(timeout=60)
        first, second = workers.submit([slow]), workers.submit(good_files[:2])
        wait_for(lambda: (tmp_path / "slow-begun").exists(), what="the slow file begun")
        time.sleep(1.0)  # slow for 0.7 s: a sleeping worker would have had its spare by now
        assert len(workers.worker_pids()) == 1 and not second.done()
        outcomes = second.results(timeout=60)
        assert first.done()
    for path, outcome in zip(good_files[:2], outcomes, strict=True):
        assert_same(outcome, reference(path))


def test_workers_stuck_in_reads_that_do_not_return_are_killed_together_and_waited_for_once(monkeypatch):
    """A worker in a read from a share that no longer answers cannot die before the read returns: a stop
    killed each in turn and waited 5 s for each (27.6 s for four, spares included). Now it kills them all,
    then waits once."""
    import image_search.workers as workers_module

    monkeypatch.setattr(workers_module, "_CLOSE_GRACE_SECONDS", 0.05)
    monkeypatch.setattr(workers_module, "_KILL_WAIT_SECONDS", 0.2)
    waited: list[float] = []

    class InAReadThatDoesNotReturn:
        killed = False

        def kill(self) -> None:
            self.killed = True

        def wait(self, timeout: float) -> int:
            if self.killed:
                waited.append(timeout)
            time.sleep(timeout)
            raise subprocess.TimeoutExpired("worker", timeout)

    class Conn:
        def send(self, message) -> None:
            raise BrokenPipeError

        def close(self) -> None:
            pass

    stuck = [types.SimpleNamespace(conn=Conn(), process=InAReadThatDoesNotReturn()) for _ in range(4)]
    workers_module._stop_all(stuck)
    assert all(w.process.killed for w in stuck)
    assert sum(waited) <= 0.2 + 0.01, waited  # one wait for them all, not one each


@pytest.mark.held(2.0)
@pytest.mark.parametrize("how", ["refused", "killed as it starts"])
def test_a_spare_worker_that_cannot_be_started_costs_only_the_wait(tmp_path, good_files, slow_reads, how):
    """Fork refused (a process limit), or the spare killed while it imports (the OOM killer): the pool goes
    on at its size, the files waiting wait for the slow one as before spares, and it says so once. A
    spare that died as it started counted as a failed start: three in a row broke the whole pool."""
    from structlog.testing import capture_logs

    slow = save_picture(tmp_path / "slow.png", 66)
    with pool(workers=1) as workers, capture_logs() as logs:
        workers.wait_ready(timeout=60)
        start = workers._start_worker

        def no_spare():
            if how == "refused":
                raise OSError(11, "Resource temporarily unavailable")
            spare = start()
            spare.process.kill()
            return spare

        workers._start_worker = no_spare
        first, second = workers.submit([slow]), workers.submit(good_files[:2])
        outcomes = second.results(timeout=60)  # after the slow file, as before spares
        assert first.done() and len(workers.worker_pids()) == 1
        again = workers.submit(good_files[2:4]).results(timeout=60)  # the pool works on
    for path, outcome in zip(good_files[:4], [*outcomes, *again], strict=True):
        assert_same(outcome, reference(path))
    [lost] = [e for e in logs if e["event"] == "preprocess_worker_not_added"]
    assert lost["log_level"] == "warning"
    assert ("Resource temporarily unavailable" if how == "refused" else "SIGKILL") in lost["reason"]


def test_a_worker_killed_for_its_file_that_lingers_is_no_longer_one_of_the_pool(tmp_path, good_files,
                                                                                 monkeypatch) -> None:
    """A read that never returns is killed at FILE_SECONDS_LIMIT, but a process stuck in the kernel may take
    its time to go: it counted as a worker all the same, so the spare reading in its place was let go, and
    files were even sent to it. Now the spare stays, and the files go to it."""
    import signal

    import image_search.workers as workers_module
    from image_search.launcher import ForkedProcess

    monkeypatch.setattr(workers_module, "SLOW_FILE_S", 0.3)
    monkeypatch.setattr(workers_module, "FILE_SECONDS_LIMIT", 2.0)
    hold_reads(monkeypatch, tmp_path / "stuck-begun")
    stuck = save_picture(tmp_path / "stuck.png", 67)
    with pool(workers=1) as workers:
        workers.wait_ready(timeout=60)
        [lingering] = workers.worker_pids()
        kill = ForkedProcess.kill
        monkeypatch.setattr(ForkedProcess, "kill", lambda self: os.kill(self.pid, signal.SIGSTOP)
                            if self.pid == lingering else kill(self))  # killed, but not gone yet
        try:
            workers.submit([stuck])
            first = workers.submit(good_files[:2]).results(timeout=30)  # a spare reads them
            time.sleep(3)  # past the limit: the stuck worker is killed, and lingers
            later = workers.submit(good_files[2:4]).results(timeout=30)
            time.sleep(1)  # the spare, idle now, is the pool's one worker
            last = workers.submit(good_files[4:6]).results(timeout=30)
        finally:
            os.kill(lingering, signal.SIGKILL)
        wait_for(lambda: workers.worker_pids() and lingering not in workers.worker_pids(), what="the stuck one gone")
        assert len(workers.worker_pids()) == 1  # and no replacement beside the spare
    for path, outcome in zip(good_files[:6], [*first, *later, *last], strict=True):
        assert_same(outcome, reference(path))


def test_a_slow_file_set_aside_leaves_its_batch_done_without_it(tmp_path, good_files, slow_reads):
    slow = save_picture(tmp_path / "slow.png", 61)
    paths = [good_files[0], slow, *good_files[1:4]]
    with pool(workers=2) as workers:
        workers.wait_ready(timeout=60)
        handle = workers.submit(paths)
        assert workers.set_aside_slow(handle) is None  # nothing has been read for long yet
        wait_for(lambda: slow_reads.exists(), what="the slow file to be begun")
        time.sleep(0.5)
        split = workers.set_aside_slow(handle)
        assert split is not None
        aside, indices = split
        assert indices == [1] and aside.paths == (slow,) and handle.paths == (good_files[0], *good_files[1:4])
        outcomes = handle.results(timeout=SLOW_S - 2)  # the rest, in their order, without waiting for it
        assert not aside.done()
        [slow_outcome] = aside.results(timeout=60)
        # Set aside, it no longer counts as a batch in flight: two more may be submitted meanwhile.
    for path, outcome in zip([*handle.paths, slow], [*outcomes, slow_outcome], strict=True):
        assert_same(outcome, reference(path))


def test_a_file_read_again_while_its_first_read_goes_on_is_read_after_it(tmp_path, slow_reads):
    """A picture rewritten while a worker still decodes its old bytes, and submitted again: read at once by
    the idle worker, the new copy was saved first and the old read's copy over it when that ended (the row
    said the new picture, the copy showed the old). The second read waits for the first."""
    source, processed = tmp_path / "source", tmp_path / "processed"
    slow = save_picture(source / "slow.png", 63, size=(120, 90))
    with pool(workers=2, processed=claimed_folders(source, processed)) as workers:
        workers.wait_ready(timeout=60)
        first = workers.submit([slow])
        wait_for(lambda: slow_reads.exists(), what="the first read to be begun")
        save_picture(slow, 64, size=(100, 80))
        second = workers.submit([slow])
        [old], [new] = first.results(timeout=60), second.results(timeout=60)
    assert (old.width, new.width) == (120, 100)
    with Image.open(processed_path_for(slow, source, processed)) as copy:
        assert copy.size == (100, 80)


def test_a_set_aside_slow_file_is_failed_like_the_rest_when_the_pool_closes(tmp_path, slow_reads):
    slow = save_picture(tmp_path / "slow.png", 62)
    workers = pool(workers=1)
    try:
        handle = workers.submit([slow])
        wait_for(lambda: slow_reads.exists(), what="the slow file to be begun")
        time.sleep(0.5)
        aside, _ = workers.set_aside_slow(handle)
        assert handle.done() and handle.results() == []
    finally:
        workers.close()
    with pytest.raises(PoolError, match="closed"):
        aside.results(timeout=5)


