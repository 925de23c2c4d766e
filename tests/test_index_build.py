"""The search index's build asks PostgreSQL for the memory its graph needs, not for an eighth of the machine:
a parallel build reserves all of it up front as one shared memory segment, which cost 0.3-0.4 s on an
empty table and fails outright where /dev/shm is small (Docker's default is 64 MB). There the build runs
serially, with a warning that says how to give the server room."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from image_search.store import BULK_LOAD_MIN_ROWS, EmbeddedPostgres, EmbeddingRow, EmbeddingStore
from image_search.store import schema
from image_search.store.embedded import PGSERVER_ROOT_USER
from tests.support import pgdata

DIM = 16


def test_the_memory_asked_for_is_twice_the_graph_of_the_rows_there() -> None:
    # 10,000 1024-d rows: a graph of about 30 MB (measured to fit in 32 MB, not in 24): 60 MB asked for.
    assert schema.build_memory_mb(10_000, 1024, workers=0) == 59
    assert schema.build_memory_mb(100_000, 1024, workers=1) == min(schema.memory_ceiling_mb(), 586)


def test_an_empty_or_small_table_gets_what_its_workers_need_and_no_more() -> None:
    # PostgreSQL leaves a parallel build fewer workers unless each participant, the leader too, has 32 MB.
    assert schema.build_memory_mb(0, 1024, workers=1) == 64
    assert schema.build_memory_mb(300, 16, workers=3) == 128
    assert schema.build_memory_mb(0, 1024, workers=0) == 32


def test_a_library_larger_than_the_ceiling_gets_the_ceiling(monkeypatch) -> None:
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 4 << 20}[name])  # 16 GB
    assert schema.memory_ceiling_mb() == 2048
    assert schema.build_memory_mb(5_000_000, 1024, workers=1) == 2048


@pytest.fixture
def server_with_small_shared_memory(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """The embedded server, started with a /dev/shm of 4 MB of its own (a mount namespace), as a container
    with little shared memory runs it; the service's code attaches to it as to a server already running."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the server's small /dev/shm is a tmpfs mounted in a mount namespace")
    pgdata.seed(tmp_path)
    data = tmp_path / "pgdata"
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_prefix_permissions

    pg_ctl = POSTGRES_BIN_PATH / "pg_ctl"
    start = (f"mount -t tmpfs -o size=4m tmpfs /dev/shm && exec runuser -u {PGSERVER_ROOT_USER} -- "
             f"{pg_ctl} -D {data} -w -l {data}/log -o '-h \"\" -k {data}' start")
    ensure_prefix_permissions(data)  # as pgserver does: its user may go through the folders above pgdata
    started = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", start],
                             capture_output=True, text=True, timeout=60)
    log = data / "log"
    assert started.returncode == 0, started.stdout + started.stderr + (log.read_text() if log.exists() else "")
    server = EmbeddedPostgres(data)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def _rows(n: int) -> list[EmbeddingRow]:
    vectors = np.random.default_rng(5).standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [EmbeddingRow(f"/img/{i}.png", f"{i}.png", f"h{i:08d}", f"/processed/{i}.png.jpg", 10, i, "m", vectors[i])
            for i in range(n)]


@pytest.mark.integration
def test_a_server_without_shared_memory_for_a_parallel_build_builds_the_index_serially(
        server_with_small_shared_memory: EmbeddedPostgres, monkeypatch) -> None:
    import psycopg2

    monkeypatch.setattr(schema, "default_worker_count", lambda: 2)  # a parallel build, whatever cores are here
    store = EmbeddingStore(lambda: psycopg2.connect(server_with_small_shared_memory.uri), dimension=DIM,
                           ef_search=40, exact_search_below=10)
    try:
        with capture_logs() as logs:
            store.create_table()  # the first start: the index over the empty table
            rows = _rows(BULK_LOAD_MIN_ROWS)
            with store.bulk_load(len(rows)) as bulk:  # a backlog: the index dropped, built again at the end
                assert bulk
                store.upsert(rows)
        assert store.index_valid()
        assert store.search(rows[7].embedding, 1)[0].file_hash == rows[7].file_hash
    finally:
        store.close()
    # The first start's build over the empty table is serial anyway: it reserves no shared memory.
    serial = [e for e in logs if e["event"] == "search_index_built_serially"]
    assert len(serial) == 1, logs
    assert "could not resize shared memory segment" in serial[0]["reason"], serial[0]
    assert "shm_size" in serial[0]["action"]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")
                or e["event"].startswith("search_index_build_failed")], logs
