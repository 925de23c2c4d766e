"""The service loop in-process: a real ``Service`` over the real embedded PostgreSQL and the tiny model,
driven by ``Change`` records (what the watcher would report) and real files, on a fake clock.

No watcher thread and no subprocess: each story puts changes on the queue, moves the clock and runs
``Service.step`` until the loop has nothing left to do, then looks at the rows, the processed copies,
the result folders and the inbox. Stories that need the process boundary (signals, sd_notify over a
real socket, kill -9, inotify overflow) stay in test_service.py and test_recovery.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg2
import pytest
from structlog.testing import capture_logs

from tests.support.db import slow_row_writes
from tests.support.failures import remount, small_disk
from tests.support.files import immutable, save_picture, written_into
from tests.support.model import TINY_DIMENSION, save_tiny_clip
from tests.support.story import SETTLE
from tests.support.waiting import wait_for

import image_search.sync
from image_search.config import Config
from image_search.errors import ExitCode
from image_search.preprocess import SOURCE_MARKER, preprocess_for, processed_path_for, thumbnail_path_for
from image_search.runtime import RestartRequested
from image_search.service import watched_folders
from image_search.watch import Change, ChangeKind, Folder, observer_problem, start_observer

pytestmark = pytest.mark.integration



def expected_hash(path: Path, cfg: Config) -> str:
    return preprocess_for(path, cfg).file_hash


# --- start-up -------------------------------------------------------------------------------------


def test_startup_indexes_the_folder_and_answers_a_waiting_query_only_after_ready(story_factory) -> None:
    story = story_factory({"a.png": 1, "b.png": 2, "sub/c.png": 3}, start=False)
    shutil.copyfile(story.images / "a.png", story.inbox / "waiting.png")
    story.service.start()
    assert story.notifier.bundles_at_ready == []  # nothing answered before READY=1
    assert any(f[0] == "READY=1" and f[1].startswith("STATUS=") for f in story.notifier.sent)
    story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(story.images / n) for n in ("a.png", "b.png", "sub/c.png")}
    assert rows[str(story.images / "sub/c.png")]["file_hash"] == expected_hash(story.images / "sub/c.png", story.cfg)
    ranking = [json.loads(line)["file_path"]
               for line in (story.bundle("waiting.png") / "waiting.jsonl").read_text().splitlines()]
    assert ranking[0] == str(story.images / "a.png")
    assert list(story.inbox.iterdir()) == []


class SlowShare:
    """``stat`` of a picture on a slow network share (``seconds`` each), for the rescan; a stop (SIGTERM,
    as the signal handler sets it) arrives while the ``stop_at``-th is under way. Counts the stats."""

    def __init__(self, monkeypatch, story, *, seconds: float, stop_at: int) -> None:
        self.story, self.seconds, self.stop_at, self.stats = story, seconds, stop_at, 0
        self._stat = image_search.sync.stat_or_none
        monkeypatch.setattr(image_search.sync, "stat_or_none", self)

    def __call__(self, path: Path) -> os.stat_result | None:
        self.stats += 1
        time.sleep(self.seconds)
        if self.stats == self.stop_at:
            self.story.service.stop.set(signal.SIGTERM)
        return self._stat(path)


def test_a_stop_during_the_startup_rescan_ends_the_start_at_the_next_file(story_factory, monkeypatch) -> None:
    """A large library on a slow share: 400 files at 20 ms a stat make an 8 s rescan. SIGTERM at the 10th
    ends the start there, never ready, as a stop during the model's load does, and nothing is removed."""
    story = story_factory(start=False)
    for i in range(400):
        (story.images / f"p{i:03}.png").touch()
    share = SlowShare(monkeypatch, story, seconds=0.02, stop_at=10)
    with capture_logs() as logs:
        assert story.service.run() == ExitCode.OK
    assert share.stats == 10  # not one file looked at after the stop
    events = [e["event"] for e in logs]
    assert "rescan_stopped" in events and "rescan_complete" not in events, events
    assert "service_ready" not in events and events[-1] == "service_stopped_during_startup", events
    assert logs[-1]["signal"] == "SIGTERM"
    assert [f[0] for f in story.notifier.sent] == ["STOPPING=1"]  # never READY=1
    assert len(story.service.images) == 0  # nothing queued from a comparison cut short


def test_a_stop_during_the_startup_walk_removes_no_row_of_a_folder_it_did_not_reach(story_factory,
                                                                                     monkeypatch) -> None:
    """The walk stops in sub/: the files of sub/ and z/ were never listed, which is not "gone". Even the
    row of a file really deleted stays until a rescan sees the whole folder; the next start does."""
    story = story_factory({"a.png": 1, "sub/b.png": 2, "sub/c.png": 3, "z/d.png": 4})
    rows = story.rows()
    again = story_factory(after=story, start=False)
    (story.images / "z" / "d.png").unlink()  # deleted while the service was stopped
    listing = os.scandir

    def slow_listing(folder):  # the stop arrives while sub/ is being listed
        if Path(folder) == story.images / "sub":
            again.service.stop.set(signal.SIGTERM)
        return listing(folder)

    monkeypatch.setattr(os, "scandir", slow_listing)
    with capture_logs() as logs:
        assert again.service.run() == ExitCode.OK
    monkeypatch.setattr(os, "scandir", listing)
    assert [e["event"] for e in logs if e["event"] in ("rescan_stopped", "rows_removed", "service_ready")] == [
        "rescan_stopped"]
    assert again.rows() == rows
    assert all(Path(row["processed_path"]).is_file() for row in rows.values())
    third = story_factory(after=again)
    assert set(third.rows()) == set(rows) - {str(story.images / "z" / "d.png")}


def test_a_stop_during_a_periodic_rescan_ends_it_at_the_next_file(story_factory, monkeypatch) -> None:
    story = story_factory({"a.png": 1, "b.png": 2}, rescan_interval=60.0)
    rows = story.rows()
    for i in range(200):
        (story.images / f"q{i:03}.png").touch()
    (story.images / "a.png").unlink()  # its event lost: only a whole rescan may say it is gone
    share = SlowShare(monkeypatch, story, seconds=0.02, stop_at=5)
    story.clock.advance(60)
    with capture_logs() as logs:
        worked = story.service.step()
    assert share.stats == 5  # not one file looked at after the stop
    assert worked and story.service.stop.is_set()  # the loop goes round, sees the stop and ends
    assert [e["event"] for e in logs if e["event"] in ("rescan_stopped", "rescan_complete", "rows_removed")] == [
        "rescan_stopped"]
    assert story.rows() == rows and len(story.service.images) == 0


def test_held_startup_query_waits_for_the_whole_backlog(story_factory) -> None:
    """batch-size 2 and five images: the held query is answered after all five are indexed, so it can
    rank the last of them first."""
    files = {f"p{i}.png": 10 + i for i in range(5)}
    story = story_factory(files, start=False, batch_size=2)
    shutil.copyfile(story.images / "p4.png", story.inbox / "held.png")
    story.service.start()
    story.run_until_idle()
    ranking = [json.loads(line)["file_path"]
               for line in (story.bundle("held.png") / "held.jsonl").read_text().splitlines()]
    assert ranking[0] == str(story.images / "p4.png")


def test_a_held_startup_query_does_not_wait_for_a_disk_that_refuses_the_ingest(story_factory) -> None:
    """New pictures waiting at start while processed/ refuses their copies: the queries found at start were
    held until the backlog was in, so for as long as the disk's outage lasted (a query dropped later was
    answered in 2 s). Now they are answered once the ingest waits, saying how many are not indexed yet."""
    first = story_factory({"a.png": 1, "b.png": 2}, cleanup_on_exit=False)
    save_picture(first.images / "new.png", seed=3)
    shutil.copyfile(first.images / "b.png", first.inbox / "held.png")
    story = story_factory(after=first, start=False)
    with immutable(first.cfg.processed_directory):  # as another user's folder refuses this one's writes
        story.service.start()
        with capture_logs() as logs:
            story.let_settle_periods_pass(10)
    assert [e["work"] for e in logs if e["event"] == "output_unwritable" and e["log_level"] == "warning"] == ["ingest"]
    (answered,) = [e for e in logs if e["event"] == "search_answered"]
    assert answered["best"] == story.images / "b.png" and answered["not_yet_indexed"] == 1  # new.png


@pytest.mark.parametrize("outages", [0, 2])
def test_held_startup_query_is_answered_once_the_backlogs_rows_are_committed(story_factory, monkeypatch,
                                                                             outages: int) -> None:
    """Embedding a batch takes longer than a settle period, and (second story) the database is away at
    two batches' start: the query found at start is still answered only once all six rows are in, not
    when the last batch was handed over or when failed batches were counted as done."""
    from image_search.indexer import Indexer
    from image_search.store import DatabaseUnavailable

    story = story_factory({f"p{i}.png": 10 + i for i in range(6)}, start=False, batch_size=2)
    shutil.copyfile(story.images / "p5.png", story.inbox / "held.png")
    submit, finish, submitted = Indexer.submit, Indexer.finish, []

    def flaky_submit(self, paths, **how):
        submitted.append(paths)
        if len(submitted) in range(2, 2 + outages):
            raise DatabaseUnavailable("database error: the test's outage")
        return submit(self, paths, **how)

    def slow_finish(self, batch):
        story.clock.advance(SETTLE + 0.01)
        return finish(self, batch)

    monkeypatch.setattr(Indexer, "submit", flaky_submit)
    monkeypatch.setattr(Indexer, "finish", slow_finish)
    monkeypatch.setattr(story.service.rt.store, "reconnect", lambda: None)
    indexed_when_answered = []
    answer = story.service.inbox.answer
    monkeypatch.setattr(story.service.inbox, "answer",
                        lambda path: (indexed_when_answered.append(story.service.indexed), answer(path))[1])
    story.service.start()
    for _ in range(40):
        story.clock.advance(5)  # past any retry of the database
        story.run_until_idle()
    assert story.service.indexed == 6 and indexed_when_answered == [6]


# --- images/ ----------------------------------------------------------------------------------------


def test_new_file_becomes_a_row_after_it_settles_and_an_exact_copy_ranks_first(story_factory, tmp_path) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    new = save_picture(story.images / "new.png", seed=41, size=(120, 90))
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, new)
    story.service.step()
    assert str(new) not in story.rows()  # not complete until it has been still for settle-seconds
    story.run_until_idle()
    row = story.rows()[str(new)]
    assert row["file_hash"] == expected_hash(new, story.cfg) and Path(row["processed_path"]).is_file()
    assert story.ask("q.png", new)[0] == str(new)
    bundle = story.bundle("q.png")
    assert {"q.json", "q.jsonl", "q.jpg", "q.query.png"} <= {p.name for p in bundle.iterdir()}
    assert (bundle / "q.query.png").read_bytes() == new.read_bytes()


def test_a_burst_is_one_images_indexed_line_and_a_long_one_a_line_every_ten_seconds(story_factory) -> None:
    """A folder of pictures copied in is one ``images_indexed`` line once they are in, not a line per batch of
    4; while a run lasts longer than ``INDEXED_LINE_EVERY_S``, a line comes that often, and the lines add up."""
    story = story_factory(batch_size=4)
    first = [save_picture(story.images / "burst" / f"{i:02d}.png", seed=i) for i in range(12)]
    with capture_logs() as logs:
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "burst", is_directory=True)
        story.run_until_idle()
    lines = [e for e in logs if e["event"] == "images_indexed"]
    assert [(e["embedded"], e["queued"]) for e in lines] == [(12, 0)]

    later = [save_picture(story.images / "long" / f"{i:02d}.png", seed=20 + i) for i in range(16)]
    with capture_logs() as logs:
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "long", is_directory=True)
        for _ in range(200):  # each pass of the loop takes 6 s, its rows written by its end: 4 batches, 18 s
            story.clock.advance(6.0)
            worked = story.service.step()
            story.service.ingest.wait_for_writes()
            if not worked and not len(story.service.images):
                break
    lines = [e for e in logs if e["event"] == "images_indexed"]
    assert [(e["embedded"], e["queued"]) for e in lines] == [(8, 8), (8, 0)]  # 12 s in (two batches), then caught up
    assert {str(p) for p in first + later} <= set(story.rows())

    last = [save_picture(story.images / "last" / f"{i:02d}.png", seed=40 + i) for i in range(8)]
    with capture_logs() as logs:
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "last", is_directory=True)
        for _ in range(3):  # the walk, then two batches started, the first one's rows in
            story.clock.advance(1.0)
            story.service.step()
        story.service.ingest.wait_for_writes()
        assert not [e for e in logs if e["event"] == "images_indexed"]
        story_factory(after=story, start=False)  # stopped mid-run: what was indexed is said
    assert [e["embedded"] for e in logs if e["event"] == "images_indexed"] == [len(set(story.rows()) & set(map(str, last)))]


def test_deleted_file_and_deleted_folder_lose_rows_and_processed_copies(story_factory) -> None:
    story = story_factory({"gone.png": 1, "keep.png": 2, "album/x.png": 3, "album/y.png": 4})
    rows = story.rows()
    processed = {p: Path(r["processed_path"]) for p, r in rows.items()}
    (story.images / "gone.png").unlink()
    story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "gone.png")
    shutil.rmtree(story.images / "album")
    story.notice(Folder.IMAGES, ChangeKind.DELETED, story.images / "album", is_directory=True)
    with capture_logs() as logs:
        story.run_until_idle()
    assert set(story.rows()) == {str(story.images / "keep.png")}
    for path in ("gone.png", "album/x.png", "album/y.png"):
        assert not processed[str(story.images / path)].exists()
        assert not thumbnail_path_for(processed[str(story.images / path)]).exists()
    assert thumbnail_path_for(processed[str(story.images / "keep.png")]).is_file()
    assert sum(e["count"] for e in logs if e["event"] == "rows_removed") == 3
    assert story.service.sync.removed == 3
    assert "3 removed" in story.service.status_text()


def test_a_file_deleted_or_renamed_while_its_row_is_being_written_ends_as_the_folder_says(story_factory,
                                                                                      monkeypatch) -> None:
    """Issue 16: rows travel beside the loop. A file deleted (or renamed) while its row is on its way
    loses (or moves) the row once it lands, instead of leaving a row of a file that is gone."""
    story = story_factory({"keep.png": 1})
    slow_row_writes(monkeypatch, 0.5)  # the rows are still on their way when the files go
    gone, moved = (save_picture(story.images / f"{name}.png", seed=seed, size=(120, 90)) for name, seed in
                   (("gone", 51), ("moved", 52)))
    for path in (gone, moved):
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, path)
    for _ in range(20):  # until the batch is embedded and its write handed over, not yet committed
        story.clock.advance(SETTLE + 0.01)
        story.service.step()
        if story.service.ingest._writing:  # noqa: SLF001 - the moment this story is about
            break
    assert story.service.ingest._writing and str(gone) not in story.rows()  # noqa: SLF001
    gone.unlink()
    story.notice(Folder.IMAGES, ChangeKind.DELETED, gone)
    os.rename(moved, story.images / "renamed.png")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, moved, dest=story.images / "renamed.png")
    story.run_until_idle()
    assert set(story.rows()) == {str(story.images / "keep.png"), str(story.images / "renamed.png")}


def being_read(story, picture: Path) -> None:
    """``picture`` noticed, settled and read by the workers: its batch in flight, not embedded yet."""
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, picture)
    story.service.step()  # noticed, settling
    story.clock.advance(SETTLE + 0.01)
    story.service.step()  # submitted: the workers read it
    in_flight = story.service.ingest._in_flight  # noqa: SLF001 - the moment these stories are about
    assert [batch.paths for batch in in_flight] == [(picture,)]
    in_flight[0].preparing.results()


def test_a_file_or_folder_deleted_while_its_batch_is_being_read_leaves_no_row(story_factory) -> None:
    """The workers have read a file (its batch is in flight, not yet embedded) when it is deleted, and
    the same for a folder: the batch is finished first, then the deletion removes what it wrote."""
    story = story_factory({"keep.png": 1})
    for deleted in ("gone.png", "album"):
        source = story.images / deleted
        picture = save_picture(source / "p.png" if deleted == "album" else source, seed=51, size=(120, 90))
        being_read(story, picture)
        shutil.rmtree(source) if deleted == "album" else source.unlink()
        story.notice(Folder.IMAGES, ChangeKind.DELETED, source, is_directory=deleted == "album")
        story.run_until_idle()
        assert set(story.rows()) == {str(story.images / "keep.png")}, deleted
        assert not processed_path_for(picture, story.images, story.cfg.processed_directory).exists()


def test_a_file_deleted_while_its_batch_is_being_read_and_its_event_lost_leaves_no_row(story_factory) -> None:
    """The watcher's events overflowed (lost) while a file whose batch was in flight was deleted: the
    rescan that follows finishes that batch before it compares the folder with the rows, so the row
    written for the deleted file goes too."""
    story = story_factory({"keep.png": 1})
    gone = save_picture(story.images / "gone.png", seed=51, size=(120, 90))
    being_read(story, gone)
    gone.unlink()
    lose_events(story)
    assert set(story.rows()) == {str(story.images / "keep.png")}
    assert not processed_path_for(gone, story.images, story.cfg.processed_directory).exists()


def test_a_file_renamed_over_one_whose_batch_is_being_read_ends_as_the_folder_says(story_factory) -> None:
    """b.png is being read (its batch in flight) when a.png, indexed already, is renamed over it. The batch
    of b.png is finished first; then the rename: b.png holds a's picture, and b's old content is gone."""
    story = story_factory({"a.png": 1})
    a, b = story.images / "a.png", story.images / "b.png"
    a_hash = story.rows()[str(a)]["file_hash"]
    save_picture(b, seed=52, size=(120, 90))
    being_read(story, b)
    os.replace(a, b)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, a, dest=b)
    story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(b)} and rows[str(b)]["file_hash"] == a_hash


def test_a_start_that_fails_after_the_indexer_began_leaves_no_writer_or_workers(story_factory,
                                                                              monkeypatch) -> None:
    """The database goes away between the indexer's start and the bulk load's: the start fails with it
    (systemd restarts the service), and the row writer's thread and the worker processes go too."""
    import threading

    from image_search.store import DatabaseUnavailable, EmbeddingStore
    from image_search.workers import PreprocessPool

    def lost(self, rows_coming):
        raise DatabaseUnavailable("database error: the server closed the connection (test)")

    workers: list[int] = []
    started = PreprocessPool.__init__

    def remember(self, *args, **kwargs):
        started(self, *args, **kwargs)
        workers.extend(self.worker_pids())
    monkeypatch.setattr(PreprocessPool, "__init__", remember)
    monkeypatch.setattr(EmbeddingStore, "begin_bulk_load", lost)
    story = story_factory({"a.png": 1}, start=False)
    with pytest.raises(DatabaseUnavailable):
        story.service.run()
    assert [t.name for t in threading.enumerate() if t.name == "row-writer"] == []
    assert workers and [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []


def test_rename_moves_the_row_and_processed_copy_without_model_work(story_factory) -> None:
    story = story_factory({"old-name.png": 7, "other.png": 8})
    before = story.rows()[str(story.images / "old-name.png")]
    os.rename(story.images / "old-name.png", story.images / "new-name.png")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "old-name.png", dest=story.images / "new-name.png")
    with capture_logs() as logs:
        story.run_until_idle()
    after = story.rows()[str(story.images / "new-name.png")]
    assert (after["id"], after["file_hash"], after["file_name"]) == (before["id"], before["file_hash"], "new-name.png")
    assert Path(after["processed_path"]).is_file() and not Path(before["processed_path"]).exists()
    assert thumbnail_path_for(Path(after["processed_path"])).is_file()  # the sheet's small copy moved along
    assert not thumbnail_path_for(Path(before["processed_path"])).exists()
    assert str(story.images / "old-name.png") not in story.rows()
    assert [e["event"] for e in logs if e["event"] in ("image_renamed", "images_indexed")] == ["image_renamed"]


def test_a_file_renamed_then_rewritten_before_the_rename_is_applied_is_read_as_it_is_now(story_factory) -> None:
    """A poll (``--poll``, NFS and SMB shares) sees a rename and a write in place in one look: one move, and the
    write's own event is the rename's. The row followed the file with the old picture's embedding, and its new
    size and mtime, so no rescan ever read it again."""
    story = story_factory({"draft.png": 7})
    os.rename(story.images / "draft.png", story.images / "final.png")
    final = save_picture(story.images / "final.png", seed=9, size=(140, 90))  # metadata written in place
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "draft.png", dest=final)
    story.run_until_idle()
    assert list(story.rows()) == [str(final)]
    assert story.rows()[str(final)]["file_hash"] == hashlib.md5(final.read_bytes()).hexdigest()


@pytest.mark.parametrize("trash", ["#recycle", ".Trash-1000", "@eaDir"])
def test_a_folder_moved_into_a_folder_a_walk_passes_over_leaves_the_index(story_factory, trash: str) -> None:
    """Deleted on a Synology share (into ``#recycle/``) or by a file manager (``.Trash-1000/``): the folder
    was moved in the index too, and stayed searchable from the trash; a NAS's thumbnail folder made beside a
    picture was walked and its thumbnails embedded."""
    story = story_factory({"album/x.png": 4, "album/y.png": 5})
    (story.images / trash).mkdir()
    os.rename(story.images / "album", story.images / trash / "album")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "album", dest=story.images / trash / "album",
                 is_directory=True)
    story.run_until_idle()
    assert story.rows() == {}
    thumbs = save_picture(story.images / "trip" / trash / "a.jpg" / "SYNOFILE_THUMB_M.png", seed=6).parent
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, thumbs, is_directory=True)
    story.run_until_idle()
    assert story.rows() == {}


def test_folder_moved_inside_keeps_rows_and_moved_out_drops_them(story_factory) -> None:
    story = story_factory({"album/x.png": 4, "album/y.png": 5})
    before = story.rows()
    os.rename(story.images / "album", story.images / "trip")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "album", dest=story.images / "trip", is_directory=True)
    story.run_until_idle()
    rows = story.rows()
    for name in ("x.png", "y.png"):
        old, new = before[str(story.images / "album" / name)], rows[str(story.images / "trip" / name)]
        assert (new["id"], new["file_hash"]) == (old["id"], old["file_hash"])
        assert Path(new["processed_path"]).is_file()
    assert story.service.indexed == 2  # the start-up's two, nothing re-embedded
    processed = story.cfg.processed_directory
    assert sorted(p.name for p in processed.iterdir()) == [SOURCE_MARKER, "trip"]  # as images/ is: no empty album/
    outside = story.cfg.source_directory.parent / "elsewhere"
    os.rename(story.images / "trip", outside)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "trip", dest=outside, is_directory=True)
    story.run_until_idle()
    assert story.rows() == {}
    assert [p.name for p in processed.iterdir()] == [SOURCE_MARKER]  # the folder and its record stay


def test_folder_copied_in_is_walked(story_factory, tmp_path) -> None:
    story = story_factory({})
    staging = tmp_path / "staging"
    for i in range(3):
        save_picture(staging / f"s{i}.png", seed=60 + i)
    shutil.copytree(staging, story.images / "import")
    story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "import", is_directory=True)
    story.run_until_idle()
    assert set(story.rows()) == {str(story.images / "import" / f"s{i}.png") for i in range(3)}


def drop_a_bad_image(story) -> Path:
    """A file named like a picture that is not one, dropped into images/ (its close-after-write noticed)."""
    bad = story.images / "bad.png"
    bad.write_text("this is not a picture\n")
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, bad)
    return bad


def lose_events(story) -> None:
    """The watcher's events overflowed: the loop rescans the folder, then does what it finds to do."""
    story.changes.put(Change(Folder.WATCHING, ChangeKind.LOST, Path(), detail="inotify queue overflow"))
    story.run_until_idle()


def test_bad_image_is_one_warning_and_the_loop_goes_on(story_factory) -> None:
    story = story_factory({"a.png": 1})
    bad = drop_a_bad_image(story)
    with capture_logs() as logs:
        story.run_until_idle()
    about_bad = [e for e in logs if e.get("path") == bad]  # paths are logged as paths (logs.py shows them)
    assert len(about_bad) == 1 and about_bad[0]["log_level"] == "warning"
    assert "not a supported image" in about_bad[0]["reason"]
    assert str(bad) not in story.rows() and story.service.skipped == 1
    assert story.ask("after.png", story.images / "a.png")[0] == str(story.images / "a.png")


def test_a_picture_the_model_embeds_as_nan_is_skipped_with_its_copy_and_the_rest_land(story_factory,
                                                                                    monkeypatch) -> None:
    """The model gives one picture a vector of NaN (a half-precision overflow on a GPU): that picture and a
    copy of it in the same batch get one warning each, the others of the batch are stored, and the service
    goes on. Before, PostgreSQL refused the whole write and the service stopped, and again at each start."""
    import numpy as np

    from image_search.embed import Embedder
    from image_search.indexer import NOT_FINITE

    story = story_factory({"a.png": 1})
    embed = Embedder.embed_images

    def overflowing(self, pictures):
        vectors = embed(self, pictures)
        for i, picture in enumerate(pictures):
            if getattr(picture, "path", Path()).name == "nan.png":
                vectors[i] = np.nan
        return vectors

    monkeypatch.setattr(Embedder, "embed_images", overflowing)
    nan = save_picture(story.images / "nan.png", seed=61, size=(120, 90))
    copy = story.images / "nan-copy.png"
    shutil.copyfile(nan, copy)
    fine = save_picture(story.images / "fine.png", seed=62, size=(120, 90))
    for path in (nan, copy, fine):
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)
    with capture_logs() as logs:
        story.run_until_idle()
    skipped = sorted(e["path"].name for e in logs if e["event"] == "image_skipped")
    assert skipped == ["nan-copy.png", "nan.png"]
    assert all(e["reason"] == NOT_FINITE for e in logs if e["event"] == "image_skipped")
    assert set(story.rows()) == {str(story.images / n) for n in ("a.png", "fine.png")}
    assert story.service.skipped == 2
    assert story.ask("after.png", fine)[0] == str(fine)


def test_half_written_image_waits_and_is_indexed_once_complete(story_factory, tmp_path) -> None:
    story = story_factory({"a.png": 1})
    data = save_picture(tmp_path / "slow.png", seed=77, size=(400, 300)).read_bytes()
    target = story.images / "slow.png"
    target.write_bytes(data[: len(data) // 2])  # the writer paused longer than settle-seconds
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, target)
    with capture_logs() as logs:
        story.let_settle_periods_pass(3)  # truncated but recent, so deferred, not skipped
        assert str(target) not in story.rows() and target in story.service.images
        with open(target, "ab") as fh:
            fh.write(data[len(data) // 2:])
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, target)
        story.run_until_idle()
    assert story.rows()[str(target)]["file_hash"] == expected_hash(target, story.cfg)
    assert not [e for e in logs if e["event"] == "image_skipped"]
    assert sum(e.get("embedded", 0) for e in logs if e["event"] == "images_indexed") == 1


def test_rescan_interval_finds_what_no_event_reported(story_factory) -> None:
    story = story_factory({"a.png": 1}, rescan_interval=60.0)
    quiet = save_picture(story.images / "quiet.png", seed=90)  # no Change: the event was never seen
    story.run_until_idle()
    assert str(quiet) not in story.rows()
    story.clock.advance(60)
    with capture_logs() as logs:
        story.run_until_idle()
    assert str(quiet) in story.rows()
    assert [e["queued"] for e in logs if e["event"] == "rescan_complete"] == [1]
    story.clock.advance(60)
    with capture_logs() as logs:  # nothing to find: no info line at every interval (a debug one, if any reaches here)
        story.run_until_idle()
    assert [e["log_level"] for e in logs if e["event"] == "rescan_complete" and e["log_level"] != "debug"] == []


def test_a_refused_file_is_read_again_at_each_rescan_but_named_once_while_it_stays_as_it_was(story_factory) -> None:
    """An empty file, a text file named .jpg and a PNG cut short, never changed: with rescan-interval 5 s,
    every rescan logged them again (two warnings and an info line a minute per file). Now each rescan
    still reads them (a refusal may be passing), but says so at debug; a file changed, or made again, is
    named again."""
    story = story_factory({"a.png": 1}, rescan_interval=60.0)
    bad = story.images / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("hello\n")
    good = (story.images / "a.png").read_bytes()
    (bad / "cut.png").write_bytes(good[: len(good) // 2])
    long_ago = time.time() - 3600  # not a file still being written (those wait): one left so
    for path in bad.iterdir():
        os.utime(path, (long_ago, long_ago))
    story.clock.advance(60)
    with capture_logs() as logs:
        story.run_until_idle()
    first = sorted(e["path"].name for e in logs if e["event"] == "image_skipped" and e["log_level"] == "warning")
    assert first == ["cut.png", "empty.png", "notes.jpg"]
    for _ in range(2):
        story.clock.advance(60)
        skipped = story.service.skipped
        with capture_logs() as logs:  # debug lines reach it only where the level lets them: not counted on
            story.run_until_idle()
        said = [(e["event"], e["log_level"]) for e in logs if e["log_level"] not in ("debug",)]
        assert said == []  # named once
        assert story.service.skipped == skipped + 3  # but read again

    (bad / "notes.jpg").write_text("hello again\n")  # changed: named again
    (bad / "empty.png").unlink()  # gone, then made again: named again
    story.service.sync.apply(Change(Folder.WATCHING, ChangeKind.DELETED, bad / "empty.png"))
    (bad / "empty.png").write_bytes(b"")
    os.utime(bad / "notes.jpg", (long_ago + 1, long_ago + 1))
    os.utime(bad / "empty.png", (long_ago, long_ago))  # as the one deleted was: named again all the same
    story.clock.advance(60)
    with capture_logs() as logs:
        story.run_until_idle()
    named = sorted(e["path"].name for e in logs if e["event"] == "image_skipped" and e["log_level"] == "warning")
    assert named == ["empty.png", "notes.jpg"]
    assert [e["log_level"] for e in logs if e["event"] == "rescan_complete"] == ["info"]
    assert set(story.rows()) == {str(story.images / "a.png")}

    for src, dest in (("notes.jpg", "n.jpg"), ("n.jpg", "notes.jpg")):  # renamed away and back: news again
        os.rename(bad / src, bad / dest)
        story.notice(Folder.IMAGES, ChangeKind.MOVED, bad / src, dest=bad / dest)
    with capture_logs() as logs:
        story.run_until_idle()
    assert [e["path"].name for e in logs if e["event"] == "image_skipped" and e["log_level"] == "warning"] == [
        "notes.jpg"]


def test_the_service_reads_its_queries_pictures_in_a_worker_of_their_own(story_factory, monkeypatch) -> None:
    """Decoded in the service's own process, a query's picture could hold the loop past the watchdog, take
    gigabytes, or crash the service with its decoder (tests/test_workers.py has those); now nothing of a
    query picture is decoded here."""
    import image_search.search

    def here(*args: object) -> None:
        raise AssertionError("a query's picture was decoded in the service's own process")

    story = story_factory({"a.png": 1, "b.png": 2})
    monkeypatch.setattr(image_search.search, "preprocess_for", here)
    monkeypatch.setattr(image_search.preprocess, "preprocess_image", here)
    assert story.ask("q.png", story.images / "b.png")[0] == str(story.images / "b.png")
    best = json.loads((story.bundle("q.png") / "q.jsonl").read_text().splitlines()[0])
    assert best["similarity"] > 0.9999  # the very vector the index holds: the same pixels, the same way in
    assert (story.bundle("q.png") / "q.sheet.jpg").is_file()


def test_lost_events_trigger_a_rescan_of_images_and_inbox(story_factory) -> None:
    story = story_factory({"a.png": 1})
    save_picture(story.images / "unseen.png", seed=91)
    shutil.copyfile(story.images / "a.png", story.inbox / "unseen-q.png")
    story.changes.put(Change(Folder.WATCHING, ChangeKind.LOST, Path(), detail="inotify queue overflow"))
    with capture_logs() as logs:
        story.run_until_idle()
    assert any(e["event"] == "watch_events_lost" for e in logs)
    assert str(story.images / "unseen.png") in story.rows()
    assert story.bundle("unseen-q.png").is_dir()


def test_entries_in_processed_where_a_copy_goes_cost_that_file_only(story_factory) -> None:
    # 2023/06/d.png: a folder two levels under the file, whose making fails with ENOTDIR, not EEXIST
    story = story_factory({"2023/a.png": 1, "2023/06/d.png": 4, "b.png": 2, "c.png": 3}, start=False)
    processed = story.cfg.processed_directory
    processed.mkdir(parents=True, exist_ok=True)
    (processed / "2023").write_text("mine\n")  # a file where the service makes a folder
    (processed / "c.png.jpg").mkdir()  # a folder where it writes a file
    with capture_logs() as logs:
        story.service.start()
        story.run_until_idle()
    reasons = {e["path"].name: e["reason"] for e in logs if e["event"] == "image_skipped"}
    assert sorted(reasons) == ["a.png", "c.png", "d.png"]
    assert f"({processed / 'c.png.jpg'})" in reasons["c.png"]
    assert f"{processed / '2023'}" in reasons["a.png"] and "in processed-directory holds a name" in reasons["a.png"]
    assert set(story.rows()) == {str(story.images / "b.png")}

    (processed / "2024").write_text("mine too\n")  # a rename into a folder whose processed one is taken
    (story.images / "2024").mkdir()
    (story.images / "b.png").rename(story.images / "2024" / "b.png")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "b.png", dest=story.images / "2024" / "b.png")
    with capture_logs() as logs:
        story.run_until_idle()
    assert [e["path"].name for e in logs if e["event"] == "image_skipped"] == ["b.png"]
    assert (processed / "2023").read_text() == "mine\n" and (processed / "2024").read_text() == "mine too\n"
    assert (processed / "c.png.jpg").is_dir()



def test_processed_replaced_by_a_file_holds_up_the_ingest_once_and_renames_meanwhile_follow_their_files(
        story_factory) -> None:
    """processed/ itself moved away and a file put in its place while the service runs: no file is to blame,
    so it is the ingest's outage, said once and waited out (each picture was skipped with "an entry in
    processed-directory holds a name it needs"), and a picture or a folder renamed meanwhile takes its rows
    along (the old, gone paths stayed in search results until a restart); their copies are made once
    processed/ is back, with no model work."""
    story = story_factory({"burst/p001.png": 1, "burst/p002.png": 4, "b.png": 2})
    processed, images = story.cfg.processed_directory, story.images
    before = story.rows()
    aside = processed.with_name("processed-aside")
    processed.rename(aside)
    processed.write_text("not a folder\n")
    save_picture(images / "new.png", seed=3)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, images / "new.png")
    os.rename(images / "burst/p001.png", images / "burst/p001-renamed.png")
    story.notice(Folder.IMAGES, ChangeKind.MOVED, images / "burst/p001.png", dest=images / "burst/p001-renamed.png")
    with capture_logs() as logs:
        story.let_settle_periods_pass(10)
        os.rename(images / "burst", images / "shots")
        story.notice(Folder.IMAGES, ChangeKind.MOVED, images / "burst", dest=images / "shots", is_directory=True)
        story.let_settle_periods_pass(10)  # 6 s in all: the ingest tried again at 1, 2 and 4 s
    outage = [e for e in logs if e["event"] == "output_unwritable" and e["log_level"] == "warning"]
    assert [e["work"] for e in outage] == ["ingest"]  # once, however often it was tried (then at debug)
    assert str(processed) in outage[0]["reason"] and "not a folder" in outage[0]["reason"]
    assert not [e for e in logs if e["event"] in ("image_skipped", "images_indexed")]
    rows = story.rows()  # the rows followed, no restart
    assert set(rows) == {str(images / "shots/p001-renamed.png"), str(images / "shots/p002.png"), str(images / "b.png")}
    assert rows[str(images / "shots/p001-renamed.png")]["id"] == before[str(images / "burst/p001.png")]["id"]
    assert processed.read_text() == "not a folder\n"  # the user's file, left as it is

    processed.unlink()
    aside.rename(processed)
    with capture_logs() as logs:
        story.run_until_idle()
    assert [e["event"] for e in logs if e["event"] == "output_writable_again"] == ["output_writable_again"]
    assert sum(e["embedded"] for e in logs if e["event"] == "images_indexed") == 1  # new.png; the renames cost none
    assert len(story.rows()) == 4 and str(images / "new.png") in story.rows()
    for name in ("p001-renamed.png", "p002.png"):
        copy = Path(story.rows()[str(images / "shots" / name)]["processed_path"])
        assert copy == processed / "shots" / f"{name}.jpg" and copy.is_file() and thumbnail_path_for(copy).is_file()
    # The old copies could not be moved: left to the next start's rescan, as any copy no row names.
    old = [processed / "burst/p001.png.jpg", processed / "burst/p002.png.jpg"]
    assert story.copies_in_processed() - story.copies_of_rows() == {*old, *map(thumbnail_path_for, old)}

# --- inbox/ -----------------------------------------------------------------------------------------


def test_bad_queries_move_to_failed_with_a_reason_and_the_next_is_answered(story_factory) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    failed = story.inbox / "failed"
    (story.inbox / "notes.doc").write_text("not a picture\n")
    (story.inbox / "broken.png").write_text("not a png either\n")
    (failed).mkdir()
    (failed / "broken.png").write_text("an earlier failure, kept\n")
    for name in ("notes.doc", "broken.png"):
        story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / name)
    story.run_until_idle()
    assert (failed / "notes.doc").read_text() == "not a picture\n"  # nothing the user dropped is deleted
    reason = (failed / "notes.doc.error.txt").read_text()
    assert "not a supported query type '.doc'" in reason and "HEIC" in reason and ".txt file of words" in reason
    assert (failed / "broken.png").read_text() == "an earlier failure, kept\n"  # never overwritten
    assert (failed / "broken-2.png").read_text() == "not a png either\n"
    assert "not a supported image" in (failed / "broken-2.png.error.txt").read_text()
    assert story.service.inbox.failed == 2
    assert story.ask("good.png", story.images / "b.png")[0] == str(story.images / "b.png")
    assert sorted(p.name for p in story.inbox.iterdir()) == ["failed"]


def test_a_file_named_failed_keeps_failed_queries_in_the_inbox_until_it_is_out_of_the_way(story_factory) -> None:
    story = story_factory({"a.png": 1})
    in_the_way = story.inbox / "failed"
    in_the_way.write_text("notes\n")  # a fresh inbox has no failed/ yet: the user's file takes the name
    broken = story.inbox / "broken.png"
    broken.write_text("not a png\n")
    for path in (in_the_way, broken):
        story.notice(Folder.INBOX, ChangeKind.CLOSED, path)
    with capture_logs() as logs:
        story.run_until_idle()
    failures = {e["path"].name: e for e in logs if e["event"] == "query_failed"}
    assert sorted(failures) == ["broken.png", "failed"]  # one line each, and the service goes on
    assert "not a supported image" in failures["broken.png"]["reason"]
    assert f"{in_the_way} is not a folder" in failures["broken.png"]["left_in_inbox"]
    assert in_the_way.read_text() == "notes\n" and broken.read_text() == "not a png\n"  # untouched

    # Unchanged, they are not tried again: not after lost events, nor when a good query comes.
    story.changes.put(Change(Folder.WATCHING, ChangeKind.LOST, Path(), detail="inotify queue overflow"))
    with capture_logs() as logs:
        assert story.ask("good.png", story.images / "a.png")[0] == str(story.images / "a.png")
    assert [e for e in logs if e["event"] == "query_failed"] == []

    # A restart tries them once more: one line each again, no crash.
    with capture_logs() as logs:
        story = story_factory(after=story)
    assert sorted(e["path"].name for e in logs if e["event"] == "query_failed") == ["broken.png", "failed"]

    # The user moves their file away: failed/ can be made, and the failed query moves into it.
    kept = story.inbox.parent / "notes.txt"
    in_the_way.rename(kept)
    story.notice(Folder.INBOX, ChangeKind.DELETED, in_the_way)
    story.run_until_idle()
    assert kept.read_text() == "notes\n"
    assert (in_the_way / "broken.png").read_text() == "not a png\n"
    assert "not a supported image" in (in_the_way / "broken.png.error.txt").read_text()
    assert sorted(p.name for p in story.inbox.iterdir()) == ["failed"]


def test_a_link_named_failed_in_the_inbox_is_never_written_through(story_factory, tmp_path: Path) -> None:
    """Whoever writes to the inbox must not make the service write wherever its user may: a link in
    failed/'s place is the user's entry, as a file is."""
    story = story_factory({"a.png": 1})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (story.inbox / "failed").symlink_to(elsewhere)
    broken = story.inbox / "broken.png"
    broken.write_text("not a png\n")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, broken)
    with capture_logs() as logs:
        story.run_until_idle()
    (failure,) = [e for e in logs if e["event"] == "query_failed"]
    assert "is not a folder of the service's" in failure["left_in_inbox"]
    assert list(elsewhere.iterdir()) == [] and broken.read_text() == "not a png\n"


def test_a_failed_query_on_a_full_disk_waits_in_the_inbox_and_moves_with_its_reason_once_there_is_room(
        story_factory) -> None:
    """The inbox's disk is full and failed/ is there: ``mv bad.png inbox/`` (words, not a picture). The
    query was moved into failed/, its reason could not be written, and the service crashed with no path
    (and again at each start, at the next bad query). Now its reason is written first: the query stays in
    the inbox, the outage is one line, and once there is room it moves into failed/ with its reason."""
    story = story_factory({"a.png": 1})
    with small_disk(story.inbox, size="8k"):
        failed = story.inbox / "failed"
        failed.mkdir()
        other_files = story.inbox / ".other-files"  # hidden, no query: what fills the disk with the query
        other_files.write_bytes(b"\0" * 4096)
        bad = story.inbox / "bad.png"
        bad.write_text("not a png\n")
        story.notice(Folder.INBOX, ChangeKind.CLOSED, bad)
        with capture_logs() as logs:
            story.let_settle_periods_pass(10)  # raised OSError out of the loop before
        # One line for the whole wait (the retries say it again at debug).
        (outage,) = [e for e in logs if e["event"] == "output_unwritable" and e["log_level"] == "warning"]
        assert outage["work"] == "queries"
        assert f"into {failed} (No space left on device): the disk is full" in outage["reason"]
        assert bad.read_text() == "not a png\n" and list(failed.iterdir()) == []  # never in failed/ without why
        assert [e for e in logs if e["event"] == "query_failed"] == [] and story.service.inbox.failed == 0

        other_files.unlink()  # room again
        with capture_logs() as logs:
            story.run_until_idle()
        assert (failed / "bad.png").read_text() == "not a png\n"
        assert "not a supported image" in (failed / "bad.png.error.txt").read_text()
        assert sorted(p.name for p in story.inbox.iterdir()) == ["failed"]
        assert [e["event"] for e in logs if e["event"] in ("query_failed", "output_writable_again")] == [
            "query_failed", "output_writable_again"]
        assert story.service.inbox.failed == 1


@pytest.mark.parametrize("kind", ["picture", "document"])
def test_a_query_whose_move_into_a_full_output_on_another_disk_fails_is_left_whole(story_factory, kind: str) -> None:
    """output/ on another disk than the inbox, nearly full: the query's move into its result is a copy,
    cut short by ENOSPC. A picture's clean-up moved that part back over the user's whole picture (0 bytes
    left of a 270 KB photo); a document's pictures folder failed the query as an "unexpected error"
    (the copy's ENOSPC lost in a shutil.Error). Now each is left as it was, the disk's outage waited out,
    and answered once there is room."""
    import numpy as np
    from PIL import Image

    story = story_factory({"a.png": 1})
    photo = story.images.parent / "photo.png"  # noise: a PNG of about 270 KB
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(photo)
    original = photo.read_bytes()
    with small_disk(story.cfg.output_directory, size="640k"):
        filler = story.cfg.output_directory / ".filler"
        filler.write_bytes(b"\0" * (640 - 160) * 1024)  # room for the result's own files, not the photo
        if kind == "picture":
            query, kept = story.inbox / "photo.png", story.inbox / "photo.png"
            shutil.copyfile(photo, query)
        else:
            kept = story.inbox / "doc" / "photo.png"
            kept.parent.mkdir()
            shutil.copyfile(photo, kept)
            query = story.inbox / "doc.json"
            query.write_text(json.dumps({"image": "photo.png"}))
        story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
        with capture_logs() as logs:
            story.let_settle_periods_pass(6)
        assert [e["work"] for e in logs if e["event"] == "output_unwritable" and e["log_level"] == "warning"] == [
            "queries"]
        assert not [e for e in logs if e["event"] in ("query_failed", "query_crashed")]
        assert query.is_file() and kept.read_bytes() == original  # whole, where the user dropped it
        assert not [p for p in written_into(story.cfg.output_directory) if p.name != ".filler"]
        filler.unlink()
        story.clock.advance(30)  # the outage's retry is due
        story.run_until_idle()
        bundle = story.bundle(query.name)
        moved = bundle / ("photo.query.png" if kind == "picture" else "doc.query/photo.png")
        assert moved.read_bytes() == original


@pytest.mark.parametrize("outage", ["full", "read-only"])
def test_a_failed_query_that_cannot_make_failed_on_a_full_or_read_only_disk_moves_once_it_can(
        story_factory, outage: str) -> None:
    """No failed/ yet, and the inbox's disk takes no new entry (every inode used, or mounted read-only):
    the failed query was left in the inbox as if an entry of the user's held failed/'s name, "tried again
    when it changes", and stayed there after the disk had room again. A disk's outage is waited out and
    the query failed again once it is over, as an answer is."""
    story = story_factory({"a.png": 1})
    # The folder, the query and two other files: every entry the disk has (no room for failed/).
    with small_disk(story.inbox, inodes=4 if outage == "full" else None):
        bad = story.inbox / "bad.png"
        bad.write_text("not a png\n")
        other_files = [story.inbox / ".other-1", story.inbox / ".other-2"]
        for path in other_files:
            path.write_text("kept\n")
        if outage == "read-only":
            remount(story.inbox, read_only=True)
        story.notice(Folder.INBOX, ChangeKind.CLOSED, bad)
        with capture_logs() as logs:
            story.let_settle_periods_pass(10)
        (waiting,) = [e for e in logs if e["event"] == "output_unwritable" and e["log_level"] == "warning"]
        strerror = "No space left on device" if outage == "full" else "Read-only file system"
        assert f"into {story.inbox / 'failed'} ({strerror})" in waiting["reason"]
        assert [e for e in logs if e["event"] == "query_failed"] == []  # not "left in the inbox until it changes"
        assert sorted(p.name for p in story.inbox.iterdir()) == [".other-1", ".other-2", "bad.png"]

        if outage == "full":
            for path in other_files:
                path.unlink()
        else:
            remount(story.inbox, read_only=False)
        story.run_until_idle()  # nothing changed in the inbox: only the outage's retry finds it
        assert (story.inbox / "failed" / "bad.png").read_text() == "not a png\n"
        assert "not a supported image" in (story.inbox / "failed" / "bad.png.error.txt").read_text()


def test_a_text_file_is_a_query_by_its_words(story_factory) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    (story.inbox / "bike.txt").write_text("  a red bicycle\n", encoding="utf-8")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / "bike.txt")
    story.run_until_idle()
    bundle = story.bundle("bike.txt")
    assert {"bike.json", "bike.jsonl", "bike.jpg", "bike.sheet.jpg", "bike.query.txt"} <= {p.name for p in bundle.iterdir()}
    assert json.loads((bundle / "bike.json").read_text(encoding="utf-8"))["query-text"] == "a red bicycle"
    assert len((bundle / "bike.jsonl").read_text().splitlines()) == 2
    assert list(story.inbox.iterdir()) == [] and story.service.inbox.answered == 1


def test_unusable_text_queries_fail_with_their_reason(story_factory) -> None:
    story = story_factory({"a.png": 1})
    bad = {"blank.txt": b"  \n\t\n", "latin1.txt": "café".encode("latin-1"), "huge.txt": b"word " * 20_000}
    for name, data in bad.items():
        (story.inbox / name).write_bytes(data)
        story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / name)
    story.run_until_idle()
    failed = story.inbox / "failed"
    reasons = {name: (failed / f"{name}.error.txt").read_text(encoding="utf-8") for name in bad}
    assert "only whitespace" in reasons["blank.txt"]
    assert "not UTF-8" in reasons["latin1.txt"]
    assert "too large" in reasons["huge.txt"]
    assert all((failed / name).read_bytes() == data for name, data in bad.items())


def test_a_text_query_to_a_model_that_cannot_read_fails_with_the_reason(story_factory, tmp_path) -> None:
    from image_search.embed import Embedder

    blind = Embedder.load(str(save_tiny_clip(tmp_path / "no-tokenizer", with_tokenizer=False)), device="cpu",
                          dimension=TINY_DIMENSION)
    story = story_factory({"a.png": 1}, model=blind)
    (story.inbox / "words.txt").write_text("a red bicycle", encoding="utf-8")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / "words.txt")
    story.run_until_idle()
    reason = (story.inbox / "failed" / "words.txt.error.txt").read_text(encoding="utf-8")
    assert "cannot read text queries" in reason and "tokenizer" in reason
    assert story.ask("picture.png", story.images / "a.png")[0] == str(story.images / "a.png")  # pictures still work


def test_an_empty_text_file_waits_for_its_words(story_factory) -> None:
    story = story_factory({"a.png": 1})
    query = story.inbox / "later.txt"
    query.touch()  # an editor creates the file, then writes it
    story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    story.let_settle_periods_pass(3)
    assert query.exists() and not (story.inbox / "failed").exists()
    query.write_text("a red bicycle", encoding="utf-8")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    story.run_until_idle()
    assert story.bundle("later.txt").is_dir()


def test_half_written_query_is_answered_not_failed(story_factory, tmp_path) -> None:
    story = story_factory({"a.png": 1})
    data = save_picture(tmp_path / "q.png", seed=1, size=(400, 300)).read_bytes()
    query = story.inbox / "slow-q.png"
    query.write_bytes(data[:100])
    story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    story.let_settle_periods_pass(3)
    assert query.exists() and not (story.inbox / "failed").exists()
    query.write_bytes(data)
    story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    story.run_until_idle()
    assert (story.bundle("slow-q.png") / "slow-q.query.png").read_bytes() == data


def test_a_query_jumps_the_ingest_queue(story_factory) -> None:
    story = story_factory({"a.png": 1}, batch_size=2)
    for i in range(6):
        save_picture(story.images / f"n{i}.png", seed=30 + i)
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / f"n{i}.png")
    shutil.copyfile(story.images / "a.png", story.inbox / "urgent.png")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / "urgent.png")
    assert not story.service.step()  # noticed now, complete once the clock has moved on
    story.clock.advance(SETTLE + 0.01)
    with capture_logs() as logs:
        assert story.service.step()  # one pass: the query, not a batch of images
    assert story.bundle("urgent.png").is_dir()
    assert story.service.indexed == 1  # only the start-up's image so far
    # The answer says that six pictures were still waiting: a picture among them may be missing from it.
    assert answered_record(story, "urgent.png")["not-yet-indexed"] == 6
    assert [e["not_yet_indexed"] for e in logs if e["event"] == "search_answered"] == [6]
    shutil.copyfile(story.images / "a.png", story.inbox / "while-reading.png")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / "while-reading.png")
    assert story.service.step()  # noticed; the first batch of two is being read: not indexed yet either
    assert len(story.service.images) == 4
    story.clock.advance(SETTLE + 0.01)
    assert story.service.step()
    assert answered_record(story, "while-reading.png")["not-yet-indexed"] == 6
    story.run_until_idle()
    assert story.ask("later.png", story.images / "n5.png")[0] == str(story.images / "n5.png")
    assert answered_record(story, "later.png")["not-yet-indexed"] == 0


class _HeldRead:
    """A batch's reading, held until the test lets it go: the loop may only wait for it in slices."""

    def __init__(self, reading, gate: threading.Event) -> None:
        self.reading = reading
        self.gate = gate

    def wait(self, timeout: float) -> bool:
        return self.gate.wait(timeout) and self.reading.wait(timeout)

    def results(self):
        assert self.gate.is_set(), "the loop waited for a batch still being read"
        return self.reading.results()


def test_a_query_does_not_wait_for_the_batches_being_read(story_factory, monkeypatch) -> None:
    """Two batches of large pictures take seconds to read: a query dropped meanwhile is answered at once."""
    story = story_factory({"a.png": 1}, batch_size=2)
    gate = two_batches_held(story, monkeypatch)
    assert story.service.step()  # still being read: the pass ends without them
    shutil.copyfile(story.images / "a.png", story.inbox / "meanwhile.png")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / "meanwhile.png")
    assert story.service.step()  # noticed
    story.clock.advance(SETTLE + 0.01)
    assert story.service.step()
    assert answered_record(story, "meanwhile.png")["not-yet-indexed"] == 4
    assert not gate.is_set() and story.service.ingest.reading
    gate.set()
    story.run_until_idle()
    assert story.service.indexed == 5
    assert story.ask("later.png", story.images / "n3.png")[0] == str(story.images / "n3.png")


def test_a_stop_leaves_the_batches_whose_read_does_not_return(story_factory, monkeypatch) -> None:
    """A stop finishes the batches in flight, but a read that does not return (a hung share) must not hold
    it: the batches from that one on are dropped, and the next start finds their files again."""
    import image_search.ingest

    monkeypatch.setattr(image_search.ingest, "STOP_READ_WAIT_S", 0.2)
    story = story_factory({"a.png": 1}, batch_size=2)
    two_batches_held(story, monkeypatch)  # the gate never opens: the read hangs
    with capture_logs() as logs:
        story.service.ingest.finish_in_flight()
    assert [e["files"] for e in logs if e["event"] == "batches_left_unfinished"] == [4]
    assert story.service.indexed == 1
    again = story_factory(after=story)
    assert set(again.rows()) == {str(again.images / name) for name in ("a.png", "n0.png", "n1.png", "n2.png", "n3.png")}


def two_batches_held(story, monkeypatch) -> threading.Event:
    """Four new pictures in two batches of two, handed to the workers, whose reading is held until the
    returned gate opens."""
    gate = threading.Event()
    indexer = story.service.ingest.indexer
    submit = indexer.submit

    def held(paths, **kwargs):
        batch = submit(paths, **kwargs)
        batch.preparing = _HeldRead(batch.preparing, gate)
        return batch

    monkeypatch.setattr(indexer, "submit", held)
    for i in range(4):
        save_picture(story.images / f"n{i}.png", seed=70 + i)
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / f"n{i}.png")
    story.service.step()  # noticed; complete once the clock has moved on
    story.clock.advance(SETTLE + 0.01)
    assert story.service.step() and story.service.step()
    assert len(story.service.ingest._in_flight) == 2
    return gate


def test_a_batch_whose_rows_are_in_is_not_counted_as_waiting(story_factory, monkeypatch) -> None:
    """Queries keep the loop from counting a committed batch (the writer commits on its own thread): their
    answers must not say its pictures are still waiting, for they are searchable."""
    story = story_factory({"a.png": 1})
    slow_row_writes(monkeypatch, 0.3)
    for i in range(3):
        save_picture(story.images / f"n{i}.png", seed=50 + i)
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / f"n{i}.png")
    story.service.step()  # noticed
    story.clock.advance(SETTLE + 0.01)
    while story.service.ingest.reading or len(story.service.images):
        story.service.step()  # read and embedded; its rows go to the writer
    assert story.service.ingest.not_yet_indexed == 3  # on their way
    batch = story.service.ingest._writing[0]
    assert batch.write is not None and batch.write.done.wait(10)
    assert story.service.indexed == 1  # not counted by the loop yet
    assert story.service.ingest.not_yet_indexed == 0


def answered_record(story, query_name: str) -> dict:
    """The ``<stem>.json`` of the result folder that answered ``query_name``."""
    return json.loads((story.bundle(query_name) / f"{Path(query_name).stem}.json").read_text())


# --- the database and the watch -------------------------------------------------------------------


def test_external_database_outage_keeps_work_pending_then_catches_up(story_factory) -> None:
    story = story_factory({"a.png": 1})
    assert story.database.embedded is not None
    with psycopg2.connect(story.database.embedded.uri) as admin, admin.cursor() as cur:
        # The service's connection breaks under it (a server restart, a network cut).
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
    admin.close()
    save_picture(story.images / "during.png", seed=5)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / "during.png")
    with capture_logs() as logs:
        story.run_until_idle()
    assert any(e["event"] == "database_unavailable" for e in logs)
    assert any(e["event"] == "database_reconnected" for e in logs)
    assert str(story.images / "during.png") in story.rows()


def test_work_goes_on_at_once_when_the_database_is_reached_again(story_factory) -> None:
    """The loop reconnected at its next try after an outage, then waited out its backoff (doubled at each
    failed try, up to 30 s) before it did any work. Here the backoff stands at 16 s (five tries failed), the
    next try reconnects, and the picture is indexed within the next few settle periods."""
    story = story_factory({"a.png": 1})
    with psycopg2.connect(story.database.embedded.uri) as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
    admin.close()
    during = save_picture(story.images / "during.png", seed=5)
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, during)
    with capture_logs() as logs:
        story.service.step()  # noticed
        story.service._backoff = 16.0  # as five failed tries left it
        started = story.clock()
        wait_for(lambda: story.let_settle_periods_pass(1) or str(during) in story.rows(), "the picture indexed")
    assert story.clock() - started < 5.0
    # Each of the service's connections (the loop's, the writer's) finds its end in turn: the first waited 16 s.
    assert [e["retry_in_s"] for e in logs if e["event"] == "database_unavailable"][0] == 16.0
    assert any(e["event"] == "database_reconnected" for e in logs)


def test_a_lost_watch_asks_for_a_restart(story_factory) -> None:
    """The real check (``observer_problem``) on a real watch of the story's folders: the watched images
    folder is deleted (a disk unmounted, a folder moved away), and the loop asks for a restart."""
    story = story_factory({"a.png": 1}, start=False)
    folders = watched_folders(story.cfg)
    observer = start_observer(folders, queue.SimpleQueue(), poll=False)
    try:
        story.service.watch_problem = lambda: observer_problem(observer, folders)
        assert story.service.watch_problem() is None  # a working watch is no problem
        shutil.rmtree(story.images)
        with capture_logs() as logs, pytest.raises(RestartRequested):
            story.service.run()
    finally:
        observer.stop()
        observer.join(timeout=5)
    assert [e["reason"] for e in logs if e["event"] == "watch_lost"] == [
        f"the watched images folder {story.images} is gone"]


def test_starting_the_service_imports_no_torch_until_the_model_loads() -> None:
    """Torch and transformers take seconds to import: only the model-loading thread may import them, so
    the database start and the rescan never wait for them."""
    import sys

    code = ("import sys, image_search.cli, image_search.service, image_search.inbox, image_search.runtime; "
            "print(sorted(m for m in ('torch', 'transformers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_fleet_member_behind_another_in_the_queue_takes_the_files_past_what_the_other_holds(story_factory) -> None:
    """Another member holds the first four files (it popped them first: every member pops in the order the
    files came). In the same pass this one reads the four after them; it gave up the pass instead, a batch
    behind at every pass, and left the other nearly all the work."""
    from image_search.fleet import ClaimKind, FleetMember, WorkClaims

    story = story_factory({}, batch_size=2)
    files = [save_picture(story.images / f"f{i}.png", seed=80 + i) for i in range(8)]
    story.service.rt.claims = WorkClaims(story.service.rt.store, FleetMember.join(story.cfg, story.database))
    other = WorkClaims(story.service.rt.store, FleetMember.join(story.cfg, story.database))
    try:
        for path in files:
            story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)
        story.service.step()  # noticed
        assert other.take(ClaimKind.IMAGE, files[:4], story.service.images) == files[:4]
        story.clock.advance(SETTLE + 0.01)
        while story.service.step():  # one pass of the loop
            pass
        story.service.ingest.finish_in_flight()  # what that pass began
        wait_for(lambda: set(story.rows()) == {str(p) for p in files[4:]}, "the rows of the four files not held",
                 timeout=10)
    finally:
        for claims in (story.service.rt.claims, other):
            assert claims.member is not None
            claims.member.leave(empty_table=False)
