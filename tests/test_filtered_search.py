"""Filtered search against a real embedded PostgreSQL: ``EmbeddingStore.ranking`` returns the pictures
that pass every filter and the floor, best first, and never fewer than min(k, those there are) without
saying so (``Completeness``).

A small library of pictures with their folders, dates, cameras and formats is searched exactly (a
small table); a larger one is forced through the HNSW index (``exact_search_below`` 0, sequential scans
priced out) to show the index path, its exact fallback when the index comes up short, and the
incomplete answer when that fallback would scan too many rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from image_search.hits import shown_similarity
from image_search.metadata import PictureMetadata
from image_search.query import Filters
from image_search.store import Database, EmbeddingRow, EmbeddingStore, Ranking
from image_search.store import ranking as ranking_module
from image_search.store import filters as filters_module
from image_search.store.filters import filter_sql
from tests.support.db import empty_store, raw

pytestmark = pytest.mark.integration

DIM = 16
UTC = timezone.utc


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def picture(path: str, vector: np.ndarray, *, taken_at: datetime | None = None, make: str | None = None,
            model: str | None = None, fmt: str = "jpeg") -> EmbeddingRow:
    """A row as ingest writes it: the folder is the path's, relative to the source directory."""
    folder = str(Path(path).parent).removeprefix(".")
    metadata = PictureMetadata(width=60, height=40, format=fmt, taken_at=taken_at, offset_known=True,
                               camera_make=make, camera_model=model)
    return EmbeddingRow(file_path=f"/images/{path}", file_name=Path(path).name, file_hash=f"hash:{path}",
                        processed_path=f"/processed/{path}.jpg", source_size=1, source_mtime_ns=1,
                        model_name="test-model", embedding=vector, metadata=metadata, folder=folder)


# The library, most similar to QUERY first: each row is QUERY tilted a little more away.
QUERY = unit(np.eye(DIM)[0])
LIBRARY = (
    ("top.jpg", dict(taken_at=datetime(2023, 5, 6, 12, tzinfo=UTC), make="Canon", model="Canon EOS R5")),
    ("2023/new-year.heic", dict(taken_at=datetime(2023, 1, 1, tzinfo=UTC), make="Apple", model="iPhone 12",
                                fmt="heic")),
    ("2023/june/beach.png", dict(taken_at=datetime(2023, 6, 15, 9, tzinfo=UTC), fmt="png")),
    ("2023-old/eve.jpg", dict(taken_at=datetime(2022, 12, 31, 23, 59, 59, tzinfo=UTC), make="Canon",
                              model="Canon EOS R5")),
    ("20_3/underscore.jpg", dict(taken_at=datetime(2023, 3, 3, tzinfo=UTC))),
    ("no date/scan.gif", dict(fmt="gif")),
    ("2024/first.jpg", dict(taken_at=datetime(2024, 1, 1, tzinfo=UTC), make="NIKON CORPORATION",
                            model="NIKON Z 6")),
    ("back\\slash/odd.webp", dict(taken_at=datetime(2023, 8, 8, tzinfo=UTC), fmt="webp")),
)
NAMES = [path for path, _ in LIBRARY]


def tilted(i: int) -> np.ndarray:
    return unit(np.eye(DIM)[0] + 0.1 * (i + 1) * np.eye(DIM)[1 + i % (DIM - 1)])


@pytest.fixture
def library(database: Database) -> Iterator[EmbeddingStore]:
    with empty_store(database, DIM) as store:
        store.upsert([picture(path, tilted(i), **extra) for i, (path, extra) in enumerate(LIBRARY)])
        yield store


def found(ranking: Ranking) -> list[str]:
    return [hit.file_path.removeprefix("/images/") for hit in ranking.hits]


def search(store: EmbeddingStore, k: int = 20, min_similarity: float | None = None, **filters) -> Ranking:
    return store.ranking(QUERY, k, filters=Filters(**filters), min_similarity=min_similarity)


def test_without_filters_every_picture_best_first_and_complete(library: EmbeddingStore) -> None:
    everything = search(library)
    assert found(everything) == NAMES
    assert everything.completeness.complete and everything.matches == len(NAMES)
    assert [h.rank for h in everything.hits] == list(range(1, len(NAMES) + 1))
    assert library.search(QUERY, 3) == everything.hits[:3]  # search: the ranking's hits
    assert found(search(library, k=2)) == NAMES[:2]


def test_a_folder_holds_its_sub_folders_and_nothing_that_only_starts_like_it(library: EmbeddingStore) -> None:
    in_2023 = search(library, folders=("2023",))
    assert found(in_2023) == ["2023/new-year.heic", "2023/june/beach.png"]  # never 2023-old
    assert in_2023.completeness.complete and in_2023.matches == 2
    assert found(search(library, folders=("2023/june",))) == ["2023/june/beach.png"]
    assert found(search(library, folders=("./2023/june/",))) == ["2023/june/beach.png"]
    assert found(search(library, folders=("20_3",))) == ["20_3/underscore.jpg"]  # '_' is no wildcard
    assert found(search(library, folders=("no date", "2024"))) == ["no date/scan.gif", "2024/first.jpg"]
    assert found(search(library, folders=("back\\slash",))) == ["back\\slash/odd.webp"]
    assert found(search(library, folders=("",))) == NAMES and found(search(library, folders=(".",))) == NAMES
    nothing = search(library, folders=("2023/july",))
    assert found(nothing) == [] and nothing.completeness.complete and nothing.matches == 0


def copy_into(store: EmbeddingStore, path: str, folder: str) -> None:
    """The library's picture ``path`` copied into ``folder`` (relative to the source directory)."""
    name = Path(path).name
    assert store.update_source(f"hash:{path}", file_path=f"/images/{folder}/{name}", file_name=name,
                               processed_path=f"/processed/{folder}/{name}.jpg", source_size=1,
                               source_mtime_ns=1, folder=folder)


def copies(database: Database) -> list[str]:
    """The paths marked as copies, which the folder filter reads beside each row's own folder."""
    return [path for (path,) in raw(database, "SELECT file_path FROM image_paths WHERE copy ORDER BY file_path")]


@pytest.mark.parametrize("listed", [True, False], ids=["copies listed", "too many copies to list"])
def test_a_copy_in_a_folder_puts_its_picture_in_that_folder_named_by_the_copy(library: EmbeddingStore,
                                                                              database: Database, listed: bool,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Photos first indexed in 2024/ and 2023/june/, copied later into selects/: the row's representative
    stays where it was first seen, but the picture is in selects/ too, and a search there names it so.
    The copies' hashes are given as a list, or, more than ``MOST_COPIES_LISTED``, as a subquery."""
    monkeypatch.setattr(filters_module, "MOST_COPIES_LISTED", 2 if listed else 1)
    assert copies(database) == []
    for path, folder in (("2024/first.jpg", "selects"), ("2023/june/beach.png", "selects/summer")):
        copy_into(library, path, folder)
    assert copies(database) == ["/images/selects/first.jpg", "/images/selects/summer/beach.png"]
    selects = search(library, folders=("selects",))
    assert found(selects) == ["selects/summer/beach.png", "selects/first.jpg"]  # best first, as in 2023/ and 2024/
    assert [h.copies for h in selects.hits] == [("/images/2023/june/beach.png",), ("/images/2024/first.jpg",)]
    assert selects.hits[1].processed_path == "/processed/selects/first.jpg.jpg" and selects.completeness.complete
    assert selects.matches == 2
    # Elsewhere, and without a filter, each is named by its representative, the copy among its copies.
    assert found(search(library, folders=("2024",))) == ["2024/first.jpg"]
    everything = search(library)
    assert found(everything) == NAMES and everything.hits[-2].copies == ("/images/selects/first.jpg",)
    assert found(search(library, folders=("2023",), formats=("png",))) == ["2023/june/beach.png"]
    assert found(search(library, folders=("selects/summer", "2024"))) == ["selects/summer/beach.png", "2024/first.jpg"]


def test_a_copy_that_becomes_the_representative_is_found_where_it_is(library: EmbeddingStore,
                                                                     database: Database) -> None:
    """The first name of a copied photo is deleted: the copy in selects/ becomes the row's representative
    (no longer marked a copy), and the photo is in selects/ alone."""
    copy_into(library, "2024/first.jpg", "selects")
    assert library.delete_paths(["/images/2024/first.jpg"]) == 1
    assert copies(database) == []
    assert found(search(library, folders=("selects",))) == ["selects/first.jpg"]
    assert found(search(library, folders=("2024",))) == []
    copy_into(library, "2023/june/beach.png", "2024")  # a copy again, of another photo
    assert copies(database) == ["/images/2024/beach.png"]
    assert found(search(library, folders=("2024",))) == ["2024/beach.png"]


def test_a_picture_embedded_again_under_another_name_stays_in_the_folder_of_the_first(
        library: EmbeddingStore, database: Database) -> None:
    """The same content written again at another path (a second service embedding a copy it found, say):
    the new path becomes the representative, and the first one, still there, is a copy of it."""
    library.upsert([replace(picture("redo/first.jpg", tilted(6)), file_hash="hash:2024/first.jpg")])
    assert copies(database) == ["/images/2024/first.jpg"]
    assert found(search(library, folders=("2024",))) == ["2024/first.jpg"]
    assert found(search(library, folders=("redo",))) == ["redo/first.jpg"]
    library.upsert([picture("2024/first.jpg", tilted(6))])
    assert copies(database) == ["/images/redo/first.jpg"]  # and back: each path marked as it is now
    assert found(search(library, folders=("redo",))) == ["redo/first.jpg"]


def test_dates_after_inclusive_before_exclusive_and_undated_pictures_never_pass(library: EmbeddingStore) -> None:
    year = search(library, taken_after=datetime(2023, 1, 1, tzinfo=UTC), taken_before=datetime(2024, 1, 1, tzinfo=UTC))
    assert found(year) == ["top.jpg", "2023/new-year.heic", "2023/june/beach.png", "20_3/underscore.jpg",
                           "back\\slash/odd.webp"]
    # The same instants written in another zone are the same filter.
    plus_two = timezone(timedelta(hours=2))
    assert found(search(library, taken_after=datetime(2023, 1, 1, 2, tzinfo=plus_two),
                        taken_before=datetime(2024, 1, 1, 2, tzinfo=plus_two))) == found(year)
    assert found(search(library, taken_before=datetime(2023, 1, 1, tzinfo=UTC))) == ["2023-old/eve.jpg"]
    since_2024 = found(search(library, taken_after=datetime(2024, 1, 1, tzinfo=UTC)))
    assert since_2024 == ["2024/first.jpg"]
    assert "no date/scan.gif" not in found(search(library, taken_after=datetime(1900, 1, 1, tzinfo=UTC)))


def test_camera_is_any_part_of_make_and_model_in_any_case(library: EmbeddingStore) -> None:
    assert found(search(library, camera="eos r5")) == ["top.jpg", "2023-old/eve.jpg"]
    assert found(search(library, camera="IPHONE")) == ["2023/new-year.heic"]
    assert found(search(library, camera="apple iphone 12")) == ["2023/new-year.heic"]  # make, a space, model
    assert found(search(library, camera="nikon z")) == ["2024/first.jpg"]
    assert found(search(library, camera="%")) == []  # a literal percent sign, not a wildcard


def test_formats_any_of_them(library: EmbeddingStore) -> None:
    assert found(search(library, formats=("png", "gif"))) == ["2023/june/beach.png", "no date/scan.gif"]
    assert found(search(library, formats=("HEIC",))) == ["2023/new-year.heic"]


def test_filters_combine_each_must_pass(library: EmbeddingStore) -> None:
    assert found(search(library, folders=("2023",), camera="iphone")) == ["2023/new-year.heic"]
    assert found(search(library, folders=("2023",), formats=("png",))) == ["2023/june/beach.png"]
    assert found(search(library, camera="canon", taken_after=datetime(2023, 1, 1, tzinfo=UTC))) == ["top.jpg"]
    both = search(library, folders=("2023",), formats=("jpeg",))
    assert found(both) == [] and both.completeness.complete and both.matches == 0


def test_the_floor_drops_what_is_below_it_and_the_answer_stays_complete(library: EmbeddingStore) -> None:
    similarities = [float(QUERY @ tilted(i)) for i in range(len(NAMES))]
    floor = (similarities[2] + similarities[3]) / 2
    above = search(library, min_similarity=floor)
    assert found(above) == NAMES[:3] and above.completeness.complete
    assert all(h.similarity >= floor for h in above.hits)
    assert found(search(library, min_similarity=floor, folders=("2023",))) == ["2023/new-year.heic",
                                                                               "2023/june/beach.png"]
    assert found(search(library, min_similarity=1.01)) == []


def test_camera_and_format_filters_have_indexes(library: EmbeddingStore, database: Database) -> None:
    indexes = {name for (name,) in raw(database, "SELECT indexname FROM pg_indexes WHERE tablename = 'image_embeddings'")}
    assert {"image_embeddings_format_idx", "image_embeddings_camera_trgm_idx"} <= indexes
    conn = database.connect()
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET LOCAL enable_seqscan = off")  # eight rows: a scan would be cheaper otherwise
            condition = filter_sql(Filters(camera="leica"), copies=[])
            cur.execute(f"EXPLAIN SELECT 1 FROM image_embeddings WHERE {condition.where}", condition.params)
            assert "image_embeddings_camera_trgm_idx" in "\n".join(row for (row,) in cur.fetchall())
    finally:
        conn.close()


def test_without_pg_trgm_the_step_makes_the_format_index_and_goes_on(database: Database,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    step = importlib.import_module("image_search.store.migrations.0007_filter_indexes")
    monkeypatch.setattr(step, "CREATE_TRIGRAMS", "CREATE EXTENSION IF NOT EXISTS no_such_extension")
    conn = database.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE image_embeddings (camera_make TEXT, camera_model TEXT, format TEXT)")
            assert step.apply(SimpleNamespace(cur=cur)) is True
            cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'image_embeddings' "
                        "AND schemaname LIKE 'pg_temp%'")
            assert [name for (name,) in cur.fetchall()] == ["image_embeddings_format_idx"]  # the transaction lives on
        conn.rollback()
    finally:
        conn.close()


# --- through the index -------------------------------------------------------------------------------

ROWS = 2000


@pytest.fixture
def large(database: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EmbeddingStore, np.ndarray]]:
    """2,000 random pictures, two of them (0.1%) by a Leica and twenty (1%) in ``rare/`` by a Canon EOS R
    (the others: Canon EOS); a store that goes through the HNSW index whatever the size (sequential
    scans priced out, as test_store does, so the planner takes the index on a table this small; the
    camera has no B-tree, so a camera filter leaves the planner the HNSW index alone)."""
    vectors = unit(np.random.default_rng(3).normal(size=(ROWS, DIM)))
    with empty_store(database, DIM) as loader:
        loader.upsert([picture(f"{'rare' if i % 100 == 7 else 'common'}/{i:04d}.jpg", vectors[i],
                               make="Leica" if i % 1000 == 5 else "Canon",
                               model="M" if i % 1000 == 5 else "EOS R" if i % 100 == 7 else "EOS")
                       for i in range(ROWS)])
        monkeypatch.setenv("PGOPTIONS", "-c enable_seqscan=off")
        store = database.open_store(dimension=DIM)
        monkeypatch.delenv("PGOPTIONS")
        store.exact_search_below = 0
        try:
            yield store, vectors
        finally:
            store.close()


def index_finds_three(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index comes up short whatever it holds (as an iterative scan that ran out of tuples to visit
    would): its answer is cut to three rows."""
    whole = ranking_module.indexed_sql
    monkeypatch.setattr(ranking_module, "indexed_sql", lambda dimension, where: whole(dimension, where) + " LIMIT 3")


def best(vectors: np.ndarray, rows: list[int], query: np.ndarray, k: int) -> list[str]:
    order = sorted(rows, key=lambda i: -float(vectors[i] @ query))[:k]
    return [f"{'rare' if i % 100 == 7 else 'common'}/{i:04d}.jpg" for i in order]


def test_a_rare_filter_through_the_index_returns_every_match(large, monkeypatch: pytest.MonkeyPatch) -> None:
    store, vectors = large

    def no_exact(*args: object) -> None:
        raise AssertionError("the exact search ran: this test is about the index path")

    monkeypatch.setattr(ranking_module, "_exact", no_exact)
    leicas = [i for i in range(ROWS) if i % 1000 == 5]
    for query in vectors[:5]:
        rare = store.ranking(query, 10, filters=Filters(camera="leica"))
        assert found(rare) == best(vectors, leicas, query, 10)  # both of them, best first
        assert rare.completeness.complete
        unfiltered = store.ranking(query, 10)
        assert len(unfiltered.hits) == 10 and unfiltered.completeness.complete


def test_copies_in_a_folder_through_the_index_are_every_match(large, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five pictures of common/ copied into picked/, which holds nothing else: a search there through the
    index (its candidates tested one by one) finds all five, named by their copies."""
    store, vectors = large
    monkeypatch.setattr(ranking_module, "_exact", lambda *args: pytest.fail("the exact search ran"))
    picked = [i for i in range(0, ROWS, 400)]
    for i in picked:
        assert store.update_source(f"hash:common/{i:04d}.jpg", file_path=f"/images/picked/{i:04d}.jpg",
                                   file_name=f"{i:04d}.jpg", processed_path=f"/processed/picked/{i:04d}.jpg.jpg",
                                   source_size=1, source_mtime_ns=1, folder="picked")
    for query in vectors[:3]:
        ranking = store.ranking(query, 10, filters=Filters(folders=("picked",)))
        assert found(ranking) == [name.replace("common/", "picked/") for name in best(vectors, picked, query, 10)]
        assert ranking.completeness.complete


def test_an_index_that_comes_up_short_is_made_good_by_an_exact_search(large, monkeypatch: pytest.MonkeyPatch) -> None:
    store, vectors = large
    index_finds_three(monkeypatch)
    in_rare = [i for i in range(ROWS) if i % 100 == 7]
    for query in vectors[:5]:
        ranking = store.ranking(query, 10, filters=Filters(camera="eos r"))
        assert found(ranking) == best(vectors, in_rare, query, 10)
        assert ranking.completeness.complete and ranking.matches == len(in_rare)


def test_a_floor_on_the_index_path_finds_every_picture_above_it(large, monkeypatch: pytest.MonkeyPatch) -> None:
    store, vectors = large
    query = vectors[0]
    sims = vectors @ query
    floor = float(np.sort(sims)[-4]) - 1e-6  # four pictures at or above it (the query's own among them)
    everywhere = store.ranking(query, 10, min_similarity=floor)
    assert found(everywhere) == best(vectors, list(range(ROWS)), query, 4)
    assert everywhere.completeness.complete

    index_finds_three(monkeypatch)  # too few: the exact search decides
    in_rare = [i for i in range(ROWS) if i % 100 == 7]
    floor = float(np.sort(sims[in_rare])[-5]) - 1e-6  # five of them above it
    rare = store.ranking(query, 10, filters=Filters(camera="eos r"), min_similarity=floor)
    assert found(rare) == best(vectors, in_rare, query, 5)
    assert rare.completeness.complete and all(h.similarity >= floor for h in rare.hits)


def test_a_floor_copied_from_a_printed_similarity_keeps_the_hit_it_was_copied_from(
        library: EmbeddingStore, large, monkeypatch: pytest.MonkeyPatch) -> None:
    """q.jsonl prints a similarity to 6 decimals; given back as ``min-similarity``, it keeps that hit, as
    the exact search (a small table, filtered or not) and the index (a large one, then its exact
    fallback) answer it."""
    store, vectors = large
    every_format = ("jpeg", "png", "heic", "webp", "gif")  # a filter every picture passes: counted as scored
    rankings = [lambda floor: search(library, min_similarity=floor),
                lambda floor: search(library, formats=every_format, min_similarity=floor),
                lambda floor: store.ranking(vectors[0], 10, min_similarity=floor)]
    for answer in rankings:
        hits = answer(None).hits[:8]
        assert any(shown_similarity(h.similarity) > h.similarity for h in hits)  # one printed above its value
        for n, hit in enumerate(hits, 1):
            assert [h.file_path for h in answer(shown_similarity(hit.similarity)).hits] == [
                h.file_path for h in hits[:n]], (n, hit.similarity)
    index_finds_three(monkeypatch)
    hit = store.ranking(vectors[0], 10).hits[5]
    assert store.ranking(vectors[0], 10, min_similarity=shown_similarity(hit.similarity)).hits[-1] == hit


def test_a_floor_written_with_more_decimals_than_printed_keeps_every_hit_above_it(
        library: EmbeddingStore, large) -> None:
    """A floor of 0.20000045 dropped a hit of 0.20000047: that prints as 0.200000, and only what prints was
    compared with the floor. A hit at or above the floor passes, as one printed at or above it does."""
    store, vectors = large
    for answer in (lambda floor: search(library, min_similarity=floor),
                   lambda floor: store.ranking(vectors[0], 10, min_similarity=floor)):
        below = [h for h in answer(None).hits if shown_similarity(h.similarity) < h.similarity]
        assert below  # printed below its value: about every other hit
        hit = below[0]
        floor = (hit.similarity + shown_similarity(hit.similarity)) / 2  # above what prints, below the value
        assert hit.file_path in [h.file_path for h in answer(floor).hits]


def test_too_many_rows_to_make_sure_is_said_not_hidden(large, monkeypatch: pytest.MonkeyPatch) -> None:
    store, vectors = large
    index_finds_three(monkeypatch)
    monkeypatch.setattr(ranking_module, "EXACT_FALLBACK_MAX_ROWS", 5)
    ranking = store.ranking(vectors[0], 10, filters=Filters(camera="eos r"))
    assert len(ranking.hits) == 3  # what the index found, and no more
    assert not ranking.completeness.complete and ranking.matches is None
    assert "more than 5 pictures pass the filters" in ranking.completeness.reason
    assert ranking.completeness.record() == {"complete": False, "incomplete-reason": ranking.completeness.reason}
