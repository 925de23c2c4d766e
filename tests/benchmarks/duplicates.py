"""Duplicates: how well the report finds planted groups, and how long it takes over 100,000 rows.

1. Real files, copy and near-copy: photo-like scenes (tests/support/derived.py), each saved again in
   every way of ``DERIVATIONS`` (JPEG quality 50 and 95, half size, PNG, WebP, HEIC, AVIF, stripped
   EXIF, turned pixels with an orientation flag), some files also copied byte for byte under a second
   name; bursts (three shots of a scene, the camera moved by 1-3 % of the frame) and distinct scenes as
   negatives. Each file is hashed as ingest hashes it (``preprocess_image``), copies are the same
   bytes (their ``source_identity``), and ``duplicates.find_groups`` groups them. Precision and recall
   are over pairs: of the pairs put in one group, how many were planted together, and the reverse.
2. ``duplicates_s_100k``: ``duplicates.write_report`` end to end (read the rows, group all three
   kinds, write duplicates.jsonl, the sheets and summary.json) over 100,000 synthetic rows loaded by
   binary COPY: planted near-copy groups (hashes 0-4 bits apart, one embedding slightly varied), bursts
   (hashes 16-60 bits apart, embeddings cosine ~0.95, taken seconds apart), copies (extra paths: today
   one row holds one path, so copy groups appear once the store keeps every path of a content) and
   distinct rows; 10 % undated. ``similar`` is judged on these planted embeddings only: the tests'
   model has random weights, so a real model's retakes cannot be measured here.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from tests.benchmarks.common import Bench, Metric, Report, Section, Sizes, fresh_dir, say
from tests.support.files import write_config

BOX = (1024, 1024)
PIXEL_LIMIT = 178_956_970
SCENE_SIZE = (800, 600)
GEN_VERSION = 1  # bump when the planted files change: the cache folder name follows it


def _pair_scores(predicted: list[set[int]], planted: list[set[int]]) -> tuple[float, float]:
    """Pairwise precision and recall of ``predicted`` groups against ``planted`` ones (items as ints)."""
    def pairs(groups: list[set[int]]) -> set[tuple[int, int]]:
        return {pair for group in groups for pair in itertools.combinations(sorted(group), 2)}

    got, want = pairs(predicted), pairs(planted)
    precision = len(got & want) / len(got) if got else 1.0
    recall = len(got & want) / len(want) if want else 1.0
    return precision, recall


def _planted_files(folder: Path, scenes: int, bursts: int, distinct: int) -> tuple[list[Path], dict[Path, str]]:
    """The planted files (made once into the cache) and each file's planted group ('' for none)."""
    from tests.support.derived import DERIVATIONS, burst, save_derived, scene

    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    group: dict[Path, str] = {}
    for s in range(scenes):
        for name, (suffix, _) in DERIVATIONS.items():
            group[folder / f"s{s:04d}-{name}{suffix}"] = f"near{s}"
        jobs.append(lambda s=s: save_derived(folder, f"s{s:04d}", scene(s, SCENE_SIZE)))
    for b in range(bursts):
        for shot in range(3):
            path = folder / f"b{b:04d}-{shot}.jpg"
            group[path] = f"burst{b}"
            jobs.append(lambda b=b, shot=shot, path=path: burst(50_000 + b, shot, SCENE_SIZE).save(path, quality=90))
    for d in range(distinct):
        path = folder / f"d{d:04d}.jpg"
        group[path] = ""
        jobs.append(lambda d=d, path=path: scene(90_000 + d, SCENE_SIZE).save(path, quality=90))
    if not all(p.exists() for p in group):
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda job: job(), jobs))
        say(f"duplicates: generated {len(group)} planted files in {time.monotonic() - started:.0f} s")
    return sorted(group), group


def measure_real_files(bench: Bench, sizes: Sizes) -> Report:
    from image_search.duplicates import Kind, Thresholds, find_groups
    from image_search.config import Config
    from image_search.preprocess import preprocess_image
    from image_search.store.duplicates import StoredPicture

    scenes, bursts, distinct = int(sizes["dup_scenes"]), int(sizes["dup_bursts"]), int(sizes["dup_distinct"])
    folder = bench.cache / f"duplicates-v{GEN_VERSION}"
    paths, planted_group = _planted_files(folder, scenes, bursts, distinct)
    started = time.monotonic()

    def stored(path: Path) -> StoredPicture:
        prepared = preprocess_image(path, max_size=BOX, max_pixels=PIXEL_LIMIT)
        meta = prepared.metadata
        return StoredPicture(prepared.file_hash, (str(path),), str(path), prepared.phash, meta.width if meta else None,
                             meta.height if meta else None, path.stat().st_size, meta.format if meta else None, None, None)

    with ThreadPoolExecutor(max_workers=2) as pool:
        pictures = list(pool.map(stored, paths))
    say(f"duplicates: {len(paths)} planted files hashed as ingest does in {time.monotonic() - started:.0f} s")
    # Copies: every 5th scene's original also under a second name (same bytes: one content, two paths).
    copied = {p.file_hash for p, path in zip(pictures, paths) if path.name.endswith("-original.jpg")
              and int(path.name[1:5]) % 5 == 0}
    pictures = [StoredPicture(**{**p.__dict__, "paths": (*p.paths, p.paths[0] + ".copy.jpg")})
                if p.file_hash in copied else p for p in pictures]
    index = {p.paths[0]: i for i, p in enumerate(pictures)}
    groups = find_groups(pictures, None, [Kind.COPY, Kind.NEAR_COPY], Thresholds.of(Config()))
    near = [{index[m.file_path] for m in g.members} for g in groups if g.kind is Kind.NEAR_COPY]
    planted: dict[str, set[int]] = {}
    for path in paths:
        if planted_group[path].startswith("near"):
            planted.setdefault(planted_group[path], set()).add(index[str(path)])
    near_p, near_r = _pair_scores(near, list(planted.values()))
    # A copy group's members are paths: numbered apart from the contents.
    path_number = {path: n for n, path in enumerate(sorted(path for p in pictures for path in p.paths))}
    copies = [{path_number[m.file_path] for m in g.members} for g in groups if g.kind is Kind.COPY]
    planted_copies = [{path_number[path] for path in p.paths} for p in pictures if len(p.paths) > 1]
    copy_p, copy_r = _pair_scores(copies, planted_copies)
    say(f"duplicates: near-copy precision {near_p:.4f} recall {near_r:.4f} ({len(planted)} planted groups of "
        f"{len(planted[next(iter(planted))])}, {bursts} bursts of 3 and {distinct} distinct as negatives); "
        f"copy precision {copy_p:.4f} recall {copy_r:.4f}")
    return {"duplicates_files": len(paths), "near_copy_precision": near_p, "near_copy_recall": near_r,
            "copy_precision": copy_p, "copy_recall": copy_r}


def _flip(rng: np.random.Generator, value: int, bits: int) -> int:
    from image_search.phash import HASH_BITS

    for bit in rng.choice(HASH_BITS, size=bits, replace=False).tolist():
        value ^= 1 << bit
    return value


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_rows(n: int, dim: int, groups: int, seed: int = 7):
    """``n`` rows: ``groups`` near-copy groups of 2-5 (hashes 0-4 bits apart, embeddings cosine ~0.995,
    one date or none), ``groups`` bursts of 3 (hashes 16-60 bits from the first shot, cosine ~0.95,
    seconds apart), the rest distinct (random hashes and embeddings, dates over five years, 10 %
    undated). Returns (rows as (name, phash, embedding, taken_at, width, height), planted near-copy
    groups, planted burst groups) with groups as sets of row numbers."""
    rng = np.random.default_rng(seed)
    start = datetime(2019, 1, 1, tzinfo=timezone.utc)
    rows: list[tuple] = []
    near: list[set[int]] = []
    bursts: list[set[int]] = []

    def random_hash() -> int:
        return int.from_bytes(rng.bytes(32), "big") >> 1

    def when() -> datetime | None:
        return None if rng.random() < 0.1 else start + timedelta(seconds=float(rng.uniform(0, 5 * 365 * 86400)))

    for _ in range(groups):
        base, vector, taken = random_hash(), rng.standard_normal(dim), when()
        members = set()
        for k in range(int(rng.integers(2, 6))):
            members.add(len(rows))
            size = (4000, 3000) if k == 0 else (2000, 1500)
            rows.append((_flip(rng, base, int(rng.integers(0, 5))), _unit(vector + 0.1 * rng.standard_normal(dim)),
                         taken if rng.random() < 0.7 else None, *size))
        near.append(members)
    for _ in range(groups):
        base, vector = random_hash(), rng.standard_normal(dim)
        taken = start + timedelta(seconds=float(rng.uniform(0, 5 * 365 * 86400)))
        shots = set()
        for shot in range(3):
            shots.add(len(rows))
            rows.append((base if shot == 0 else _flip(rng, base, int(rng.integers(16, 61))),
                         _unit(vector + 0.3 * rng.standard_normal(dim)), taken + timedelta(seconds=shot * 2.5),
                         4000, 3000))
        bursts.append(shots)
    while len(rows) < n:
        rows.append((random_hash(), _unit(rng.standard_normal(dim)), when(), 4000, 3000))
    return rows[:n], near, bursts


def _load(store, rows, chunk: int = 5000) -> None:
    from image_search.metadata import PictureMetadata
    from image_search.store import EmbeddingRow

    for first in range(0, len(rows), chunk):
        store.upsert([EmbeddingRow(f"/bench/images/r{i:06d}.jpg", f"r{i:06d}.jpg", f"h{i:06d}",
                                   f"/bench/processed/r{i:06d}.jpg.jpg", 2_000_000 + i, i, "bench", vector,
                                   PictureMetadata(width, height, "jpeg", taken, True), "", phash)
                      for i, (phash, vector, taken, width, height) in enumerate(rows[first:first + chunk], start=first)])


def measure_100k(bench: Bench, sizes: Sizes) -> Report:
    import json

    from image_search.config import load_config
    from image_search.duplicates import REPORT, SUMMARY, write_report
    from image_search.store import Database
    from tests.support.files import read_jsonl

    n, dim, planted = int(sizes["dup_rows"]), 1024, int(sizes["dup_planted"])
    root = fresh_dir(bench.work / "duplicates")
    cfg = load_config(write_config(root, None, dimension=dim, **{"similar-min-similarity": 0.9}))
    started = time.monotonic()
    rows, near, bursts = synthetic_rows(n, dim, planted)
    say(f"duplicates: {n} synthetic rows made in {time.monotonic() - started:.0f} s")
    database = Database(cfg)
    try:
        store = database.open_store(dimension=dim)
        store.create_table()
        bulk = store.begin_bulk_load(n)  # the rows land without the search index, which the report never uses
        started = time.monotonic()
        _load(store, rows)
        if bulk is not None:
            bulk.abandon()  # no index build: minutes spent on nothing measured here
        say(f"duplicates: loaded in {time.monotonic() - started:.0f} s; writing the report")
        del rows
        started = time.perf_counter()
        report = write_report(cfg, store)
        elapsed = time.perf_counter() - started
        store.close()
    finally:
        database.close()
    lines = read_jsonl(report / REPORT)
    number = {f"/bench/images/r{i:06d}.jpg": i for i in range(n)}
    found = {kind: [{number[m["file_path"]] for m in line["members"]} for line in lines if line["kind"] == kind]
             for kind in ("near-copy", "similar")}
    near_p, near_r = _pair_scores(found["near-copy"], near)
    similar_p, similar_r = _pair_scores(found["similar"], near + bursts)
    summary = json.loads((report / SUMMARY).read_text())
    say(f"duplicates: report over {n} rows in {elapsed:.1f} s ({summary['groups']}, {summary['sheets']} sheets); "
        f"near-copy precision {near_p:.4f} recall {near_r:.4f}; similar (planted embeddings, not a model's: "
        f"cannot be judged on random test weights) precision {similar_p:.4f} recall {similar_r:.4f}")
    return {"duplicates_rows": n, "duplicates_s_100k": elapsed, "synthetic_near_copy_precision": near_p,
            "synthetic_near_copy_recall": near_r, "synthetic_similar_precision": similar_p,
            "synthetic_similar_recall": similar_r, "duplicates_sheets": summary["sheets"]}


def run(bench: Bench) -> Report:
    return {**measure_real_files(bench, bench.sizes), **measure_100k(bench, bench.sizes)}


SECTION = Section(
    name="duplicates",
    run=run,
    full_sizes={"dup_scenes": 120, "dup_bursts": 60, "dup_distinct": 300, "dup_rows": 100_000, "dup_planted": 2000},
    quick_sizes={"dup_scenes": 6, "dup_bursts": 4, "dup_distinct": 10, "dup_rows": 3000, "dup_planted": 100},
    metrics=(
        Metric("near-copy precision (files)", "near_copy_precision", "{:.4f}", ">= 0.995", lambda v, r: v >= 0.995),
        Metric("near-copy recall (files)", "near_copy_recall", "{:.4f}", ">= 0.98", lambda v, r: v >= 0.98),
        Metric("copy precision (files)", "copy_precision", "{:.4f}", ">= 0.995", lambda v, r: v >= 0.995),
        Metric("copy recall (files)", "copy_recall", "{:.4f}", ">= 0.98", lambda v, r: v >= 0.98),
        Metric("duplicates report, 100k rows", "duplicates_s_100k", "{:.1f} s", "<= 120 s", lambda v, r: v <= 120),
        Metric("similar precision (planted embeddings)", "synthetic_similar_precision", "{:.4f}", "not judged"),
        Metric("similar recall (planted embeddings)", "synthetic_similar_recall", "{:.4f}", "not judged"),
    ),
    report_keys=("near_copy_precision", "near_copy_recall", "copy_precision", "copy_recall", "duplicates_s_100k"),
)
