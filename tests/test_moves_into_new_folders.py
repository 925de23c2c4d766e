"""Pictures moved into folders made just before (``mkdir new; mv a.jpg new/``): the processed copy and
thumbnail follow the file, so ``processed/`` holds exactly one copy per stored path, whatever order the
watcher's events come in. A real ``Service`` over the embedded PostgreSQL and the tiny model, driven
in-process (``story_factory``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.preprocess import thumbnail_path_for
from image_search.sync import SOURCE_MARKER
from image_search.watch import ChangeKind, Folder

pytestmark = pytest.mark.integration

PICTURES = {"d5/x.png": 1, "d5/y.png": 2, "d5/z.png": 3}


def copies_in_processed(story) -> set[Path]:
    """Every file in processed-directory but its record of the source folder."""
    return {p for p in story.cfg.processed_directory.rglob("*") if p.is_file() and p.name != SOURCE_MARKER}


def copies_of_rows(story) -> set[Path]:
    """The processed copy and thumbnail of each stored path."""
    processed = [Path(row["processed_path"]) for row in story.rows().values()]
    return {*processed, *(thumbnail_path_for(p) for p in processed)}


def move(story, src: str, dest: str) -> tuple[Path, Path]:
    old, new = story.images / src, story.images / dest
    new.parent.mkdir(parents=True, exist_ok=True)
    os.rename(old, new)
    return old, new


def test_a_file_moved_into_a_new_folder_takes_its_processed_copy_along(story_factory) -> None:
    story = story_factory(PICTURES)
    hashes = {Path(p).name: row["file_hash"] for p, row in story.rows().items()}
    for src, dest, made in (("d5/x.png", "new2/x.png", "new2"), ("d5/y.png", "new3/sub/y.png", "new3")):
        old, new = move(story, src, dest)
        # inotify: the folder made (its walk finds the file already there), then the file's move
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / made, is_directory=True)
        story.notice(Folder.IMAGES, ChangeKind.MOVED, old, dest=new)
    with capture_logs() as logs:
        story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(story.images / p) for p in ("new2/x.png", "new3/sub/y.png", "d5/z.png")}
    assert {Path(p).name: row["file_hash"] for p, row in rows.items()} == hashes
    assert copies_in_processed(story) == copies_of_rows(story)  # the old copies went with their files
    assert sorted(str(e["path"]) for e in logs if e["event"] == "image_renamed") == [
        str(story.images / "new2/x.png"), str(story.images / "new3/sub/y.png")]
    assert not [e for e in logs if e["event"] == "images_indexed"]  # nothing read again


def test_a_move_seen_only_at_its_new_path_leaves_no_copy_behind(story_factory) -> None:
    """The watch on a new folder may begin after a file was moved into it: the walk of the folder finds
    the file, and the move's first half comes late, as a deletion. Read at its new path, the file's
    content is found stored: its old path, whose file is gone, leaves with its processed copy."""
    story = story_factory(PICTURES)
    old, new = move(story, "d5/x.png", "new4/x.png")
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new4", is_directory=True)
    story.run_until_idle()
    story.notice(Folder.IMAGES, ChangeKind.DELETED, old)
    story.run_until_idle()
    assert set(story.rows()) == {str(new), str(story.images / "d5/y.png"), str(story.images / "d5/z.png")}
    assert copies_in_processed(story) == copies_of_rows(story)
