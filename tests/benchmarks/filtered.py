"""Filtered search: ``EmbeddingStore.ranking`` with a folder filter matching 50%, 10%, 1% and 0.1% of
the rows, against the unfiltered search on the same table.

100,000 x 1024 clustered vectors (``search.make_vectors``) loaded by binary COPY with a folder and a path each, in
a nested tree as a photo library's (``2020`` holds ``2020/summer``, which holds
``2020/summer/beach``, which holds ``2020/summer/beach/day1``; beside them ``2020-old`` and ``2021``,
which no filter here may match), folders drawn at random, independently of the vectors. HNSW index
built; 200 queries top-10 per level. Recall against numpy's exact top-10 over the rows of that folder;
a ranking that holds fewer than min(10, matches) hits while it says it is complete is counted as
``filtered_short_unflagged`` (must be 0). Then a relevance floor that only five rows pass (10 queries,
at 10% and without a filter): the index's candidates come up short, so an exact search makes sure.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.common import Bench, Metric, Report, Section, Sizes, fresh_dir, pct, say
from tests.benchmarks.search import _copy_sql, make_vectors
from tests.support.files import write_config

K = 10
# (report suffix, fraction of the rows, the folder filter that matches them)
LEVELS: tuple[tuple[str, float, str], ...] = (
    ("50", 0.5, "2020"),
    ("10", 0.1, "2020/summer"),
    ("1", 0.01, "2020/summer/beach"),
    ("0_1", 0.001, "2020/summer/beach/day1"),
)


def library_folders(n: int, seed: int = 5) -> tuple[np.ndarray, list[str]]:
    """A uniform draw per row and its folder: the deepest level whose fraction the draw is below; the
    rest split between ``2020-old`` (whose name starts like ``2020``) and ``2021``."""
    draw = np.random.default_rng(seed).random(n)
    folders = np.where(draw < 0.75, "2020-old", "2021").astype(object)
    for _, fraction, folder in LEVELS:  # widest first, so each deeper level overwrites its share
        folders[draw < fraction] = folder
    return draw, [str(f) for f in folders]


def _copy_chunk(vectors: np.ndarray, folders: list[str], start: int) -> bytes:
    from image_search.store import EmbeddingRow, copy_binary

    return copy_binary([EmbeddingRow(f"/bench/images/{folders[i]}/v{i:06d}.jpg", f"v{i:06d}.jpg", f"h{i:06d}",
                                     f"/bench/processed/v{i:06d}.jpg.jpg", 1000 + i, 1_700_000_000_000_000_000 + i,
                                     "bench-vectors", vectors[i - start], folder=folders[i])
                        for i in range(start, start + len(vectors))])


# Each row's one path, its representative (no copies: a folder filter reads the rows' own folders).
PATHS_FILL = ("INSERT INTO image_paths (file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns, "
              "folder, copy) SELECT file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns, "
              "folder, FALSE FROM image_embeddings")


def _load(uri: str, vectors: np.ndarray, folders: list[str], out: Report) -> None:
    """The rows by binary COPY with the index dropped, then the index built (as search.py does)."""
    import psycopg2

    from image_search.store import HNSW_INDEX, hnsw_index_ddl

    conn = psycopg2.connect(uri)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
        started = time.perf_counter()
        for start in range(0, len(vectors), 10_000):
            data = _copy_chunk(vectors[start:start + 10_000], folders, start)
            with conn, conn.cursor() as cur:
                cur.copy_expert(_copy_sql(), io.BytesIO(data))
        with conn, conn.cursor() as cur:
            cur.execute(PATHS_FILL)
        say(f"filtered: loaded {len(vectors)} rows in {time.perf_counter() - started:.1f} s; building HNSW")
        started = time.perf_counter()
        with conn, conn.cursor() as cur:
            cur.execute("SET maintenance_work_mem = '2GB'")
            cur.execute("SET max_parallel_maintenance_workers = 1")
            cur.execute(hnsw_index_ddl(int(vectors.shape[1])))
            cur.execute("ANALYZE image_embeddings, image_paths")
        out["filtered_index_build_s"] = time.perf_counter() - started
        say(f"filtered: HNSW built in {out['filtered_index_build_s']:.1f} s")
    finally:
        conn.close()


def _timed(store, queries: np.ndarray) -> dict[str | None, tuple[list[float], list]]:
    """Each query's ranking and its milliseconds, unfiltered (key None) and at each level (its folder),
    after a few warm-up queries. Interleaved (one query at every level, then the next), so the shared
    machine's load falls on the unfiltered baseline and on the filtered searches alike."""
    from image_search.query import Filters

    filters = {None: Filters(), **{folder: Filters(folders=(folder,)) for _, _, folder in LEVELS}}
    for q in queries[: min(5, len(queries))]:
        for f in filters.values():
            store.ranking(q, K, filters=f)
    timed: dict[str | None, tuple[list[float], list]] = {key: ([], []) for key in filters}
    for q in queries:
        for key, f in filters.items():
            t = time.perf_counter()
            ranking = store.ranking(q, K, filters=f)
            timed[key][0].append((time.perf_counter() - t) * 1000)
            timed[key][1].append(ranking)
    return timed


def _measure_level(latencies: list[float], rankings: list, vectors: np.ndarray, queries: np.ndarray,
                   rows: np.ndarray, folder: str, suffix: str, out: Report) -> int:
    """One filter level's recall and p95 into ``out``; returns its unflagged short rankings."""
    sims = vectors[rows] @ queries.T
    exact = rows[np.argsort(-sims, axis=0, kind="stable")[:K].T]
    wanted = min(K, len(rows))
    recalls, short, incomplete = [], 0, 0
    for j, ranking in enumerate(rankings):
        found = {h.file_hash for h in ranking.hits}
        recalls.append(len(found & {f"h{i:06d}" for i in exact[j]}) / max(wanted, 1))
        short += len(ranking.hits) < wanted and ranking.completeness.complete
        incomplete += not ranking.completeness.complete
    out[f"filtered_recall_at_10_{suffix}"] = float(np.mean(recalls)) if wanted else 1.0
    out[f"filtered_p95_ms_{suffix}"] = pct(latencies, 95)
    out[f"filtered_p50_ms_{suffix}"] = pct(latencies, 50)
    out[f"filtered_matches_{suffix}"] = float(len(rows))
    out[f"filtered_incomplete_{suffix}"] = float(incomplete)
    say(f"filtered: {folder!r} ({len(rows)} rows): recall@10 {out[f'filtered_recall_at_10_{suffix}']:.3f}, "
        f"p50 {out[f'filtered_p50_ms_{suffix}']:.1f} ms, p95 {out[f'filtered_p95_ms_{suffix}']:.1f} ms, "
        f"short unflagged {short}, incomplete {incomplete}")
    return short


def _measure_floor(store, vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray, folder: str | None,
                   suffix: str, out: Report) -> int:
    """A floor that five of the rows pass (per query): the index's ten candidates hold only those five, so
    the answer is made sure by an exact search over every row that passes the filter. Returns the
    rankings that missed a row above the floor while saying they are complete."""
    from image_search.query import Filters

    filters = Filters(folders=(folder,)) if folder else Filters()
    latencies, wrong = [], 0
    for q in queries:
        sims = vectors[rows] @ q
        floor = float(np.sort(sims)[-5]) - 1e-6
        t = time.perf_counter()
        ranking = store.ranking(q, K, filters=filters, min_similarity=floor)
        latencies.append((time.perf_counter() - t) * 1000)
        wrong += ranking.completeness.complete and {h.file_hash for h in ranking.hits} != {
            f"h{i:06d}" for i in rows[sims >= floor]}
    out[f"floor_p95_ms_{suffix}"] = pct(latencies, 95)
    say(f"filtered: floor (5 above it), {folder or 'no filter'!r}: p50 {pct(latencies, 50):.0f} ms, "
        f"p95 {out[f'floor_p95_ms_{suffix}']:.0f} ms, wrong while complete {wrong}")
    return wrong


def measure_filtered(work: Path, sizes: Sizes) -> Report:
    import psycopg2

    from image_search.config import load_config
    from image_search.store import Database, EmbeddingStore

    n, nq = int(sizes["filtered_vectors"]), int(sizes["filtered_queries"])
    root = fresh_dir(work / "filtered")
    cfg = load_config(write_config(root, None, dimension=1024))
    vectors, queries = make_vectors(n, nq, clusters=int(sizes["filtered_clusters"]), seed=23)
    draw, folders = library_folders(n)
    database = Database(cfg)
    out: Report = {"filtered_vectors": n, "filtered_queries": nq}
    try:
        assert database.embedded is not None
        uri = database.embedded.uri
        database.open_store(dimension=1024).close()
        _load(uri, vectors, folders, out)
        # --quick's table is below the exact-search threshold: lower it there so the index path runs.
        store = EmbeddingStore(lambda: psycopg2.connect(uri), dimension=1024, ef_search=cfg.ef_search,
                               exact_search_below=min(cfg.exact_search_below, max(1, n // 2)))
        out["filtered_exact_search_below"] = float(store.exact_search_below)
        timed = _timed(store, queries)
        out["unfiltered_p95_ms"] = pct(timed[None][0], 95)
        out["unfiltered_p50_ms"] = pct(timed[None][0], 50)
        say(f"filtered: unfiltered p50 {out['unfiltered_p50_ms']:.1f} ms, p95 {out['unfiltered_p95_ms']:.1f} ms")
        short = 0
        for suffix, fraction, folder in LEVELS:
            short += _measure_level(*timed[folder], vectors, queries, np.flatnonzero(draw < fraction), folder,
                                    suffix, out)
        out["filtered_short_unflagged"] = float(short)
        floor_queries = queries[: int(sizes["filtered_floor_queries"])]
        wrong = _measure_floor(store, vectors, floor_queries, np.flatnonzero(draw < 0.1), "2020/summer", "10", out)
        wrong += _measure_floor(store, vectors, floor_queries, np.arange(n), None, "unfiltered", out)
        out["floor_wrong_while_complete"] = float(wrong)
        store.close()
    finally:
        database.close()
    return out


def run(bench: Bench) -> Report:
    return measure_filtered(bench.work, bench.sizes)


def _within_twice_unfiltered(value: float, report: Report) -> bool:
    return value <= 2 * float(report.get("unfiltered_p95_ms", 0.0))  # type: ignore[arg-type]


SECTION = Section(
    name="filtered",
    run=run,
    full_sizes={"filtered_vectors": 100_000, "filtered_clusters": 1000, "filtered_queries": 200,
                "filtered_floor_queries": 10},
    quick_sizes={"filtered_vectors": 3_000, "filtered_clusters": 100, "filtered_queries": 10,
                 "filtered_floor_queries": 3},
    metrics=(
        Metric("unfiltered search p95", "unfiltered_p95_ms", "{:.1f} ms"),
        *(metric for suffix, fraction, _ in LEVELS for metric in (
            Metric(f"filtered recall@10, {fraction:.1%} of rows", f"filtered_recall_at_10_{suffix}", "{:.3f}",
                   ">= 0.95", lambda v, r: v >= 0.95),
            Metric(f"filtered search p95, {fraction:.1%} of rows", f"filtered_p95_ms_{suffix}", "{:.1f} ms",
                   *(("<= 500 ms", lambda v, r: v <= 500) if fraction < 0.01
                     else ("<= 2x unfiltered", _within_twice_unfiltered))),
        )),
        Metric("short rankings not flagged incomplete", "filtered_short_unflagged", "{:.0f}", "0",
               lambda v, r: v == 0),
        Metric("floor search p95, 10% of rows (exact after the index)", "floor_p95_ms_10", "{:.0f} ms"),
        Metric("floor search p95, no filter (exact after the index)", "floor_p95_ms_unfiltered", "{:.0f} ms"),
        Metric("floor rankings missing a row while complete", "floor_wrong_while_complete", "{:.0f}", "0",
               lambda v, r: v == 0),
    ),
    report_keys=("unfiltered_p95_ms", *(f"filtered_{m}_{suffix}" for suffix, _, _ in LEVELS
                                       for m in ("recall_at_10", "p95_ms"))),
)
