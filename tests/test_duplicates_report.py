"""The duplicates report from a real index: pictures saved again in the ways people do are found as
near-copies of one another (by the perceptual hash stored at ingest, or filled in later from the
processed copies), the report folder holds the groups, the sheets and the summary, and nothing in the
user's folders changes."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from image_search.config import load_config
from image_search.duplicates import REPORT, SUMMARY, Kind, write_report
from image_search.embed import Embedder
from image_search.indexer import Indexer
from image_search.store import Database
from image_search.store.duplicates import read_pictures
from tests.support.db import empty_store, raw
from tests.support.derived import save_derived, scene
from tests.support.files import read_jsonl, write_config, written_into
from tests.support.model import TINY_DIMENSION

pytestmark = pytest.mark.integration

SIZE = (480, 360)
SAVED_AGAIN = ("original", "stripped", "quality50", "half", "png", "webp", "heic", "turned")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def library(tmp_path: Path, tiny_model_dir: Path):
    """Scene 1 saved eight ways at the top, scene 2 eight ways under trip/, and two distinct pictures."""
    cfg = load_config(write_config(tmp_path, tiny_model_dir))
    images = cfg.source_directory
    save_derived(images, "beach", scene(1, SIZE), SAVED_AGAIN)
    save_derived(images / "trip", "hill", scene(2, SIZE), SAVED_AGAIN)
    scene(3, SIZE).save(images / "other.jpg", quality=90)
    scene(4, SIZE).save(images / "trip" / "another.png")
    database = Database(cfg)
    store = database.open_store(dimension=TINY_DIMENSION)
    indexer = Indexer(cfg, Embedder.load(cfg.model_name, device="cpu", dimension=TINY_DIMENSION), store, workers=1,
                      jpeg_decode_device=None)
    assert indexer.index_folder(show_progress=False).embedded == 2 * len(SAVED_AGAIN) + 2
    yield cfg, database, store
    indexer.close()
    store.close()
    database.close()


def expected(stem: str) -> list[str]:
    """The names ``save_derived`` gave one scene's files."""
    suffixes = {"png": ".png", "webp": ".webp", "heic": ".heic"}
    return sorted(f"{stem}-{name}{suffixes.get(name, '.jpg')}" for name in SAVED_AGAIN)


def near_copy_names(report: Path) -> list[list[str]]:
    return sorted(sorted(Path(m["file_path"]).name for m in line["members"])
                  for line in read_jsonl(report / REPORT) if line["kind"] == "near-copy")



def test_pictures_saved_again_are_reported_as_near_copies_and_nothing_is_touched(library):
    cfg, database, store = library
    assert raw(database, "SELECT count(*) FROM image_embeddings WHERE phash IS NULL") == [(0,)]  # from ingest
    before = snapshot(cfg.source_directory)
    report = write_report(cfg, store, kinds=[Kind.COPY, Kind.NEAR_COPY])
    assert near_copy_names(report) == [expected("beach"), expected("hill")]
    lines = read_jsonl(report / REPORT)
    for line in lines:
        assert line["keep"] == line["members"][0]["file_path"]
        kept = line["members"][0]
        assert kept["file_path"].endswith(".png")  # full size, and the most bytes of those
        assert (kept["width"], kept["height"], kept["format"]) == (*SIZE, "png")
        assert all(0.96 <= m["similarity"] <= 1.0 for m in line["members"])
    summary = json.loads((report / SUMMARY).read_text())
    assert summary["groups"] == {"copy": 0, "near-copy": 2} and summary["pictures"] == 2 * len(SAVED_AGAIN) + 2
    assert summary["thresholds"]["near-copy-max-distance"] == cfg.near_copy_max_distance
    assert sorted(p.name for p in report.glob("duplicates-*.jpg")) == ["duplicates-0001.jpg"]
    assert snapshot(cfg.source_directory) == before
    assert not list(cfg.output_directory.glob(".tmp-*"))


def test_rows_without_a_hash_get_it_from_their_processed_copies(library):
    """An earlier version's rows (and the GPU decoder's) have no hash: the report fills them in first."""
    cfg, database, store = library
    raw(database, "UPDATE image_embeddings SET phash = NULL")
    report = write_report(cfg, store, kinds=[Kind.NEAR_COPY])
    assert near_copy_names(report) == [expected("beach"), expected("hill")]
    assert raw(database, "SELECT count(*) FROM image_embeddings WHERE phash IS NULL") == [(0,)]


def test_a_folder_report_looks_only_inside_that_folder(library):
    cfg, _, store = library
    report = write_report(cfg, store, kinds=[Kind.NEAR_COPY, Kind.SIMILAR], folders=("trip",))
    assert near_copy_names(report) == [expected("hill")]
    summary = json.loads((report / SUMMARY).read_text())
    assert summary["pictures"] == len(SAVED_AGAIN) + 1 and summary["folder"] == "trip"
    assert set(summary["groups"]) == {"near-copy", "similar"}


def test_a_folder_report_holds_the_pictures_copied_there_named_by_their_paths_there(library):
    """Three versions of the beach copied into selects/ after they were indexed: a report of selects/ holds
    those three pictures, each named by its path there, its first path among its copies."""
    cfg, _, store = library
    selects = cfg.source_directory / "selects"
    selects.mkdir()
    names = expected("beach")[:3]
    for name in names:
        shutil.copy2(cfg.source_directory / name, selects / name)
    indexer = Indexer(cfg, Embedder.load(cfg.model_name, device="cpu", dimension=TINY_DIMENSION), store, workers=1,
                      jpeg_decode_device=None)
    try:
        assert indexer.index_folder(show_progress=False).copies == 3
    finally:
        indexer.close()
    report = write_report(cfg, store, kinds=[Kind.COPY, Kind.NEAR_COPY], folders=("selects",))
    assert json.loads((report / SUMMARY).read_text())["pictures"] == 3
    lines = read_jsonl(report / REPORT)
    (near,) = [line for line in lines if line["kind"] == "near-copy"]
    assert sorted(m["file_path"] for m in near["members"]) == [str(selects / name) for name in names]
    assert sorted(c for m in near["members"] for c in m["copies"]) == [str(cfg.source_directory / n) for n in names]
    assert sorted(sorted(m["file_path"] for m in line["members"]) for line in lines if line["kind"] == "copy") == [
        sorted([str(cfg.source_directory / name), str(selects / name)]) for name in names]


def test_an_empty_index_gives_an_empty_report_that_says_so(library):
    cfg, database, _ = library
    with empty_store(database, TINY_DIMENSION) as store:
        report = write_report(cfg, store)
    assert (report / REPORT).read_text() == ""
    summary = json.loads((report / SUMMARY).read_text())
    assert summary["message"] == "the index holds no pictures"
    assert summary["groups"] == {"copy": 0, "near-copy": 0, "similar": 0}
    assert not list(report.glob("*.jpg"))


def test_the_report_reads_each_picture_with_its_embedding_and_metadata(library):
    cfg, database, store = library
    pictures, embeddings = read_pictures(store, folders=("trip",))
    stored = {h: np.asarray(v, dtype=np.float32) for h, v in raw(
        database, "SELECT file_hash, embedding::real[] FROM image_embeddings WHERE folder = 'trip'")}
    assert [p.file_hash for p in pictures] == sorted(stored)
    assert np.array_equal(embeddings, np.stack([stored[p.file_hash] for p in pictures]))
    png = next(p for p in pictures if p.paths[0].endswith("hill-png.png"))
    assert (png.width, png.height, png.format, png.bytes) == (*SIZE, "png", (cfg.source_directory / "trip" /
                                                                            "hill-png.png").stat().st_size)
    assert png.processed_path.startswith(str(cfg.processed_directory)) and png.phash is not None


class Stopped(Exception):
    """What a stop raises at a checkpoint (the service's is ``ShutdownRequested``)."""


def test_a_report_stopped_at_any_checkpoint_leaves_no_folder_and_the_document_where_it_was(library):
    """The service stops a report at its next checkpoint: wherever that is, from the hash fill to the last
    step before the document moves in, no report appears (whole or half) and the document stays put."""
    cfg, database, store = library
    def forget_hashes() -> None:  # the trip's rows as an earlier version wrote them: a fill to do
        raw(database, "UPDATE image_embeddings SET phash = NULL WHERE file_path LIKE '%%trip%%'")

    forget_hashes()
    document = cfg.inbox_directory / "dupes.json"
    document.write_text('{"duplicates": true}', encoding="utf-8")
    calls: list[None] = []  # list.append is one step under the GIL, as next() is below

    def count() -> None:
        calls.append(None)

    def stop_at(n: int):
        seen = itertools.count(1)  # next() is one step under the GIL: the hash fill's threads share it

        def checkpoint() -> None:
            if next(seen) == n:
                raise Stopped(n)
        return checkpoint

    write_report(cfg, store, checkpoint=count)  # counts them: the fill's pictures, rounds of rows, searches, pages
    checkpoints = len(calls)
    assert checkpoints >= 10
    before = written_into(cfg.output_directory)
    for n in range(1, checkpoints + 1):
        forget_hashes()
        with pytest.raises(Stopped):
            write_report(cfg, store, document=document, checkpoint=stop_at(n))
        assert written_into(cfg.output_directory) == before, f"stopped at checkpoint {n}"
        assert document.read_text(encoding="utf-8") == '{"duplicates": true}'
    forget_hashes()
    report = write_report(cfg, store, document=document, checkpoint=stop_at(checkpoints + 1))
    assert (report / "dupes.query.json").is_file() and not document.exists()
