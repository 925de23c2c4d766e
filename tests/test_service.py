"""User stories against the real service: ``image-search serve`` in a subprocess, the real embedded
PostgreSQL, a real sd_notify datagram socket.

Each service start costs ~10 s (torch import, model load, server start), so one module-scoped service
carries most stories (indexing, queries, deletes, renames, bad files, slow writers, sd_notify, and at
the very end SIGTERM with the default cleanup), and one lifecycle story carries the restarts
(--no-cleanup SIGTERM, offline changes, kill -9).

Rows are read while the service runs through a plain psycopg2 connection to the socket named in the
pgdata's ``postmaster.pid``, not through ``image_search.store.Database``: a ``Database`` in the test
process would register the test's pid as a pgserver handle, and while it is listed the service's own
shutdown does not stop the embedded server (and the test's cached server handle goes stale across
service restarts). When no service runs, rows are read through ``Database`` like the CLI tests do.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2
import pytest

from conftest import save_picture, write_config

from image_search.config import load_config
from image_search.preprocess import preprocess_image
from image_search.store import Database

CLI = Path(sys.executable).parent / "image-search"
TIMEOUT = 30.0
START_TIMEOUT = 90.0
TOP_K = 3


# --- helpers ------------------------------------------------------------------------------------------


def picture_bytes(tmp: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str = "PNG") -> bytes:
    return save_picture(tmp / f"_bytes_{seed}.{fmt.lower()}", seed, size, fmt).read_bytes()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT, proc: ServiceProc | None = None) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` (and the log) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"service exited (rc={proc.popen.returncode}) while waiting for {what}\n{proc.log_text()}")
        if time.monotonic() > deadline:
            tail = proc.log_text()[-6000:] if proc is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
        time.sleep(0.05)


_FIELD = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


def parse_line(line: str) -> dict[str, Any]:
    """One structlog key=value line (values rendered with repr) as a dict."""
    out: dict[str, Any] = {}
    for key, raw in _FIELD.findall(line):
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def pg_connect(state_dir: Path) -> psycopg2.extensions.connection | None:
    """A connection to the running embedded server of ``state_dir`` (None when it is not running)."""
    pid_file = state_dir / "pgdata" / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), lines[3].strip(), lines[4].strip()
    except (OSError, IndexError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        return psycopg2.connect(host=socket_dir, port=port, user="postgres", dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ROWS_SQL = ("SELECT id, file_path, file_name, file_hash, processed_path, source_size, source_mtime_ns, model_name "
             "FROM image_embeddings ORDER BY file_path, id")


def _rows_from(conn: psycopg2.extensions.connection) -> dict[str, dict[str, Any]]:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('image_embeddings') IS NOT NULL")
        if not cur.fetchone()[0]:
            return {}
        cur.execute(_ROWS_SQL)
        names = [d.name for d in cur.description]
        return {row[1]: dict(zip(names, row)) for row in cur.fetchall()}


def live_rows(state_dir: Path) -> dict[str, dict[str, Any]]:
    """file_path -> row, read from the embedded server the running service uses."""
    conn = wait_for(lambda: pg_connect(state_dir), "a connection to the embedded PostgreSQL")
    try:
        return _rows_from(conn)
    finally:
        conn.close()


def stopped_rows(config_path: Path) -> dict[str, dict[str, Any]]:
    """file_path -> row, with no service running: starts the embedded server for the read, stops it after."""
    database = Database(load_config(config_path))
    try:
        assert database.embedded is not None
        conn = psycopg2.connect(database.embedded.uri)
        try:
            return _rows_from(conn)
        finally:
            conn.close()
    finally:
        database.close()


def postgres_running(state_dir: Path) -> bool:
    conn = pg_connect(state_dir)
    if conn is None:
        return False
    conn.close()
    return True


def stop_leftover_postgres(state_dir: Path) -> None:
    """Teardown only: never leave a server running behind the tests."""
    pid_file = state_dir / "pgdata" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return
    if _alive(pid):
        os.kill(pid, signal.SIGINT)  # fast shutdown
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def expected_hash(path: Path, cfg_path: Path) -> str:
    cfg = load_config(cfg_path)
    return preprocess_image(path, max_size=(cfg.resize_width, cfg.resize_height), max_pixels=cfg.max_image_pixels).file_hash


def find_bundle(output: Path, query_name: str) -> Path | None:
    """The result folder holding ``<stem>.query.<ext>`` for the query ``query_name``."""
    stem, ext = os.path.splitext(query_name)
    for bundle in output.iterdir() if output.is_dir() else ():
        if bundle.is_dir() and not bundle.name.startswith(".") and (bundle / f"{stem}.query{ext}").is_file():
            return bundle
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def inbox_files(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir() if p.is_file())


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IMAGE_SEARCH_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                              "JOURNAL_STREAM")}
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.update(extra)
    return env


class ServiceProc:
    """``image-search serve`` in its own session; stderr (the structlog lines) goes to a file."""

    def __init__(self, root: Path, config: Path, *flags: str, env: dict[str, str] | None = None, tag: str = "") -> None:
        self.root = root
        self.log_path = root / f"service{tag}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen([str(CLI), "serve", "--config", str(config), *flags], cwd=root,
                                      env=env or service_env(), stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        parsed = [parse_line(line) for line in self.log_text().splitlines() if "event=" in line]
        return [e for e in parsed if name is None or e.get("event") == name]

    def mark(self) -> int:
        """A position in the log: events after it are what an action caused."""
        return len(self.events())

    def events_since(self, mark: int, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events()[mark:] if name is None or e.get("event") == name]

    def wait_event(self, name: str, *, since: int = 0, timeout: float = TIMEOUT,
                   where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        return wait_for(lambda: next((e for e in self.events_since(since, name) if where(e)), None),
                        f"log event {name}", timeout, proc=self)

    def wait_ready(self) -> None:
        self.wait_event("service_ready", timeout=START_TIMEOUT)

    def signal(self, signum: int, timeout: float = 60) -> int:
        self.popen.send_signal(signum)
        return self.popen.wait(timeout=timeout)

    def kill9(self) -> None:
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def close(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)
        self._log.close()


class NotifyListener:
    """A bound unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        self.output = output
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.bundles_at_ready: list[str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            if "READY=1" in text.splitlines() and self.bundles_at_ready is None:
                # what the service had produced when it said it was ready
                self.bundles_at_ready = [p.name for p in self.output.iterdir() if not p.name.startswith(".")]
            self.messages.append((time.monotonic(), text))

    def with_field(self, line: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if line in m.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


# --- the module's running service ---------------------------------------------------------------------


INITIAL = {"a.png": 1, "b.jpg": 2, "sub/c.png": 3, "album/x.png": 4, "album/y.png": 5, "gone.png": 6,
           "old-name.png": 7}


@dataclass
class Running:
    root: Path
    config: Path
    proc: ServiceProc
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
                  timeout: float = TIMEOUT) -> dict[str, dict[str, Any]]:
        return wait_for(lambda: (lambda r: r if predicate(r) else None)(self.rows()), what, timeout, proc=self.proc)

    def ask(self, name: str, source: Path, timeout: float = TIMEOUT) -> Path:
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
    env = service_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000")
    started = time.monotonic()
    proc = ServiceProc(root, config, env=env)  # default cleanup: the last test checks the table is emptied
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
    assert stopped_rows(r.config) == {}


# --- restarts: --no-cleanup, offline changes, kill -9 -------------------------------------------------


def test_restart_reconciles_offline_changes_and_survives_kill_9(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = tmp_path
    config = write_config(root, tiny_model_dir, top_k=TOP_K)
    images, inbox, output, state = (root / n for n in ("images", "inbox", "output", "state"))
    for i, name in enumerate(("keep.png", "drop.png", "other.png")):
        save_picture(images / name, seed=200 + i)
    procs: list[ServiceProc] = []
    try:
        # 1. index, then SIGTERM with --no-cleanup: exit 0, rows kept
        p1 = ServiceProc(root, config, "--no-cleanup", tag="-1")
        procs.append(p1)
        p1.wait_ready()
        first = wait_for(lambda: (lambda rows: rows if len(rows) == 3 else None)(live_rows(state)), "3 rows", proc=p1)
        assert p1.signal(signal.SIGTERM) == 0, p1.log_text()[-4000:]
        assert "table_emptied" not in p1.log_text()

        # 2. while stopped: add a file, delete another, drop a query
        save_picture(images / "added.png", seed=300)
        (images / "drop.png").unlink()
        shutil.copyfile(images / "keep.png", inbox / "offline-q.png")
        p2 = ServiceProc(root, config, "--no-cleanup", tag="-2")
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
        p3 = ServiceProc(root, config, "--no-cleanup", tag="-3")
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
        assert set(stopped_rows(config)) == want  # --no-cleanup: rows kept
    finally:
        for p in procs:
            p.close()
        stop_leftover_postgres(state)
