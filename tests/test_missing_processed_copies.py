"""A processed copy or thumbnail deleted by hand (or by a disk clean-up) while its source is unchanged: the
next rescan (at start, every ``rescan-interval``, ``index``) makes it again from the source file, with no
model work and the same row, one line per file; a query meanwhile is still answered, naming the picture
that has no copy. The other way round, copies that no row names and whose file is gone go at a rescan.
A real ``Service`` over the embedded PostgreSQL and the tiny model, driven in-process (``story_factory``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from structlog.testing import capture_logs

from image_search.indexer import Indexer
from image_search.names import escape
from image_search.preprocess import thumbnail_path_for
from image_search.sheet import PLACEHOLDER, cell_box
import image_search.sync
from image_search.sync import SOURCE_MARKER
from tests.support.story import TOP_K

pytestmark = pytest.mark.integration

PICTURES = {"a.png": 1, "b.png": 2, "album/c.png": 3, "album/d.png": 4}


def copies_of(story) -> dict[str, tuple[bytes, bytes]]:
    """Each indexed source -> the bytes of its processed JPEG and of its thumbnail."""
    copies = {}
    for path, row in story.rows().items():
        processed = Path(row["processed_path"])
        copies[path] = (processed.read_bytes(), thumbnail_path_for(processed).read_bytes())
    return copies


def refuse_model_work(monkeypatch, embedder) -> None:
    def refused(*args: object, **kwargs: object):
        raise AssertionError("a picture was embedded: making a processed copy again needs no model work")
    monkeypatch.setattr(embedder, "embed_images", refused)


def test_copies_deleted_by_hand_are_made_again_at_the_next_start_with_no_model_work(story_factory, embedder,
                                                                                   monkeypatch) -> None:
    story = story_factory(PICTURES)
    rows, copies = story.rows(), copies_of(story)
    processed = {path: Path(row["processed_path"]) for path, row in rows.items()}
    processed[str(story.images / "a.png")].unlink()  # the processed JPEG
    thumbnail_path_for(processed[str(story.images / "b.png")]).unlink()  # the thumbnail alone
    shutil.rmtree(story.cfg.processed_directory / "album")  # a whole sub-folder
    refuse_model_work(monkeypatch, embedder)
    with capture_logs() as logs:
        again = story_factory(after=story)
    assert again.rows() == rows  # the same rows: ids, hashes, paths, copies' paths
    assert copies_of(again) == copies  # made again, the same bytes
    missing = [(e["path"], e["processed"]) for e in logs if e["event"] == "processed_copy_missing"]
    assert sorted(missing) == sorted((Path(p), str(processed[p])) for p in rows)  # one line each
    assert [e["missing_copies"] for e in logs if e["event"] == "rescan_complete"] == [4]
    indexed = [e for e in logs if e["event"] == "images_indexed"]
    assert (sum(e["embedded"] for e in indexed), sum(e["relinked"] for e in indexed)) == (0, 4)

    with capture_logs() as logs:  # and nothing more to do once they are there
        story_factory(after=again)
    assert [e["missing_copies"] for e in logs if e["event"] == "rescan_complete"] == [0]
    assert not [e for e in logs if e["event"] in ("processed_copy_missing", "images_indexed")]


def test_a_query_names_the_picture_without_a_copy_and_the_next_rescan_makes_it_again(story_factory, embedder,
                                                                                    monkeypatch) -> None:
    story = story_factory(PICTURES, rescan_interval=60.0)
    a = story.images / "a.png"
    copies = copies_of(story)
    processed = Path(story.rows()[str(a)]["processed_path"])
    processed.unlink()
    thumbnail_path_for(processed).unlink()
    with capture_logs() as logs:
        ranking = story.ask("q.png", a)
    assert ranking[0] == str(a)  # answered all the same, the picture first
    bundle = story.bundle("q.png")
    assert {"q.json", "q.jsonl", "q.sheet.jpg"} <= {p.name for p in bundle.iterdir()}
    assert not (bundle / "q.jpg").exists()  # no best match's copy to give
    missing = [(e["path"], e["processed"], e["rank"]) for e in logs if e["event"] == "processed_copy_missing"]
    assert missing == [(str(a), str(processed), 1)]
    with Image.open(bundle / "q.sheet.jpg") as sheet:
        left, top, _, _ = cell_box(1, 1 + TOP_K)
        assert all(abs(c - p) <= 6 for c, p in zip(sheet.getpixel((left + 5, top + 5)), PLACEHOLDER))

    refuse_model_work(monkeypatch, embedder)
    with capture_logs() as logs:
        story.clock.advance(61)  # the rescan is due
        story.run_until_idle()
    assert copies_of(story) == copies
    assert [e["path"] for e in logs if e["event"] == "processed_copy_missing"] == [a]
    assert [e["missing_copies"] for e in logs if e["event"] == "rescan_complete"] == [1]


def test_index_makes_a_missing_thumbnail_again_and_counts_it(story_factory, embedder, monkeypatch) -> None:
    story = story_factory(PICTURES)
    copies = copies_of(story)
    c = story.images / "album" / "c.png"
    thumbnail_path_for(Path(story.rows()[str(c)]["processed_path"])).unlink()
    refuse_model_work(monkeypatch, embedder)
    indexer = Indexer(story.cfg, embedder, story.service.rt.store, workers=1)
    try:
        with capture_logs() as logs:
            summary = indexer.index_folder(show_progress=False)
    finally:
        indexer.close()
    assert (summary.embedded, summary.relinked, summary.unchanged, summary.missing_copies) == (0, 1, 3, 1)
    assert [e["missing_copies"] for e in logs if e["event"] == "index_complete"] == [1]
    assert copies_of(story) == copies


def test_a_processed_folder_deleted_whole_is_a_few_lines_and_a_count(story_factory, monkeypatch) -> None:
    """20,000 copies gone are not 20,000 log lines: the first few are named, the rest counted."""
    story = story_factory(PICTURES)
    rows, copies = story.rows(), copies_of(story)
    for entry in story.cfg.processed_directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name != SOURCE_MARKER:  # the folder's own record of its source stays
            entry.unlink()
    monkeypatch.setattr("image_search.sync.MISSING_COPIES_NAMED", 2)
    with capture_logs() as logs:
        again = story_factory(after=story)
    assert copies_of(again) == copies and again.rows() == rows
    assert len([e for e in logs if e["event"] == "processed_copy_missing"]) == 2
    assert [(e["count"], e["named"]) for e in logs if e["event"] == "processed_copies_missing"] == [(4, 2)]


def test_copies_of_files_gone_after_the_table_was_emptied_go_at_the_next_start(story_factory, monkeypatch) -> None:
    """cleanup-on-exit empties the table; a file renamed or deleted before the next start then left its
    copies behind, named by no row, for good. The next start's rescan removes them; every other copy stays,
    those of odd names too (not UTF-8; cut short for the 255-byte limit; past the path limit)."""
    odd = {os.fsdecode(b"bad\xff\xfename.png"): 5, "x" * 250 + ".png": 6, "/".join(["d" * 200] * 12) + "/e.png": 7}
    story = story_factory({**PICTURES, **odd})
    story.service.rt.store.clear()  # as cleanup-on-exit leaves it
    images = story.images
    (images / "a.png").rename(images / "renamed.png")
    (images / "album" / "c.png").unlink()
    (images / "album" / "d.png").unlink()  # album/ keeps no picture: its processed folder goes with its copies
    monkeypatch.setattr(image_search.sync, "ORPHAN_MIN_AGE_S", 0.0)  # as if written long ago
    with capture_logs() as logs:
        again = story_factory(after=story)
    assert again.copies_in_processed() == again.copies_of_rows()
    assert set(again.rows()) == {escape(str(images / name)) for name in ("renamed.png", "b.png", *odd)}  # as stored
    assert not (again.cfg.processed_directory / "album").exists()
    assert [e["count"] for e in logs if e["event"] == "processed_copies_removed"] == [6]


def test_a_copy_written_moments_ago_is_left_to_the_service_that_wrote_it(story_factory) -> None:
    """Another service on the same folders may have written a copy for a row it has not committed yet."""
    story = story_factory(PICTURES)
    story.service.rt.store.clear()
    (story.images / "a.png").unlink()
    kept = story.copies_in_processed()
    again = story_factory(after=story)
    assert kept <= again.copies_in_processed()
