"""Changes the service applies after the files have moved on. The watcher's events are applied in order, but
each is applied when the loop gets to it, and the files are looked at then: a picture rewritten and renamed
at once is already at its new name when its write is applied; names swapped through a third are all in
their last places when the first rename is. Each rule must hold whatever the folder holds by then: a row
holds the content of the file at its path, and a rename costs no model work. The events are the ones
inotify delivers for each command. A real ``Service`` over the embedded PostgreSQL and the tiny model,
driven in-process (``story_factory``)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.preprocess import processed_path_for
from image_search.watch import ChangeKind, Folder
from tests.support.files import save_picture

pytestmark = pytest.mark.integration

PICTURES = {"d/a.png": 1, "d/b.png": 2, "d/c.png": 3, "e/x.png": 4, "e/y.png": 5}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_rows_hold_their_files(story) -> None:
    """Each stored path (copies too) holds the content of the file at that path, and processed/ holds
    exactly the copies of the stored paths."""
    paths = story.paths()
    assert {path: file_hash for path, (file_hash, _) in paths.items()} == {path: md5(Path(path)) for path in paths}
    assert story.copies_in_processed() == story.copies_of_rows()


def stored_hash(story, path: Path) -> str:
    return story.paths()[str(path)][0]


def model_work(logs: list[dict]) -> int:
    return sum(e["embedded"] for e in logs if e["event"] == "images_indexed")


def test_a_picture_rewritten_then_renamed_at_once_is_read_as_what_it_now_holds(story_factory) -> None:
    """``cp other.png a.png; mv a.png a2.png``: the write is applied once ``a.png`` is gone already. The
    rename must not carry ``a.png``'s row (the old picture) to ``a2.png``; it was, with the new file's size
    and mtime, so not even a restart read it again."""
    story = story_factory(PICTURES)
    a, renamed = story.images / "d/a.png", story.images / "d/a2.png"
    other = save_picture(story.images.parent / "other.png", seed=9)
    shutil.copyfile(other, a)
    os.rename(a, renamed)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, a)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, a, dest=renamed)
    with capture_logs() as logs:
        story.run_until_idle()
    assert str(a) not in story.paths() and stored_hash(story, renamed) == md5(other)
    assert model_work(logs) == 1
    assert_rows_hold_their_files(story)


def test_a_temporary_file_renamed_over_a_picture_then_renamed_again_is_read_as_what_it_holds(story_factory) -> None:
    """exiftool's way: the new bytes in ``a.png_exiftool_tmp``, renamed over ``a.png``, then the picture
    renamed after its date, before the service got to any of it."""
    story = story_factory(PICTURES)
    a, dated = story.images / "d/a.png", story.images / "d/2024-01-01.png"
    temporary = story.images / "d/a.png_exiftool_tmp"
    shutil.copyfile(save_picture(story.images.parent / "other.png", seed=9), temporary)
    os.replace(temporary, a)
    os.rename(a, dated)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, temporary)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, temporary, dest=a)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, a, dest=dated)
    with capture_logs() as logs:
        story.run_until_idle()
    assert str(a) not in story.paths() and str(dated) in story.paths()
    assert model_work(logs) == 1
    assert_rows_hold_their_files(story)


def test_a_folder_renamed_right_after_a_picture_in_it_was_rewritten(story_factory) -> None:
    story = story_factory(PICTURES)
    shutil.copyfile(save_picture(story.images.parent / "other.png", seed=9), story.images / "e/x.png")
    os.rename(story.images / "e", story.images / "e2")
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / "e/x.png")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "e", dest=story.images / "e2", is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    assert {p for p in story.paths() if "/e" in p} == {str(story.images / "e2/x.png"), str(story.images / "e2/y.png")}
    assert model_work(logs) == 1  # x.png as it now is; y.png followed its folder
    assert_rows_hold_their_files(story)


def test_names_swapped_through_a_third_cost_no_model_work(story_factory) -> None:
    """``mv a t; mv b a; mv t b``: when the first rename is applied, ``t`` is gone already. Each path
    follows its file name by name; nothing is read, and ``a``'s processed copy is ``b``'s picture."""
    story = story_factory(PICTURES)
    a, b, t = (story.images / "d" / name for name in ("a.png", "b.png", "t.png"))
    copies = {name: processed_path_for(p, story.images, story.cfg.processed_directory).read_bytes()
              for name, p in (("a", a), ("b", b))}
    for src, dest in ((a, t), (b, a), (t, b)):
        os.rename(src, dest)
    for src, dest in ((a, t), (b, a), (t, b)):
        story.notice(Folder.IMAGES, ChangeKind.MOVED, src, dest=dest)
    with capture_logs() as logs:
        story.run_until_idle()
    assert not [e for e in logs if e["event"] == "images_indexed"]
    assert str(t) not in story.paths()
    assert processed_path_for(a, story.images, story.cfg.processed_directory).read_bytes() == copies["b"]
    assert_rows_hold_their_files(story)


def test_folders_swapped_through_a_third_cost_no_model_work_and_log_no_skip(story_factory) -> None:
    story = story_factory(PICTURES)
    d, e, t = (story.images / name for name in ("d", "e", "t"))
    for src, dest in ((d, t), (e, d), (t, e)):
        os.rename(src, dest)
    for src, dest in ((d, t), (e, d), (t, e)):
        story.notice(Folder.IMAGES, ChangeKind.MOVED, src, dest=dest, is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    assert not [e for e in logs if e["event"] in ("images_indexed", "image_skipped")]
    assert len(story.paths()) == len(PICTURES)
    assert_rows_hold_their_files(story)


def test_a_renamed_picture_whose_processed_copy_was_deleted_by_hand_costs_no_model_work(story_factory) -> None:
    story = story_factory(PICTURES)
    c, renamed = story.images / "d/c.png", story.images / "d/c2.png"
    processed_path_for(c, story.images, story.cfg.processed_directory).unlink()
    os.rename(c, renamed)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, c, dest=renamed)
    with capture_logs() as logs:
        story.run_until_idle()
    assert str(c) not in story.paths() and str(renamed) in story.paths()
    assert model_work(logs) == 0
    assert_rows_hold_their_files(story)  # its copy made again, at its new name


@pytest.mark.parametrize("order", ["deletion last", "deletion first"])
def test_a_folder_and_a_file_moved_out_and_straight_back_cost_no_model_work(story_factory, tmp_path: Path,
                                                                              order: str) -> None:
    """``mv e /elsewhere; mv /elsewhere/e .`` (an undo): each move's halves are unpaired, a deletion and a
    folder that appeared, and the deletion is applied with the folder back in its place. inotify delivered
    the deletion last (the pairing waits for it); either way nothing is embedded again."""
    story = story_factory(PICTURES)
    outside = tmp_path / "outside"
    outside.mkdir()
    e, c = story.images / "e", story.images / "d/c.png"
    for path in (e, c):
        os.rename(path, outside / path.name)
        os.rename(outside / path.name, path)
    appeared = [(ChangeKind.TOUCHED, e, True), *((ChangeKind.TOUCHED, p, False) for p in sorted(e.iterdir())),
                (ChangeKind.TOUCHED, c, False)]
    deleted = [(ChangeKind.DELETED, e, True), (ChangeKind.DELETED, c, False)]
    for kind, path, is_directory in (appeared + deleted if order == "deletion last" else deleted + appeared):
        story.notice(Folder.IMAGES, kind, path, is_directory=is_directory)
    with capture_logs() as logs:
        story.run_until_idle()
    assert set(story.paths()) == {str(story.images / p) for p in PICTURES}
    assert model_work(logs) == 0
    assert not [e for e in logs if e["event"] == "rows_removed"]
    assert_rows_hold_their_files(story)


@pytest.mark.parametrize("other_name", ["hard link", "symbolic link"])
def test_a_picture_rewritten_through_one_name_is_read_again_through_its_other_names(story_factory,
                                                                                    other_name: str) -> None:
    """``ln a.png h.png`` (or ``ln -s a.png h.png``), then ``a.png`` rewritten: ``h.png`` shows the new picture
    too, and no event says so. Once ``a.png`` is read anew, the other paths of the content it left are
    looked at again; a plain copy that still holds the old bytes is not read."""
    story = story_factory(PICTURES)
    a, other, copy = story.images / "d/a.png", story.images / "d/h.png", story.images / "d/copy.png"
    if other_name == "hard link":
        os.link(a, other)
    else:
        other.symlink_to("a.png")
    shutil.copy2(a, copy)
    for path in (other, copy):
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)
    story.run_until_idle()
    assert stored_hash(story, other) == stored_hash(story, copy) == md5(a)

    with open(a, "r+b") as handle:  # in place: a hard link shares the bytes
        handle.write(save_picture(story.images.parent / "new.png", seed=11).read_bytes())
        handle.truncate()
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, a)
    with capture_logs() as logs:
        story.run_until_idle()
    assert stored_hash(story, other) == stored_hash(story, a) == md5(a) != stored_hash(story, copy)
    assert model_work(logs) == 1
    assert_rows_hold_their_files(story)


def test_a_deletion_while_processed_is_full_waits_with_the_ingest_and_is_applied_after(story_factory,
                                                                                       monkeypatch) -> None:
    """A picture deleted while a batch is being read: the batch is finished first, and processed/ refuses
    its copies (a full disk). That stopped the service; now the ingest waits out the outage as it does for
    its own batches, and the deletion is applied by the rescan after it."""
    from image_search.errors import OutputUnwritable

    story = story_factory(PICTURES)
    new = save_picture(story.images / "d/new.png", seed=12)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, new)
    story.service.step()  # noticed
    story.clock.advance(1.0)
    story.service.step()  # taken, being read
    assert new not in story.service.images and str(new) not in story.paths()
    indexer = story.service.ingest.indexer
    finish = indexer.finish
    monkeypatch.setattr(indexer, "finish", lambda batch: (_ for _ in ()).throw(
        OutputUnwritable(f"cannot write a processed image into {story.cfg.processed_directory}: No space left on device")))
    (story.images / "d/a.png").unlink()
    story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "d/a.png")
    with capture_logs() as logs:
        story.service.step()  # raised out of the loop before
    assert [e["work"] for e in logs if e["event"] == "output_unwritable"] == ["ingest"]
    monkeypatch.setattr(indexer, "finish", finish)  # room again
    story.run_until_idle()
    assert str(story.images / "d/a.png") not in story.paths() and str(new) in story.paths()
    assert_rows_hold_their_files(story)


def test_a_rewritten_picture_that_cannot_be_stored_is_not_read_again_and_again(story_factory) -> None:
    """``a.png`` rewritten while an entry of the user's holds the name of its processed copy: it is skipped,
    its row as it was. Its old content's paths (``a.png`` among them) are not queued again for that, or it
    would be read and skipped at every settle period, for ever."""
    story = story_factory(PICTURES)
    a = story.images / "d/a.png"
    os.link(a, story.images / "d/h.png")
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / "d/h.png")
    story.run_until_idle()
    copy = processed_path_for(a, story.images, story.cfg.processed_directory)
    copy.unlink()
    copy.mkdir()  # the user's folder where a.png's copy goes
    with open(a, "r+b") as handle:
        handle.write(save_picture(story.images.parent / "new.png", seed=11).read_bytes())
        handle.truncate()
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, a)
    with capture_logs() as logs:
        story.run_until_idle()  # raised "the service loop did not become idle" before
    assert [str(e["path"]) for e in logs if e["event"] == "image_skipped"] == [str(a)]


def test_a_renamed_picture_whose_thumbnail_was_deleted_by_hand_gets_it_again(story_factory) -> None:
    """The rename moves the processed copy along, and there is no thumbnail to move: the file is read at its
    new name (content stored: no model work) and the thumbnail made again, as a rescan would."""
    from image_search.preprocess import thumbnail_path_for

    story = story_factory(PICTURES)
    c, renamed = story.images / "d/c.png", story.images / "d/c2.png"
    thumbnail_path_for(processed_path_for(c, story.images, story.cfg.processed_directory)).unlink()
    os.rename(c, renamed)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, c, dest=renamed)
    with capture_logs() as logs:
        story.run_until_idle()
    assert model_work(logs) == 0
    assert_rows_hold_their_files(story)
