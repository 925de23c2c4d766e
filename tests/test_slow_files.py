"""A picture that takes long to read (a huge panorama, a file on a slow share) holds back nothing else: the
pictures dropped with it and after it are searchable while it is still being read, and it is indexed
once it is. The service runs in-process (``story_factory``); the slow read is a worker's, held by
``tests/support/held_reads.py``, and a file counts as slow after 0.3 s here (``SLOW_FILE_S``)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from structlog.testing import capture_logs

import image_search.workers as workers
from image_search.watch import ChangeKind, Folder
from tests.support.files import save_picture
from tests.support.held_reads import hold_reads
from tests.support.story import SETTLE, Story

pytestmark = pytest.mark.integration

SLOW_S = 10.0  # how long the slow picture holds its worker: far longer than anything else here takes


@pytest.fixture
def slow_begun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Set before the service starts its workers. The mark: the slow read was begun."""
    monkeypatch.setattr(workers, "SLOW_FILE_S", 0.3)
    mark = tmp_path / "slow-begun"
    hold_reads(monkeypatch, mark, slow_s=SLOW_S)
    return mark


def step_until(story: Story, condition: Callable[[], object], what: str, timeout: float) -> None:
    """The loop's passes, the clock past each settle period, until ``condition`` holds (``timeout``: real s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        story.clock.advance(SETTLE + 0.01)
        story.service.step()


def drop(story: Story, name: str, seed: int) -> Path:
    path = save_picture(story.images / name, seed=seed, size=(120, 90))
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)
    return path


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


@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_a_slow_picture_deleted_or_renamed_while_it_is_read_holds_back_nothing(story_factory, slow_begun, how):
    """The deletion or rename of a file being read waited for its read (the rows it acts on must be in):
    the loop, queries and the pictures after it with it, up to the per-file limit. Now its read is dropped:
    a renamed one is read anew at its new path, and the copy the dropped read saves as it ends is removed."""
    story = story_factory({"a.png": 1})
    slow = drop(story, "slow.png", 2)
    step_until(story, lambda: story.service.ingest.slow_files == (slow,), "the slow picture set aside", SLOW_S - 3)
    started = time.monotonic()
    if how == "deleted":
        slow.unlink()
        story.notice(Folder.IMAGES, ChangeKind.DELETED, slow)
    else:
        slow.rename(story.images / "renamed.png")
        story.notice(Folder.IMAGES, ChangeKind.MOVED, slow, dest=story.images / "renamed.png")
    after = drop(story, "after.png", 3)
    step_until(story, lambda: str(after) in story.rows(), "the picture dropped after it", SLOW_S - 3)
    assert time.monotonic() - started < SLOW_S - 3
    time.sleep(max(0.0, started + SLOW_S + 1 - time.monotonic()))  # the dropped read has ended, saving its copy
    story.run_until_idle()
    expected = {"a.png", "after.png"} | ({"renamed.png"} if how == "renamed" else set())
    assert set(story.rows()) == {str(story.images / name) for name in expected}
    assert story.copies_in_processed() == story.copies_of_rows()  # the dropped read's copy is gone


def test_a_rescan_while_a_slow_picture_is_read_holds_back_nothing(story_factory, slow_begun):
    """A rescan finished every batch being read before it compared the folder with the rows: with a slow
    file set aside, it waited for it, and the loop with it (at every rescan-interval while it lasted)."""
    story = story_factory({"a.png": 1}, rescan_interval=60.0)
    slow = drop(story, "slow.png", 2)
    step_until(story, lambda: story.service.ingest.slow_files == (slow,), "the slow picture set aside", SLOW_S - 3)
    started = time.monotonic()
    with capture_logs() as logs:
        story.clock.advance(60)  # the rescan is due: it finds slow.png with no row yet
        after = drop(story, "after.png", 3)
        step_until(story, lambda: str(after) in story.rows(), "the picture dropped after the rescan", SLOW_S - 3)
        assert time.monotonic() - started < SLOW_S - 3
        story.run_until_idle()
    assert [e["event"] for e in logs if e["event"] == "rescan_complete"] == ["rescan_complete"]
    assert set(story.rows()) == {str(story.images / n) for n in ("a.png", "slow.png", "after.png")}
    assert sum(e.get("embedded", 0) for e in logs if e["event"] == "images_indexed") == 2  # each once
