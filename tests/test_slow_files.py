"""A picture that takes long to read (a huge panorama, a file on a slow share) holds back nothing else: the
pictures dropped with it and after it are searchable while it is still being read, and it is indexed
once it is. The service runs in-process (``story_factory``); the slow read is a worker's, held by
``tests/support/held_reads.py``, and a file counts as slow after 0.3 s here (``SLOW_FILE_S``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time

import pytest
from PIL import Image
from structlog.testing import capture_logs

from image_search.errors import ExitCode
from image_search.watch import ChangeKind, Folder
from tests.support.files import save_picture
from tests.support.held_reads import SLOW_S, drop, hold_reads, step_until
from tests.support.story import SETTLE
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def test_pictures_dropped_with_and_after_a_slow_one_are_searchable_while_it_is_read(story_factory, slow_begun):
    story = story_factory({"a.png": 1})
    started = time.monotonic()
    slow, beside = drop(story, "slow.png", 2), drop(story, "beside.png", 3)  # one batch
    step_until(story, lambda: str(beside) in story.rows(), "the picture dropped with the slow one", SLOW_S - 3)
    after = drop(story, "after.png", 4)
    step_until(story, lambda: str(after) in story.rows(), "the picture dropped after it", SLOW_S - 3)
    assert str(slow) not in story.rows() and time.monotonic() - started < SLOW_S  # it is still being read
    assert story.ask("q.png", after)[0] == str(after)  # and a query is answered meanwhile
    story.run_until_idle()
    rows = story.rows()
    assert rows[str(slow)]["file_hash"] == hashlib.md5(slow.read_bytes()).hexdigest()
    assert set(rows) == {str(story.images / "a.png"), str(slow), str(beside), str(after)}
    assert story.service.skipped == 0


def test_as_many_slow_pictures_as_workers_hold_back_nothing_either(story_factory, slow_begun, monkeypatch):
    """Two workers each on a slow picture: every picture dropped after them waited for one of them to
    end. Now one more worker reads them meanwhile."""
    import image_search.workers as workers

    monkeypatch.setattr(workers, "default_worker_count", lambda: 2)  # whatever cores this machine has
    story = story_factory({"a.png": 1})
    started = time.monotonic()
    slow = [drop(story, "slow1.png", 2), drop(story, "slow2.png", 3)]
    step_until(story, lambda: len(story.service.ingest.slow_files) == 2, "both slow pictures set aside", SLOW_S - 3)
    after = drop(story, "after.png", 4)
    step_until(story, lambda: str(after) in story.rows(), "the picture dropped after them", SLOW_S - 3)
    assert not {str(p) for p in slow} & set(story.rows()) and time.monotonic() - started < SLOW_S
    story.run_until_idle()
    assert set(story.rows()) == {str(story.images / n) for n in ("a.png", "slow1.png", "slow2.png", "after.png")}


def test_a_slow_picture_rewritten_while_it_is_read_ends_with_its_new_content_and_copy(story_factory, slow_begun):
    """Its first read (of the old bytes) saves its processed copy when it ends: a second read of the new
    bytes, begun meanwhile and ended first, was overwritten by it (the row said the new content, the copy
    and the search results showed the old). The second read waits for the first."""
    story = story_factory({"a.png": 1})
    slow = drop(story, "slow.png", 2)  # 120 x 90
    step_until(story, lambda: story.service.ingest.slow_files == (slow,), "the slow picture set aside", SLOW_S - 3)
    first_read_over = time.monotonic() + SLOW_S
    save_picture(slow, seed=5, size=(100, 80))  # new bytes, read at once this time
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, slow)
    new_hash = hashlib.md5(slow.read_bytes()).hexdigest()
    story.run_until_idle()
    time.sleep(max(0.0, first_read_over + 1 - time.monotonic()))  # whatever the first read saves, it has
    row = story.rows()[str(slow)]
    assert row["file_hash"] == new_hash
    with Image.open(row["processed_path"]) as copy:
        assert copy.size == (100, 80)  # the new picture's, not the old one's 120 x 90


def test_a_stop_while_a_slow_picture_is_read_leaves_it_to_the_next_start(story_factory, slow_begun):
    story = story_factory({"a.png": 1}, cleanup_on_exit=False)
    slow, beside = drop(story, "slow.png", 2), drop(story, "beside.png", 3)
    step_until(story, lambda: str(beside) in story.rows(), "the picture dropped with the slow one", SLOW_S - 3)
    started = time.monotonic()
    with capture_logs() as logs:
        story.service.ingest.finish_in_flight()  # what a SIGTERM's stop does once the loop has ended
    [left] = [e for e in logs if e["event"] == "batches_left_unfinished"]
    assert left["files"] == 1
    again = story_factory(after=story)  # the stop's close; the next start reads it again, quickly now
    assert time.monotonic() - started < SLOW_S
    assert str(slow) in again.rows() and str(beside) in again.rows()


def test_a_stop_while_a_querys_picture_is_read_still_finishes_the_batches_read(story_factory, tmp_path,
                                                                               monkeypatch) -> None:
    """A stop that cut short the wait for a query's picture (a read that does not return) unwound past the
    stop's finishing of the ingest's batches: pictures read by then were dropped, to be read again by the
    next start. Now they are finished as at any stop; the query stays in the inbox for the next start."""
    hold_reads(monkeypatch, tmp_path / "stuck-begun")  # a ``stuck*`` picture is never read
    story = story_factory({"a.png": 1})
    news = [save_picture(story.images / f"n{i}.png", seed=10 + i) for i in range(3)]
    for path in news:
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)  # ready once closed a moment
    shutil.copyfile(story.images / "a.png", story.inbox / "stuck.png")
    story.notice(Folder.INBOX, ChangeKind.TOUCHED, story.inbox / "stuck.png")  # ready a settle period on
    story.service.step()  # noticed
    story.clock.advance(0.1)
    assert story.service.step() and story.service.ingest.reading  # the pictures handed to the workers
    story.clock.advance(SETTLE)  # the query's turn: the loop's next pass waits for its picture

    def stop_once_the_picture_is_waited_for() -> None:
        wait_for((tmp_path / "stuck-begun").exists, "the query's picture to be begun")
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGUSR1)  # a handler runs on the main thread, as SIGTERM's does

    previous = signal.signal(signal.SIGUSR1, lambda *_: story.service.stop.set(signal.SIGTERM))
    stopper = threading.Thread(target=stop_once_the_picture_is_waited_for)
    stopper.start()
    try:
        started = time.monotonic()
        assert story.service.serve() == ExitCode.OK
        assert time.monotonic() - started < 20
    finally:
        stopper.join()
        signal.signal(signal.SIGUSR1, previous)
    assert {str(p) for p in news} <= set(story.rows())
    assert (story.inbox / "stuck.png").is_file()
