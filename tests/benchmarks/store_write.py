"""Writing rows: the indexer's way (``RowWriter``: binary COPY beside the caller, batches that wait
written together) inside ``bulk_load``, through to a searchable index, against the way rows were
written before (``execute_values`` with every vector as text, the HNSW index updated row by row), on
the same 1024-d rows in the indexer's batches (config key batch-size).

Also ``search_recall_during_bulk_load``: recall@10 of searches made between the batches of a bulk load,
against an exact search over every row committed at that moment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from tests.benchmarks.common import Bench, Metric, Report, Section, fresh_dir, say
from tests.benchmarks.search import make_vectors
from tests.support.files import write_config

# The INSERT the store used before binary COPY (d9f59a6), for the side-by-side baseline.
_UPSERT_AS_TEXT = """
INSERT INTO image_embeddings
    (file_path, file_name, file_hash, processed_path, source_size, source_mtime_ns, model_name, embedding)
VALUES %s
ON CONFLICT (file_hash) DO UPDATE SET
    file_path = EXCLUDED.file_path, file_name = EXCLUDED.file_name, processed_path = EXCLUDED.processed_path,
    source_size = EXCLUDED.source_size, source_mtime_ns = EXCLUDED.source_mtime_ns,
    model_name = EXCLUDED.model_name, embedding = EXCLUDED.embedding, updated_at = now()
"""
_DELETE_STALE = "DELETE FROM image_embeddings WHERE file_path = ANY(%s) AND NOT (file_hash = ANY(%s))"


def _rows(vectors: np.ndarray, tag: str) -> list:
    from image_search.store import EmbeddingRow

    return [EmbeddingRow(f"/bench/{tag}/{i}.jpg", f"{i}.jpg", f"{tag}{i:030d}", f"/bench/p/{tag}/{i}.jpg.jpg",
                         1000 + i, i, "bench", vectors[i]) for i in range(len(vectors))]


def _write_as_before(connect, rows: Sequence, batch: int) -> None:
    import psycopg2.extras
    from pgvector.psycopg2 import register_vector

    conn = connect()
    register_vector(conn)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        with conn, conn.cursor() as cur:
            cur.execute(_DELETE_STALE, ([r.file_path for r in chunk], [r.file_hash for r in chunk]))
            values = [(r.file_path, r.file_name, r.file_hash, r.processed_path, r.source_size, r.source_mtime_ns,
                       r.model_name, np.asarray(r.embedding, dtype=np.float32)) for r in chunk]
            psycopg2.extras.execute_values(cur, _UPSERT_AS_TEXT, values, page_size=len(values))
    conn.close()


def measure_store_write(bench: Bench) -> Report:
    from image_search.config import load_config
    from image_search.store import Database
    from image_search.store.writer import RowWriter

    n, batch = int(bench.sizes["store_rows"]), int(bench.sizes["store_batch"])
    cfg = load_config(write_config(fresh_dir(bench.work / "store-write"), None, dimension=1024))
    vectors, queries = make_vectors(2 * n, 20, clusters=max(10, n // 100))
    database = Database(cfg)
    out: Report = {"store_rows": n, "store_batch": batch}
    try:
        store = database.open_store(dimension=1024)
        store.clear()
        started = time.perf_counter()
        _write_as_before(database.connect, _rows(vectors[:n], "a"), batch)
        before = n / (time.perf_counter() - started)
        store.clear()
        _checkpoint(database)  # the way before's writes are flushed now, not during the measured load

        rows = _rows(vectors[n:], "b")
        recalls: list[float] = []
        looking = 0.0  # time spent on the recall probes, not counted as writing
        started = time.perf_counter()
        with store.bulk_load(n) as bulk:
            writer = RowWriter(store)  # as the indexer writes: a batch handed over, the writer beside
            try:
                for start in range(0, n, batch):
                    writer.submit(rows[start:start + batch], keys=())
                    if start // batch % max(1, n // batch // 10) == 0:  # ten looks during the load
                        probe = time.perf_counter()
                        writer.flush()  # what is committed now: every batch handed over so far
                        recalls.append(_recall(store, vectors[n:n + start + batch], queries, prefix="b"))
                        looking += time.perf_counter() - probe
                writer.flush()
                transactions = writer.transactions
            finally:
                writer.close()
        after = n / (time.perf_counter() - started - looking)
        store.close()
        out.update(store_rows_per_s_before=before, store_rows_per_s=after, store_speedup=after / before,
                   store_bulk_load=1.0 if bulk else 0.0, search_recall_during_bulk_load=float(np.mean(recalls)))
        say(f"store: {before:.0f} rows/s before, {after:.0f} rows/s now (bulk load {bool(bulk)}, {n // batch} batches "
            f"in {transactions} transactions, through the index build), {after / before:.1f}x; recall@10 during the load {out['search_recall_during_bulk_load']:.3f}")
    finally:
        database.close()
    return out


def _checkpoint(database) -> None:
    """Write every dirty page out (off the clock): the baseline's 16,000 HNSW insertions leave hundreds of
    MB of WAL behind, and the checkpoint they start otherwise runs during the next load (measured here:
    that load ran at 1,150 rows/s after the baseline, 1,600-1,800 alone)."""
    conn = database.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CHECKPOINT")
    finally:
        conn.close()


def _recall(store, committed: np.ndarray, queries: np.ndarray, *, prefix: str) -> float:
    """recall@10 of ``store.search`` against an exact search over the rows committed so far."""
    exact = np.argsort(-(committed @ queries.T), axis=0, kind="stable")[:10].T
    found = [{h.file_hash for h in store.search(q, 10)} for q in queries]
    return float(np.mean([len({f"{prefix}{i:030d}" for i in exact[j]} & found[j]) / min(10, len(committed))
                          for j in range(len(queries))]))


SECTION = Section(
    name="store",
    run=measure_store_write,
    full_sizes={"store_rows": 16_000, "store_batch": 16},
    quick_sizes={"store_rows": 1_200, "store_batch": 16},
    metrics=(
        Metric("rows written before (text, row by row into HNSW)", "store_rows_per_s_before", "{:.0f} rows/s"),
        Metric("rows written (binary COPY beside the caller, bulk index build)", "store_rows_per_s", "{:.0f} rows/s"),
        Metric("store write speedup", "store_speedup", "{:.1f}x", ">= 8", lambda v, r: v >= 8),
        Metric("recall@10 during a bulk load", "search_recall_during_bulk_load", "{:.3f}", ">= 0.98",
               lambda v, r: v >= 0.98),
    ),
    report_keys=("store_rows_per_s_before", "store_rows_per_s", "store_speedup", "search_recall_during_bulk_load"),
)
