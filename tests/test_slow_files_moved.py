"""A slow picture deleted, renamed or looked at by a rescan while it is read holds back nothing: its read
is dropped (a renamed one read anew), or left to land once read. The slow read is held in a worker by
``tests/support/held_reads.py``; test_slow_files.py tells the rest of the story."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from tests.support.held_reads import SLOW_S, drop, step_until

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_a_slow_picture_deleted_or_renamed_while_it_is_read_holds_back_nothing(story_factory, slow_begun, how):
    """The deletion or rename of a file being read waited for its read (the rows it acts on must be in):
    the loop, queries and the pictures after it with it, up to the per-file limit. Now its read is dropped:
    a renamed one is read anew at its new path, and the copy the dropped read saves as it ends is removed."""
    story = story_factory({"a.png": 1})
    slow = drop(story, "slow.png", 2)
    step_until(story, lambda: story.service.ingest.slow_files == (slow,), "the slow picture set aside", SLOW_S - 3)
    started = time.monotonic()
    story.delete_or_rename(slow, how, to="renamed.png")
    after = drop(story, "after.png", 3)
    step_until(story, lambda: str(after) in story.rows(), "the picture dropped after it", SLOW_S - 3)
    assert time.monotonic() - started < SLOW_S - 3
    time.sleep(max(0.0, started + SLOW_S + 1 - time.monotonic()))  # the dropped read has ended, saving its copy
    story.run_until_idle()
    expected = {"a.png", "after.png"} | ({"renamed.png"} if how == "renamed" else set())
    assert set(story.rows()) == {str(story.images / name) for name in expected}
    assert story.copies_in_processed() == story.copies_of_rows()  # the dropped read's copy is gone


def test_a_slow_picture_replaced_by_a_rename_while_it_is_read_holds_back_nothing(story_factory, slow_begun):
    """An editor's save (a new file renamed over the old) while the old is read: its read is dropped, and
    the new picture's read waited in the pool for it to end, holding back the batch it was in with the
    pictures dropped after it (helper x: 11-13 s). Now the new read is not submitted until then."""
    import hashlib
    import os

    from image_search.watch import ChangeKind, Folder
    from tests.support.files import save_picture

    story = story_factory({"a.png": 1})
    slow = drop(story, "slow.png", 2)
    step_until(story, lambda: story.service.ingest.slow_files == (slow,), "the slow picture set aside", SLOW_S - 3)
    started = time.monotonic()
    saved = save_picture(story.images / ".slow.png.tmp", seed=9, size=(100, 80), fmt="PNG")
    os.rename(saved, slow)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, saved, dest=slow)
    after = drop(story, "after.png", 3)
    step_until(story, lambda: str(after) in story.rows(), "the picture dropped after it", SLOW_S - 3)
    assert time.monotonic() - started < SLOW_S - 3
    time.sleep(max(0.0, started + SLOW_S + 1 - time.monotonic()))  # the dropped read has ended
    step_until(story, lambda: str(slow) in story.rows(), "the new picture", 30)
    story.run_until_idle()
    assert story.rows()[str(slow)]["file_hash"] == hashlib.md5(slow.read_bytes()).hexdigest()
    assert set(story.rows()) == {str(story.images / n) for n in ("a.png", "slow.png", "after.png")}
    assert story.copies_in_processed() == story.copies_of_rows()


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
