#!/usr/bin/env python
"""Benchmark: our paths against the original tool's naive paths, side by side in one run.

    uv run python tests/benchmarks/run.py [--quick] [--json PATH] [--chart PATH] [--work-dir DIR]

Ratios matter more than absolute times: these machines are shared and noisy. Sections:

1. ingest  - N camera-size (4000x3000, q90, photo-like) JPEGs end to end: ``Indexer.index_folder``
   versus a one-at-a-time baseline written here that reproduces the original tool (full decode without
   draft, convert, LANCZOS resize, save, md5, one forward pass per image, one autocommitted INSERT per
   image), same embedded PostgreSQL, same tiny CLIP on the CPU.
2. search  - 100,000 x 1024 clustered vectors (low intrinsic dimension, see ``make_vectors``) loaded by
   binary COPY; 200 queries top-10 through ``EmbeddingStore.search`` (HNSW path), recall against exact
   numpy brute force; versus the original's full scan (every vector fetched as ``real[]`` and scored
   in numpy), timed on a few queries over the whole table (not scaled from a subsample).
3. service - the real ``image-search serve`` in a subprocess: query files dropped into inbox/ until
   their result folder appears, idle and during a 2,000-file ingest; restart with --no-cleanup on the
   unchanged files; VmRSS/VmHWM during the ingest and across three more ingests.

Generated images are cached under ``<work-dir>/cache`` (made once, reused by later runs). ``--quick``
shrinks every size so CI can run it as a smoke test; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from PIL import Image, ImageChops  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.support.files import write_config  # noqa: E402
from tests.support.model import save_tiny_clip  # noqa: E402

GEN_VERSION = 1  # bump when the generators change: the cache folder name follows it
CAMERA_SIZE = (4000, 3000)
SMALL_SIZE = (1280, 960)
QUERY_SIZE = (640, 480)
TINY_DIMENSION = 32

FULL = {"camera": 300, "vectors": 100_000, "clusters": 1000, "queries": 200, "fullscan_queries": 2,
        "service_files": 2000, "idle_drops": 30, "drop_gap_s": 1.0}
QUICK = {"camera": 12, "vectors": 3_000, "clusters": 100, "queries": 50, "fullscan_queries": 2,
         "service_files": 40, "idle_drops": 4, "drop_gap_s": 0.3}

REPORT_KEYS = (
    "ingest_images_per_s", "ingest_baseline_images_per_s", "ingest_speedup",
    "search_p50_ms", "search_p99_ms", "recall_at_10", "search_speedup_vs_full_scan",
    "drop_to_result_p50_ms", "drop_to_result_p95_ms_under_ingest",
    "rescan_unchanged_s", "ingest_s_first", "peak_rss_mb", "rss_growth_mb",
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# data: photo-like JPEGs
# --------------------------------------------------------------------------------------------------

def _base_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB picture: smooth colour regions, a sky-like gradient, mid-frequency texture
    and per-pixel sensor noise (so the JPEG is as hard to decode as a real photo's)."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    mid = Image.fromarray((rng.random((max(2, h // 12), max(2, w // 12), 3)) * 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(low, dtype=np.float32) * 0.7
    arr += np.linspace(60, -20, h, dtype=np.float32)[:, None, None]
    arr += (np.asarray(mid, dtype=np.float32) - 127.5) * 0.35
    arr += rng.standard_normal((h, w, 3), dtype=np.float32) * 5.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _noise_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 13, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _variant(base: Image.Image, noise: Image.Image, seed: int) -> Image.Image:
    """A cheap, unique variation of a base picture: shifted, maybe mirrored, colour-graded, fresh noise."""
    rng = np.random.default_rng(seed)
    w, h = base.size
    im = ImageChops.offset(base, int(rng.integers(0, w)), int(rng.integers(0, h)))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lut: list[int] = []
    for _ in range(3):
        gain, shift = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
        lut.extend(int(min(255, max(0, round(v * gain + shift)))) for v in range(256))
    im = im.point(lut)
    n = ImageChops.offset(noise, int(rng.integers(0, w)), int(rng.integers(0, h)))
    return ImageChops.add(im, n, scale=1.0, offset=-6)


def _save_atomic_jpeg(im: Image.Image, path: Path, quality: int = 90) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    im.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def ensure_jpegs(folder: Path, prefix: str, count: int, size: tuple[int, int], *, seed: int, bases: int) -> list[Path]:
    """``count`` JPEGs ``<prefix>_<i>.jpg`` in ``folder``; file i is always the same picture, so a
    quick run reuses a full run's cache and the reverse. Only missing files are generated."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}_{i:05d}.jpg" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if not missing:
        return paths
    started = time.monotonic()
    base_images = [_base_image(seed * 1000 + b, size) for b in range(bases)]
    noise = _noise_image(seed * 1000 + 999, size)

    def make(i: int) -> None:
        _save_atomic_jpeg(_variant(base_images[i % bases], noise, seed * 1_000_000 + i), paths[i])

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(make, missing))
    say(f"generated {len(missing)} {size[0]}x{size[1]} JPEGs in {folder.name}/ ({prefix}) "
        f"in {time.monotonic() - started:.1f} s")
    return paths


# --------------------------------------------------------------------------------------------------
# data: vectors
# --------------------------------------------------------------------------------------------------

def make_vectors(n: int, n_queries: int, *, dim: int = 1024, latent: int = 48, clusters: int = 1000,
                 seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors shaped like real image embeddings: a ``latent``-d Gaussian mixture (``clusters``
    centres, e.g. many photos of similar scenes) linearly embedded in ``dim`` dimensions plus small
    isotropic noise. Real CLIP embeddings have low intrinsic dimension; isotropic high-dimensional noise
    would make all neighbours nearly equidistant and any approximate index collapse (see the probes
    note: recall 0.2-0.3 on such data, 0.99+ on this kind). Queries are stored points slightly perturbed
    in the latent space - a query photo near photos already indexed."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32) * 1.0
    z = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, latent), dtype=np.float32)
    proj = (rng.standard_normal((latent, dim)) / math.sqrt(latent)).astype(np.float32)
    x = z @ proj + 0.02 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    picks = rng.choice(n, n_queries, replace=False)
    zq = z[picks] + 0.1 * rng.standard_normal((n_queries, latent), dtype=np.float32)
    q = zq @ proj + 0.02 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x.astype(np.float32), q.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def warm_page_cache(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 20):
                pass


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def machine_info() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {"cores": os.cpu_count(), "cpu_model": cpu, "gpu": None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - informative only
        pass
    try:
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    import PIL

    info["pillow"] = PIL.__version__
    info["python"] = sys.version.split()[0]
    return info


# --------------------------------------------------------------------------------------------------
# 1. ingest: ours vs the original one-at-a-time path
# --------------------------------------------------------------------------------------------------

def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    scale = min(box[0] / w, box[1] / h, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


_BASELINE_INSERT = """
INSERT INTO image_embeddings
    (file_path, file_name, file_hash, processed_path, source_size, source_mtime_ns, model_name, embedding)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (file_hash) DO NOTHING
"""


def baseline_ingest(paths: list[Path], *, cfg, embedder, uri: str) -> int:
    """The original tool, one image at a time: full decode (no draft), convert, resize, save, md5,
    one forward pass, one INSERT committed on its own. Returns the rows inserted."""
    import psycopg2
    from pgvector.psycopg2 import register_vector

    box = (cfg.resize_width, cfg.resize_height)
    conn = psycopg2.connect(uri)
    conn.autocommit = True
    register_vector(conn)
    inserted = 0
    try:
        with conn.cursor() as cur:
            for path in paths:
                st = path.stat()
                with Image.open(path) as im:
                    rgb = im.convert("RGB")  # decodes the full 4000x3000
                rgb = rgb.resize(_fit(rgb.size, box), Image.Resampling.LANCZOS)
                buffer = io.BytesIO()
                rgb.save(buffer, format="JPEG", quality=95)
                data = buffer.getvalue()
                file_hash = hashlib.md5(data).hexdigest()
                processed = cfg.processed_directory / (path.name + ".jpg")
                processed.write_bytes(data)
                vector = embedder.embed_images([rgb])[0]
                cur.execute(_BASELINE_INSERT, (str(path), path.name, file_hash, str(processed), st.st_size,
                                               st.st_mtime_ns, embedder.info.name, vector))
                inserted += cur.rowcount
    finally:
        conn.close()
    return inserted


def bench_ingest(work: Path, model_dir: Path, camera: list[Path]) -> dict[str, float]:
    from image_search.config import load_config
    from image_search.embed import Embedder
    from image_search.indexer import Indexer
    from image_search.store import Database

    root = fresh_dir(work / "ingest")
    cfg = load_config(write_config(root, model_dir, resize_width=1024, resize_height=1024, batch_size=16,
                                   settle_seconds=1.0))
    for p in camera:
        link_or_copy(p, cfg.source_directory / p.name)
    sources = sorted(cfg.source_directory.iterdir())
    embedder = Embedder.load(str(model_dir), device="cpu", dimension=TINY_DIMENSION)
    database = Database(cfg)
    try:
        store = database.open_store(dimension=embedder.dimension, model_name=cfg.model_name)
        assert database.embedded is not None

        say(f"ingest: baseline (one at a time) over {len(sources)} camera JPEGs")
        warm_page_cache(sources)
        started = time.perf_counter()
        inserted = baseline_ingest(sources, cfg=cfg, embedder=embedder, uri=database.embedded.uri)
        baseline_s = time.perf_counter() - started
        if inserted != len(sources):
            raise RuntimeError(f"baseline inserted {inserted} rows for {len(sources)} images")

        store.clear()
        fresh_dir(cfg.processed_directory)
        say("ingest: ours (Indexer.index_folder)")
        warm_page_cache(sources)
        indexer = Indexer(cfg, embedder, store)
        try:
            started = time.perf_counter()
            summary = indexer.index_folder(show_progress=False)
            ours_s = time.perf_counter() - started
        finally:
            indexer.close()
        if summary.embedded != len(sources) or store.count() != len(sources):
            raise RuntimeError(f"index_folder embedded {summary.embedded} of {len(sources)} images")
        store.close()
    finally:
        database.close()
    n = len(sources)
    return {
        "ingest_images": n,
        "ingest_s": ours_s,
        "ingest_baseline_s": baseline_s,
        "ingest_images_per_s": n / ours_s,
        "ingest_baseline_images_per_s": n / baseline_s,
        "ingest_speedup": baseline_s / ours_s,
    }


# --------------------------------------------------------------------------------------------------
# 2. search: HNSW through EmbeddingStore.search vs the original full scan
# --------------------------------------------------------------------------------------------------

_COPY = ("COPY image_embeddings (file_path, file_name, file_hash, processed_path, source_size, "
         "source_mtime_ns, model_name, embedding) FROM STDIN WITH (FORMAT binary)")


def _binary_copy_chunk(vectors: np.ndarray, start: int) -> bytes:
    """PostgreSQL binary COPY data for rows ``start..``: text fields as UTF-8, bigints big-endian,
    pgvector's binary vector (int16 dim, int16 unused, float4 big-endian each)."""
    out = io.BytesIO()
    out.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0))
    dim = vectors.shape[1]
    vec_header = struct.pack("!ihh", 4 + 4 * dim, dim, 0)
    big = vectors.astype(">f4")
    model = b"bench-vectors"
    for j in range(vectors.shape[0]):
        i = start + j
        name = f"v{i:06d}.jpg".encode()
        path = b"/bench/images/" + name
        fields = (path, name, f"h{i:06d}".encode(), b"/bench/processed/" + name + b".jpg")
        out.write(struct.pack("!h", 8))
        for f in fields:
            out.write(struct.pack("!i", len(f)))
            out.write(f)
        out.write(struct.pack("!iqiq", 8, 1000 + i, 8, 1_700_000_000_000_000_000 + i))
        out.write(struct.pack("!i", len(model)))
        out.write(model)
        out.write(vec_header)
        out.write(big[j].tobytes())
    out.write(struct.pack("!h", -1))
    return out.getvalue()


def full_scan_search(conn, query: np.ndarray, k: int) -> list[str]:
    """The original tool: fetch every stored vector, score all of them in numpy."""
    with conn.cursor() as cur:
        cur.execute("SELECT file_name, file_path, processed_path, file_hash, embedding::real[] FROM image_embeddings")
        rows = cur.fetchall()
    matrix = np.array([row[4] for row in rows], dtype=np.float32)
    sims = matrix @ query
    top = np.argsort(-sims, kind="stable")[:k]
    return [rows[i][3] for i in top]


def bench_search(work: Path, sizes: dict[str, int], quick: bool) -> dict[str, float]:
    import psycopg2

    from image_search.config import load_config
    from image_search.store import HNSW_INDEX, Database, EmbeddingStore, hnsw_index_ddl

    n, nq = sizes["vectors"], sizes["queries"]
    root = fresh_dir(work / "search")
    cfg = load_config(write_config(root, None, dimension=1024))
    started = time.perf_counter()
    vectors, queries = make_vectors(n, nq, clusters=sizes["clusters"])
    say(f"search: {n} x 1024 vectors generated in {time.perf_counter() - started:.1f} s")
    database = Database(cfg)
    out: dict[str, float] = {"search_vectors": n, "search_queries": nq}
    try:
        assert database.embedded is not None
        uri = database.embedded.uri
        # The store creates the table and its HNSW index; loading goes faster with the index dropped and
        # rebuilt afterwards (same name and definition as the store's schema).
        database.open_store(dimension=1024, model_name="bench-vectors").close()
        conn = psycopg2.connect(uri)
        with conn, conn.cursor() as cur:
            cur.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
        started = time.perf_counter()
        chunk = 10_000
        for start in range(0, n, chunk):
            data = _binary_copy_chunk(vectors[start:start + chunk], start)
            with conn, conn.cursor() as cur:
                cur.copy_expert(_COPY, io.BytesIO(data))
        out["search_load_s"] = time.perf_counter() - started
        say(f"search: loaded {n} rows by binary COPY in {out['search_load_s']:.1f} s; building HNSW")
        started = time.perf_counter()
        with conn, conn.cursor() as cur:
            cur.execute("SET maintenance_work_mem = '2GB'")
            cur.execute("SET max_parallel_maintenance_workers = 1")
            cur.execute(hnsw_index_ddl(1024))
            cur.execute("ANALYZE image_embeddings")
        out["search_index_build_s"] = time.perf_counter() - started
        say(f"search: HNSW built in {out['search_index_build_s']:.1f} s")

        # The path under test: EmbeddingStore.search with the configured ef_search. --quick's table is
        # below the exact-search threshold, so lower the threshold there to exercise the index path.
        conn_store = psycopg2.connect(uri)
        store = EmbeddingStore(conn_store, dimension=1024, model_name="bench-vectors", ef_search=cfg.ef_search,
                               exact_search_below=min(cfg.exact_search_below, max(1, n // 2)))
        out["search_uses_index"] = 1.0 if HNSW_INDEX in store.indexed_search_plan(queries[0], 10) else 0.0
        for q in queries[: min(10, nq)]:
            store.search(q, 10)  # warm-up: index pages into shared buffers
        latencies: list[float] = []
        found: list[list[str]] = []
        for q in queries:
            t = time.perf_counter()
            hits = store.search(q, 10)
            latencies.append((time.perf_counter() - t) * 1000)
            found.append([h.file_hash for h in hits])
        store.close()
        exact = np.argsort(-(vectors @ queries.T), axis=0, kind="stable")[:10].T
        recall = np.mean([len({f"h{i:06d}" for i in exact[j]} & set(found[j])) / 10 for j in range(nq)])
        out.update(search_p50_ms=pct(latencies, 50), search_p99_ms=pct(latencies, 99),
                   recall_at_10=float(recall), search_ef=float(cfg.ef_search))
        say(f"search: p50 {out['search_p50_ms']:.2f} ms, p99 {out['search_p99_ms']:.2f} ms, recall@10 {recall:.3f}")

        nf = sizes["fullscan_queries"]
        say(f"search: full scan (the original's fetch-everything), {nf} queries over all {n} rows")
        scan_ms: list[float] = []
        scan_agree = 0
        for j in range(nf):
            t = time.perf_counter()
            top = full_scan_search(conn, queries[j], 10)
            scan_ms.append((time.perf_counter() - t) * 1000)
            scan_agree += set(top) == {f"h{i:06d}" for i in exact[j]}
        conn.close()
        out["search_full_scan_p50_ms"] = pct(scan_ms, 50)
        out["search_full_scan_queries"] = float(nf)
        out["search_full_scan_matches_exact"] = scan_agree / nf
        out["search_speedup_vs_full_scan"] = out["search_full_scan_p50_ms"] / out["search_p50_ms"]
    finally:
        database.close()
    return out


# --------------------------------------------------------------------------------------------------
# 3. the service: drop-to-result latency, rescan, memory
# --------------------------------------------------------------------------------------------------

_KV = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")


def parse_log_line(line: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, value in _KV.findall(line):
        if value[:1] in "'\"" and value[-1:] == value[:1]:
            value = value[1:-1]
        fields[key] = value
    return fields


@dataclass
class LogEvent:
    t: float
    event: str
    fields: dict[str, str]


class ServiceProcess:
    """``image-search serve`` in a subprocess; its log lines parsed as they come, its memory sampled."""

    def __init__(self, config: Path, log_path: Path, *, no_cleanup: bool = True) -> None:
        exe = Path(sys.executable).with_name("image-search")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "image_search.cli"]
        cmd += ["serve", "--config", str(config)] + (["--no-cleanup"] if no_cleanup else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("JOURNAL_STREAM", None)
        self.events: list[LogEvent] = []
        self._lock = threading.Condition()
        self._log = open(log_path, "a", encoding="utf-8")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        self.rss_samples: list[tuple[float, float, float]] = []  # (t, VmRSS MB, VmHWM MB)
        self._stop_sampling = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            t = time.monotonic()
            self._log.write(line)
            fields = parse_log_line(line)
            with self._lock:
                self.events.append(LogEvent(t, fields.get("event", ""), fields))
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def memory_mb(self) -> tuple[float, float]:
        rss = hwm = float("nan")
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        return rss, hwm

    def _sample(self) -> None:
        while not self._stop_sampling.wait(0.2):
            rss, hwm = self.memory_mb()
            if not math.isnan(rss):
                self.rss_samples.append((time.monotonic(), rss, hwm))

    def count(self, event: str, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for e in self.events if e.event == event and e.t >= since)

    def wait_for(self, event: str, *, timeout: float, after: float = 0.0,
                 pred=lambda e: True) -> LogEvent:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for e in self.events:
                    if e.t >= after and e.event == event and pred(e):
                        return e
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited ({self.proc.returncode}) while waiting for {event}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no '{event}' from the service within {timeout:.0f} s")
                self._lock.wait(min(left, 0.5))

    def indexed_total(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(int(e.fields.get("embedded", 0)) + int(e.fields.get("relinked", 0))
                       + int(e.fields.get("duplicates", 0)) + int(e.fields.get("skipped", 0))
                       for e in self.events if e.event == "images_indexed" and e.t >= since)

    def removed_total(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(int(e.fields.get("count", 0)) for e in self.events if e.event == "rows_removed" and e.t >= since)

    def wait_indexed(self, n: int, *, since: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.indexed_total(since) < n:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited ({self.proc.returncode}) during the ingest")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.indexed_total(since)} of {n} images indexed in {timeout:.0f} s")
            with self._lock:
                self._lock.wait(0.2)
        with self._lock:
            done = [e.t for e in self.events if e.event == "images_indexed" and e.t >= since]
        return max(done) if done else time.monotonic()

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stop_sampling.set()
        self._reader.join(timeout=5)
        self._sampler.join(timeout=5)
        self._log.close()
        return code


def _bundles(output: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(output) if e.is_dir() and not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


def drop_query(src: Path, inbox: Path, output: Path, name: str, timeout: float = 120.0) -> float:
    """Copy ``src`` into inbox/ as ``name``; milliseconds until a new result folder with a .jsonl exists."""
    before = _bundles(output)
    started = time.perf_counter()
    shutil.copyfile(src, inbox / name)  # as `cp` does: create, write, close (close-after-write marks it complete)
    deadline = started + timeout
    while True:
        new = _bundles(output) - before
        for folder in new:
            if any(p.suffix == ".jsonl" for p in (output / folder).iterdir()):
                return (time.perf_counter() - started) * 1000
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no result for {name} within {timeout:.0f} s")
        time.sleep(0.002)


def _copy_all(files: list[Path], dest: Path) -> None:
    for src in files:
        shutil.copyfile(src, dest / src.name)


def _clear_folder(folder: Path) -> int:
    n = 0
    for entry in os.scandir(folder):
        if entry.is_file():
            os.unlink(entry.path)
            n += 1
    return n


def bench_service(work: Path, model_dir: Path, sets: list[list[Path]], queries: list[Path],
                  sizes: dict[str, int]) -> dict[str, object]:
    root = fresh_dir(work / "service")
    config = write_config(root, model_dir, resize_width=1024, resize_height=1024, batch_size=16, settle_seconds=1.0)
    images, inbox, output = root / "images", root / "inbox", root / "output"
    log_path = root / "service.log"
    n = len(sets[0])
    timeout = max(300.0, n * 0.5)
    out: dict[str, object] = {"service_files": n}
    qi = 0

    def next_query() -> Path:
        nonlocal qi
        qi += 1
        return queries[qi % len(queries)]

    # --- run 1: idle drops, then the first ingest with drops meanwhile -----------------------------
    say("service: run 1 (fresh state)")
    svc = ServiceProcess(config, log_path)
    try:
        ready = svc.wait_for("service_ready", timeout=300)
        out["service_startup_s"] = ready.t - svc.t0
        say(f"service: first ingest of {n} files, dropping queries meanwhile")
        mark = time.monotonic()
        copier = threading.Thread(target=_copy_all, args=(sets[0], images))
        copy_started = time.monotonic()
        copier.start()
        under: list[float] = []
        i = 0
        # A query counts as "under ingest" when it was dropped while the ingest was still running; the
        # first goes in at once, so even --quick's short ingest gets at least one.
        while svc.indexed_total(mark) < n:
            under.append(drop_query(next_query(), inbox, output, f"busy_{i:03d}.jpg"))
            i += 1
            time.sleep(sizes["drop_gap_s"])
        done = svc.wait_indexed(n, since=mark, timeout=timeout)
        copier.join()
        out["ingest_s_first"] = done - copy_started
        say(f"service: first ingest {out['ingest_s_first']:.1f} s; {len(under)} drops under ingest, "
            f"p95 {pct(under, 95):.0f} ms")
        hwm_first = max((s[2] for s in svc.rss_samples), default=float("nan"))
        rss_after_first = svc.memory_mb()[0]
        # Idle: the ingest is over, the index holds the files just ingested (an empty index would
        # answer faster than any real one).
        # Queries drop_gap_s (1 s) apart: the previous answer moved its query out of inbox/ (a rename out of a
        # watched folder), and watchdog holds such an unmatched IN_MOVED_FROM for 0.5 s while every later
        # event of that folder waits behind it; spacing them measures the service, not that hold-up.
        # Back to back (0.1 s apart) is measured separately below.
        time.sleep(1.0)
        idle: list[float] = []
        for i in range(sizes["idle_drops"]):
            time.sleep(sizes["drop_gap_s"])
            idle.append(drop_query(next_query(), inbox, output, f"idle_{i:03d}.jpg"))
        say(f"service: idle drop-to-result p50 {pct(idle, 50):.0f} ms over {len(idle)} queries")
        back_to_back: list[float] = []
        for i in range(sizes["idle_drops"] // 2):
            time.sleep(0.1)
            back_to_back.append(drop_query(next_query(), inbox, output, f"b2b_{i:03d}.jpg"))
        say(f"service: back-to-back drop-to-result p50 {pct(back_to_back, 50):.0f} ms")
    finally:
        code1 = svc.stop()
    if code1 != 0:
        raise RuntimeError(f"service run 1 exited with {code1}; see {log_path}")

    # --- run 2: restart on the unchanged folder, then three more ingests for memory growth -----------
    say("service: run 2 (restart with --no-cleanup on the unchanged files)")
    svc = ServiceProcess(config, log_path)
    try:
        rescan = svc.wait_for("rescan_complete", timeout=300)
        ready = svc.wait_for("service_ready", timeout=300)
        time.sleep(3.0)  # any re-indexing would show within a few batches
        reindexed = svc.indexed_total(svc.t0)
        out["rescan_unchanged_s"] = rescan.t - svc.t0
        out["rescan_scan_only_s"] = int(rescan.fields.get("duration_ms", "0")) / 1000
        out["rescan_queued"] = int(rescan.fields.get("queued", "-1"))
        out["rescan_reindexed"] = reindexed
        out["service_restart_ready_s"] = ready.t - svc.t0
        say(f"service: rescan done {out['rescan_unchanged_s']:.2f} s after start (scan alone "
            f"{out['rescan_scan_only_s']:.3f} s), {reindexed} images re-indexed")
        rss_after: list[float] = []
        for k, files in enumerate(sets[1:4], start=1):
            mark = time.monotonic()
            removed = _clear_folder(images)
            deadline = time.monotonic() + 120
            while svc.removed_total(mark) < removed and time.monotonic() < deadline:
                time.sleep(0.1)
            mark = time.monotonic()
            _copy_all(files, images)
            svc.wait_indexed(len(files), since=mark, timeout=timeout)
            time.sleep(1.0)
            rss_after.append(svc.memory_mb()[0])
            say(f"service: ingest {k + 1} done, VmRSS {rss_after[-1]:.0f} MB")
        hwm_all = max((s[2] for s in svc.rss_samples), default=float("nan"))
    finally:
        code2 = svc.stop()
    if code2 != 0:
        raise RuntimeError(f"service run 2 exited with {code2}; see {log_path}")

    out.update(
        drop_to_result_p50_ms=pct(idle, 50),
        drop_to_result_p95_ms=pct(idle, 95),
        drop_to_result_p50_ms_back_to_back=pct(back_to_back, 50),
        drop_gap_s=sizes["drop_gap_s"],
        drop_to_result_p50_ms_under_ingest=pct(under, 50),
        drop_to_result_p95_ms_under_ingest=pct(under, 95),
        drops_idle=len(idle),
        drops_under_ingest=len(under),
        peak_rss_mb=hwm_first,
        peak_rss_mb_all_ingests=max(hwm_first, hwm_all),
        rss_after_first_ingest_mb=rss_after_first,
        rss_after_ingests_mb=rss_after,
        rss_growth_mb=rss_after[-1] - rss_after[0],
        rescan_speedup=out["ingest_s_first"] / out["rescan_unchanged_s"],
    )
    return out


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

TARGETS = [  # (label, key, format, target text, check)
    ("ingest ours", "ingest_images_per_s", "{:.1f} img/s", "", None),
    ("ingest baseline", "ingest_baseline_images_per_s", "{:.1f} img/s", "", None),
    ("ingest speedup", "ingest_speedup", "{:.2f}x", ">= 4", lambda v, r: v >= 4),
    ("search p50", "search_p50_ms", "{:.2f} ms", "<= 10 ms", lambda v, r: v <= 10),
    ("search p99", "search_p99_ms", "{:.2f} ms", "", None),
    ("recall@10", "recall_at_10", "{:.3f}", ">= 0.95", lambda v, r: v >= 0.95),
    ("full scan p50", "search_full_scan_p50_ms", "{:.0f} ms", "", None),
    ("search speedup vs full scan", "search_speedup_vs_full_scan", "{:.0f}x", ">= 50", lambda v, r: v >= 50),
    ("drop-to-result p50 (idle)", "drop_to_result_p50_ms", "{:.0f} ms", "<= 300 ms", lambda v, r: v <= 300),
    ("drop-to-result p95 under ingest", "drop_to_result_p95_ms_under_ingest", "{:.0f} ms", "<= 2000 ms",
     lambda v, r: v <= 2000),
    ("first ingest (service)", "ingest_s_first", "{:.1f} s", "", None),
    ("rescan unchanged (from start)", "rescan_unchanged_s", "{:.2f} s", ">= 20x faster",
     lambda v, r: r["ingest_s_first"] / v >= 20),
    ("peak RSS (first ingest)", "peak_rss_mb", "{:.0f} MB", "", None),
    ("RSS growth (3 ingests)", "rss_growth_mb", "{:+.1f} MB", "<= 50 MB", lambda v, r: v <= 50),
]


def print_table(report: dict[str, object]) -> None:
    rows = []
    for label, key, fmt, target, check in TARGETS:
        value = report.get(key)
        shown = fmt.format(value) if isinstance(value, (int, float)) else "n/a"
        verdict = ""
        if check is not None and isinstance(value, (int, float)) and not report.get("quick"):
            verdict = "ok" if check(value, report) else "MISSED"
        rows.append((label, shown, target, verdict))
    widths = [max(len(r[i]) for r in rows + [("metric", "value", "target", "")]) for i in range(4)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format("metric", "value", "target", ""))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
    m = report.get("machine", {})
    print(f"\nmachine: {m.get('cores')} cores, {m.get('cpu_model')}, GPU: {m.get('gpu') or 'none'}"
          + ("  (--quick: sizes shrunk, verdicts not given)" if report.get("quick") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test for CI")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report here")
    parser.add_argument("--chart", type=Path, metavar="PATH", help="also draw the PNG chart here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench-out" / "work",
                        help="scratch and image cache (default: bench-out/work, gitignored)")
    parser.add_argument("--only", choices=["ingest", "search", "service"], action="append",
                        help="run only these sections (repeatable); the report then lacks the others' keys")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sections = set(args.only or ["ingest", "search", "service"])
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache" / f"v{GEN_VERSION}"
    started = time.monotonic()
    report: dict[str, object] = {"quick": args.quick, "sizes": sizes, "machine": machine_info(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    model_dir = work / "tiny-clip"
    if not (model_dir / "config.json").exists():
        fresh_dir(model_dir)
        save_tiny_clip(model_dir)

    if "ingest" in sections:
        camera = ensure_jpegs(cache / "camera", "cam", sizes["camera"], CAMERA_SIZE, seed=1, bases=4)
        report.update(bench_ingest(work, model_dir, camera))
    if "search" in sections:
        report.update(bench_search(work, sizes, args.quick))
    if "service" in sections:
        n = sizes["service_files"]
        sets = [ensure_jpegs(cache / "small", f"set{k}", n, SMALL_SIZE, seed=10 + k, bases=8) for k in range(4)]
        queries = ensure_jpegs(cache / "queries", "query", 20, QUERY_SIZE, seed=99, bases=4)
        report.update(bench_service(work, model_dir, sets, queries, sizes))
    report["duration_s"] = time.monotonic() - started

    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"report: {args.json}")
    if args.chart:
        from chart import draw_chart

        draw_chart(report, args.chart)
        print(f"chart: {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
