#!/usr/bin/env python
"""Benchmark: several services sharing one PostgreSQL, and the database numbers the README's scaling
section is built on.

    uv run python -m tests.benchmarks.fleet [--quick] [--json PATH] [--work-dir DIR]

1. ingest  - the same folder of small PNGs dropped at once into a tree served by one, then by two real
   ``image-search serve`` processes on this machine, sharing a pgserver PostgreSQL reached through its
   socket directory; time from the drop until every row is there. On a CPU-only machine the two compete
   for the same cores, so the ratio shows the coordination's overhead, not a speed-up.
2. queries - drop-to-result p50: a query renamed into inbox/ until its result folder appears, with one and
   with two members attached.
3. claims  - ``claim`` + ``release`` of one batch (batch-size items) through the store, as the service does
   per batch, with two members registered: ``claim_overhead_ms``.
4. sizes   - 1024-d rows written through ``EmbeddingStore.upsert``: rows/s, table and HNSW (halfvec) index
   bytes per 100,000 rows (pg_total_relation_size, pg_relation_size), indexed search p50.

Nothing here asserts a timing (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.env import use_offline_hub

use_offline_hub()  # before anything imports transformers

import numpy as np  # noqa: E402

from tests.benchmarks.common import empty_trash, fresh_dir  # noqa: E402
from tests.support.files import save_picture, write_config  # noqa: E402
from tests.support.service import ServiceProcess  # noqa: E402
from tests.support.model import save_tiny_clip  # noqa: E402

FULL = {"images": 300, "image_size": (320, 240), "queries": 20, "claim_rounds": 300, "vectors": 20_000,
        "searches": 200}
QUICK = {"images": 16, "image_size": (64, 48), "queries": 2, "claim_rounds": 20, "vectors": 500, "searches": 10}
BATCH_SIZE = 8
LEASE_S = 5.0
TIMEOUT_S = 600.0

REPORT_KEYS = (
    "ingest_one_images_per_s", "ingest_two_images_per_s", "ingest_two_vs_one_ratio",
    "claim_overhead_ms", "drop_to_result_p50_ms_one_member", "drop_to_result_p50_ms_two_members",
    "upsert_rows_per_s_1024d", "table_mb_per_100k_rows_1024d", "hnsw_halfvec_mb_per_100k_rows_1024d",
    "search_p50_ms_hnsw",
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Shared:
    """The shared PostgreSQL (pgserver), reached through its socket directory like an external server."""

    def __init__(self, folder: Path) -> None:
        import pgserver

        self.server = pgserver.get_server(folder, cleanup_mode="stop")
        info = self.server.get_postmaster_info()
        self.host, self.port = str(info.socket_dir), info.port or 5432

    def config(self, root: Path, model_dir: Path, **overrides: object) -> Path:
        return write_config(root, model_dir, postgres_host=self.host, postgres_port=self.port, shared_index=True,
                            member_lease_seconds=LEASE_S, batch_size=BATCH_SIZE, top_k=3, **overrides)

    def scalar(self, sql: str, database: str = "postgres") -> Any:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user="postgres", dbname=database)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone()[0] if cur.description else None
        finally:
            conn.close()

    def rows(self) -> int:
        if not self.scalar("SELECT to_regclass('image_embeddings') IS NOT NULL"):
            return 0
        return int(self.scalar("SELECT count(*) FROM image_embeddings"))

    def close(self) -> None:
        self.server.cleanup()


def drop_query(source: Path, inbox: Path, output: Path, name: str) -> float:
    """Rename a query into the inbox; ms until its result folder is there."""
    tmp = inbox / f".{name}.part"
    shutil.copyfile(source, tmp)
    started = time.perf_counter()
    os.rename(tmp, inbox / name)
    stem = Path(name).stem
    wait_until(lambda: any((b / f"{stem}.query.png").is_file() for b in output.iterdir() if not b.name.startswith(".")),
               f"the result of {name}")
    return (time.perf_counter() - started) * 1000


def bench_services(work: Path, shared: Shared, model_dir: Path, staged: list[Path], members: int,
                   queries: int) -> dict[str, float]:
    """``members`` services on one fresh tree: ingest of the staged images, then queries one at a time."""
    root = fresh_dir(work / f"tree-{members}")  # an earlier run's tree is put aside, deleted at the end
    config = shared.config(root, model_dir)
    services = [ServiceProcess(config, log_path=root / f"service-{i}.log") for i in range(members)]
    try:
        for s in services:
            s.wait_ready(timeout=TIMEOUT_S)
        started = time.perf_counter()
        for f in staged:
            os.link(f, root / "images" / f.name)  # appears complete: a hard link is one step
        wait_until(lambda: shared.rows() >= len(staged), f"{len(staged)} rows")
        ingest_s = time.perf_counter() - started
        latencies = [drop_query(staged[i], root / "inbox", root / "output", f"q{i:03d}.png") for i in range(queries)]
    finally:
        codes = [s.stop() for s in services]
    embedded = sum(e.get("embedded", 0) for s in services for e in s.events("images_indexed"))
    say(f"{members} member(s): {len(staged)} images in {ingest_s:.2f} s ({len(staged) / ingest_s:.1f}/s), "
        f"embedded {embedded} in all, drop-to-result p50 {statistics.median(latencies):.0f} ms, exit codes {codes}")
    if embedded != len(staged):
        # A member that outlived its stop was aborted: its log ends with every thread's stack.
        tails = "".join(f"\n--- service-{i}.log, exit code {code}, its end:\n{s.log_text()[-6000:]}"
                        for i, (s, code) in enumerate(zip(services, codes)) if code != 0)
        raise RuntimeError(f"{embedded} embeddings for {len(staged)} images: the work was not shared cleanly{tails}")
    return {"ingest_s": ingest_s, "images_per_s": len(staged) / ingest_s,
            "drop_to_result_p50_ms": statistics.median(latencies)}


def bench_claims(shared: Shared, rounds: int) -> dict[str, float]:
    """claim + release of one batch, as ``_index_one_batch`` does; and a claim refused (another holds it)."""
    from image_search.config import load_config
    from image_search.store import Database, FleetClaims, FleetRegistry

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(shared.config(Path(tmp), None))
        database = Database(cfg)
        registries = [FleetRegistry(database.connect) for _ in range(2)]
        ours, theirs = (r.join(host="bench", pid=i, model_name="bench", dimension=cfg.dimension, lease_s=LEASE_S).member
                        for i, r in enumerate(registries))
        store = database.open_store(dimension=cfg.dimension, create_table=False)
        claims = FleetClaims(store.session)
        try:
            granted_ms, refused_ms = [], []
            for n in range(rounds):
                items = [f"image:/bench/{n}/{i}.png" for i in range(BATCH_SIZE)]
                t = time.perf_counter()
                claims.claim(ours.id, items, LEASE_S)
                claims.release(ours.id, items)
                granted_ms.append((time.perf_counter() - t) * 1000)
                claims.claim(theirs.id, items, LEASE_S)
                t = time.perf_counter()
                claims.claim(ours.id, items, LEASE_S)
                refused_ms.append((time.perf_counter() - t) * 1000)
                claims.release(theirs.id, items)
        finally:
            store.close()
            for r, m in zip(registries, (ours, theirs)):
                r.leave(m.id, LEASE_S, empty_table=False)
                r.close()
    out = {"claim_overhead_ms": statistics.median(granted_ms), "claim_refused_ms": statistics.median(refused_ms)}
    say(f"claims: claim+release of {BATCH_SIZE} items p50 {out['claim_overhead_ms']:.2f} ms; "
        f"a refused claim {out['claim_refused_ms']:.2f} ms")
    return out


def bench_sizes(shared: Shared, n: int, searches: int) -> dict[str, float]:
    """1024-d rows through the store's own upsert into a database of their own; sizes and search p50."""
    from image_search.config import load_config
    from image_search.store import HNSW_INDEX, Database, EmbeddingRow

    dim, chunk = 1024, 500
    shared.scalar("DROP DATABASE IF EXISTS sizes")
    shared.scalar("CREATE DATABASE sizes")
    rng = np.random.default_rng(3)
    # Clustered, low intrinsic dimension like real image embeddings (HNSW behaves as it would on them).
    centres = rng.normal(size=(max(10, n // 100), 48)).astype(np.float32)
    mix = rng.normal(size=(48, dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(shared.config(Path(tmp), None, postgres_database="sizes", dimension=dim))
        database = Database(cfg)
        store = database.open_store(dimension=dim)
        try:
            write_s = 0.0
            for start in range(0, n, chunk):
                latent = centres[rng.integers(0, len(centres), chunk)] + 0.3 * rng.normal(size=(chunk, 48))
                vectors = (latent @ mix).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                rows = [EmbeddingRow(file_path=f"/img/{start + i}.png", file_name=f"{start + i}.png",
                                     file_hash=f"h{start + i:08d}", processed_path=f"/p/{start + i}.jpg", source_size=1,
                                     source_mtime_ns=1, model_name="bench", embedding=v)
                         for i, v in enumerate(vectors[: min(chunk, n - start)])]
                t = time.perf_counter()
                store.upsert(rows)  # the HNSW index is maintained as rows arrive, as in the service
                write_s += time.perf_counter() - t
            shared.scalar("VACUUM ANALYZE image_embeddings", database="sizes")
            table = shared.scalar("SELECT pg_total_relation_size('image_embeddings') - "
                                  f"pg_relation_size('{HNSW_INDEX}')", database="sizes")
            index = shared.scalar(f"SELECT pg_relation_size('{HNSW_INDEX}')", database="sizes")
            store.exact_search_below = 1  # through the index
            queries = vectors[:searches] + 0.01
            for q in queries[:10]:
                store.search(q / np.linalg.norm(q), 10)
            latencies = []
            for q in queries:
                t = time.perf_counter()
                store.search(q / np.linalg.norm(q), 10)
                latencies.append((time.perf_counter() - t) * 1000)
        finally:
            store.close()
            database.close()
    per_100k = 100_000 / n / 2**20
    out = {"upsert_rows_per_s_1024d": n / write_s, "table_mb_per_100k_rows_1024d": table * per_100k,
           "hnsw_halfvec_mb_per_100k_rows_1024d": index * per_100k, "search_p50_ms_hnsw": statistics.median(latencies),
           "size_rows": float(n)}
    say(f"sizes: {n} rows x 1024 at {out['upsert_rows_per_s_1024d']:.0f} rows/s; per 100k rows: table "
        f"{out['table_mb_per_100k_rows_1024d']:.0f} MB, HNSW {out['hnsw_halfvec_mb_per_100k_rows_1024d']:.0f} MB; "
        f"search p50 {out['search_p50_ms_hnsw']:.2f} ms")
    return out


def run(*, quick: bool = False, work_dir: Path | None = None) -> dict[str, Any]:
    """Every section; returns the report (REPORT_KEYS and a few more)."""
    sizes = QUICK if quick else FULL
    work = Path(work_dir or tempfile.mkdtemp(prefix="fleet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tiny-clip"
    if not (model_dir / "config.json").is_file():
        save_tiny_clip(model_dir)
    staged_dir = work / f"staged-{sizes['images']}-{sizes['image_size'][0]}"
    staged = sorted(staged_dir.glob("*.png"))
    if len(staged) != sizes["images"]:
        shutil.rmtree(staged_dir, ignore_errors=True)
        staged = [save_picture(staged_dir / f"img-{i:04d}.png", seed=20_000 + i, size=sizes["image_size"])
                  for i in range(sizes["images"])]
    shutil.rmtree(work / "pg", ignore_errors=True)
    shared = Shared(work / "pg")
    report: dict[str, Any] = {"quick": quick, "sizes": {k: v for k, v in sizes.items()}, "cores": os.cpu_count(),
                              "batch_size": BATCH_SIZE, "lease_s": LEASE_S}
    try:
        one = bench_services(work, shared, model_dir, staged, 1, sizes["queries"])
        two = bench_services(work, shared, model_dir, staged, 2, sizes["queries"])
        report.update(ingest_one_images_per_s=one["images_per_s"], ingest_two_images_per_s=two["images_per_s"],
                      ingest_two_vs_one_ratio=two["images_per_s"] / one["images_per_s"],
                      drop_to_result_p50_ms_one_member=one["drop_to_result_p50_ms"],
                      drop_to_result_p50_ms_two_members=two["drop_to_result_p50_ms"])
        report.update(bench_claims(shared, sizes["claim_rounds"]))
        report.update(bench_sizes(shared, sizes["vectors"], sizes["searches"]))
    finally:
        shared.close()
    empty_trash(work)  # once nothing is measured any more (see common.TRASH_MARK)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (kept; generated images are reused)")
    args = parser.parse_args(argv)
    report = run(quick=args.quick, work_dir=args.work_dir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
