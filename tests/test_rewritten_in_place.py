"""A picture rewritten while the service watches, keeping its size and its mtime (``exiftool -P`` fixing a
date in place, or writing a temporary file and renaming it over the picture): the watcher saw it written,
so it is read again whatever its stat says. New content is embedded (its new date stored); the same
content costs no model work. A real ``Service`` over the embedded PostgreSQL and the tiny model, driven
in-process (``story_factory``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.preprocess import thumbnail_path_for
from image_search.watch import ChangeKind, Folder
from tests.support.db import ROW_COLUMNS, database_rows, rows_by_path
from tests.support.files import save_photo, save_picture

pytestmark = pytest.mark.integration

ROW_AND_DATE = (*ROW_COLUMNS, "taken_at")


def rows_with_dates(story) -> dict[str, dict]:
    return rows_by_path(database_rows(story.database, ROW_AND_DATE))


def rewrite_keeping_size_and_mtime(path: Path, content: bytes) -> None:
    """``content`` (as long as the file) written over ``path`` in place, its mtime set back, as ``exiftool -P`` does."""
    st = path.stat()
    assert len(content) == st.st_size
    with open(path, "r+b") as handle:
        handle.write(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def same_length(picture: bytes, length: int) -> bytes:
    """A JPEG padded after its end marker to ``length`` bytes (decoders stop at the marker)."""
    assert len(picture) <= length
    return picture + b"\0" * (length - len(picture))


def test_a_date_fixed_in_place_with_size_and_mtime_kept_is_indexed_again(story_factory) -> None:
    story = story_factory()
    photo = save_photo(story.images / "trip" / "p.jpg", seed=5, taken="2023:04:04 12:00:00")
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, photo)
    story.run_until_idle()
    before = rows_with_dates(story)[str(photo)]
    assert before["taken_at"].year == 2023

    data = photo.read_bytes()
    rewrite_keeping_size_and_mtime(photo, data.replace(b"2023:04:04", b"2021:04:04"))
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, photo)  # what inotify reports: modified, then closed
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, photo)
    with capture_logs() as logs:
        story.run_until_idle()
    after = rows_with_dates(story)[str(photo)]
    assert after["file_hash"] == hashlib.md5(photo.read_bytes()).hexdigest() != before["file_hash"]
    assert (after["taken_at"].year, after["taken_at"].month, after["taken_at"].day) == (2021, 4, 4)
    assert (after["source_size"], after["source_mtime_ns"]) == (before["source_size"], before["source_mtime_ns"])
    assert [e["path"] for e in logs if e["event"] == "image_reread"] == [photo]
    assert [e["embedded"] for e in logs if e["event"] == "images_indexed"] == [1]


def test_another_picture_renamed_over_it_with_size_and_mtime_kept_is_indexed_again(story_factory) -> None:
    """The other way editors write: a temporary file, then renamed over the picture."""
    story = story_factory({"a.png": 1, "b.png": 2})
    a = story.images / "a.png"
    before = story.rows()[str(a)]
    st = a.stat()
    other = save_picture(story.cfg.source_directory.parent / "other.png", seed=9, size=(60, 40))
    temporary = story.images / "a.png_exiftool_tmp"
    temporary.write_bytes(same_length(other.read_bytes(), st.st_size))
    os.utime(temporary, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(temporary, a)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, temporary)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, temporary, dest=a)
    story.run_until_idle()
    after = story.rows()[str(a)]
    assert after["file_hash"] == hashlib.md5(a.read_bytes()).hexdigest() != before["file_hash"]
    assert Path(after["processed_path"]).is_file() and thumbnail_path_for(Path(after["processed_path"])).is_file()
    assert story.ask("q.png", other)[0] == str(a)  # it answers as the new picture


def test_the_same_bytes_written_again_are_read_with_no_model_work_and_a_chmod_is_not_read(story_factory, embedder,
                                                                                         monkeypatch) -> None:
    story = story_factory({"a.png": 1})
    a = story.images / "a.png"
    before = story.rows()

    def refused(*args: object, **kwargs: object):
        raise AssertionError("a picture was embedded: its content is stored already")
    monkeypatch.setattr(embedder, "embed_images", refused)
    rewrite_keeping_size_and_mtime(a, a.read_bytes())
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, a)
    with capture_logs() as logs:
        story.run_until_idle()
    assert story.rows() == before
    assert [e["path"] for e in logs if e["event"] == "image_reread"] == [a]
    assert [e["relinked"] for e in logs if e["event"] == "images_indexed"] == [1]

    os.chmod(a, 0o600)  # an attribute change alone: its stat is as stored, nothing to read
    story.notice(Folder.IMAGES, ChangeKind.ATTRIBUTES, a)
    with capture_logs() as logs:
        story.run_until_idle()
    assert not [e for e in logs if e["event"] in ("image_reread", "images_indexed")]

    # A poll's news (another fleet member's copy, seen by this one's snapshot after that member read it):
    # its stat is as stored, nothing to read.
    story.notice(Folder.IMAGES, ChangeKind.STAT_CHANGED, a)
    with capture_logs() as logs:
        story.run_until_idle()
    assert not [e for e in logs if e["event"] in ("image_reread", "images_indexed")]


def test_a_picture_rewritten_then_renamed_before_it_was_read_is_read_at_its_new_name(story_factory) -> None:
    """Its row no longer describes it: the path must not follow the file with the old content's row."""
    story = story_factory({"a.png": 1, "album/c.png": 3})
    a, c = story.images / "a.png", story.images / "album" / "c.png"
    other = save_picture(story.cfg.source_directory.parent / "other.png", seed=9, size=(60, 40)).read_bytes()
    for path in (a, c):
        rewrite_keeping_size_and_mtime(path, same_length(other, path.stat().st_size))
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)
    story.service.step()  # noticed, not read yet
    os.rename(a, story.images / "b.png")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, a, dest=story.images / "b.png")
    os.rename(story.images / "album", story.images / "trip")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "album", dest=story.images / "trip", is_directory=True)
    story.run_until_idle()
    rows = story.rows()
    for moved in (story.images / "b.png", story.images / "trip" / "c.png"):
        assert rows[str(moved)]["file_hash"] == hashlib.md5(moved.read_bytes()).hexdigest()
    assert set(rows) == {str(story.images / "b.png"), str(story.images / "trip" / "c.png")}
