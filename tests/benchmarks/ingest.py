"""Ingest: camera-size JPEGs end to end, ``Indexer.index_folder`` against the original tool's path.

N camera-size (4000x3000, q90, photo-like; 1600x1200 with --quick) JPEGs go through ``Indexer.index_folder`` and through a
one-at-a-time baseline written here that reproduces the original tool (full decode without draft,
convert, LANCZOS resize, save, md5, one forward pass per image, one autocommitted INSERT per image);
same embedded PostgreSQL, same tiny CLIP on the CPU.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

from PIL import Image

# The same box fit as our path, so that both paths make processed copies of the same size.
from image_search.preprocess import fit_inside
from tests.benchmarks.common import Bench, Metric, Report, Section, fresh_dir, link_or_copy, say, warm_page_cache
from tests.benchmarks.photos import ensure_jpegs
from tests.support.db import make_legacy_identity
from tests.support.files import emptied_on_purpose, write_config
from tests.support.model import TINY_DIMENSION

CAMERA_ASPECT = (4, 3)

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
                rgb = rgb.resize(fit_inside(rgb.size, box), Image.Resampling.LANCZOS)
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


def measure_ingest(work: Path, model_dir: Path, camera: list[Path]) -> Report:
    from image_search.config import load_config
    from image_search.embed import Embedder
    from image_search.indexer import Indexer
    from image_search.store import Database
    from image_search.sync import migrate_identities

    root = fresh_dir(work / "ingest")
    cfg = load_config(write_config(root, model_dir, resize_width=1024, resize_height=1024, batch_size=16,
                                   settle_seconds=1.0))
    for p in camera:
        link_or_copy(p, cfg.source_directory / p.name)
    sources = sorted(cfg.source_directory.iterdir())
    embedder = Embedder.load(str(model_dir), device="cpu", dimension=TINY_DIMENSION)
    database = Database(cfg)
    try:
        store = database.open_store(dimension=embedder.dimension)
        assert database.embedded is not None

        say(f"ingest: baseline (one at a time) over {len(sources)} camera JPEGs")
        warm_page_cache(sources)
        started = time.perf_counter()
        inserted = baseline_ingest(sources, cfg=cfg, embedder=embedder, uri=database.embedded.uri)
        baseline_s = time.perf_counter() - started
        if inserted != len(sources):
            raise RuntimeError(f"baseline inserted {inserted} rows for {len(sources)} images")

        store.clear()
        emptied_on_purpose(fresh_dir(cfg.processed_directory))
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
        # A database of the earlier identity (MD5 of the processed JPEG), migrated: every source read
        # and hashed once, against embedding them all again.
        make_legacy_identity(database)
        warm_page_cache(sources)
        started = time.perf_counter()
        rewritten = migrate_identities(store)
        migration_s = time.perf_counter() - started
        if rewritten != len(sources):
            raise RuntimeError(f"the identity migration rewrote {rewritten} of {len(sources)} rows")
        say(f"ingest: identity migration of {rewritten} rows in {migration_s * 1000:.0f} ms")
        sheet_ms = measure_sheet(sorted(cfg.processed_directory.iterdir()), cfg.top_k)
        say(f"ingest: a contact sheet of {cfg.top_k} processed camera pictures costs {sheet_ms:.0f} ms")
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
        "sheet_ms": sheet_ms,
        "identity_migration_rows_per_s": n / migration_s,
        "identity_migration_speedup": ours_s / migration_s,
    }


def measure_sheet(processed: list[Path], top_k: int, repeats: int = 7) -> float:
    """Median milliseconds to render and save the contact sheet of ``top_k`` hits (what the sheet adds to
    a search), over real processed camera pictures (1024 px noisy JPEGs: the expensive case)."""
    import statistics
    import tempfile

    from image_search.sheet import render_contact_sheet, save_contact_sheet, warm_up
    from image_search.store import Hit

    warm_up()  # the service loads the fonts before READY
    hits = [Hit(rank=i + 1, similarity=0.9 - i / 100, file_name=p.name, file_path=str(p), processed_path=str(p),
                file_hash="0" * 32) for i, p in enumerate(processed[:top_k])]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            started = time.perf_counter()
            sheet = render_contact_sheet(hits, query_name="query.jpg", query_text="a red bicycle")
            save_contact_sheet(sheet, Path(tmp) / "q.sheet.jpg")
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)



def run(bench: Bench) -> Report:
    # --quick makes smaller pictures: a 12 MP picture costs ~4 s to generate and ~2 s to ingest twice here,
    # and the smoke test checks the report, not the speed.
    width = int(bench.sizes["camera_width"])
    size = (width, width * CAMERA_ASPECT[1] // CAMERA_ASPECT[0])
    folder = "camera" if size == (4000, 3000) else f"camera-{size[0]}x{size[1]}"  # full runs keep their cache
    camera = ensure_jpegs(bench.cache / folder, "cam", int(bench.sizes["camera"]), size, seed=1, bases=4)
    return measure_ingest(bench.work, bench.model_dir, camera)


SECTION = Section(
    name="ingest",
    run=run,
    full_sizes={"camera": 300, "camera_width": 4000},
    quick_sizes={"camera": 4, "camera_width": 1600},
    metrics=(
        Metric("ingest ours", "ingest_images_per_s", "{:.1f} img/s"),
        Metric("ingest baseline", "ingest_baseline_images_per_s", "{:.1f} img/s"),
        Metric("ingest speedup", "ingest_speedup", "{:.2f}x", ">= 4", lambda v, r: v >= 4),
        Metric("contact sheet, top 10", "sheet_ms", "{:.0f} ms", "<= 30 ms", lambda v, r: v <= 30),
        Metric("identity migration", "identity_migration_rows_per_s", "{:.0f} rows/s"),
        Metric("identity migration vs re-embedding", "identity_migration_speedup", "{:.0f}x faster"),
    ),
    report_keys=("ingest_images_per_s", "ingest_baseline_images_per_s", "ingest_speedup", "sheet_ms",
                 "identity_migration_rows_per_s", "identity_migration_speedup"),
)
