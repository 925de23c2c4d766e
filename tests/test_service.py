"""User stories against the real service: ``image-search serve`` in a subprocess, the real embedded
PostgreSQL, a real sd_notify datagram socket.

Only what needs the process boundary is here (each service start costs seconds: torch import, model
load, server start): one story from start to SIGTERM, and one that carries the restarts (--no-cleanup
SIGTERM, offline changes, kill -9). Each starts its own service, so no test depends on another's order.
The folder and inbox stories run in-process, on a fake clock, in test_service_loop.py.

Rows are read with tests.support.db: while the service runs through the socket named in the pgdata's
``postmaster.pid`` (``live_rows``), when no service runs through ``Database`` (``stopped_server_rows``);
that module says why.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np

from image_search.config import load_config
from image_search.preprocess import preprocess_for
from tests.support.db import live_rows, postgres_running, rows_by_path, stop_leftover_postgres, stopped_server_rows
from tests.support.env import child_env
from tests.support.files import find_bundle, inbox_files, read_jsonl, save_picture, write_config
from tests.support.notify import NotifyListener
from tests.support.service import ServiceProcess
from tests.support.waiting import wait_for

import pytest

pytestmark = pytest.mark.e2e

TOP_K = 3


# --- helpers ------------------------------------------------------------------------------------------


def expected_hash(path: Path, cfg_path: Path) -> str:
    return preprocess_for(path, load_config(cfg_path)).file_hash


def start_service(root: Path, config: Path, *flags: str, env: dict[str, str] | None = None,
                  tag: str = "") -> ServiceProcess:
    """The service of the tree ``root``, logging to ``root/service<tag>.log``."""
    return ServiceProcess(config, *flags, log_path=root / f"service{tag}.log", env=env)


# --- one service, start to SIGTERM ---------------------------------------------------------------------


def test_service_lifecycle_ready_watch_answer_watchdog_and_sigterm(tmp_path: Path, tiny_model_dir: Path) -> None:
    """What needs the real process: READY=1 over a real socket only after the start-up work, files and
    queries noticed by the real inotify watcher, WATCHDOG=1 pings, and SIGTERM: STOPPING=1, exit 0, the
    table emptied (default cleanup-on-exit) and the embedded server stopped. The folder stories
    themselves (renames, deletions, bad files, slow writers) run in-process in test_service_loop.py."""
    root = tmp_path
    config = write_config(root, tiny_model_dir, top_k=TOP_K)
    images, inbox, output, state = (root / n for n in ("images", "inbox", "output", "state"))
    initial = {"a.png": 1, "b.jpg": 2, "sub/c.png": 3}
    for name, seed in initial.items():
        save_picture(images / name, seed=seed, size=(96 + 4 * seed, 72), fmt="JPEG" if name.endswith(".jpg") else None)
    # A query already waiting when the service starts: it must be answered only after READY=1.
    shutil.copyfile(images / "a.png", inbox / "waiting.png")
    notify = NotifyListener(root / "notify.sock", output)
    proc = start_service(root, config, env=child_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000"))
    try:
        proc.wait_ready()
        rows = wait_for(lambda: (lambda r: r if len(r) == len(initial) else None)(live_rows(state)),
                        "the initial images indexed", proc=proc)
        assert rows[str(images / "sub/c.png")]["file_hash"] == expected_hash(images / "sub/c.png", config)
        bundle = wait_for(lambda: find_bundle(output, "waiting.png"), "the waiting query's bundle", proc=proc)
        assert read_jsonl(bundle / "waiting.jsonl")[0]["file_path"] == str(images / "a.png")
        ready = notify.with_field("READY=1")
        assert len(ready) == 1, notify.messages
        assert any(line.startswith("STATUS=") for line in ready[0][1].splitlines()), ready
        assert notify.bundles_at_ready == [], notify.bundles_at_ready

        # The real watcher: a copied file becomes a row, a dropped copy of it is answered with it first.
        new = save_picture(tmp_path / "new.png", seed=41, size=(120, 90))
        shutil.copyfile(new, images / "new.png")
        wait_for(lambda: str(images / "new.png") in live_rows(state), "new.png indexed", proc=proc)
        shutil.copyfile(images / "b.jpg", inbox / "q-b.jpg")
        bundle = wait_for(lambda: find_bundle(output, "q-b.jpg"), "the result bundle of q-b.jpg", proc=proc)
        hits = read_jsonl(bundle / "q-b.jsonl")
        assert len(hits) == TOP_K and hits[0]["file_path"] == str(images / "b.jpg") and hits[0]["similarity"] >= 0.999
        assert (bundle / "q-b.query.jpg").read_bytes() == (images / "b.jpg").read_bytes()
        # A text query dropped as a file: answered by its words, the file moved into its result folder.
        (inbox / "bike.txt").write_text("a red bicycle\n", encoding="utf-8")
        bundle = wait_for(lambda: find_bundle(output, "bike.txt"), "the result bundle of bike.txt", proc=proc)
        assert len(read_jsonl(bundle / "bike.jsonl")) == TOP_K and (bundle / "bike.sheet.jpg").is_file()
        assert (bundle / "bike.query.txt").read_text(encoding="utf-8") == "a red bicycle\n"
        assert inbox_files(inbox) == []

        first = len(notify.with_field("WATCHDOG=1"))
        wait_for(lambda: len(notify.with_field("WATCHDOG=1")) >= first + 3, "three more WATCHDOG=1 pings",
                 timeout=10, proc=proc)
        gaps = np.diff([t for t, _ in notify.with_field("WATCHDOG=1")][-4:])
        assert (gaps < 1.0).all(), gaps  # WATCHDOG_USEC=1s: pinged every ~0.5 s
        assert [m for _, m in notify.messages if m.startswith("STATUS=") and "searches answered" in m]

        rc = proc.signal(signal.SIGTERM)
        assert rc == 0, proc.log_text()[-4000:]
        stopping = notify.with_field("STOPPING=1")
        assert stopping and stopping[-1][0] > ready[0][0], notify.messages
        assert {"service_stopping", "table_emptied", "service_stopped"} <= {e["event"] for e in proc.events()}
        assert "Traceback" not in proc.log_text()
        assert not postgres_running(state), "the embedded PostgreSQL was left running"
        assert rows_by_path(stopped_server_rows(config)) == {}
    finally:
        proc.close()
        notify.close()
        stop_leftover_postgres(state)


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
