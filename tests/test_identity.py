"""A picture's identity is the MD5 of its source bytes, on every path; a database of an earlier
version (identity = MD5 of the processed JPEG) is migrated once, without re-embedding anything."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from image_search.config import load_config
from image_search.embed import Embedder
from image_search.indexer import Indexer
from image_search.store import IDENTITY, Database
from image_search.sync import compare_folder, migrate_identities
from tests.support.db import database_rows, make_legacy_identity, raw
from tests.support.files import save_picture, write_config
from tests.support.model import TINY_DIMENSION

pytestmark = pytest.mark.integration

COLUMNS = ("id", "file_path", "file_hash", "processed_path", "updated_at", "embedding::text AS embedding")


def md5_of(path: Path | str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def library(tmp_path: Path, tiny_model_dir: Path):
    """Six pictures indexed by today's code, on the real embedded PostgreSQL."""
    cfg = load_config(write_config(tmp_path, tiny_model_dir))
    for i in range(6):
        save_picture(cfg.source_directory / f"p{i}.{'png' if i % 2 else 'jpg'}", seed=i, size=(120, 90))
    database = Database(cfg)
    embedder = Embedder.load(cfg.model_name, device="cpu", dimension=TINY_DIMENSION)
    store = database.open_store(dimension=TINY_DIMENSION)
    indexer = Indexer(cfg, embedder, store, workers=1)
    assert indexer.index_folder(show_progress=False).embedded == 6
    yield cfg, database, store, indexer
    indexer.close()
    store.close()
    database.close()


def rows(database: Database) -> dict[str, dict]:
    return {r["file_path"]: r for r in database_rows(database, COLUMNS) or []}


def test_a_new_table_holds_source_md5s_and_is_marked_as_such(library) -> None:
    cfg, database, store, _ = library
    for path, row in rows(database).items():
        assert row["file_hash"] == md5_of(path)
    assert raw(database, "SELECT value FROM image_search_meta WHERE key = 'identity'") == [(IDENTITY,)]
    assert not store.needs_identity_migration()
    assert migrate_identities(store) == 0


def test_an_old_database_is_rehashed_once_keeping_rows_and_embeddings(library, monkeypatch) -> None:
    cfg, database, store, indexer = library
    old_hashes = make_legacy_identity(database)
    before = rows(database)
    assert store.needs_identity_migration()
    images = cfg.source_directory
    # While nothing ran: one picture was replaced by another, one was deleted.
    changed, deleted = images / "p1.png", images / "p2.jpg"
    save_picture(changed, seed=99, size=(120, 90))
    os.utime(changed, ns=(before[str(changed)]["id"] * 10**9, before[str(changed)]["id"] * 10**9))
    deleted.unlink()

    state = compare_folder(cfg, store)

    assert not store.needs_identity_migration()
    after = rows(database)
    assert state.changed == [changed] and state.removed == [str(deleted)]
    for path in set(before) - {str(changed), str(deleted)}:
        # Same row, same embedding: only its identity changed, to the MD5 of the source bytes.
        assert after[path]["id"] == before[path]["id"]
        assert after[path]["embedding"] == before[path]["embedding"]
        assert after[path]["file_hash"] == md5_of(path) != old_hashes[path]
    # The changed picture keeps its old row until it is re-indexed, which replaces it by path.
    assert after[str(changed)]["file_hash"] == old_hashes[str(changed)]
    summary = indexer.index_paths(state.changed)
    assert (summary.embedded, summary.relinked) == (1, 0)
    final = rows(database)
    assert sorted(final) == sorted(str(p) for p in images.iterdir())
    assert final[str(changed)]["file_hash"] == md5_of(changed)
    assert final[str(changed)]["embedding"] != before[str(changed)]["embedding"]
    # A second look finds nothing to migrate and reads no file.
    def no_reading(*args, **kwargs):
        raise AssertionError("a migrated database read a file to re-hash it")

    monkeypatch.setattr("image_search.sync.source_identity_of_file", no_reading)
    assert migrate_identities(store) == 0
    assert compare_folder(cfg, store).changed == []


def test_a_rehashed_database_relinks_a_copy_without_model_work(library) -> None:
    """After the migration the identity is the one the indexer computes: a copy of a migrated picture is
    a copy (a path of the same row), a touched one is relinked; neither is embedded again."""
    cfg, database, store, indexer = library
    make_legacy_identity(database)
    compare_folder(cfg, store)
    images = cfg.source_directory
    (images / "copy-of-p3.png").write_bytes((images / "p3.png").read_bytes())
    touched = images / "p4.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 5 * 10**9))
    state = compare_folder(cfg, store)
    assert sorted(state.changed) == [images / "copy-of-p3.png", touched]
    summary = indexer.index_paths(state.changed)
    assert summary.embedded == 0
    assert (summary.copies, summary.relinked) == (1, 1)
    assert rows(database)[str(touched)]["file_hash"] == md5_of(touched)


def test_a_file_another_process_stored_meanwhile_is_unchanged_not_relinked(library, monkeypatch) -> None:
    """``search`` or ``index`` beside a running service: a new file the rescan found is stored by the service
    before this process reads it. Its row already says what the file says: unchanged, not relinked."""
    cfg, database, store, indexer = library
    new = cfg.source_directory / "new.png"
    save_picture(new, seed=42, size=(120, 90))
    state = compare_folder(cfg, store)
    assert state.changed == [new]
    service = Indexer(cfg, indexer.embedder, store, workers=1)  # the service, storing it first
    try:
        assert service.index_paths([new]).embedded == 1
    finally:
        service.close()
    before = rows(database)[str(new)]
    with monkeypatch.context() as m:  # this process looked before the service wrote: no row for the file
        m.setattr(store, "sources", lambda paths: {})
        summary = indexer.index_paths(state.changed)
    assert (summary.embedded, summary.relinked, summary.copies, summary.unchanged) == (0, 0, 0, 1)
    assert rows(database)[str(new)] == before  # nothing written

    os.utime(new, ns=(new.stat().st_atime_ns, new.stat().st_mtime_ns + 5 * 10**9))  # touched: relinked, as before
    summary = indexer.index_paths([new])
    assert (summary.embedded, summary.relinked, summary.unchanged) == (0, 1, 0)


def test_two_old_rows_of_the_same_bytes_become_one(library) -> None:
    """An old database could hold the same bytes twice (processed with another box before): after the
    migration they would share one identity, so one row stays, and the next rescan finds the dropped
    row's file again as a copy of it (no model work)."""
    cfg, database, store, indexer = library
    make_legacy_identity(database)
    images = cfg.source_directory
    twin = images / "p5-twin.png"
    twin.write_bytes((images / "p5.png").read_bytes())
    source = rows(database)[str(images / "p5.png")]
    st = twin.stat()
    raw(database, "INSERT INTO image_embeddings (file_path, file_name, file_hash, processed_path, source_size, "
                  "source_mtime_ns, model_name, embedding) SELECT %s, 'p5-twin.png', 'an-old-hash', processed_path, "
                  "%s, %s, model_name, embedding FROM image_embeddings WHERE id = %s",
        (str(twin), st.st_size, st.st_mtime_ns, source["id"]))
    raw(database, "INSERT INTO image_paths (file_path, file_hash, file_name, processed_path, source_size, "
                  "source_mtime_ns) SELECT file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns "
                  "FROM image_embeddings WHERE file_hash = 'an-old-hash'")
    compare_folder(cfg, store)
    hashes = [r["file_hash"] for r in rows(database).values()]
    assert hashes.count(md5_of(twin)) == 1
    assert len(hashes) == 6
    state = compare_folder(cfg, store)
    assert state.changed == [twin]
    summary = indexer.index_paths(state.changed)
    assert (summary.copies, summary.embedded) == (1, 0)
    assert store.contents([md5_of(twin)])[md5_of(twin)].paths == tuple(sorted([str(twin), str(images / "p5.png")]))


def test_files_renamed_onto_one_anothers_names_while_nothing_watched_keep_their_rows(library) -> None:
    """A renumbering (IMG_0001 to IMG_0002, ..., IMG_0004 to IMG_0005) and a swap (p0 and p2) made while
    nothing watched: each content follows its file, with no model work. Followed one file at a time, each
    content whose name the next file took was dropped, and embedded again when its file was read."""
    cfg, database, store, indexer = library
    images, seq = cfg.source_directory, cfg.source_directory / "seq"
    for i in range(1, 5):
        save_picture(seq / f"IMG_{i:04d}.png", seed=20 + i, size=(120, 90))
    assert indexer.index_folder(show_progress=False).embedded == 4
    before = {row["file_hash"]: row for row in rows(database).values()}
    processed = {h: Path(row["processed_path"]).read_bytes() for h, row in before.items()}
    for i in range(4, 0, -1):
        (seq / f"IMG_{i:04d}.png").rename(seq / f"IMG_{i + 1:04d}.png")
    (images / "p0.jpg").rename(images / "swap.jpg")
    (images / "p2.jpg").rename(images / "p0.jpg")
    (images / "swap.jpg").rename(images / "p2.jpg")

    summary = indexer.index_folder(show_progress=False)

    assert (summary.embedded, summary.removed, summary.copies, summary.relinked) == (0, 0, 0, 6)
    after = rows(database)
    on_disk = sorted(p for p in images.rglob("*") if p.is_file())
    assert sorted(map(Path, after)) == on_disk
    for path in on_disk:
        row = after[str(path)]
        was = before[md5_of(path)]
        assert (row["file_hash"], row["id"], row["embedding"]) == (was["file_hash"], was["id"], was["embedding"]), path
        assert Path(row["processed_path"]).read_bytes() == processed[row["file_hash"]], path
    assert not (cfg.processed_directory / "seq" / "IMG_0001.png.jpg").exists()


def test_a_file_renamed_or_moved_while_nothing_watched_keeps_its_row(library) -> None:
    """Found again by its identity (same size, then the MD5 of its bytes): the row, its embedding and its
    processed copy follow the file, with no decoding and no model work, where the rescan used to drop
    the row and embed the file again."""
    cfg, database, store, indexer = library
    before = rows(database)
    images = cfg.source_directory
    (images / "trip").mkdir()
    (images / "p0.jpg").rename(images / "trip" / "beach.jpg")
    (images / "p1.png").rename(images / "renamed.png")
    (images / "p2.jpg").unlink()
    save_picture(images / "new.png", seed=42, size=(120, 90))

    state = compare_folder(cfg, store)

    assert state.renamed == 2
    assert state.changed == [images / "new.png"] and state.removed == [str(images / "p2.jpg")]
    after = rows(database)
    for old, new in (("p0.jpg", "trip/beach.jpg"), ("p1.png", "renamed.png")):
        row, was = after[str(images / new)], before[str(images / old)]
        assert (row["id"], row["embedding"], row["file_hash"]) == (was["id"], was["embedding"], was["file_hash"])
        assert Path(row["processed_path"]) == cfg.processed_directory / f"{new}.jpg"
        assert Path(row["processed_path"]).is_file() and not Path(was["processed_path"]).exists()
    summary = indexer.index_paths(state.changed)
    assert (summary.embedded, summary.relinked) == (1, 0)
    assert len(rows(database)) == 6  # six indexed, one deleted, one new


def test_a_picture_saved_from_a_processed_copy_survives_the_migration(library) -> None:
    """Its bytes are another row's processed JPEG, so its new identity is that row's old one: both rows
    stay, each with the MD5 of its own source (no row is taken for a duplicate of the other)."""
    cfg, database, store, indexer = library
    images = cfg.source_directory
    saved = images / "saved-from-output.jpg"
    saved.write_bytes((cfg.processed_directory / "p3.png.jpg").read_bytes())
    assert indexer.index_paths([saved]).embedded == 1
    old = make_legacy_identity(database)
    assert md5_of(saved) == old[str(images / "p3.png")]
    before = rows(database)
    compare_folder(cfg, store)
    after = rows(database)
    assert sorted(after) == sorted(before)
    for path in after:
        assert after[path]["file_hash"] == md5_of(path)
        assert after[path]["id"] == before[path]["id"]


def test_a_new_source_directory_leaves_the_old_rows_and_does_not_follow_them(library) -> None:
    """Rows of another folder are not renames inside this one (the same bytes under /new are new files to
    read), nor this rescan's to remove: the other folder may be another service's, or a disk not mounted."""
    cfg, database, store, _ = library
    before = rows(database)
    moved = cfg.source_directory.parent / "library-moved"
    shutil.copytree(cfg.source_directory, moved)
    state = compare_folder(dataclasses.replace(cfg, source_directory=moved), store)
    assert state.renamed == 0
    assert state.removed == [] and len(state.changed) == 6
    assert rows(database) == before
