"""A folder under processed/ that refuses writes (another user's, immutable), or one copy in it that
cannot be replaced, costs only its own pictures, each named with the fix, once: the rest of the ingest
goes on (it was held up whole, as an outage of processed/). The service runs in-process
(``story_factory``); ``chattr +i`` refuses root's writes too (EPERM), as another user's folder refuses
this one's (EACCES)."""

from __future__ import annotations

import hashlib

import pytest
from structlog.testing import capture_logs

from image_search.watch import ChangeKind, Folder
from tests.support.files import immutable, save_picture

pytestmark = pytest.mark.integration


def test_a_sub_folder_or_a_copy_in_processed_that_refuses_writes_costs_its_files_only(story_factory) -> None:
    """processed/2023 made by another user (or made immutable): its pictures' copies cannot be written; and
    processed/b.png.jpg immutable: b.png rewritten cannot have its copy replaced. That held up the whole
    ingest as an outage of processed/, every folder waiting on the one. Now each of those pictures is
    skipped naming the folder or the file and the fix, the others are indexed, and once they take writes
    the next rescan indexes them."""
    story = story_factory({"2023/a.png": 1, "b.png": 2}, rescan_interval=60.0)
    denied, copy = story.cfg.processed_directory / "2023", story.cfg.processed_directory / "b.png.jpg"
    with immutable(denied, copy):
        for name, seed in (("2023/new.png", 3), ("2023/06/deeper.png", 4), ("c.png", 5), ("b.png", 6)):
            save_picture(story.images / name, seed=seed)
            story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / name)
        with capture_logs() as logs:
            story.run_until_idle()
    reasons = {e["path"].name: e["reason"] for e in logs if e["event"] == "image_skipped"}
    assert sorted(reasons) == ["b.png", "deeper.png", "new.png"]
    for name in ("deeper.png", "new.png"):
        assert f"into {denied} (Operation not permitted)" in reasons[name] and "into that folder" in reasons[name]
    assert f"{copy} cannot be replaced (Operation not permitted)" in reasons["b.png"] and "that file" in reasons["b.png"]
    assert all("fix its owner, permissions or attributes" in reason for reason in reasons.values())
    assert not [e for e in logs if e["event"] == "output_unwritable"]
    assert set(story.rows()) == {str(story.images / n) for n in ("2023/a.png", "b.png", "c.png")}
    story.clock.advance(60)  # they take writes again: the next rescan
    story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(story.images / n) for n in ("2023/a.png", "b.png", "c.png", "2023/new.png",
                                                         "2023/06/deeper.png")}
    assert (denied / "06" / "deeper.png.jpg").is_file()
    assert rows[str(story.images / "b.png")]["file_hash"] == hashlib.md5((story.images / "b.png").read_bytes()).hexdigest()


def test_a_copy_a_refusing_folder_keeps_from_being_made_again_is_named_once_not_at_every_rescan(story_factory) -> None:
    """A picture's processed copy deleted in a folder that then refuses writes: each rescan found it missing
    and said so at info ("made again", which it was not), one line a file every rescan-interval. Now the
    first rescan names it and why it cannot be made, the next ones stay quiet while nothing changed, and
    once the folder takes writes the copy is made."""
    story = story_factory({"2023/a.png": 1, "b.png": 2}, rescan_interval=60.0)
    denied = story.cfg.processed_directory / "2023"
    (denied / "a.png.jpg").unlink()
    said = []
    with immutable(denied):
        for _ in range(3):
            story.clock.advance(60)
            with capture_logs() as logs:
                story.run_until_idle()
            said.append(sorted(e["event"] for e in logs if e["event"] in ("processed_copy_missing", "image_skipped")
                               and e["log_level"] != "debug"))
    assert said == [["image_skipped", "processed_copy_missing"], [], []]
    story.clock.advance(60)
    story.run_until_idle()
    assert (denied / "a.png.jpg").is_file()
