"""The source folder against the index when the folder is not what it was: missing (a disk or share not
mounted, a folder moved away), empty while the index holds its pictures (an unmounted mount point),
another source-directory's rows on the same database, and links left pointing at a file that went.

None of these is "every picture deleted": the rows and processed copies stay until the folder says, file
by file, that a picture is gone. A real ``Service`` over the embedded PostgreSQL and the tiny model,
driven in-process (``story_factory``)."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.errors import ExitCode, SourceFolderMissing
from image_search.mounts import MountTable
from image_search.sync import compare_folder, ensure_source_folder
from image_search.watch import ChangeKind, Folder
from tests.support.files import save_picture

pytestmark = pytest.mark.integration

PICTURES = {"a.png": 1, "b.png": 2, "album/c.png": 3}


def processed_copies(story) -> dict[str, Path]:
    """Each indexed source -> its processed copy."""
    return {path: Path(row["processed_path"]) for path, row in story.rows().items()}


def move_contents(folder: Path, aside: Path) -> None:
    """Empty ``folder`` into ``aside``, leaving the folder itself (a mount point whose disk went)."""
    aside.mkdir()
    for entry in folder.iterdir():
        shutil.move(entry, aside / entry.name)


def test_a_missing_source_folder_with_indexed_pictures_stops_the_start_and_keeps_everything(story_factory,
                                                                                          tmp_path) -> None:
    story = story_factory(PICTURES)
    rows, copies = story.rows(), processed_copies(story)
    story.images.rename(tmp_path / "images-aside")  # the watch is lost, systemd restarts the service
    with pytest.raises(SourceFolderMissing) as failed:
        ensure_source_folder(story.cfg, story.service.rt.store)  # the start-up, before the model loads
    assert failed.value.exit_code == ExitCode.SOURCE_MISSING
    assert str(story.images) in str(failed.value) and "3 paths" in str(failed.value)
    again = story_factory(after=story, start=False)
    with pytest.raises(SourceFolderMissing):
        again.service.start()  # the service's own rescan refuses too, should the folder go after the check
    assert not story.images.exists()  # not created: an empty folder would read as every picture deleted
    assert again.rows() == rows
    assert all(copy.is_file() for copy in copies.values())
    (tmp_path / "images-aside").rename(story.images)  # the disk is back
    with capture_logs() as logs:
        story_factory(after=again)
    assert again.rows() == rows
    assert not [e for e in logs if e["event"] in ("rows_removed", "images_indexed")]


@pytest.mark.parametrize(("holder", "said"), [("file", "is not a folder (a file holds its name)"),
                                              ("dangling link", "is a link to nothing")])
def test_a_source_folder_whose_name_a_file_or_dead_link_holds_says_which(story_factory, tmp_path, holder,
                                                                          said) -> None:
    story = story_factory(PICTURES)
    story.images.rename(tmp_path / "images-aside")
    if holder == "file":
        story.images.write_text("mine\n")
    else:
        story.images.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SourceFolderMissing, match=re.escape(f"{story.images} {said}, but the index holds 3 paths")):
        ensure_source_folder(story.cfg, story.service.rt.store)


def test_a_fresh_install_creates_the_source_folder(story_factory) -> None:
    story = story_factory(start=False)
    story.images.rmdir()  # nothing indexed, no folder yet
    ensure_source_folder(story.cfg, story.service.rt.store)
    assert story.images.is_dir()


def test_an_empty_source_folder_with_indexed_pictures_looks_unmounted_and_keeps_them(story_factory,
                                                                                   tmp_path) -> None:
    story = story_factory(PICTURES)
    rows, copies = story.rows(), processed_copies(story)
    move_contents(story.images, tmp_path / "disk")
    with capture_logs() as logs:
        again = story_factory(after=story)  # a restart over the empty mount point
        again.notice(Folder.WATCHING, ChangeKind.LOST, Path())  # and the rescan after lost events
        again.run_until_idle()
    assert again.rows() == rows
    assert all(copy.is_file() for copy in copies.values())
    warnings = [e for e in logs if e["event"] == "source_folder_empty"]
    assert [(e["path"], e["kept"], e["log_level"]) for e in warnings] == [(story.images, 3, "warning")] * 2
    assert "unmounted" in warnings[0]["reason"]
    assert not [e for e in logs if e["event"] == "rows_removed"]

    for entry in (tmp_path / "disk").iterdir():  # the disk is mounted again
        shutil.move(entry, story.images / entry.name)
    (story.images / "a.png").unlink()  # and a picture deleted while the service watches still goes
    again.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "a.png")
    with capture_logs() as logs:
        again.run_until_idle()
    assert set(again.rows()) == set(rows) - {str(story.images / "a.png")}
    assert not copies[str(story.images / "a.png")].exists()
    assert [e["path"] for e in logs if e["event"] == "rows_removed"] == [story.images / "a.png"]


def test_a_start_names_the_pictures_deleted_while_it_was_stopped_as_a_running_service_does(story_factory) -> None:
    """The start's rescan said ``rows_removed count=1`` with no path: which picture left, the journal did not
    say. Now it names up to three, as the running service does, and their folder for more."""
    story = story_factory({"a.png": 1, "b.png": 2, "album/x.png": 3, "album/y.png": 4, "album/z.png": 5,
                           "album/w.png": 6})
    images = story.images

    def started_after(deleted: list[str]):
        nonlocal story
        for name in deleted:  # unseen: the story's watcher is told nothing, as a stopped service sees nothing
            (images / name).unlink()
        with capture_logs() as logs:
            story = story_factory(after=story)
        return [(e["path"], e["count"]) for e in logs if e["event"] == "rows_removed" and e["log_level"] == "info"]

    assert started_after(["album/x.png", "album/y.png", "album/z.png", "album/w.png"]) == [(images / "album", 4)]
    assert started_after(["a.png"]) == [(images / "a.png", 1)]
    assert set(story.rows()) == {str(images / "b.png")}


def test_a_rescan_of_another_source_directory_leaves_this_ones_rows(story_factory, tmp_path) -> None:
    """``image-search index`` with another source-directory on the same database: it answers for its own
    folder only."""
    story = story_factory(PICTURES)
    rows, copies = story.rows(), processed_copies(story)
    other = tmp_path / "other-images"
    save_picture(other / "z.png", seed=9)
    with capture_logs() as logs:
        state = compare_folder(dataclasses.replace(story.cfg, source_directory=other), story.service.rt.store)
    assert state.removed == [] and state.changed == [other / "z.png"]
    assert story.rows() == rows
    assert all(copy.is_file() for copy in copies.values())
    assert not [e for e in logs if e["event"] == "rows_removed"]


@pytest.mark.parametrize("what_happens", ["deleted", "renamed"])
def test_a_link_whose_target_goes_loses_its_path(story_factory, what_happens: str) -> None:
    story = story_factory({"tgt.png": 1, "other.png": 2})
    target, link = story.images / "tgt.png", story.images / "lnk.png"
    link.symlink_to("tgt.png")
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, link)
    story.run_until_idle()
    store = story.service.rt.store
    assert {str(target), str(link)} <= set(store.sources())  # one picture, two paths
    story.delete_or_rename(target, what_happens, to="renamed.png")
    with capture_logs() as logs:
        story.run_until_idle()
    assert str(link) not in store.sources()
    assert str(link) not in story.ask("q.png", story.images / "other.png")  # no hit names the dangling link
    removed = [(e["path"], e["reason"]) for e in logs if e["event"] == "rows_removed"]
    assert (link, "symbolic link whose target is gone") in removed
    if what_happens == "renamed":
        assert str(story.images / "renamed.png") in store.sources()  # the picture followed its file


@pytest.mark.parametrize("mounted", [False, True])
def test_a_subfolder_fstab_names_with_nothing_mounted_keeps_its_rows(story_factory, tmp_path, mounted) -> None:
    """``images/album`` is a NAS share in /etc/fstab. Unmounted (the NAS is down at boot) it is an empty
    folder, and its pictures are not deleted; mounted and emptied, they are."""
    story = story_factory({**PICTURES, "album/d.png": 4})
    rows, copies = story.rows(), processed_copies(story)
    album = story.images / "album"
    move_contents(album, tmp_path / "nas")
    (story.images / "a.png").unlink()  # a picture outside the share, deleted while nothing watched
    share = Path(os.path.realpath(album))
    mounts = MountTable(expected=frozenset({share}), mounted=frozenset({share} if mounted else ()))
    with capture_logs() as logs:
        state = compare_folder(story.cfg, story.service.rt.store, mounts=mounts)
    in_album = {str(album / "c.png"), str(album / "d.png")}
    gone = {str(story.images / "a.png")} | (in_album if mounted else set())
    assert set(state.removed) == gone
    assert set(story.rows()) == set(rows) - gone
    assert {path for path, copy in copies.items() if copy.is_file()} == set(rows) - gone
    warnings = [(e["path"], e["kept"], e["log_level"]) for e in logs if e["event"] == "source_subfolder_unmounted"]
    assert warnings == ([] if mounted else [(album, 2, "warning")])


def test_a_subfolder_mounted_by_hand_and_not_mounted_at_a_later_rescan_keeps_its_rows(story_factory, tmp_path) -> None:
    """``images/album`` is a share mounted by hand (no fstab line). A rescan sees it mounted and notes it in
    processed-directory; after a reboot that did not mount it again its pictures are kept; once its empty
    folder is deleted (gone for good), they go."""
    story = story_factory({**PICTURES, "album/d.png": 4})
    rows, store = story.rows(), story.service.rt.store
    album = story.images / "album"
    share = Path(os.path.realpath(album))
    compare_folder(story.cfg, store, mounts=MountTable(expected=frozenset(), mounted=frozenset({share})))
    move_contents(album, tmp_path / "nas")  # not mounted: an empty folder
    with capture_logs() as logs:
        state = compare_folder(story.cfg, store, mounts=MountTable(expected=frozenset(), mounted=frozenset()))
    assert state.removed == [] and set(story.rows()) == set(rows)
    (warning,) = [e for e in logs if e["event"] == "source_subfolder_unmounted"]
    assert (warning["path"], warning["kept"]) == (album, 2) and "earlier rescan" in warning["reason"]
    assert warning["action"].endswith("delete the empty folder")
    album.rmdir()
    state = compare_folder(story.cfg, store, mounts=MountTable(expected=frozenset(), mounted=frozenset()))
    assert set(state.removed) == {str(album / "c.png"), str(album / "d.png")}


def test_a_subfolder_that_cannot_be_listed_keeps_its_rows(story_factory, monkeypatch) -> None:
    """A share's I/O error, or a folder another user closed: what it holds is unknown, not deleted. (As
    root no permission stops a listing, so the listing's failure is injected.)"""
    story = story_factory({**PICTURES, "album/d.png": 4})
    rows, copies = story.rows(), processed_copies(story)
    album = story.images / "album"
    listing = os.scandir

    def scandir(path):
        if Path(path) == album:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return listing(path)

    monkeypatch.setattr("image_search.discover.os.scandir", scandir)
    (story.images / "a.png").unlink()  # deleted while nothing watched: still goes
    state = compare_folder(story.cfg, story.service.rt.store, mounts=MountTable(frozenset(), frozenset()))
    assert state.removed == [str(story.images / "a.png")]
    assert set(story.rows()) == set(rows) - {str(story.images / "a.png")}
    assert all(copies[path].is_file() for path in story.rows())
    assert [(e.path, e.reason) for e in state.skipped] == [
        (album, "folder cannot be read (Input/output error); kept: 2 indexed paths under it")]


def test_a_subfolder_made_readable_is_walked_and_another_folders_attribute_change_is_not(story_factory,
                                                                                          monkeypatch) -> None:
    """``chmod o+rx locked`` (a folder that could not be listed): its attribute change makes the service walk
    it, and its pictures are indexed. ``chmod -R`` over readable folders changes every folder's attributes
    too: walked, a tree was walked once per level; its files' own events say what changed in them."""
    story = story_factory(PICTURES)
    locked = story.images / "locked"
    save_picture(locked / "e.png", seed=5)
    listing, refused = os.scandir, {locked}

    def scandir(path):
        if Path(path) in refused:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return listing(path)

    monkeypatch.setattr("image_search.discover.os.scandir", scandir)
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, locked, is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    assert [e["reason"] for e in logs if e["event"] == "image_skipped"] == ["folder cannot be read (Permission denied)"]
    assert str(locked / "e.png") not in story.rows()

    walked: list[Path] = []
    monkeypatch.setattr("image_search.discover.os.scandir", lambda path: walked.append(Path(path)) or scandir(path))
    story.notice(Folder.IMAGES, ChangeKind.ATTRIBUTES, story.images / "album", is_directory=True)  # chmod, readable
    story.run_until_idle()
    assert walked == []
    refused.clear()  # the chmod that makes it readable
    story.notice(Folder.IMAGES, ChangeKind.ATTRIBUTES, locked, is_directory=True)
    story.run_until_idle()
    assert walked == [locked]
    assert str(locked / "e.png") in story.rows()
    story.notice(Folder.IMAGES, ChangeKind.ATTRIBUTES, locked, is_directory=True)  # readable since: not walked again
    story.run_until_idle()
    assert walked == [locked]


def test_a_folder_renamed_while_the_rescan_walks_keeps_its_rows(story_factory, monkeypatch) -> None:
    """``mv album album-trip`` between the rescan's listing of the top folder and its walk of ``album``: the
    walk finds ``album`` gone, and ``album-trip`` is not in the listing it walks. The top folder, written
    into since it was listed, is listed again: ``album-trip`` is walked and its pictures take their rows
    along. No row is removed, and no skip is logged for a folder that is not broken."""
    story = story_factory({**PICTURES, "album/d.png": 4})
    rows = story.rows()
    album, renamed = story.images / "album", story.images / "album-trip"
    listing = os.scandir

    def scandir(path):
        if Path(path) == album and album.exists():
            os.rename(album, renamed)  # just as the walk reaches it
        return listing(path)

    monkeypatch.setattr("image_search.discover.os.scandir", scandir)
    with capture_logs() as logs:
        state = compare_folder(story.cfg, story.service.rt.store, mounts=MountTable(frozenset(), frozenset()))
    assert state.removed == [] and state.skipped == [] and state.renamed == 2
    assert {path.replace(f"{album}/", f"{renamed}/"): row["id"] for path, row in rows.items()} == {
        path: row["id"] for path, row in story.rows().items()}
    assert not [e for e in logs if e["event"] in ("rows_removed", "image_skipped")]


def test_a_picture_moved_into_a_folder_the_walk_had_passed_keeps_its_row(story_factory, monkeypatch) -> None:
    """``mv later/x.png 2023/`` after the rescan's walk listed ``2023/`` and before it reached ``later/`` (a
    walk of a share takes minutes): the walk found the picture in neither, removed its row and processed copy
    as deleted, and the move's event then read it as new, its embedding done again. A folder written into
    since it was listed is listed again: the picture takes its row along."""
    story = story_factory({"2023/a.png": 5, "later/x.png": 6, "later/y.png": 7})
    rows = story.rows()
    moved_from, moved_to = story.images / "later" / "x.png", story.images / "2023" / "x.png"
    listing = os.scandir

    def scandir(path):
        if Path(path) == moved_from.parent and moved_from.exists():
            os.rename(moved_from, moved_to)  # just as the walk reaches later/, having passed 2023/
        return listing(path)

    monkeypatch.setattr("image_search.discover.os.scandir", scandir)
    state = compare_folder(story.cfg, story.service.rt.store, mounts=MountTable(frozenset(), frozenset()))
    assert state.removed == [] and state.renamed == 1
    assert story.rows()[str(moved_to)]["id"] == rows[str(moved_from)]["id"]
    assert Path(story.rows()[str(moved_to)]["processed_path"]).is_file()
