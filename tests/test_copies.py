"""Copies: a file with the same bytes as an indexed one is a path of the same row, not a row of its own
and not dropped. The index keeps each content once with every path that holds it; a search names the
content once, with its other paths (``copies``); deleting, renaming, moving or rewriting one copy
touches that copy's path alone, and the row goes with its last path. None of it is model work."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.config import load_config
from image_search.embed import Embedder
from image_search.indexer import Indexer
from image_search.names import escape
from image_search.preprocess import processed_path_for
from image_search.readiness import ReadinessTracker
from image_search.search import search_image
from image_search.store import Database
from image_search.sync import FolderSync, compare_folder
from image_search.watch import Change, ChangeKind, Folder
from tests.support.db import raw
from tests.support.files import read_jsonl, save_picture, write_config
from tests.support.model import TINY_DIMENSION

pytestmark = pytest.mark.integration


class Library:
    """Three pictures indexed on the real embedded PostgreSQL, the model's every call counted."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.cfg = load_config(write_config(root, model_dir))
        self.images = self.cfg.source_directory
        self.beach = save_picture(self.images / "trips" / "beach.png", seed=1)
        save_picture(self.images / "cat.jpg", seed=2)
        save_picture(self.images / "dog.png", seed=3)
        self.database = Database(self.cfg)
        self.embedder = Embedder.load(self.cfg.model_name, device="cpu", dimension=TINY_DIMENSION)
        self.store = self.database.open_store(dimension=TINY_DIMENSION)
        self.indexer = Indexer(self.cfg, self.embedder, self.store, workers=1)
        self.embedded_pictures = 0
        embed_images = self.embedder.embed_images

        def counted(pictures):
            self.embedded_pictures += len(pictures)
            return embed_images(pictures)

        self.embedder.embed_images = counted  # type: ignore[method-assign]
        self.sync = FolderSync(self.cfg, self.store, ReadinessTracker(0.5, clock=time.monotonic))

    def copy(self, source: Path, name: str) -> Path:
        target = self.images / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def paths(self) -> dict[str, str]:
        """Every stored path -> its content's hash, as stored (escaped)."""
        return dict(raw(self.database, "SELECT file_path, file_hash FROM image_paths"))

    def rows(self) -> dict[str, tuple[str, str, str | None]]:
        """file_hash -> (representative path, its processed copy, its folder), as stored."""
        return {h: (p, pp, f) for h, p, pp, f in
                raw(self.database, "SELECT file_hash, file_path, processed_path, folder FROM image_embeddings")}

    def hash_of(self, path: Path) -> str:
        return self.paths()[escape(path)]

    def copies_of(self, path: Path) -> set[str]:
        """Every stored path of the content at ``path``."""
        file_hash = self.hash_of(path)
        return {p for p, h in self.paths().items() if h == file_hash}

    def event(self, kind: ChangeKind, path: Path, dest: Path | None = None) -> None:
        self.sync.apply(Change(Folder.IMAGES, kind, path, dest=dest))


@pytest.fixture
def library(tmp_path: Path, tiny_model_dir: Path):
    lib = Library(tmp_path, tiny_model_dir)
    assert lib.indexer.index_folder(show_progress=False).embedded == 3
    lib.embedded_pictures = 0
    yield lib
    lib.indexer.close()
    lib.store.close()
    lib.database.close()


def test_a_copy_is_recorded_as_a_path_of_the_one_row_without_model_work(library: Library) -> None:
    lib = library
    top, album = lib.copy(lib.beach, "beach copy.png"), lib.copy(lib.beach, "album/beach.png")
    with capture_logs() as logs:
        summary = lib.indexer.index_folder(show_progress=False)
    assert (summary.embedded, summary.copies, summary.relinked) == (0, 2, 0)
    assert lib.embedded_pictures == 0
    assert lib.copies_of(lib.beach) == {escape(lib.beach), escape(top), escape(album)}
    assert len(lib.rows()) == 3 and lib.store.count() == 3
    copies = [e for e in logs if e["event"] == "image_copy"]
    assert sorted(e["path"] for e in copies) == sorted([top, album])
    assert all(e["same_as"] in {lib.beach, top, album} - {e["path"]} for e in copies)
    index_complete = next(e for e in logs if e["event"] == "index_complete")
    assert index_complete["copies"] == 2 and "duplicates" not in index_complete
    # Each copy has its own processed picture; the next look reads none of them again.
    assert all(processed_path_for(p, lib.images, lib.cfg.processed_directory).is_file() for p in (top, album))
    assert compare_folder(lib.cfg, lib.store).changed == []
    # Two new files of one new content in one batch: embedded once, the second a copy.
    new = save_picture(lib.images / "new.png", seed=7)
    lib.copy(new, "new again.png")
    summary = lib.indexer.index_folder(show_progress=False)
    assert (summary.embedded, summary.copies, summary.unchanged) == (1, 1, 5)
    assert lib.embedded_pictures == 1
    assert len(lib.copies_of(new)) == 2 and lib.store.count() == 4


def test_a_search_names_the_content_once_with_its_copies(library: Library) -> None:
    lib = library
    odd = lib.copy(lib.beach, "odd\\name\n.png")  # stored escaped, given back as the file system names it
    lib.copy(lib.beach, "album/beach.png")
    lib.indexer.index_folder(show_progress=False)
    result = search_image(lib.beach, cfg=lib.cfg, embedder=lib.embedder, store=lib.store)
    assert [h.file_hash for h in result.hits].count(lib.hash_of(lib.beach)) == 1
    best = result.hits[0]
    assert best.file_hash == lib.hash_of(lib.beach) and best.similarity == pytest.approx(1.0, abs=1e-4)
    everywhere = {str(lib.beach), str(odd), str(lib.images / "album" / "beach.png")}
    assert {best.file_path, *best.copies} == everywhere and len(best.copies) == 2
    assert best.file_path not in best.copies
    assert all(h.copies == () for h in result.hits[1:])
    records = read_jsonl(result.bundle / "beach.jsonl")
    assert len(records) == 3
    assert records[0]["file_path"] == escape(best.file_path)
    assert records[0]["copies"] == [escape(p) for p in best.copies]
    assert escape(odd) in records[0]["copies"] or records[0]["file_path"] == escape(odd)
    assert records[1]["copies"] == [] and records[2]["copies"] == []


def test_deleting_one_copy_keeps_the_row_and_deleting_the_last_removes_it(library: Library) -> None:
    lib = library
    top = lib.copy(lib.beach, "beach copy.png")
    lib.indexer.index_folder(show_progress=False)
    file_hash = lib.hash_of(lib.beach)
    representative = Path(lib.rows()[file_hash][0])
    other = top if representative == lib.beach else lib.beach
    # The representative goes (seen by the watcher): the row stays, naming the remaining copy.
    representative.unlink()
    lib.event(ChangeKind.DELETED, representative)
    processed = processed_path_for(other, lib.images, lib.cfg.processed_directory)
    assert lib.rows()[file_hash][:2] == (escape(other), escape(processed)) and processed.is_file()
    assert lib.copies_of(other) == {escape(other)}
    assert all(h.copies == () for h in lib.store.search(lib.embedder.embed_texts(["a picture"])[0], 5))
    # The last one goes while nothing watched: the next look drops the row.
    other.unlink()
    state = compare_folder(lib.cfg, lib.store)
    assert state.removed == [str(other)]
    assert file_hash not in lib.rows() and file_hash not in lib.paths().values()
    assert lib.store.count() == 2
    assert lib.embedded_pictures == 0


def test_deleting_copies_while_nothing_watched(library: Library) -> None:
    lib = library
    copies = [lib.copy(lib.beach, f"copy{i}.png") for i in range(3)]
    lib.indexer.index_folder(show_progress=False)
    file_hash = lib.hash_of(lib.beach)
    for path in [lib.beach, *copies[:2]]:
        path.unlink()
    assert sorted(compare_folder(lib.cfg, lib.store).removed) == sorted(str(p) for p in [lib.beach, *copies[:2]])
    assert lib.rows()[file_hash][0] == escape(copies[2])
    assert lib.copies_of(copies[2]) == {escape(copies[2])}


def test_renaming_or_moving_a_copy_moves_its_own_path(library: Library) -> None:
    lib = library
    top = lib.copy(lib.beach, "beach copy.png")
    lib.indexer.index_folder(show_progress=False)
    file_hash = lib.hash_of(lib.beach)
    # Renamed, seen by the watcher.
    renamed = lib.images / "beach again.png"
    top.rename(renamed)
    lib.event(ChangeKind.MOVED, top, renamed)
    assert lib.copies_of(lib.beach) == {escape(lib.beach), escape(renamed)}
    assert (lib.cfg.processed_directory / "beach again.png.jpg").is_file()
    # Moved to another folder while nothing watched: found again by its identity.
    (lib.images / "kept").mkdir()
    moved = lib.images / "kept" / "beach.png"
    lib.beach.rename(moved)
    state = compare_folder(lib.cfg, lib.store)
    assert (state.renamed, state.removed, state.changed) == (1, [], [])
    assert lib.copies_of(moved) == {escape(moved), escape(renamed)}
    assert raw(lib.database, "SELECT folder FROM image_paths WHERE file_path = %s", (escape(moved),)) == [("kept",)]
    # The representative is one of the paths, its folder that path's.
    path, processed, folder = lib.rows()[file_hash]
    assert path in {escape(moved), escape(renamed)} and Path(processed).is_file()
    assert folder == ("kept" if path == escape(moved) else "")
    # Both copies moved at once: each path follows one file.
    (lib.images / "both").mkdir()
    moved.rename(lib.images / "both" / "1.png")
    renamed.rename(lib.images / "both" / "2.png")
    assert compare_folder(lib.cfg, lib.store).renamed == 2
    assert lib.copies_of(lib.images / "both" / "1.png") == {escape(lib.images / "both" / n) for n in ("1.png", "2.png")}
    # A folder of copies moved, seen by the watcher.
    (lib.images / "both").rename(lib.images / "all")
    lib.sync.apply(Change(Folder.IMAGES, ChangeKind.MOVED, lib.images / "both", is_directory=True,
                          dest=lib.images / "all"))
    assert lib.copies_of(lib.images / "all" / "1.png") == {escape(lib.images / "all" / n) for n in ("1.png", "2.png")}
    assert lib.rows()[file_hash][2] == "all"
    assert lib.embedded_pictures == 0 and lib.store.count() == 3


def test_a_copy_whose_content_changes_leaves_its_old_content(library: Library) -> None:
    lib = library
    top = lib.copy(lib.beach, "beach copy.png")
    lib.indexer.index_folder(show_progress=False)
    beach_hash = lib.hash_of(lib.beach)
    for changed in (lib.beach, top):  # whichever is the representative, one of them changes
        if lib.rows()[beach_hash][0] == escape(changed):
            break
    kept = top if changed == lib.beach else lib.beach
    save_picture(changed, seed=11)
    summary = lib.indexer.index_folder(show_progress=False)
    assert (summary.embedded, summary.copies) == (1, 0)
    assert lib.copies_of(kept) == {escape(kept)}
    assert lib.rows()[beach_hash][0] == escape(kept)
    assert lib.hash_of(changed) != beach_hash and lib.copies_of(changed) == {escape(changed)}
    assert lib.store.count() == 4
    # Rewritten with the bytes of another stored picture: a copy of that one, and the beach keeps its row.
    shutil.copyfile(lib.images / "cat.jpg", changed)
    summary = lib.indexer.index_folder(show_progress=False)
    assert (summary.embedded, summary.copies) == (0, 1)
    assert lib.copies_of(changed) == {escape(changed), escape(lib.images / "cat.jpg")}
    assert lib.store.count() == 3 and beach_hash in lib.rows()
    assert lib.embedded_pictures == 1


def test_copies_an_earlier_version_dropped_are_found_by_the_next_rescan_without_model_work(library: Library) -> None:
    lib = library
    copies = [lib.copy(lib.beach, "beach copy.png"), lib.copy(lib.images / "cat.jpg", "pets/cat.jpg")]
    # What an earlier version left: the copies read, logged as duplicates and dropped; no path of theirs.
    lib.indexer.index_folder(show_progress=False)
    raw(lib.database, "DELETE FROM image_paths WHERE file_path = ANY(%s)", ([escape(p) for p in copies],))
    assert sorted(compare_folder(lib.cfg, lib.store).changed) == sorted(copies)
    lib.embedded_pictures = 0
    summary = lib.indexer.index_folder(show_progress=False)
    assert (summary.copies, summary.embedded, summary.unchanged) == (2, 0, 3)
    assert lib.embedded_pictures == 0
    assert lib.copies_of(copies[0]) == {escape(lib.beach), escape(copies[0])}
    assert compare_folder(lib.cfg, lib.store).changed == []  # found once; unchanged from then on


def test_a_copy_that_cannot_be_looked_at_now_keeps_its_path_when_another_copy_goes(library: Library,
                                                                                    monkeypatch) -> None:
    """The beach picture is on a share (``nas/``) and in ``trips/``. The share answers I/O errors for a
    moment (a stale handle; a folder closed to the service's user) as ``trips/beach.png`` is deleted: the
    copy on the share was taken for gone too, its path and processed copy removed with the row (its last
    path), and ``path.is_symlink()`` then raised out of the service. A new copy read meanwhile crashed the
    indexer the same way. Only a path known to hold no file goes."""
    lib = library
    on_share = lib.copy(lib.beach, "nas/beach.png")
    lib.indexer.index_folder(show_progress=False)
    file_hash = lib.hash_of(lib.beach)
    stat = Path.stat

    def share_errors(path: Path, *args, **kwargs):
        if Path(path).is_relative_to(lib.images / "nas"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return stat(path, *args, **kwargs)

    newer = lib.copy(on_share, "newer/beach.png")
    monkeypatch.setattr(Path, "stat", share_errors)
    lib.beach.unlink()
    lib.event(ChangeKind.DELETED, lib.beach)
    summary = lib.indexer.index_paths([newer])  # read by a worker, which the share's errors do not reach
    monkeypatch.undo()
    assert summary.skipped == [] and lib.embedded_pictures == 0
    assert lib.copies_of(on_share) == {escape(on_share), escape(newer)}  # the share's path kept, with its row
    assert processed_path_for(on_share, lib.images, lib.cfg.processed_directory).is_file()
    assert lib.hash_of(on_share) == file_hash
