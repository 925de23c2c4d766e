"""The pipelined, batched ingest gives exactly what the simple one-image-at-a-time path gives:
the same rows, the same vectors, the same rankings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_search.config import load_config
from image_search.embed import Embedder
from image_search.indexer import Indexer
from image_search.preprocess import preprocess_image, processed_path_for, save_processed
from image_search.store import Database, EmbeddingRow
from tests.support.db import database_rows, slow_row_writes
from tests.support.files import emptied_on_purpose, write_config
from tests.support.model import TINY_DIMENSION

pytestmark = pytest.mark.integration


def _photo(path: Path, seed: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([(x * (seed % 7 + 1)) % 256, (y * 3 + seed) % 256, (x + y) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy).save(path, quality=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    root = tmp_path_factory.mktemp("ingest")
    config = write_config(root, tiny_model_dir, batch_size=4, resize_width=320, resize_height=240)
    for i in range(23):  # several batches and a partial last one; large JPEGs take the draft path
        size = (1600, 1200) if i % 3 == 0 else (500 + 7 * i, 380)
        _photo(root / "images" / f"sub{i % 2}" / f"p{i:02d}.jpg", seed=i, size=size)
    cfg = load_config(config)
    database = Database(cfg)
    embedder = Embedder.load(cfg.model_name, device="cpu", dimension=TINY_DIMENSION)
    yield cfg, database, embedder
    database.close()


def _rows(database: Database) -> dict[str, tuple[str, np.ndarray]]:
    """file_path -> (file_hash, embedding), read on a connection of our own (the store's has committed)."""
    rows = database_rows(database, ("file_path", "file_hash", "embedding::real[] AS embedding")) or []
    return {r["file_path"]: (r["file_hash"], np.asarray(r["embedding"], dtype=np.float32)) for r in rows}


def test_pipelined_ingest_equals_one_at_a_time(tree) -> None:
    cfg, database, embedder = tree
    store = database.open_store(dimension=TINY_DIMENSION)
    try:
        store.clear()
        indexer = Indexer(cfg, embedder, store)
        try:
            summary = indexer.index_folder(show_progress=False)
        finally:
            indexer.close()
        assert summary.embedded == 23 and not summary.skipped
        fast = _rows(database)
        query = embedder.embed_images([preprocess_image(cfg.source_directory / "sub1" / "p07.jpg",
                                                        max_size=(320, 240), max_pixels=cfg.max_image_pixels).image])[0]
        fast_ranking = [(h.file_path, round(h.similarity, 5)) for h in store.search(query, 23)]

        # The simple path: one file at a time, full pipeline, one forward pass and one write each.
        store.clear()
        for path in sorted(cfg.source_directory.rglob("*.jpg")):
            prepared = preprocess_image(path, max_size=(320, 240), max_pixels=cfg.max_image_pixels)
            processed = processed_path_for(path, cfg.source_directory, cfg.processed_directory)
            save_processed(prepared, processed)
            st = path.stat()
            store.upsert([EmbeddingRow(str(path), path.name, prepared.file_hash, str(processed), st.st_size,
                                       st.st_mtime_ns, cfg.model_name, embedder.embed_images([prepared.image])[0])])
        simple = _rows(database)
        simple_ranking = [(h.file_path, round(h.similarity, 5)) for h in store.search(query, 23)]
    finally:
        store.close()

    assert fast.keys() == simple.keys()
    for path, (file_hash, vector) in fast.items():
        assert simple[path][0] == file_hash, path
        np.testing.assert_allclose(vector, simple[path][1], atol=1e-5, err_msg=path)
    assert fast_ranking == simple_ranking
    assert fast_ranking[0][0].endswith("p07.jpg")


def test_the_processed_copies_are_written_by_the_workers_not_this_thread(tree, monkeypatch) -> None:
    """Issue 16: the indexer's own save_processed runs only for a picture no worker saved (none here); every
    row's processed copy is on disk all the same, its bytes those of preprocessing."""
    import shutil

    import image_search.indexer

    cfg, database, embedder = tree
    here: list[Path] = []
    monkeypatch.setattr(image_search.indexer, "save_processed", lambda prepared, path: here.append(path))
    shutil.rmtree(cfg.processed_directory, ignore_errors=True)
    emptied_on_purpose(cfg.processed_directory)
    store = database.open_store(dimension=TINY_DIMENSION)
    try:
        store.clear()
        indexer = Indexer(cfg, embedder, store, workers=2)
        try:
            summary = indexer.index_folder(show_progress=False)
        finally:
            indexer.close()
        rows = database_rows(database, ("file_path", "processed_path")) or []
    finally:
        store.close()

    assert summary.embedded == 23 and here == []
    assert len(rows) == 23
    for row in rows:
        source = Path(row["file_path"])
        processed = processed_path_for(source, cfg.source_directory, cfg.processed_directory)
        assert row["processed_path"] == str(processed)
        prepared = preprocess_image(source, max_size=(320, 240), max_pixels=cfg.max_image_pixels)
        assert processed.read_bytes() == prepared.jpeg_bytes, source


def test_a_write_names_the_stored_content_its_copies_join_and_every_copy_lands(tree, tmp_path,
                                                                              monkeypatch) -> None:
    """Content stored already; a batch holds a new picture and two more copies of it (the second of them is
    recorded by the batch's write, beside this thread), and the next batch a third copy. The write names
    that content among what it changes, so a batch reading it waits for it (``touches``); every copy is
    one more path of the one row."""
    import shutil

    slow_row_writes(monkeypatch, 0.5)  # the next batch is looked up while this one's rows travel
    _, _, embedder = tree
    cfg = load_config(write_config(tmp_path, Path(embedder.info.name), batch_size=3, resize_width=320,
                                   resize_height=240))
    sources = cfg.source_directory
    _photo(sources / "a.jpg", seed=1, size=(400, 300))
    _photo(sources / "n1.jpg", seed=2, size=(400, 300))
    for name in ("x.jpg", "z.jpg", "y.jpg"):
        shutil.copyfile(sources / "a.jpg", sources / name)
    database = Database(cfg)
    try:
        store = database.open_store(dimension=TINY_DIMENSION)
        store.create_table()
        indexer = Indexer(cfg, embedder, store, workers=1)
        written: list[set[str]] = []
        submit = indexer._writer.submit  # noqa: SLF001 - what each write says it changes

        def submitted(rows, *, keys, then=None):
            written.append(set(keys))
            return submit(rows, keys=keys, then=then)
        monkeypatch.setattr(indexer._writer, "submit", submitted)  # noqa: SLF001
        try:
            indexer.index_paths([sources / "a.jpg"])
            stored = next(iter(store.contents([r["file_hash"] for r in database_rows(database, ("file_hash",))])))
            summary = indexer.index_paths([sources / n for n in ("n1.jpg", "x.jpg", "z.jpg", "y.jpg")])
        finally:
            indexer.close()
        content = store.contents([stored])[stored]
        store.close()
    finally:
        database.close()
    assert (summary.embedded, summary.copies) == (1, 3)
    assert sorted(Path(p).name for p in content.paths) == ["a.jpg", "x.jpg", "y.jpg", "z.jpg"]
    assert stored in written[-1]  # the write of n1 and z names the content z joins


def test_an_indexer_whose_workers_cannot_start_leaves_no_writer_behind(tree, monkeypatch) -> None:
    """The row writer (a thread and a connection) starts before the worker pool: when the pool cannot start,
    the constructor's error is the pool's, and the writer is stopped with it."""
    import threading

    import image_search.indexer
    from image_search.workers import PoolError

    def no_workers(**_settings: object) -> None:
        raise PoolError("the preprocessing workers could not start (test)")

    cfg, database, embedder = tree
    monkeypatch.setattr(image_search.indexer, "PreprocessPool", no_workers)
    store = database.open_store(dimension=TINY_DIMENSION)
    try:
        with pytest.raises(PoolError, match="could not start"):
            Indexer(cfg, embedder, store)
    finally:
        store.close()
    assert [t.name for t in threading.enumerate() if t.name == "row-writer"] == []


def test_a_copy_of_content_whose_row_is_still_being_written_is_one_more_path_of_it(tree, tmp_path,
                                                                                   monkeypatch) -> None:
    """Issue 16: the rows of a batch are written beside the embedding of the next. A file in the next
    batch with the bytes of one being written waits for that write and is recorded as a copy (one row,
    two paths), not embedded a second time."""
    import shutil

    slow_row_writes(monkeypatch, 1.0)  # the next batch is looked up while this one travels
    _, _, embedder = tree
    cfg = load_config(write_config(tmp_path, Path(embedder.info.name), batch_size=4, resize_width=320,
                                   resize_height=240))
    sources = cfg.source_directory
    for i in range(8):
        _photo(sources / f"p{i:02d}.jpg", seed=100 + i, size=(400, 300))
    shutil.copyfile(sources / "p00.jpg", sources / "q00.jpg")
    order = [sources / n for n in ("p00.jpg", "p01.jpg", "p02.jpg", "p03.jpg", "q00.jpg", "p04.jpg",
                                   "p05.jpg", "p06.jpg", "p07.jpg")]  # the copy opens the second batch
    database = Database(cfg)
    try:
        store = database.open_store(dimension=TINY_DIMENSION)
        store.create_table()
        indexer = Indexer(cfg, embedder, store, workers=1)
        try:
            summary = indexer.index_paths(order)
        finally:
            indexer.close()
        rows = database_rows(database, ("file_path", "file_hash")) or []
        content = store.contents([r["file_hash"] for r in rows if r["file_path"].endswith("p00.jpg")])
        store.close()
    finally:
        database.close()
    assert (summary.embedded, summary.copies) == (8, 1)
    assert len(rows) == 8
    assert sorted(Path(p).name for (c,) in [tuple(content.values())] for p in c.paths) == ["p00.jpg", "q00.jpg"]
