"""A large backlog lands without per-row index insertion and the HNSW index is built once at the end
(``EmbeddingStore.bulk_load``): searches meanwhile are exact and complete, and a load or a build cut
short at any moment leaves a next start that finds a valid index, with every row and none twice."""

from __future__ import annotations

import json
import signal
import threading
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from image_search.config import load_config
from image_search.store import BULK_LOAD_MIN_ROWS, HNSW_INDEX, Database, EmbeddingRow, EmbeddingStore
from image_search.store import hnsw_index_ddl
from tests.support.db import empty_store, raw
from tests.support.model import TINY_DIMENSION
from tests.support.waiting import wait_for
from tests.support.files import write_config

pytestmark = pytest.mark.integration

DIM = 16


def rows(start: int, stop: int, vectors: np.ndarray) -> list[EmbeddingRow]:
    return [EmbeddingRow(f"/img/{i}.png", f"{i}.png", f"h{i:08d}", f"/processed/{i}.png.jpg", 10, i, "m", vectors[i])
            for i in range(start, stop)]


def unit_vectors(n: int, seed: int = 3) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def index_state(database: Database) -> str:
    found = raw(database, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (HNSW_INDEX,))
    return "missing" if not found else "valid" if found[0][0] else "invalid"


DATABASE_CONFIG = {"dimension": DIM, "exact_search_below": 10}  # the module's database (the ``database`` fixture, conftest.py)


@pytest.fixture
def store(database: Database) -> Iterator[EmbeddingStore]:
    with empty_store(database, DIM) as s:
        yield s


def test_a_large_backlog_lands_without_the_index_and_searches_meanwhile_miss_nothing(store, database) -> None:
    n = BULK_LOAD_MIN_ROWS + 200
    vectors = unit_vectors(n)
    with capture_logs() as logs, store.bulk_load(n) as bulk:
        assert bulk and index_state(database) == "missing"
        store.upsert(rows(0, n // 2, vectors))
        for q in range(0, n // 2, 97):  # every committed row can be found, exactly
            hits = store.search(vectors[q], 3)
            assert hits[0].file_hash == f"h{q:08d}" and hits[0].similarity == pytest.approx(1.0, abs=1e-6)
        store.upsert(rows(n // 2, n, vectors))
    assert index_state(database) == "valid"
    assert [e["event"] for e in logs if e["event"].startswith(("bulk", "search_index"))] == [
        "bulk_load_started", "search_index_built"]
    assert store.count() == n
    plan = store.indexed_search_plan(vectors[0], 10)
    assert HNSW_INDEX in plan, plan


def test_a_small_batch_keeps_the_index(store, database) -> None:
    store.upsert(rows(0, 2000, unit_vectors(2000)))
    with store.bulk_load(600) as bulk:  # fewer than a quarter of the table: inserting costs less
        assert not bulk and index_state(database) == "valid"


def test_a_build_cut_short_leaves_an_invalid_index_that_the_next_start_builds_again(store, database) -> None:
    store.upsert(rows(0, 50, unit_vectors(50)))
    conn = database.connect()
    with conn, conn.cursor() as cur:  # what a CREATE INDEX CONCURRENTLY killed half-way leaves
        cur.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)", (HNSW_INDEX,))
    conn.close()
    assert index_state(database) == "invalid"
    assert store.search(unit_vectors(50)[7], 1)[0].file_hash == "h00000007"  # exact meanwhile
    with capture_logs() as logs:
        start_again(database)
    assert index_state(database) == "valid"
    assert search_index_events(logs) == REPAIRED


def test_index_stopped_during_its_build_says_so(store, database, monkeypatch) -> None:
    """`image-search index` builds the index at its end: a Ctrl-C then left no line about it."""
    from image_search.store import BulkLoad

    def stopped(self) -> None:
        self._conn.close()  # what a cut build leaves: the lock gone with the connection
        raise KeyboardInterrupt

    monkeypatch.setattr(BulkLoad, "finish", stopped)
    with capture_logs() as logs, pytest.raises(KeyboardInterrupt), store.bulk_load(2000) as bulk:
        assert bulk
        store.upsert(rows(0, 20, unit_vectors(20)))
    assert [e["event"] for e in logs if e["event"].startswith(("search_index", "bulk_load"))] == [
        "bulk_load_started", "search_index_build_stopped"]


@contextmanager
def another_sessions_transaction(database: Database, sql: str = "SELECT count(*) FROM image_embeddings", *,
                                 ends_after: float = 10.0) -> Iterator[threading.Event]:
    """A transaction of another session on the table (a backup's read, another service's write), open until
    the block ends, or until ``ends_after`` seconds at most: a call that waits for it then fails its test
    instead of hanging it. The event says whether it has ended: set, the call under test waited for it."""
    conn = database.connect()
    ended = threading.Event()

    def end() -> None:
        if not ended.is_set():
            ended.set()
            conn.rollback()

    conn.cursor().execute(sql)
    timer = threading.Timer(ends_after, end)
    timer.start()
    try:
        yield ended
    finally:
        timer.cancel()
        end()
        conn.close()


REPAIRED = ["search_index_repair_started", "search_index_built"]  # what a start that repairs the index logs


def search_index_events(logs: list[dict]) -> list[str]:
    return [e["event"] for e in logs if e["event"].startswith("search_index")]


def wait_for_builds(logs: list[dict], count: int = 1) -> None:
    """The index builds the service runs beside its loop, awaited by their lines (a build over a few rows
    may be over, and its bulk load let go, before the loop's passes have ended)."""
    def ended() -> int:
        return sum(e["event"] in ("search_index_built", "search_index_build_failed") for e in logs) >= count
    wait_for(ended, timeout=120, what=f"{count} index build(s) ended")


def start_again(database: Database) -> None:
    """What the next start of the service or of ``index`` does with the index: the store opened as
    ``open_runtime`` opens it, and the repair it begins built (the service builds it once idle, beside the
    loop; ``index`` once its rows are in)."""
    store = database.open_store(dimension=DIM, create_table=False)
    try:
        repair = store.repair_index()
        if repair is not None:
            repair.finish()
    finally:
        store.close()


_KILLED_MID_LOAD = """
import os, signal, sys
import numpy as np
from image_search.config import load_config
from image_search.store import BULK_LOAD_MIN_ROWS, Database, EmbeddingRow
cfg = load_config(sys.argv[1])
database = Database(cfg)
store = database.open_store(dimension=int(sys.argv[2]))
v = np.ones((BULK_LOAD_MIN_ROWS, int(sys.argv[2])), dtype=np.float32) / np.sqrt(int(sys.argv[2]))
with store.bulk_load(BULK_LOAD_MIN_ROWS):
    store.upsert([EmbeddingRow(f"/k/{i}", f"{i}", f"k{i}", f"/p/{i}", 1, i, "m", v[i]) for i in range(300)])
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_during_a_bulk_load_leaves_every_row_once_and_the_next_start_builds_the_index(
        tmp_path: Path) -> None:
    """A real process, killed with SIGKILL in the middle of a bulk load; its embedded server is stopped
    here before the next start, as systemd would have stopped it with the service."""
    config = write_config(tmp_path, dimension=DIM)
    child = subprocess.run([sys.executable, "-c", _KILLED_MID_LOAD, str(config), str(DIM)], capture_output=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode(errors="replace")[-2000:]
    from tests.support.db import stop_leftover_postgres

    stop_leftover_postgres(tmp_path / "state")
    database = Database(load_config(config))
    try:
        assert index_state(database) == "missing"  # dropped, never built: the load died
        with capture_logs() as logs:
            start_again(database)
        assert index_state(database) == "valid"
        assert raw(database, "SELECT count(*), count(DISTINCT file_hash) FROM image_embeddings") == [(300, 300)]
        assert search_index_events(logs) == REPAIRED
    finally:
        database.close()


def test_a_start_during_another_services_bulk_load_leaves_the_index_to_it(store, database) -> None:
    with store.bulk_load(BULK_LOAD_MIN_ROWS) as bulk:
        assert bulk
        other = database.open_store(dimension=DIM, create_table=False)  # another service starting meanwhile
        assert other.repair_index() is None and index_state(database) == "missing", \
            "a start must not build the index under a bulk load"
        with other.bulk_load(BULK_LOAD_MIN_ROWS) as second:
            assert not second, "one bulk load at a time"
        other.close()
    assert index_state(database) == "valid"


def test_the_service_bulk_loads_a_large_start_up_backlog_and_builds_the_index_in_the_background(
        story_factory, monkeypatch) -> None:
    """A first start on a library: the backlog lands without the index, and the index is built once the
    backlog is in, beside the loop; searches then go through it (exact ones meanwhile: the first test)."""
    import image_search.store.embeddings as store_module
    from tests.support.db import database_rows

    monkeypatch.setattr(store_module, "BULK_LOAD_MIN_ROWS", 12)  # a library of 12 pictures stands in
    files = {f"p{i:02d}.png": 100 + i for i in range(14)}
    with capture_logs() as logs:
        story = story_factory(files, start=False)
        story.service.start()
        assert index_state(story.database) == "missing"
        story.run_until_idle()
        wait_for_builds(logs)  # the build runs beside the loop
    assert index_state(story.database) == "valid"
    assert len(database_rows(story.database) or []) == 14
    events = [e["event"] for e in logs if e["event"] in ("bulk_load_started", "search_index_built")]
    assert events == ["bulk_load_started", "search_index_built"]
    assert story.ask("q.png", story.images / "p03.png")[0] == str(story.images / "p03.png")


@pytest.mark.parametrize("left", ["missing", "invalid"])
def test_a_service_started_after_a_stop_that_cut_a_bulk_load_short_builds_the_index_again(
        story_factory, monkeypatch, left: str) -> None:
    """SIGTERM while a start-up backlog lands (the index dropped, not built yet) or while its index is being
    built (left invalid): the next start of the service, with nothing left to index, builds it again
    beside the loop, and its searches go through it."""
    import image_search.store.embeddings as store_module
    from image_search.store import BulkLoad

    monkeypatch.setattr(store_module, "BULK_LOAD_MIN_ROWS", 12)
    story = story_factory({f"p{i:02d}.png": 100 + i for i in range(14)}, start=False)
    with monkeypatch.context() as stopped_first:
        stopped_first.setattr(BulkLoad, "finish_in_background", lambda self: None)  # the stop comes first
        story.service.start()
        story.run_until_idle()
    assert index_state(story.database) == "missing" and story.service.indexed == 14
    if left == "invalid":  # what a CREATE INDEX CONCURRENTLY cancelled half-way leaves
        raw(story.database, hnsw_index_ddl(TINY_DIMENSION))
        raw(story.database, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)", (HNSW_INDEX,))
    with capture_logs() as logs:
        again = story_factory(after=story)  # the stop, then the start
        wait_for_builds(logs)
    assert [e["event"] for e in logs if e["event"].startswith("bulk_load")] == ["bulk_load_stopped"]  # said
    assert search_index_events(logs) == REPAIRED and index_state(story.database) == "valid"
    assert again.ask("q.png", again.images / "p03.png")[0] == str(again.images / "p03.png")


def test_a_running_service_builds_again_an_index_that_a_failed_build_left_invalid(story_factory) -> None:
    """A build fails while the service runs (the database restarted under it): within REPAIR_LOOK_EVERY_S
    of being caught up, the service looks, and builds the index again beside its loop."""
    from image_search.ingest import REPAIR_LOOK_EVERY_S

    story = story_factory({"a.png": 1, "b.png": 2})
    assert index_state(story.database) == "valid"
    raw(story.database, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)", (HNSW_INDEX,))
    story.run_until_idle()
    assert index_state(story.database) == "invalid"  # not looked at every pass: once a minute at most
    with capture_logs() as logs:
        story.clock.advance(REPAIR_LOOK_EVERY_S)
        story.run_until_idle()
        wait_for_builds(logs)
    assert search_index_events(logs) == REPAIRED and index_state(story.database) == "valid"


def test_a_file_that_never_settles_keeps_neither_the_index_build_nor_a_query_found_at_start_waiting(
        story_factory, monkeypatch) -> None:
    """A start-up backlog is bulk-loaded while a webcam rewrites its snapshot faster than it can settle:
    once the rest is in and the snapshot has kept changing for ten settle periods, the index is built and
    the query that was waiting in the inbox at start is answered."""
    import shutil

    import image_search.store.embeddings as store_module
    from image_search.readiness import RESTLESS_AFTER_SETTLES
    from image_search.watch import ChangeKind, Folder
    from tests.support.files import save_picture
    from tests.support.story import SETTLE

    monkeypatch.setattr(store_module, "BULK_LOAD_MIN_ROWS", 12)
    story = story_factory({f"p{i:02d}.png": 100 + i for i in range(14)}, start=False)
    shutil.copyfile(story.images / "p03.png", story.inbox / "held.png")
    webcam = story.images / "webcam.png"
    with capture_logs() as logs:
        story.service.start()
        for i in range(3 * RESTLESS_AFTER_SETTLES):
            save_picture(webcam, seed=500 + i, size=(100 + i, 80))
            story.notice(Folder.IMAGES, ChangeKind.TOUCHED, webcam)
            story.clock.advance(SETTLE / 2)
            while story.service.step():
                pass
        assert story.service.indexed == 14
        wait_for_builds(logs)  # the index built while the webcam's snapshot keeps changing
    assert index_state(story.database) == "valid"
    answer = [json.loads(line)["file_path"] for line in (story.bundle("held.png") / "held.jsonl").read_text().splitlines()]
    assert answer[0] == str(story.images / "p03.png") and len(answer) == min(14, story.cfg.top_k)


def test_a_connection_lost_while_a_bulk_load_drops_the_index_is_a_lost_database(store, database) -> None:
    """The drop waits for every transaction on the table, another service's search included; the database
    going away meanwhile is the service's usual outage (``DatabaseUnavailable``: retried, not a crash)."""
    from image_search.store import DatabaseUnavailable

    store.upsert(rows(0, 50, unit_vectors(50)))
    outcome: list[BaseException | object] = []

    def begin() -> None:
        try:
            outcome.append(store.begin_bulk_load(BULK_LOAD_MIN_ROWS))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome.append(exc)

    with another_sessions_transaction(database):  # another service's search: the drop waits for it
        beginning = threading.Thread(target=begin)
        beginning.start()
        [(pid,)] = wait_for(lambda: raw(database, "SELECT pid FROM pg_stat_activity WHERE query LIKE 'DROP INDEX%%' "
                                                  "AND wait_event_type = 'Lock'"), "the drop waiting")
        raw(database, "SELECT pg_terminate_backend(%s)", (pid,))
        beginning.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], DatabaseUnavailable), outcome


def test_a_bulk_load_that_would_wait_long_for_other_sessions_leaves_the_drop_to_its_build(
        store, database, monkeypatch) -> None:
    """A backup (pg_dump) holds a transaction on the table, and a report another that ends meanwhile: the
    drop that begins a bulk load would wait for each in turn on the service's loop, past systemd's
    watchdog. It is cut short after DROP_WAIT_S in all; the rows go into the index one by one, searches
    stay complete, and the build drops and builds the index once the backup is over."""
    from image_search.store import bulk as bulk_module

    monkeypatch.setattr(bulk_module, "DROP_WAIT_S", 1.0)
    vectors = unit_vectors(60)
    store.upsert(rows(0, 50, vectors))
    with another_sessions_transaction(database) as backup_ended, \
            another_sessions_transaction(database, ends_after=0.8):  # the report
        with capture_logs() as logs:
            bulk = store.begin_bulk_load(BULK_LOAD_MIN_ROWS)
        assert bulk is not None and not backup_ended.is_set(), "the drop waited for the backup"
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["bulk_load_index_kept"]
        store.upsert(rows(50, 60, vectors))
        assert all(store.search(vectors[i], 1)[0].file_hash == f"h{i:08d}" for i in (3, 55))
    bulk.finish()
    assert index_state(database) == "valid"
    assert store.search(vectors[55], 1)[0].file_hash == f"h{55:08d}"


def test_a_stop_cancels_a_build_even_between_its_statements(store, database, monkeypatch) -> None:
    """A cancel that reaches the server between two statements of the build is dropped there; the stop
    cancels again until the build has ended, rather than waiting for a build that waits on another
    service's open write."""
    import time

    from image_search.store import schema

    store.upsert(rows(0, 50, unit_vectors(50)))
    bulk = store.begin_bulk_load(BULK_LOAD_MIN_ROWS)
    assert bulk is not None
    create_index = schema._create_index

    def slowly(cur, dimension: int, *, concurrently: bool) -> None:  # the first cancel lands here, between
        time.sleep(1.0)                                               # the build's settings and its DDL
        create_index(cur, dimension, concurrently=concurrently)

    monkeypatch.setattr(schema, "_create_index", slowly)
    # Another service's write, not committed: the CREATE INDEX CONCURRENTLY waits for it.
    with another_sessions_transaction(
            database, "UPDATE image_embeddings SET source_size = 11 WHERE file_hash = 'h00000001'") as write_ended, \
            capture_logs() as logs:
        bulk.finish_in_background()
        time.sleep(0.3)
        bulk.abandon()
        assert bulk.ended and not write_ended.is_set(), "the stop waited for the build"
    # The stop's own cancel is no failure (a warning quoting PostgreSQL's "canceling statement" said so).
    assert [e["event"] for e in logs if e["event"].startswith("search_index_build")] == ["search_index_build_stopped"]


def test_a_burst_dropped_while_the_service_runs_is_bulk_loaded_and_a_later_one_again(story_factory, monkeypatch) -> None:
    """A folder of pictures copied in while the service runs lands as a start-up backlog does, and once its
    index is built a second burst gets a bulk load of its own; a trickle never does."""
    import image_search.store.embeddings as store_module
    from image_search.watch import ChangeKind, Folder
    from tests.support.db import database_rows
    from tests.support.files import save_picture

    monkeypatch.setattr(store_module, "BULK_LOAD_MIN_ROWS", 8)  # bursts of 8 pictures stand in
    story = story_factory({"first.png": 1})
    assert story.service._ingest.bulk is None  # one picture at start: no bulk load

    def burst(prefix: str, count: int, seed: int) -> None:
        for i in range(count):
            path = save_picture(story.images / f"{prefix}{i:02d}.png", seed=seed + i)
            story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)

    with capture_logs() as logs:
        burst("trickle", 1, 50)
        story.run_until_idle()
        burst("a", 10, 100)
        story.run_until_idle()
        wait_for_builds(logs)
        assert index_state(story.database) == "valid"
        burst("b", 12, 200)
        story.run_until_idle()
        wait_for_builds(logs, 2)
    assert index_state(story.database) == "valid"
    assert len(database_rows(story.database) or []) == 1 + 1 + 10 + 12
    started = [e["rows"] for e in logs if e["event"] == "bulk_load_started"]
    assert started == [10, 12], started
    assert [e["event"] for e in logs if e["event"] == "search_index_built"] == ["search_index_built"] * 2
    assert story.ask("q.png", story.images / "b03.png")[0] == str(story.images / "b03.png")


def test_the_index_build_gets_parallel_workers_even_over_a_small_heap(store, database, monkeypatch) -> None:
    """Issue 16: PostgreSQL sizes a parallel build by the table's heap, and a big vector lives out of line
    (TOAST), so a build over 16,000 1024-d rows ran serially whatever max_parallel_maintenance_workers
    said. ``build_index`` lets the worker setting decide: here a build over a heap far below
    min_parallel_table_scan_size (8 MB) reports a worker's share."""
    from image_search.store import schema

    monkeypatch.setattr(schema, "default_worker_count", lambda: 3)  # whatever cores this machine has
    with a_table_without_its_index(store, database, autocommit=True) as (conn, cur):
        cur.execute("SET client_min_messages = debug1")  # the build says who processed what
        schema.build_index(cur, DIM, concurrently=True)
        said = " ".join(conn.notices)
    assert "worker processed" in said and "serially" not in said, said[-500:]


@contextmanager
def a_table_without_its_index(store, database, *, autocommit: bool):
    """``PARALLEL_BUILD_MIN_ROWS`` rows (fewer are built serially) and no HNSW index; a connection of its own
    (``autocommit``: as a concurrent build has it), and its cursor."""
    from image_search.store import schema

    n = schema.PARALLEL_BUILD_MIN_ROWS
    store.upsert(rows(0, n, unit_vectors(n)))
    conn = database.connect()
    try:
        conn.autocommit = autocommit
        with conn.cursor() as cur:
            cur.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
            yield conn, cur
    finally:
        conn.close()


@pytest.mark.parametrize("concurrently", [True, False])
def test_a_statement_timeout_the_server_gives_does_not_cancel_the_index_build(store, database, concurrently) -> None:
    """A role's or database's statement_timeout (a DBA's guard against runaway queries) cancelled every build of
    a large table, and each start's repair after it: searches stayed exact, and slow, for good."""
    from image_search.store import schema

    with a_table_without_its_index(store, database, autocommit=concurrently) as (conn, cur):
        cur.execute("SET statement_timeout = '1ms'")  # as the server would set it for the session
        schema.build_index(cur, DIM, concurrently=concurrently)
        cur.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (HNSW_INDEX,))
        assert cur.fetchone() == (True,)
        conn.commit()


def test_a_burst_that_arrives_file_by_file_is_bulk_loaded_once_it_is_many(story_factory, monkeypatch) -> None:
    """A ``cp -r`` of a folder just over the least a bulk load takes: looked at 6 files in (too few), the
    next look waited for twice that, which a burst being indexed as it came may never reach; its rows went
    into the index one by one. Now the first look is at the least, whatever came before."""
    import image_search.store.embeddings as store_module
    from image_search.watch import ChangeKind, Folder
    from tests.support.files import save_picture

    monkeypatch.setattr(store_module, "BULK_LOAD_MIN_ROWS", 8)  # bursts of 8 pictures stand in
    story = story_factory({"first.png": 1})
    for wave, names in enumerate((range(6), range(6, 11))):
        for i in names:
            story.notice(Folder.IMAGES, ChangeKind.CLOSED, save_picture(story.images / "burst" / f"b{i}.png", seed=20 + i))
        story.service.step()  # noticed; none due yet (the clock stands)
        assert (story.service._ingest.bulk is not None) == (wave == 1), wave
    story.run_until_idle()
    assert len(story.rows()) == 12
