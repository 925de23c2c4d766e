"""Pictures moved into folders made just before (``mkdir new; mv a.jpg new/``): the processed copy and
thumbnail follow the file, so ``processed/`` holds exactly one copy per stored path, whatever order the
watcher's events come in. A real ``Service`` over the embedded PostgreSQL and the tiny model, driven
in-process (``story_factory``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.support.files import save_picture
from tests.support.story import SETTLE
from image_search.watch import ChangeKind, Folder

pytestmark = pytest.mark.integration

PICTURES = {"d5/x.png": 1, "d5/y.png": 2, "d5/z.png": 3}


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
    assert story.copies_in_processed() == story.copies_of_rows()  # the old copies went with their files
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
    assert story.copies_in_processed() == story.copies_of_rows()


def test_a_move_whose_old_path_goes_before_its_new_path_is_read_costs_no_model_work(story_factory) -> None:
    """What inotify delivered, every time it was tried here, for ``mkdir new; mv x.png new/`` when the move
    comes before the watch on ``new`` begins: the walk of ``new`` finds the file, then the move's first half,
    unpaired, arrives as a deletion of the old path, both before the new path has settled. The row follows
    the file (its size, mtime and MD5 are the gone path's): no decoding for the model, no second copy."""
    story = story_factory(PICTURES)
    hashes = {Path(p).name: row["file_hash"] for p, row in story.rows().items()}
    old, new = move(story, "d5/x.png", "new5/x.png")
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new5", is_directory=True)
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, new)
    story.notice(Folder.IMAGES, ChangeKind.DELETED, old)
    with capture_logs() as logs:
        story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(new), str(story.images / "d5/y.png"), str(story.images / "d5/z.png")}
    assert {Path(p).name: row["file_hash"] for p, row in rows.items()} == hashes
    assert story.copies_in_processed() == story.copies_of_rows()
    assert [(str(e["path"]), str(e["previous"])) for e in logs if e["event"] == "image_renamed"] == [(str(new), str(old))]
    assert not [e for e in logs if e["event"] in ("images_indexed", "rows_removed")]


def test_a_deleted_picture_is_not_taken_for_a_waiting_file_of_its_size_and_mtime(story_factory) -> None:
    """Only the same bytes are the moved file: a waiting file with the gone path's size and mtime but other
    pixels (two BMPs of one size) is read as a new picture, and the gone path leaves."""
    story = story_factory(PICTURES)
    gone = save_picture(story.images / "d6/a.bmp", seed=7, fmt="BMP")
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, gone)
    story.run_until_idle()
    assert str(gone) in story.rows()
    other = save_picture(story.images / "new6/b.bmp", seed=8, fmt="BMP")
    st = gone.stat()
    assert other.stat().st_size == st.st_size
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    gone.unlink()
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, other)
    story.notice(Folder.IMAGES, ChangeKind.DELETED, gone)
    with capture_logs() as logs:
        story.run_until_idle()
    rows = story.rows()
    assert str(gone) not in rows and str(other) in rows
    assert [e["embedded"] for e in logs if e["event"] == "images_indexed"] == [1]
    assert not [e for e in logs if e["event"] == "image_renamed"]
    assert [str(e["path"]) for e in logs if e["event"] == "rows_removed"] == [str(gone)]


def test_a_move_whose_old_path_goes_while_its_new_path_is_being_read_costs_no_model_work(story_factory) -> None:
    """The same, when the new path had settled first and its batch is being read as the deletion arrives
    (the walk's files settle in ``settle-seconds``; the move's unpaired first half comes ~0.5 s after the
    move): the batch is finished first, and reading the new path found the content stored."""
    story = story_factory(PICTURES)
    hashes = {Path(p).name: row["file_hash"] for p, row in story.rows().items()}
    old, new = move(story, "d5/y.png", "new7/y.png")
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new7", is_directory=True)
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, new)
    with capture_logs() as logs:
        story.service.step()  # noticed
        story.clock.advance(SETTLE + 0.01)
        story.service.step()  # settled, taken, being read
        assert new not in story.service.images and str(new) not in story.rows()
        story.notice(Folder.IMAGES, ChangeKind.DELETED, old)
        story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(new), str(story.images / "d5/x.png"), str(story.images / "d5/z.png")}
    assert {Path(p).name: row["file_hash"] for p, row in rows.items()} == hashes
    assert story.copies_in_processed() == story.copies_of_rows()
    assert [(e["embedded"], e["relinked"]) for e in logs if e["event"] == "images_indexed"] == [(0, 1)]
    assert not [e for e in logs if e["event"] == "rows_removed"]


def test_a_folder_moved_into_a_folder_made_just_before_keeps_its_rows(story_factory) -> None:
    """``mkdir new; mv d5 new/``: what inotify delivered every time here is the walk of ``new`` finding
    ``new/d5`` and its files, then ``d5`` deleted (the move's first half, unpaired). Each stored path of
    ``d5`` whose file waits under ``new/d5`` follows it; none is embedded again."""
    story = story_factory(PICTURES)
    hashes = {Path(p).name: row["file_hash"] for p, row in story.rows().items()}
    (story.images / "new8").mkdir()
    os.rename(story.images / "d5", story.images / "new8/d5")
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new8", is_directory=True)
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new8/d5", is_directory=True)
    for name in ("z.png", "x.png", "y.png"):
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new8/d5" / name)
    story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "d5", is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(story.images / "new8/d5" / name) for name in ("x.png", "y.png", "z.png")}
    assert {Path(p).name: row["file_hash"] for p, row in rows.items()} == hashes
    assert story.copies_in_processed() == story.copies_of_rows()
    assert len([e for e in logs if e["event"] == "image_renamed"]) == 3
    assert not [e for e in logs if e["event"] in ("images_indexed", "rows_removed")]


def test_a_file_renamed_after_a_chmod_follows_its_row_without_being_read(story_factory) -> None:
    """An attribute change noted before the rename (``chmod``; ``ln`` changes the link count) says nothing
    of the content when the size and mtime are still the row's: the rename moves the path, no reading."""
    story = story_factory(PICTURES)
    x = story.images / "d5/x.png"
    os.chmod(x, 0o600)
    story.notice(Folder.IMAGES, ChangeKind.ATTRIBUTES, x)
    story.service.step()  # noted, not due yet
    old, new = move(story, "d5/x.png", "d5/renamed.png")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, old, dest=new)
    with capture_logs() as logs:
        story.run_until_idle()
    assert str(new) in story.rows() and str(old) not in story.rows()
    assert [str(e["path"]) for e in logs if e["event"] == "image_renamed"] == [str(new)]
    assert not [e for e in logs if e["event"] in ("images_indexed", "image_reread")]
    assert story.copies_in_processed() == story.copies_of_rows()


def test_a_folder_renamed_or_deleted_whole_is_one_line_not_one_per_picture(story_factory) -> None:
    """``mv 2023 2023-old`` of a folder of 10,000 pictures logged 10,000 ``image_renamed`` lines, and
    ``rm -rf`` of one (an event per file, then the folder's) 10,000 ``rows_removed count=1``. Now each is one
    line with the count (each file's own at debug); three or fewer are still named one by one."""
    story = story_factory({**{f"trip/p{i}.png": 10 + i for i in range(8)}, **{f"junk/q{i}.png": 30 + i for i in range(6)},
                           "single.png": 50})
    os.rename(story.images / "trip", story.images / "trip-2023")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "trip", dest=story.images / "trip-2023",
                 is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    said = [e for e in logs if e["log_level"] != "debug" and e["event"] in ("image_renamed", "images_renamed")]
    assert [(e["event"], e["count"], e["path"], e["previous"]) for e in said] == [
        ("images_renamed", 8, story.images / "trip-2023", story.images / "trip")]

    for i in range(6):  # rm -rf junk: inotify's order, each file's deletion, then the folder's
        (story.images / "junk" / f"q{i}.png").unlink()
        story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "junk" / f"q{i}.png")
    (story.images / "junk").rmdir()
    story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "junk", is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    said = [(e["path"], e["count"]) for e in logs if e["event"] == "rows_removed" and e["log_level"] == "info"]
    assert said == [(story.images / "junk", 6)]

    (story.images / "single.png").unlink()  # one file: named, as ever
    story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "single.png")
    with capture_logs() as logs:
        story.run_until_idle()
    assert [(e["path"], e["count"]) for e in logs if e["event"] == "rows_removed"] == [(story.images / "single.png", 1)]
    assert {Path(p).parent.name for p in story.rows()} == {"trip-2023"}


def test_a_folder_moved_into_a_new_one_is_one_line_whatever_order_its_events_come_in(story_factory) -> None:
    """``mkdir new; mv 2023/ new/`` arrives as the walk of ``new`` finding the files, then the old paths
    deleted: each file was followed on its own, one ``image_renamed`` line each."""
    story = story_factory({f"d6/p{i}.png": 60 + i for i in range(5)})
    (story.images / "new9").mkdir()
    os.rename(story.images / "d6", story.images / "new9/d6")
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new9", is_directory=True)
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "new9/d6", is_directory=True)
    story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "d6", is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    assert set(story.rows()) == {str(story.images / f"new9/d6/p{i}.png") for i in range(5)}
    said = [(e["event"], e.get("count"), e["path"]) for e in logs
            if e["event"] in ("image_renamed", "images_renamed") and e["log_level"] == "info"]
    assert said == [("images_renamed", 5, story.images / "new9/d6")]
    assert not [e for e in logs if e["event"] in ("images_indexed", "rows_removed")]


def test_files_renamed_here_and_there_while_stopped_are_one_line_naming_where_and_one_of_them(story_factory) -> None:
    """A start that follows renames made while nothing watched, of files in several folders: the one line
    said ``path=images previous=images``. It names the folder that holds them and one of them."""
    first = story_factory({f"f{i % 2}/p{i}.png": 70 + i for i in range(5)}, cleanup_on_exit=False)
    images = first.images
    for i in range(5):
        os.rename(images / f"f{i % 2}/p{i}.png", images / f"f{i % 2}/renamed-{i}.png")
    with capture_logs() as logs:
        again = story_factory(after=first)
    said = [e for e in logs if e["event"] in ("image_renamed", "images_renamed") and e["log_level"] == "info"]
    assert [(e["event"], e["count"], e["folder"]) for e in said] == [("images_renamed", 5, images)]
    assert said[0]["first"].name.startswith("renamed-") and said[0]["first_previous"].name.startswith("p")
    assert {Path(p).name for p in again.rows()} == {f"renamed-{i}.png" for i in range(5)}
