"""The ingest ceiling: ``index`` of many small images with a tiny 1024-d model (decoding and the model cost
almost nothing, so whatever else limits the ingest shows), against preprocessing alone on the same files;
and the service's ingest against ``index`` on the same files. All in one run, on one embedded PostgreSQL.

- ``preprocess_only_img_s``: the worker pool alone (a ``PreprocessPool`` with the indexer's settings but
  no processed folders, so nothing is saved, as before issue 16 moved saving into the workers; just
  before the ``index`` run below), driven as the indexer drives it (batches of batch-size, the next one
  submitted before the current one is collected), started before the clock starts.
  ``preprocess_and_save_img_s`` (full runs, a diagnosis): the same with the processed copies saved (into
  a scratch folder), which is the workers' whole job in ``index``.
- ``ingest_ceiling_img_s``: ``Indexer.index_folder`` (what ``image-search index`` runs once the model is
  loaded) into an empty table, until every row is in and the HNSW index is built and valid (a bulk load
  above ``BULK_LOAD_MIN_ROWS`` rows). The pool is started before the clock starts, as above.
- ``service_ingest_vs_index``: the in-process service loop (``Service.step``, the real ``ImageIngest``;
  no watchdog thread: its close-after-write events are put on the queue directly, all at once) over
  ``index``'s rate on the same files, both into an empty table, both until the rows are searchable
  through a valid index (or, below ``BULK_LOAD_MIN_ROWS`` rows, until they are in). Full runs measure
  index, service, service, index and pool each side (``_pooled``), so that drift cancels;
  ``service_ingest_runs_img_s`` keeps each run's rate.
  ``service_backlog_vs_index``: the same service started on a folder already holding the files (the
  start-up backlog, bulk-loaded), timed from the end of ``Service.start`` (so the pool is started, and
  only part of settle-seconds is in it).

Nothing is deleted while the section measures: each phase's processed copies and scratch are put aside
(``common.fresh_dir``) and deleted when the run ends, since on this VM's disk every deletion makes the
next minutes' file creations dearer (``common.TRASH_MARK``). ``ceiling_file_create_ms`` (a diagnosis) is
what creating one small file cost just before the section measured.

Where the time goes is measured too (nothing asserted): CPU milliseconds per image of this process (the
main thread: embedding, handing rows over, and the row writer's thread), of the pool's workers and of the
PostgreSQL server, and the main thread's wall time per stage of ``index``. On N cores no ingest beats
N x 1000 / (all CPU ms per image), whatever overlaps.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.benchmarks.common import Bench, Metric, Report, Section, file_create_ms, fresh_dir, link_or_copy, say, \
    warm_page_cache
from tests.support.files import claimed_folders, emptied_on_purpose, save_picture, write_config
from tests.support.model import TINY_DIMENSION

DIMENSION = 1024
IMAGE_SIZE = (160, 120)  # small PNGs: decoding costs almost nothing
BATCH_SIZE = 16  # the indexer's batch-size (and the config's default)


def ensure_pngs(folder: Path, count: int) -> list[Path]:
    """``count`` distinct small PNGs, made once and reused (written through a rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img-{i:05d}.png" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            partial = path.with_name(path.name + ".part")
            save_picture(partial, seed=50_000 + i, size=IMAGE_SIZE, fmt="PNG")
            os.replace(partial, path)
    return paths


def ensure_model(work: Path) -> Path:
    """The tiny random CLIP with a 1024-d projection, made once under ``work``."""
    from tests.support.model import save_tiny_clip

    model_dir = work / "tiny-clip-1024"
    if not (model_dir / "config.json").exists():
        fresh_dir(model_dir)
        save_tiny_clip(model_dir, projection_dim=DIMENSION)
    return model_dir


# --- CPU accounting ---------------------------------------------------------------------------------

def _task_cpu_s(pid: int) -> float:
    try:
        on_cpu, _, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
        return int(on_cpu) / 1e9
    except (OSError, ValueError):
        return 0.0


def _postgres_cpu_s(pgdata: Path) -> float:
    """CPU seconds of the embedded server so far: the postmaster, its live children, and its reaped ones."""
    import psutil

    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        master = psutil.Process(pid)
        t = master.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in master.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total
    except (OSError, ValueError, psutil.Error):
        return float("nan")


class CpuMeter:
    """CPU seconds spent by this process, by given worker processes and by the PostgreSQL server."""

    def __init__(self, pgdata: Path, worker_pids: Callable[[], list[int]]) -> None:
        self.pgdata = pgdata
        self.worker_pids = worker_pids

    def __enter__(self) -> CpuMeter:
        self._pids = self.worker_pids()
        self._workers = {pid: _task_cpu_s(pid) for pid in self._pids}
        self._process = time.process_time()
        self._postgres = _postgres_cpu_s(self.pgdata)
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.process_s = time.process_time() - self._process
        self.workers_s = sum(_task_cpu_s(pid) - before for pid, before in self._workers.items())
        self.postgres_s = _postgres_cpu_s(self.pgdata) - self._postgres

    def per_image_ms(self, n: int) -> dict[str, float]:
        parts = {"main_process": self.process_s, "workers": self.workers_s, "postgres": self.postgres_s}
        out = {name: round(1000 * s / n, 3) for name, s in parts.items()}
        out["all"] = round(sum(out.values()), 3)
        return out


# --- the runs ---------------------------------------------------------------------------------------

def _through_pool(pool, paths: list[Path], batch_size: int) -> int:
    """As the indexer drives the pool: the next batch submitted before the current one is collected."""
    from image_search.preprocess import PreprocessError

    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    done = 0
    ahead = pool.submit(batches[0])
    for batch in [*batches[1:], None]:
        current, ahead = ahead, (pool.submit(batch) if batch is not None else None)
        outcomes = current.results()
        failed = [o for o in outcomes if isinstance(o, PreprocessError)]
        if failed:
            raise RuntimeError(f"{len(failed)} benchmark files failed, e.g. {failed[0]}")
        done += len(outcomes)
    return done


def _fill(folder: Path, files: list[Path]) -> list[Path]:
    """``folder`` holding exactly ``files`` (hard links); the paths inside it."""
    for entry in os.scandir(folder):
        os.unlink(entry.path)
    placed = []
    for src in files:
        link_or_copy(src, folder / src.name)
        placed.append(folder / src.name)
    return placed


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reset(cfg, store) -> None:
    store.clear()
    emptied_on_purpose(fresh_dir(cfg.processed_directory))


class StageTimer:
    """Wall seconds the calling thread spends in each wrapped callable."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attribute: str, stage: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

        self.replace(owner, attribute, timed)

    def replace(self, owner: Any, attribute: str, value: Any) -> None:
        """``owner.attribute = value`` until ``restore``."""
        original = getattr(owner, attribute)
        had_own = attribute in vars(owner)
        setattr(owner, attribute, value)
        self._undo.append(lambda: setattr(owner, attribute, original) if had_own else delattr(owner, attribute))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _instrument(stages: StageTimer, indexer, store) -> None:
    """Time the stages of ``indexer``'s batches (and of ``index_folder``) on the calling thread."""
    import image_search.indexer as indexer_module

    stages.wrap(indexer_module, "compare_folder", "rescan (compare_folder)")
    stages.wrap(indexer, "_outcomes", "waiting for the workers")
    stages.wrap(indexer.embedder, "embed_images", "embedding")
    stages.wrap(indexer_module, "save_processed", "saving processed copies")
    stages.wrap(store, "sources", "store lookups")
    stages.wrap(store, "contents", "store lookups")
    stages.wrap(indexer._writer, "submit", "handing rows to the writer (waits while 4 batches queue)")  # noqa: SLF001
    stages.wrap(indexer._writer, "wait", "waiting for the writer")  # noqa: SLF001
    original_begin = store.begin_bulk_load

    def begin(rows: int):
        bulk = original_begin(rows)
        if bulk is not None:
            stages.wrap(bulk, "finish", "building the index (bulk load finish)")
        return bulk

    store.begin_bulk_load = begin
    stages._undo.append(lambda: vars(store).pop("begin_bulk_load", None))


def run_index(cfg, embedder, store, sources: list[Path], *, pgdata: Path, profile: bool = False,
              preprocess_only: Report | None = None, preprocess_and_save: Report | None = None) -> Report:
    """``Indexer.index_folder`` over ``sources`` (already in the source folder) into an empty table. Given
    ``preprocess_only`` (a dict), first fills it with ``run_preprocess_only`` on a twin of this indexer's
    pool that saves nothing (the indexer's would fill the processed folder before ``index`` runs); given
    ``preprocess_and_save`` too, fills that from a twin that saves the processed copies into a scratch
    folder (the workers' whole job in ``index``; a diagnosis)."""
    from image_search.indexer import Indexer

    _reset(cfg, store)
    warm_page_cache(sources)
    indexer = Indexer(cfg, embedder, store)
    stages = StageTimer()
    try:
        pool = indexer._pool  # noqa: SLF001 - the benchmark looks at the indexer's own pool
        pool.wait_ready()  # started before the clock
        if preprocess_only is not None:
            with _twin(pool) as alone:
                alone.wait_ready()
                preprocess_only.update(run_preprocess_only(alone, sources, pgdata=pgdata))
        if preprocess_and_save is not None:
            scratch = fresh_dir(cfg.state_directory.parent / "processed-scratch")
            with _twin(pool, claimed_folders(cfg.source_directory, scratch)) as saving:
                saving.wait_ready()
                preprocess_and_save.update(run_preprocess_only(saving, sources, pgdata=pgdata))
        if profile:
            _instrument(stages, indexer, store)
        with CpuMeter(pgdata, indexer._pool.worker_pids) as cpu:  # noqa: SLF001
            summary = indexer.index_folder(show_progress=False)
    finally:
        stages.restore()
        indexer.close()
    n = len(sources)
    if summary.embedded != n or store.count() != n:
        raise RuntimeError(f"index_folder embedded {summary.embedded} of {n} images ({store.count()} rows)")
    valid = store.index_valid()
    from image_search.store import BULK_LOAD_MIN_ROWS

    if n >= BULK_LOAD_MIN_ROWS and not valid:
        raise RuntimeError("after index_folder the HNSW index is not valid")
    out: Report = {"img_s": n / cpu.wall_s, "wall_s": cpu.wall_s, "cpu_ms_per_image": cpu.per_image_ms(n),
                   "index_valid": valid, "bulk_load": n >= BULK_LOAD_MIN_ROWS}  # into an empty table: the rule
    if profile:
        accounted = sum(stages.seconds.values())
        out["stages_s"] = {k: round(v, 3) for k, v in stages.seconds.items()}
        out["stages_s"]["other (loop, summaries, pool hand-off)"] = round(cpu.wall_s - accounted, 3)
    return out


def _twin(pool, processed=None):
    """A pool with ``pool``'s settings and worker count, saving the processed copies only where ``processed``
    says (a ``ProcessedFolders``; None: nowhere)."""
    from image_search.workers import PreprocessPool

    settings = pool.settings
    return PreprocessPool(max_size=settings.max_size, max_pixels=settings.max_pixels, model_input=settings.model_input,
                          links=settings.links, workers=pool.worker_count, processed=processed)


def run_preprocess_only(pool, sources: list[Path], *, pgdata: Path) -> Report:
    """Preprocessing alone on ``pool`` (started), as the indexer drives it; nothing saved unless the pool's
    settings say where."""
    _through_pool(pool, sources[:2 * BATCH_SIZE], BATCH_SIZE)  # first use stays out of the clock
    with CpuMeter(pgdata, pool.worker_pids) as cpu:
        done = _through_pool(pool, sources, BATCH_SIZE)
    return {"img_s": done / cpu.wall_s, "wall_s": cpu.wall_s, "cpu_ms_per_image": cpu.per_image_ms(done)}


def work_the_ingest_cannot_skip(database, embedder, pgdata: Path, dimension: int, n: int,
                                saving: Report) -> Report:
    """CPU milliseconds per image of the work ``index`` cannot leave out, each measured alone on this run's
    rows (a diagnosis): the workers' whole job (``saving``, the processed copies saved), the model at
    batch-size, and the HNSW index over the ``n`` rows, built serially so one backend's CPU is all of it
    (a parallel build costs as much CPU, spread over more processes, plus their coordination). Then
    the best ratio to preprocessing alone this CPU allows, were every core busy all the time."""
    import numpy as np

    from image_search.store.schema import HNSW_INDEX, build_memory_mb, hnsw_index_ddl

    conn = database.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"DROP INDEX {HNSW_INDEX}")
            cur.execute(f"SET maintenance_work_mem = '{build_memory_mb(n, dimension, workers=0)}MB'")
            cur.execute("SET max_parallel_maintenance_workers = 0")
            before = _postgres_cpu_s(pgdata)
            cur.execute(hnsw_index_ddl(dimension))  # the index is back, valid, for the runs after this
            build_s = _postgres_cpu_s(pgdata) - before
    finally:
        conn.close()
    width, height = embedder.pixel_spec.output_size
    pictures = np.random.default_rng(0).integers(0, 256, (BATCH_SIZE, height, width, 3), dtype=np.uint8)
    embedder.embed_images(pictures)  # first use stays out
    before = time.process_time()
    for _ in range(n // BATCH_SIZE):
        embedder.embed_images(pictures)
    embed_s = time.process_time() - before
    return {"preprocess_and_save": saving["cpu_ms_per_image"]["all"],
            "index_build_serial": round(1000 * build_s / n, 3),
            "embedding": round(1000 * embed_s / (n // BATCH_SIZE * BATCH_SIZE), 3)}


def _pooled(runs: list[Report]) -> Report:
    """Runs of one thing on the same files as one: the rate over their summed wall time, and the mean of
    their CPU and stage figures; ``runs_img_s`` keeps each run's rate."""
    def mean(key: str) -> dict[str, float]:  # a stage one run never entered counts 0 s in it
        names = dict.fromkeys(k for r in runs for k in r[key])
        return {k: round(sum(r[key].get(k, 0.0) for r in runs) / len(runs), 3) for k in names}

    files = sum(r["img_s"] * r["wall_s"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    return {"img_s": files / wall, "wall_s": wall, "cpu_ms_per_image": mean("cpu_ms_per_image"),
            "stages_s": mean("stages_s"), "index_valid": all(r["index_valid"] for r in runs),
            "bulk_load": all(r["bulk_load"] for r in runs), "runs_img_s": [round(r["img_s"], 1) for r in runs]}


def run_service(cfg, embedder, database, store, files: list[Path], *, pgdata: Path, backlog: bool) -> Report:
    """The in-process service over ``files``: dropped in while it runs (close-after-write events put on its
    queue at once), or, with ``backlog``, already there when it starts. Until the rows are searchable.
    A member of the database's fleet, as every service is: it claims each batch and lets it go."""
    from image_search import sheet
    from image_search.fleet import FleetMember
    from image_search.notify import Notifier
    from image_search.runtime import Runtime
    from image_search.service import Service, StopFlag
    from image_search.store import BULK_LOAD_MIN_ROWS
    from image_search.sync import claim_processed_folder
    from image_search.watch import Change, ChangeKind, Folder

    _reset(cfg, store)
    _fill(cfg.source_directory, [])
    placed = _fill(cfg.source_directory, files) if backlog else []
    warm_page_cache(files)
    changes: queue.SimpleQueue[Change] = queue.SimpleQueue()
    member = FleetMember.join(cfg, database)
    claim_processed_folder(cfg, store.sources)  # as every start does (runtime.open_runtime)
    service = Service(Runtime(cfg, store, lambda: embedder, fleet=member), changes=changes, stop=StopFlag(),
                      notifier=Notifier(environ={}))
    n = len(files)
    stages = StageTimer()
    # The contact sheet's fonts (1-2.5 s here) are loaded by start(), before any clock: not loading them
    # shortens the run and changes no number.
    stages.replace(sheet, "warm_up", lambda: None)
    try:
        service.start()
        assert service.ingest is not None
        service.ingest.indexer._pool.wait_ready()  # noqa: SLF001 - as for index: started before the clock
        if not backlog:
            placed = _fill(cfg.source_directory, files)
        bulk = service.ingest.bulk
        _instrument(stages, service.ingest.indexer, store)
        stages.wrap(service.rt.claims, "take", "fleet claims (taking, letting go)")
        stages.wrap(service.rt.claims, "release", "fleet claims (taking, letting go)")
        if bulk is not None:  # begun by start(): its build runs beside the loop, which waits for it at the end
            stages.wrap(bulk, "finish", "building the index (bulk load finish, beside the loop)")
        with CpuMeter(pgdata, service.ingest.indexer._pool.worker_pids) as cpu:  # noqa: SLF001
            for path in [] if backlog else placed:
                changes.put(Change(Folder.IMAGES, ChangeKind.CLOSED, path))
            deadline = time.monotonic() + max(300.0, n * 0.5)
            while service.indexed + service.skipped < n or len(service.images):
                if not service.step():
                    time.sleep(0.001)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the service indexed {service.indexed} of {n} files")
            # Searchable: the bulk load's index built (beside the loop, which keeps stepping meanwhile). A
            # burst's bulk load begins at the loop's first step after the drop: looked up now.
            bulk = service.ingest.bulk
            while bulk is not None and not bulk.ended:
                if not service.step():
                    time.sleep(0.005)
                if time.monotonic() > deadline:
                    raise TimeoutError("the bulk load's index build did not finish")
        if service.indexed != n or store.count() != n:
            raise RuntimeError(f"the service indexed {service.indexed} of {n} files ({store.count()} rows)")
        valid = store.index_valid()
        if n >= BULK_LOAD_MIN_ROWS and not valid:
            raise RuntimeError("after the service's ingest the HNSW index is not valid")
    finally:
        stages.restore()
        service.close()
        member.leave(empty_table=False)
    accounted = sum(stages.seconds.values())
    stages.seconds["other (the loop, waiting for the index build, settling)"] = cpu.wall_s - accounted
    return {"img_s": n / cpu.wall_s, "wall_s": cpu.wall_s, "cpu_ms_per_image": cpu.per_image_ms(n),
            "bulk_load": bulk is not None, "index_valid": valid,
            "stages_s": {k: round(v, 3) for k, v in stages.seconds.items()}}


def measure_ceiling(bench: Bench) -> Report:
    from image_search.config import load_config
    from image_search.embed import Embedder
    from image_search.store import Database

    section_started = time.monotonic()
    n, m = int(bench.sizes["ceiling_images"]), int(bench.sizes["ceiling_service_files"])
    files = ensure_pngs(bench.cache / "ceiling-png", max(n, m))
    # --quick (a smoke test) takes the run's own tiny model, already made, rather than making another.
    model_dir, dimension = (bench.model_dir, TINY_DIMENSION) if bench.quick else (ensure_model(bench.work), DIMENSION)
    root = fresh_dir(bench.work / "ceiling")
    cfg = load_config(write_config(root, model_dir, dimension=dimension, batch_size=BATCH_SIZE, settle_seconds=0.2))
    embedder = Embedder.load(str(model_dir), device="cpu", dimension=dimension)
    database = Database(cfg)
    pgdata = cfg.state_directory / "pgdata"
    load_before = os.getloadavg()
    import torch

    threads = torch.get_num_threads()
    try:
        store = database.open_store(dimension=dimension)
        sources = _fill(cfg.source_directory, files[:n])
        create_ms = file_create_ms(root / "file-create-probe")
        say(f"ceiling: creating a small file costs {create_ms:.3f} ms of kernel CPU on this disk now")
        say(f"ceiling: preprocessing alone, then index of the same {n} {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} PNGs with a "
            f"tiny {dimension}-d model, until searchable")
        pre: Report = {}
        # Diagnosis (full runs): the workers' whole job in index, the processed copies saved too. Creating
        # two files per image costs the kernel's CPU, several-fold more in the minutes after this disk
        # deleted many files (common.TRASH_MARK).
        saving: Report | None = None if bench.quick else {}
        idx = run_index(cfg, embedder, store, sources, pgdata=pgdata, profile=True, preprocess_only=pre,
                        preprocess_and_save=saving)
        say(f"ceiling: {idx['img_s']:.0f} img/s index, {pre['img_s']:.0f} img/s preprocessing alone "
            f"({idx['img_s'] / pre['img_s']:.2f}x); CPU ms/img index {idx['cpu_ms_per_image']}, "
            f"preprocessing {pre['cpu_ms_per_image']}; index stages {idx['stages_s']}")
        if saving is not None:
            say(f"ceiling: preprocessing and saving the processed copies (diagnosis) {saving['img_s']:.0f} img/s "
                f"(index {idx['img_s'] / saving['img_s']:.2f}x of it); CPU ms/img {saving['cpu_ms_per_image']}")
        floor = None if saving is None else work_the_ingest_cannot_skip(database, embedder, pgdata, dimension, n,
                                                                        saving)
        if floor is not None:
            say(f"ceiling: CPU ms/img of the work index cannot skip, each alone (diagnosis) {floor}: at best "
                f"{pre['cpu_ms_per_image']['all'] / sum(floor.values()):.2f}x preprocessing alone on this CPU")
        # Diagnosis, not the product's setting: the same index with torch on one intra-op thread (the
        # product leaves torch's default, one thread per core, beside one worker process per core).
        # Full runs only, as is the start-up backlog below: --quick stays short.
        one = None
        if not bench.quick:
            with torch_threads(1):
                one = run_index(cfg, embedder, store, sources, pgdata=pgdata, profile=True)
            say(f"ceiling: with torch on 1 thread (diagnosis) {one['img_s']:.0f} img/s "
                f"({one['img_s'] / pre['img_s']:.2f}x preprocessing alone); CPU ms/img {one['cpu_ms_per_image']}; "
                f"index stages {one['stages_s']}")

        subset = files[:m]
        say(f"ceiling: the service against index on the same {m} files")
        if m == n:  # --quick: the index run above is the baseline, measured in this run already
            index_runs = [idx]
            service_runs = [run_service(cfg, embedder, database, store, subset, pgdata=pgdata, backlog=False)]
        else:
            # In the order index, service, service, index, each side pooled: what drifts across the section
            # (the disk's charge for deletions fades over minutes, common.TRASH_MARK; the host's load) weighs
            # on both sides alike. One pair in one order moved the ratio by 0.1 between runs minutes apart.
            def index_m() -> Report:
                return run_index(cfg, embedder, store, _fill(cfg.source_directory, subset), pgdata=pgdata,
                                 profile=True)

            index_runs = [index_m()]
            service_runs = [run_service(cfg, embedder, database, store, subset, pgdata=pgdata, backlog=False) for _ in range(2)]
            index_runs.append(index_m())
        idx_m, live = _pooled(index_runs), _pooled(service_runs)
        backlog = None if bench.quick else run_service(cfg, embedder, database, store, subset, pgdata=pgdata, backlog=True)
        say(f"ceiling: {m} files: index {idx_m['img_s']:.0f} img/s, service (dropped in) {live['img_s']:.0f} img/s "
            f"({live['img_s'] / idx_m['img_s']:.2f}x); CPU ms/img index {idx_m['cpu_ms_per_image']}, "
            f"service {live['cpu_ms_per_image']}; stages: index {idx_m['stages_s']}, service {live['stages_s']}")
        if backlog is not None:
            say(f"ceiling: service (start-up backlog) {backlog['img_s']:.0f} img/s ({backlog['img_s'] / idx_m['img_s']:.2f}x "
                f"index); CPU ms/img {backlog['cpu_ms_per_image']}; stages {backlog['stages_s']}")
        store.close()
    finally:
        database.close()
    load_after = os.getloadavg()
    section_s = time.monotonic() - section_started
    say(f"ceiling: section done in {section_s:.1f} s (load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
        f"after, on {os.cpu_count()} cores)")
    out: Report = {
        "ceiling_images": n,
        "ceiling_image_size": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}",
        "ceiling_dimension": dimension,
        "ingest_ceiling_img_s": idx["img_s"],
        "preprocess_only_img_s": pre["img_s"],
        "ingest_ceiling_vs_preprocess": idx["img_s"] / pre["img_s"],
        "ingest_ceiling_index_valid": int(idx["index_valid"]),
        "ingest_ceiling_cpu_ms_per_image": idx["cpu_ms_per_image"],
        "preprocess_only_cpu_ms_per_image": pre["cpu_ms_per_image"],
        "ingest_ceiling_stages_s": idx["stages_s"],
        "ingest_ceiling_torch_threads": threads,
        "service_ingest_files": m,
        "service_ingest_index_img_s": idx_m["img_s"],
        "service_ingest_img_s": live["img_s"],
        "service_ingest_vs_index": live["img_s"] / idx_m["img_s"],
        "service_ingest_runs_img_s": {"index": idx_m["runs_img_s"], "service": live["runs_img_s"]},
        "service_ingest_cpu_ms_per_image": {"index": idx_m["cpu_ms_per_image"], "service": live["cpu_ms_per_image"]},
        "service_ingest_stages_s": {"index": idx_m["stages_s"], "service": live["stages_s"]},
        "service_ingest_bulk_load": {"index": int(idx_m["bulk_load"]), "service": int(live["bulk_load"])},
        "ceiling_load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "ceiling_file_create_ms": create_ms,  # diagnosis: the disk's charge per file (common.TRASH_MARK)
        "ceiling_section_s": section_s,  # what the section costs a run (the smoke test's share with --quick)
    }
    if one is not None:
        out.update(ingest_ceiling_img_s_torch_1_thread=one["img_s"],
                   ingest_ceiling_torch_1_thread_vs_preprocess=one["img_s"] / pre["img_s"],
                   ingest_ceiling_torch_1_thread_cpu_ms_per_image=one["cpu_ms_per_image"],
                   ingest_ceiling_torch_1_thread_stages_s=one["stages_s"])
    if saving is not None:
        out.update(preprocess_and_save_img_s=saving["img_s"],
                   ingest_ceiling_vs_preprocess_and_save=idx["img_s"] / saving["img_s"],
                   preprocess_and_save_cpu_ms_per_image=saving["cpu_ms_per_image"])
    if floor is not None:
        out.update(ingest_ceiling_floor_cpu_ms_per_image=floor,
                   ingest_ceiling_best_vs_preprocess=pre["cpu_ms_per_image"]["all"] / sum(floor.values()))
    if backlog is not None:
        out.update(service_backlog_img_s=backlog["img_s"], service_backlog_vs_index=backlog["img_s"] / idx_m["img_s"])
        out["service_ingest_cpu_ms_per_image"]["service_backlog"] = backlog["cpu_ms_per_image"]
        out["service_ingest_stages_s"]["service_backlog"] = backlog["stages_s"]
        out["service_ingest_bulk_load"]["service_backlog"] = int(backlog["bulk_load"])
    return out


SECTION = Section(
    name="ceiling",
    run=measure_ceiling,
    full_sizes={"ceiling_images": 5000, "ceiling_service_files": 2000},
    quick_sizes={"ceiling_images": 24, "ceiling_service_files": 24},
    metrics=(
        Metric("preprocessing alone, small PNGs (worker pool)", "preprocess_only_img_s", "{:.0f} img/s"),
        Metric("index, small PNGs, tiny 1024-d model, until searchable", "ingest_ceiling_img_s", "{:.0f} img/s"),
        Metric("ingest ceiling vs preprocessing alone", "ingest_ceiling_vs_preprocess", "{:.2f}x", ">= 0.7",
               lambda v, r: v >= 0.7),
        Metric("preprocessing and saving the copies (diagnosis, full runs)", "preprocess_and_save_img_s",
               "{:.0f} img/s"),
        Metric("ingest ceiling vs preprocessing and saving (diagnosis)", "ingest_ceiling_vs_preprocess_and_save",
               "{:.2f}x"),
        Metric("ingest ceiling this CPU allows at best (diagnosis)", "ingest_ceiling_best_vs_preprocess", "{:.2f}x"),
        Metric("service ingest (files dropped in)", "service_ingest_img_s", "{:.0f} img/s"),
        Metric("service ingest vs index, same files", "service_ingest_vs_index", "{:.2f}x", ">= 0.9",
               lambda v, r: v >= 0.9),
        Metric("service start-up backlog vs index (full runs)", "service_backlog_vs_index", "{:.2f}x"),
    ),
    report_keys=("preprocess_only_img_s", "ingest_ceiling_img_s", "ingest_ceiling_vs_preprocess",
                 "service_ingest_img_s", "service_ingest_vs_index"),
)
