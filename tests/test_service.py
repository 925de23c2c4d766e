"""User stories against the real service: ``image-search serve`` in a subprocess, the real embedded
PostgreSQL, a real sd_notify datagram socket.

Each service start costs ~10 s (torch import, model load, server start), so one module-scoped service
carries most stories (indexing, queries, deletes, renames, bad files, slow writers, sd_notify, and at
the very end SIGTERM with the default cleanup), and one lifecycle story carries the restarts
(--no-cleanup SIGTERM, offline changes, kill -9).

Rows are read with tests.support.db: while the service runs through the socket named in the pgdata's
``postmaster.pid`` (``live_rows``), when no service runs through ``Database`` (``stopped_server_rows``);
that module says why.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from image_search.config import load_config
from image_search.preprocess import preprocess_image
from tests.support.db import live_rows, postgres_running, rows_by_path, stop_leftover_postgres, stopped_server_rows
from tests.support.env import child_env
from tests.support.files import find_bundle, inbox_files, read_jsonl, save_picture, write_config
from tests.support.notify import NotifyListener
from tests.support.service import ServiceProcess
from tests.support.waiting import DEFAULT_TIMEOUT_S, wait_for

TOP_K = 3


# --- helpers ------------------------------------------------------------------------------------------


def picture_bytes(tmp: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str = "PNG") -> bytes:
    return save_picture(tmp / f"_bytes_{seed}.{fmt.lower()}", seed, size, fmt).read_bytes()


def expected_hash(path: Path, cfg_path: Path) -> str:
    cfg = load_config(cfg_path)
    return preprocess_image(path, max_size=(cfg.resize_width, cfg.resize_height), max_pixels=cfg.max_image_pixels).file_hash


def start_service(root: Path, config: Path, *flags: str, env: dict[str, str] | None = None,
                  tag: str = "") -> ServiceProcess:
    """The service of the tree ``root``, logging to ``root/service<tag>.log``."""
    return ServiceProcess(config, *flags, log_path=root / f"service{tag}.log", env=env)


# --- the module's running service ---------------------------------------------------------------------


INITIAL = {"a.png": 1, "b.jpg": 2, "sub/c.png": 3, "album/x.png": 4, "album/y.png": 5, "gone.png": 6,
           "old-name.png": 7}


@dataclass
class Running:
    root: Path
    config: Path
    proc: ServiceProcess
    notify: NotifyListener
    started: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def rows(self) -> dict[str, dict[str, Any]]:
        return live_rows(self.state)

    def wait_rows(self, predicate: Callable[[dict[str, dict[str, Any]]], bool], what: str,
                  timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        return wait_for(lambda: (lambda r: r if predicate(r) else None)(self.rows()), what, timeout, proc=self.proc)

    def ask(self, name: str, source: Path, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
        """Drop a copy of ``source`` into the inbox as ``name``; return its result folder."""
        shutil.copyfile(source, self.inbox / name)
        return wait_for(lambda: find_bundle(self.output, name), f"the result bundle of {name}", timeout, proc=self.proc)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    root = tmp_path_factory.mktemp("svc")
    config = write_config(root, tiny_model_dir, top_k=TOP_K)
    for name, seed in INITIAL.items():
        save_picture(root / "images" / name, seed=seed, size=(96 + 4 * seed, 72), fmt="JPEG" if name.endswith(".jpg") else None)
    # A query already waiting when the service starts: it must be answered only after READY=1.
    shutil.copyfile(root / "images" / "a.png", root / "inbox" / "waiting.png")
    notify = NotifyListener(root / "notify.sock", root / "output")
    env = child_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000")
    started = time.monotonic()
    proc = start_service(root, config, env=env)  # default cleanup: the last test checks the table is emptied
    r = Running(root, config, proc, notify, started)
    try:
        proc.wait_ready()
        yield r
    finally:
        proc.close()
        notify.close()
        stop_leftover_postgres(root / "state")


def test_startup_indexes_folder_then_answers_waiting_query_after_ready(running: Running) -> None:
    r = running
    rows = r.wait_rows(lambda rows: len(rows) == len(INITIAL), "the initial images indexed")
    assert set(rows) == {str(r.images / name) for name in INITIAL}
    for name in ("a.png", "sub/c.png"):
        assert rows[str(r.images / name)]["file_hash"] == expected_hash(r.images / name, r.config)
    bundle = wait_for(lambda: find_bundle(r.output, "waiting.png"), "the waiting query's bundle", proc=r.proc)
    hits = read_jsonl(bundle / "waiting.jsonl")
    assert hits[0]["file_path"] == str(r.images / "a.png")
    # sd_notify: READY=1 (with a STATUS= line) came, and no result existed yet when it did.
    ready = r.notify.with_field("READY=1")
    assert len(ready) == 1, r.notify.messages
    assert any(line.startswith("STATUS=") for line in ready[0][1].splitlines()), ready
    assert r.notify.bundles_at_ready == [], r.notify.bundles_at_ready
    assert "waiting.png" not in inbox_files(r.inbox)


def test_copied_file_becomes_row_and_exact_copy_query_ranks_it_first(running: Running, tmp_path: Path) -> None:
    r = running
    src = save_picture(tmp_path / "new.png", seed=41, size=(120, 90))
    shutil.copyfile(src, r.images / "new.png")
    target = str(r.images / "new.png")
    rows = r.wait_rows(lambda rows: target in rows, "new.png indexed")
    assert rows[target]["file_hash"] == expected_hash(r.images / "new.png", r.config)
    assert Path(rows[target]["processed_path"]).is_file()

    bundle = r.ask("q-b.jpg", r.images / "b.jpg")
    hits = read_jsonl(bundle / "q-b.jsonl")
    assert len(hits) == TOP_K
    assert hits[0]["rank"] == 1 and hits[0]["file_path"] == str(r.images / "b.jpg")
    assert hits[0]["similarity"] >= 0.999
    assert {"q-b.json", "q-b.jsonl", "q-b.jpg", "q-b.query.jpg"} <= {p.name for p in bundle.iterdir()}
    assert (bundle / "q-b.query.jpg").read_bytes() == (r.images / "b.jpg").read_bytes()
    assert inbox_files(r.inbox) == []
    assert r.proc.events("search_answered")


def test_deleted_reference_loses_its_row(running: Running) -> None:
    r = running
    gone = r.images / "gone.png"
    r.wait_rows(lambda rows: str(gone) in rows, "gone.png indexed")
    mark = r.proc.mark()
    gone.unlink()
    r.wait_rows(lambda rows: str(gone) not in rows, "gone.png's row removed")
    r.proc.wait_event("rows_removed", since=mark, where=lambda e: e.get("path") == str(gone))


def test_rename_keeps_embedding_without_model_work(running: Running) -> None:
    r = running
    old, new = r.images / "old-name.png", r.images / "new-name.png"
    before = r.wait_rows(lambda rows: str(old) in rows, "old-name.png indexed")[str(old)]
    # let any in-flight indexing of the startup finish before taking the mark
    mark = r.proc.mark()
    os.rename(old, new)
    rows = r.wait_rows(lambda rows: str(new) in rows and str(old) not in rows, "the renamed row")
    after = rows[str(new)]
    assert (after["id"], after["file_hash"]) == (before["id"], before["file_hash"])
    assert after["file_name"] == "new-name.png"
    assert Path(after["processed_path"]).is_file() and not Path(before["processed_path"]).exists()
    r.proc.wait_event("image_renamed", since=mark, where=lambda e: e.get("path") == str(new))
    # A query right after proves the loop went round; no images_indexed line since the rename.
    r.ask("after-rename.png", new)
    assert r.proc.events_since(mark, "images_indexed") == []


def test_folder_moved_inside_images_keeps_rows(running: Running) -> None:
    r = running
    names = ("x.png", "y.png")
    before = r.wait_rows(lambda rows: all(str(r.images / "album" / n) in rows for n in names), "album indexed")
    mark = r.proc.mark()
    os.rename(r.images / "album", r.images / "trip")
    rows = r.wait_rows(lambda rows: all(str(r.images / "trip" / n) in rows for n in names)
                       and not any(str(r.images / "album" / n) in rows for n in names), "the moved folder's rows")
    for n in names:
        old, new = before[str(r.images / "album" / n)], rows[str(r.images / "trip" / n)]
        assert (new["id"], new["file_hash"]) == (old["id"], old["file_hash"])
        assert Path(new["processed_path"]).is_file()
    r.ask("after-move.png", r.images / "trip" / "x.png")
    assert all(e.get("embedded", 0) == 0 for e in r.proc.events_since(mark, "images_indexed"))


def test_bad_queries_go_to_failed_with_reason_and_service_answers_next(running: Running, tmp_path: Path) -> None:
    r = running
    failed = r.inbox / "failed"
    (r.inbox / "notes.txt").write_text("not a picture\n")
    (r.inbox / "broken.png").write_text("not a png either\n")
    wait_for(lambda: (failed / "notes.txt.error.txt").is_file() and (failed / "broken.png.error.txt").is_file(),
             "both bad queries in inbox/failed", proc=r.proc)
    assert (failed / "notes.txt").read_text() == "not a picture\n"  # nothing the user dropped is deleted
    assert (failed / "broken.png").is_file()
    assert "not a supported query type" in (failed / "notes.txt.error.txt").read_text()
    assert "not a supported image" in (failed / "broken.png.error.txt").read_text()
    assert inbox_files(r.inbox) == []
    assert {e["path"] for e in r.proc.events("query_failed")} >= {str(r.inbox / "notes.txt"), str(r.inbox / "broken.png")}
    # still alive and answering
    bundle = r.ask("after-bad.png", r.images / "a.png")
    assert read_jsonl(bundle / "after-bad.jsonl")[0]["file_path"] == str(r.images / "a.png")
    assert "Traceback" not in r.proc.log_text()


def test_bad_image_is_one_warning_line_and_service_stays_alive(running: Running) -> None:
    r = running
    bad = r.images / "bad.png"
    bad.write_text("this is not a picture\n")
    r.proc.wait_event("image_skipped", where=lambda e: e.get("path") == str(bad))
    bundle = r.ask("after-bad-image.png", r.images / "sub" / "c.png")  # the loop went round since
    assert read_jsonl(bundle / "after-bad-image.jsonl")[0]["file_path"] == str(r.images / "sub" / "c.png")
    lines = [line for line in r.proc.log_text().splitlines() if f"'{bad}'" in line]
    assert len(lines) == 1, lines
    assert "level='warning'" in lines[0] and "not a supported image" in lines[0]
    assert str(bad) not in r.rows()
    assert "Traceback" not in r.proc.log_text()


def _slow_write(path: Path, data: bytes, *, reopen: bool, chunks: int = 6, seconds: float = 3.0) -> None:
    pieces = [data[i * len(data) // chunks:(i + 1) * len(data) // chunks] for i in range(chunks)]
    pause = seconds / (chunks - 1)
    if reopen:
        for i, piece in enumerate(pieces):
            with open(path, "ab" if i else "wb") as fh:
                fh.write(piece)
                fh.flush()
                os.fsync(fh.fileno())
            if i < chunks - 1:
                time.sleep(pause)  # the slowness under test, not a wait for the service
    else:
        with open(path, "wb") as fh:
            for i, piece in enumerate(pieces):
                fh.write(piece)
                fh.flush()
                os.fsync(fh.fileno())
                if i < chunks - 1:
                    time.sleep(pause)


@pytest.mark.parametrize("reopen", [False, True], ids=["one-handle", "reopen-append"])
def test_slowly_written_file_is_indexed_once_correctly(running: Running, tmp_path: Path, reopen: bool) -> None:
    r = running
    name = f"slow-{'append' if reopen else 'handle'}.png"
    data = picture_bytes(tmp_path, seed=77 if reopen else 78, size=(400, 300))
    mark = r.proc.mark()
    target = r.images / name
    _slow_write(target, data, reopen=reopen)
    assert target.read_bytes() == data
    rows = r.wait_rows(lambda rows: str(target) in rows, f"{name} indexed")
    want = expected_hash(target, r.config)
    # settle, then check the row is the complete file's and it was read once
    r.ask(f"after-{name}", r.images / "a.png")
    rows = r.rows()
    assert rows[str(target)]["file_hash"] == want
    assert [p for p in rows if Path(p).name == name] == [str(target)]
    assert [e for e in r.proc.events_since(mark, "image_skipped") if name in str(e.get("path"))] == []
    assert sum(e.get("embedded", 0) for e in r.proc.events_since(mark, "images_indexed")) == 1


def test_slowly_written_query_is_answered_not_failed(running: Running, tmp_path: Path) -> None:
    r = running
    big = picture_bytes(tmp_path, seed=2, size=(400, 300))  # big enough that each chunk is a real part
    _slow_write(r.inbox / "slow-q.png", big, reopen=False)
    bundle = wait_for(lambda: find_bundle(r.output, "slow-q.png"), "the slow query's bundle", proc=r.proc)
    assert (bundle / "slow-q.query.png").read_bytes() == big
    assert not (r.inbox / "failed" / "slow-q.png").exists()


def test_watchdog_pings_arrive_repeatedly(running: Running) -> None:
    r = running
    first = len(r.notify.with_field("WATCHDOG=1"))
    wait_for(lambda: len(r.notify.with_field("WATCHDOG=1")) >= first + 3, "three more WATCHDOG=1 pings", timeout=10,
             proc=r.proc)
    pings = [t for t, _ in r.notify.with_field("WATCHDOG=1")]
    gaps = np.diff(pings[-4:])
    assert (gaps < 1.0).all(), gaps  # WATCHDOG_USEC=1s: pinged every ~0.5 s
    statuses = [m for _, m in r.notify.messages if m.startswith("STATUS=") and "searches answered" in m]
    assert statuses, r.notify.messages


def test_sigterm_exits_0_sends_stopping_and_empties_the_table(running: Running) -> None:
    """Last in the module: stops the shared service (default cleanup-on-exit)."""
    r = running
    assert r.rows()  # something to empty
    rc = r.proc.signal(signal.SIGTERM)
    assert rc == 0, r.proc.log_text()[-4000:]
    stopping = r.notify.with_field("STOPPING=1")
    assert stopping, r.notify.messages
    ready_t = r.notify.with_field("READY=1")[0][0]
    assert stopping[-1][0] > ready_t
    events = [e["event"] for e in r.proc.events()]
    assert {"service_stopping", "table_emptied", "service_stopped"} <= set(events)
    assert "Traceback" not in r.proc.log_text()
    assert not postgres_running(r.state), "the embedded PostgreSQL was left running"
    assert rows_by_path(stopped_server_rows(r.config)) == {}


# --- restarts: --no-cleanup, offline changes, kill -9 -------------------------------------------------


def test_restart_reconciles_offline_changes_and_survives_kill_9(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = tmp_path
    config = write_config(root, tiny_model_dir, top_k=TOP_K)
    images, inbox, output, state = (root / n for n in ("images", "inbox", "output", "state"))
    for i, name in enumerate(("keep.png", "drop.png", "other.png")):
        save_picture(images / name, seed=200 + i)
    procs: list[ServiceProcess] = []
    try:
        # 1. index, then SIGTERM with --no-cleanup: exit 0, rows kept
        p1 = start_service(root, config, "--no-cleanup", tag="-1")
        procs.append(p1)
        p1.wait_ready()
        first = wait_for(lambda: (lambda rows: rows if len(rows) == 3 else None)(live_rows(state)), "3 rows", proc=p1)
        assert p1.signal(signal.SIGTERM) == 0, p1.log_text()[-4000:]
        assert "table_emptied" not in p1.log_text()

        # 2. while stopped: add a file, delete another, drop a query
        save_picture(images / "added.png", seed=300)
        (images / "drop.png").unlink()
        shutil.copyfile(images / "keep.png", inbox / "offline-q.png")
        p2 = start_service(root, config, "--no-cleanup", tag="-2")
        procs.append(p2)
        p2.wait_ready()
        assert p2.events("store_ready")[0]["rows"] == 3  # the previous run's rows were kept
        want = {str(images / n) for n in ("keep.png", "other.png", "added.png")}
        rows = wait_for(lambda: (lambda rows: rows if set(rows) == want else None)(live_rows(state)),
                        "rows matching the folder", proc=p2)
        for n in ("keep.png", "other.png"):
            assert rows[str(images / n)]["id"] == first[str(images / n)]["id"]  # kept, not re-made
        assert rows[str(images / "added.png")]["file_hash"] == expected_hash(images / "added.png", config)
        bundle = wait_for(lambda: find_bundle(output, "offline-q.png"), "the offline query answered", proc=p2)
        hit = read_jsonl(bundle / "offline-q.jsonl")[0]
        assert hit["file_path"] == str(images / "keep.png") and hit["similarity"] >= 0.999
        assert inbox_files(inbox) == []

        # 3. kill -9, change things while it is dead, restart: nothing lost
        before_kill = live_rows(state)
        p2.kill9()
        save_picture(images / "while-dead.png", seed=400)
        shutil.copyfile(images / "other.png", inbox / "dead-q.png")
        p3 = start_service(root, config, "--no-cleanup", tag="-3")
        procs.append(p3)
        p3.wait_ready()
        want |= {str(images / "while-dead.png")}
        rows = wait_for(lambda: (lambda rows: rows if set(rows) == want else None)(live_rows(state)),
                        "rows after the kill -9 restart", proc=p3)
        for path, row in before_kill.items():
            assert (rows[path]["id"], rows[path]["file_hash"]) == (row["id"], row["file_hash"])
        bundle = wait_for(lambda: find_bundle(output, "dead-q.png"), "the query dropped while dead", proc=p3)
        assert read_jsonl(bundle / "dead-q.jsonl")[0]["file_path"] == str(images / "other.png")
        assert inbox_files(inbox) == []
        assert p3.signal(signal.SIGTERM) == 0, p3.log_text()[-4000:]
        for p in procs:
            assert "Traceback" not in p.log_text(), p.log_text()
        assert not postgres_running(state), "the embedded PostgreSQL was left running after the restart's SIGTERM"
        assert set(rows_by_path(stopped_server_rows(config))) == want  # --no-cleanup: rows kept
    finally:
        for p in procs:
            p.close()
        stop_leftover_postgres(state)
