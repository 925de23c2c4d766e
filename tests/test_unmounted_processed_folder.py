"""processed/ on a disk of its own (a USB disk, a NAS share mounted by hand or by udisks: in no fstab) that is
unmounted while the service runs. In its place is the empty mount point on the disk under it. Nothing told the
service: new pictures' copies went onto that disk, and the next rescan found every copy missing and made them
all again there, filling the root disk. The processed folder's record of its source folder is on the disk
with the copies; while it is not there, no copy is written. A new picture waits as on a full disk, said once;
the rescan takes the copies as away, not missing, and removes no row. Once the disk is back, the waiting
picture is indexed and every copy is where it was. A real ``Service`` over the embedded PostgreSQL and the
tiny model, in-process (``story_factory``); the start that refuses such a folder is in
test_processed_folder.py and test_cli.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.mounts import MountTable
from image_search.preprocess import SOURCE_MARKER
from image_search.sync import compare_folder
from image_search.watch import ChangeKind, Folder
from tests.support.files import save_picture
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

PICTURES = {"a.png": 1, "album/b.png": 2, "album/c.png": 3}


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_no_copy_lands_on_the_disk_under_an_unmounted_processed_folder(story_factory) -> None:
    story = story_factory(PICTURES, rescan_interval=60.0)
    processed = story.cfg.processed_directory
    disk = processed.with_name("usb-disk")  # the copies' disk, "unmounted": away from the mount point
    on_disk = files_under(processed)
    assert Path(SOURCE_MARKER) in on_disk and len(on_disk) > 2 * len(PICTURES)
    processed.rename(disk)
    processed.mkdir()  # the mount point, empty, on the disk under it

    new = save_picture(story.images / "album" / "d.png", seed=4)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, new)
    a_id = story.rows()[str(story.images / "a.png")]["id"]
    with capture_logs() as logs:
        story.delete_or_rename(story.images / "a.png", "renamed", to="a2.png")  # its copy cannot follow: made later
        (story.images / "album" / "c.png").unlink()  # its event lost: the rescan's to find
        # The workers read the picture in real time: until its copy meets the outage, then the rescan is due.
        wait_for(lambda: story.let_settle_periods_pass(1) or any(e["event"] == "output_unwritable" for e in logs),
                 "the new picture's copy to meet the outage")
        story.clock.advance(61)  # the rescan is due, and the picture's next try
        story.let_settle_periods_pass(5)
    assert list(processed.iterdir()) == []
    assert str(new) not in story.rows()
    assert story.rows()[str(story.images / "a2.png")]["id"] == a_id  # the rename followed all the same
    (renamed,) = [e for e in logs if e["event"] == "image_renamed"]
    assert renamed["processed"].startswith("not moved: processed-directory's record of its source folder is gone")
    # Said once (its repeats are debug lines, which a test run that configured logging before drops).
    waits = [e for e in logs if e["event"] == "output_unwritable"]
    assert [e["log_level"] for e in waits] == ["warning"] + ["debug"] * (len(waits) - 1)
    assert f"its record of the source folder ({processed / SOURCE_MARKER}) is gone" in waits[0]["reason"]
    assert "its disk is not mounted" in waits[0]["reason"]
    # The rescan's word. Nor does it remove a row: which mount points under images/ it remembers is away too.
    assert [(e["path"], e["kept"]) for e in logs if e["event"] == "processed_folder_away"] == [(processed, 1)]
    assert str(story.images / "album" / "c.png") in story.rows()
    assert not [e for e in logs if e["event"] in ("processed_copy_missing", "processed_copies_missing",
                                                  "processed_copies_removed", "image_removed")]

    processed.rmdir()
    disk.rename(processed)  # mounted again
    story.clock.advance(61)
    story.run_until_idle()
    assert str(new) in story.rows() and str(story.images / "album" / "c.png") not in story.rows()
    c_copies = {Path("album/c.png.jpg"), Path("album/.c.png.jpg.thumb.jpg")}  # gone with c.png's row
    assert {p: b for p, b in files_under(processed).items() if p in on_disk} == {
        p: b for p, b in on_disk.items() if p not in c_copies}  # every other copy as it was
    assert story.copies_of_rows() <= story.copies_in_processed()  # a2.png's and d.png's made there
    # a.png's, named by no row now, until the next start's rescan removes them (as for any rename unseen)
    assert story.copies_in_processed() - story.copies_of_rows() == {processed / "a.png.jpg",
                                                                    processed / ".a.png.jpg.thumb.jpg"}


def test_a_share_under_images_stays_remembered_while_the_processed_folder_is_away(story_factory, tmp_path) -> None:
    """``images/album``, a share mounted by hand, is remembered as a mount point in processed/ (no fstab line
    names it). A reboot mounts neither it nor processed/'s disk. A rescan then could not read what it
    remembered, took album's pictures for deleted, and wrote its record of the mount points onto the disk under
    processed/. Now it removes no row and writes nothing there; once processed/ is back, album's rows are kept
    by what it remembers."""
    story = story_factory(PICTURES)
    cfg, store = story.cfg, story.service.rt.store
    album, other = story.images / "album", story.images / "other"
    other.mkdir()  # another share, mounted now: news for the record
    share, other_share = Path(os.path.realpath(album)), Path(os.path.realpath(other))
    compare_folder(cfg, store, mounts=MountTable(expected=frozenset(), mounted=frozenset({share})))
    rows = story.rows()
    processed = cfg.processed_directory
    processed.rename(processed.with_name("usb-disk"))
    processed.mkdir()
    album.rename(tmp_path / "nas")
    album.mkdir()  # its mount point, empty
    now = MountTable(expected=frozenset(), mounted=frozenset({other_share}))
    with capture_logs() as logs:
        state = compare_folder(cfg, store, mounts=now)
    assert state.removed == [] and story.rows() == rows
    assert [(e["path"], e["kept"]) for e in logs if e["event"] == "processed_folder_away"] == [(processed, 2)]
    assert list(processed.iterdir()) == []

    processed.rmdir()
    processed.with_name("usb-disk").rename(processed)
    with capture_logs() as logs:
        state = compare_folder(cfg, store, mounts=now)
    assert state.removed == [] and story.rows() == rows
    assert [(e["path"], e["kept"]) for e in logs if e["event"] == "source_subfolder_unmounted"] == [(album, 2)]
