#!/usr/bin/env python
"""Benchmark: does preprocessing scale with cores? One core, all cores, and today's thread pool, one run.

    uv run python tests/benchmarks/preprocess.py [--images 40] [--rounds 5] [--work-dir DIR] [--json PATH]

What is measured, on the same ``--images`` photo-like 2000x1500 JPEGs (q90: smooth gradients, soft
blocks and a little sensor-like noise, so the DCT and entropy decoder work as on a photo), normalised to
the service's default box (1024x1024) and limit, with the page cache warm:

- ``preprocess_img_s_one_core``: ``preprocess_image`` in a plain loop in this process: what one core does,
  with no pool machinery at all (the strictest baseline for the ratio);
- ``preprocess_img_s_one_worker``: the same files through ``PreprocessPool(workers=1)``: the pool's own
  overhead (pickling, the dispatcher thread) shows as the gap to the line above;
- ``preprocess_img_s_all_cores``: ``PreprocessPool`` with one worker per available core;
- ``preprocess_img_s_threads``: today's path (at d418193): a ThreadPoolExecutor of DECODE_THREADS over
  ``preprocess_image``;
- ``preprocess_scaling`` = all_cores / one_core; the target is ``preprocess_scaling_target`` = 0.8 x cores.

Pools are driven the way the indexer drives them: batches of ``--batch-size`` with the next batch
submitted before the current one is collected, and started (workers imported and ready) before the clock
starts, since a service starts its pool once.

The machines this runs on are shared: another process on one of the cores lowers the all-cores number
and the ratio. Each configuration is therefore measured ``--rounds`` times, interleaved (one round runs
every configuration once), and the report gives the best round of each (the least disturbed: noise only
ever slows a run down) next to every round's value and the load average before and after, so a reader
can judge how quiet the machine was.

Because a busy machine can hide scaling entirely (with a load of 4 on 2 cores, "all cores" is about one
core's worth), the CPU time each configuration spends per image is reported too: the parent's process
time plus every worker's time on a CPU, from /proc/<pid>/schedstat. It does not depend on what else
runs. The same file splits each worker's wall time into running, waiting for a CPU held by another
process (the machine's load), and idle (waiting for work: the pool's own loss); near-zero idle means the
pool keeps every core it gets busy. ``preprocess_scaling_cpu_bound`` = cores x (one-core CPU per image)
/ (pool CPU per image) is what the pool would reach on that many free cores if nothing but CPU limited
it (no memory-bandwidth or clock-speed effects); it shows whether the pool wastes work (contention,
pickling), while ``preprocess_scaling`` is the measured, wall-clock figure. It is computed for the pool
only: threads lose their time waiting for the GIL, which CPU time does not show. The parent's own CPU
per image is the pool's serial part (dispatching, unpickling): 1000 / that is the most any number of
workers can deliver. Nothing here asserts a timing.

Measured on the 2-core development VM (2026-11-25, shared with four other engineers' test runs, load
average 2.4 to 5.4), six runs of 5 rounds each: one core did 17 to 25 images/s at best. In two runs some
rounds found both cores free (where recorded, the workers waited for a CPU 1-2% of those rounds) and the
pool reached 46 and 48 images/s: ``preprocess_scaling`` 1.86 and 1.98, against a target of 1.6. In the
other four no round did (median waiting for a CPU 45-69% where recorded) and the measured ratio was 0.8
to 1.2: the load, not the pool. In every run ``preprocess_scaling_cpu_bound`` was 1.94 to 2.02 and the
parent spent 0.34 to 0.40 ms per image (a ceiling near 2,500 images/s, far above 16 cores' worth); in
the four runs that recorded it, the workers were idle about 1% of the time. Today's thread pool matched
the pool on 2 cores (44 and 46 images/s at best in the two quiet runs): threads contend only at higher
core counts (issue 8), which this machine cannot show; a 16-core run is still to be done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

from image_search.preprocess import PreprocessError, preprocess_image  # noqa: E402
from image_search.workers import PreprocessPool, default_worker_count  # noqa: E402

GEN_VERSION = 1  # bump when the generator changes: the cache folder name follows it
IMAGE_SIZE = (2000, 1500)
JPEG_QUALITY = 90
BOX = (1024, 1024)  # the config's default resize-width x resize-height
MAX_PIXELS = 178_956_970  # the config's default max-image-pixels
# The indexer's decode thread count at d418193 (indexer.DECODE_THREADS), repeated here so that this module
# imports neither the indexer nor torch.
DECODE_THREADS = max(2, min(8, (os.cpu_count() or 2)))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def photo_like(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """A smooth two-way gradient, a few soft-edged blocks of colour and low noise: photo statistics, cheaply."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    corners = rng.uniform(30, 225, (4, 3)).astype(np.float32)
    img = (corners[0] * (1 - x) * (1 - y) + corners[1] * x * (1 - y)
           + corners[2] * (1 - x) * y + corners[3] * x * y)
    for _ in range(12):
        w, h = int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3))
        left, top = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        block = img[top:top + h, left:left + w]
        block += (colour - block) * np.float32(rng.uniform(0.3, 0.8))
    img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def ensure_images(folder: Path, count: int) -> list[Path]:
    """``count`` generated JPEGs in ``folder``, made once and reused (written through a rename, so a run
    interrupted while generating never leaves a half file behind)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo-{i:04d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            partial = path.with_suffix(".part")
            photo_like(seed=i).save(partial, format="JPEG", quality=JPEG_QUALITY)
            os.replace(partial, path)
    return paths


def _warm_page_cache(paths: Sequence[Path]) -> None:
    for path in paths:
        path.read_bytes()


def _count_ok(outcomes: Sequence[object]) -> int:
    failures = [o for o in outcomes if isinstance(o, PreprocessError)]
    if failures:  # a benchmark over files that fail would measure the wrong thing
        raise RuntimeError(f"{len(failures)} benchmark files failed, e.g. {failures[0]}")
    return len(outcomes)


@dataclass(frozen=True)
class Measurement:
    images_per_s: float  # wall clock
    cpu_ms_per_image: float  # this process and its workers, all cores together
    parent_cpu_ms_per_image: float  # this process alone: for a pool, the serial part (dispatch, unpickling)
    # Of the measured tasks' wall time (the main thread in-process, every worker for a pool): the share spent
    # running, waiting for a core that another process held, and idle (for a worker: waiting for work).
    running_fraction: float | None = None
    waiting_for_cpu_fraction: float | None = None
    idle_fraction: float | None = None


def _schedstat(path: str) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of one task, from /proc/.../schedstat."""
    on_cpu, waiting, _ = Path(path).read_text().split()
    return int(on_cpu), int(waiting)


def _measure(work: Callable[[], int], worker_pids: Sequence[int] = ()) -> Measurement:
    """Run ``work`` (which returns how many images it did) and account for its wall and CPU time.

    The tasks followed are the pool's workers, or this thread when there are none (in-process runs).
    """
    tasks = [f"/proc/{pid}/schedstat" for pid in worker_pids] or ["/proc/thread-self/schedstat"]
    before = [_schedstat(task) for task in tasks]
    wall, parent_cpu = time.perf_counter(), time.process_time()
    workers_cpu_before = sum(on_cpu for on_cpu, _ in before) if worker_pids else 0
    done = work()
    wall = time.perf_counter() - wall
    parent_cpu = time.process_time() - parent_cpu
    after = [_schedstat(task) for task in tasks]
    running = sum(a[0] - b[0] for a, b in zip(after, before)) / 1e9
    waiting = sum(a[1] - b[1] for a, b in zip(after, before)) / 1e9
    workers_cpu = (sum(on_cpu for on_cpu, _ in after) - workers_cpu_before) / 1e9 if worker_pids else 0.0
    task_time = wall * len(tasks)
    return Measurement(
        images_per_s=done / wall,
        cpu_ms_per_image=1000 * (parent_cpu + workers_cpu) / done,
        parent_cpu_ms_per_image=1000 * parent_cpu / done,
        running_fraction=running / task_time,
        waiting_for_cpu_fraction=waiting / task_time,
        idle_fraction=max(0.0, 1 - (running + waiting) / task_time),
    )


def in_process(paths: Sequence[Path]) -> int:
    for path in paths:
        preprocess_image(path, max_size=BOX, max_pixels=MAX_PIXELS)
    return len(paths)


def through_threads(executor: ThreadPoolExecutor, paths: Sequence[Path]) -> int:
    return len(list(executor.map(lambda p: preprocess_image(p, max_size=BOX, max_pixels=MAX_PIXELS), paths)))


def through_pool(pool: PreprocessPool, paths: Sequence[Path], batch_size: int) -> int:
    """Pipelined like the indexer: the next batch is submitted before the current one is collected."""
    batches = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    done = 0
    ahead = pool.submit(batches[0])
    for batch in batches[1:]:
        current, ahead = ahead, pool.submit(batch)
        done += _count_ok(current.results())
    done += _count_ok(ahead.results())
    return done


def run(*, images: int = 40, rounds: int = 5, batch_size: int = 16, work_dir: Path | None = None,
        cores: int | None = None) -> dict[str, object]:
    """Measure every configuration ``rounds`` times, interleaved; return the report (see the module doc)."""
    cores = cores or default_worker_count()
    work_dir = work_dir or Path(tempfile.gettempdir()) / "image-search-bench"
    say(f"preprocess benchmark: {images} images of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {cores} cores, {rounds} rounds")
    paths = ensure_images(work_dir / f"preprocess-v{GEN_VERSION}", images)
    _warm_page_cache(paths)
    load_before = os.getloadavg()
    samples: dict[str, list[Measurement]] = {"one_core": [], "one_worker": [], "all_cores": [], "threads": []}
    with PreprocessPool(max_size=BOX, max_pixels=MAX_PIXELS, workers=1) as one_worker, \
            PreprocessPool(max_size=BOX, max_pixels=MAX_PIXELS, workers=cores) as all_cores, \
            ThreadPoolExecutor(max_workers=DECODE_THREADS) as threads:
        one_worker.wait_ready()
        all_cores.wait_ready()
        # First use of each path (lazy imports, first allocations) stays out of the measurement.
        through_pool(all_cores, paths[: 2 * cores], batch_size)
        through_pool(one_worker, paths[:2], batch_size)
        through_threads(threads, paths[:DECODE_THREADS])
        measures: dict[str, Callable[[], Measurement]] = {
            "one_core": lambda: _measure(lambda: in_process(paths)),
            "one_worker": lambda: _measure(lambda: through_pool(one_worker, paths, batch_size), one_worker.worker_pids()),
            "all_cores": lambda: _measure(lambda: through_pool(all_cores, paths, batch_size), all_cores.worker_pids()),
            "threads": lambda: _measure(lambda: through_threads(threads, paths)),
        }
        for round_number in range(1, rounds + 1):
            for name, measure in measures.items():
                samples[name].append(measure())
            say(f"  round {round_number}: " + ", ".join(
                f"{n} {v[-1].images_per_s:.1f} img/s ({v[-1].cpu_ms_per_image:.0f} ms CPU/img)" for n, v in samples.items())
                + f"; all-cores workers waited for a CPU {samples['all_cores'][-1].waiting_for_cpu_fraction:.0%}"
                f" of the time, idle {samples['all_cores'][-1].idle_fraction:.0%}")
    load_after = os.getloadavg()
    best = {name: max(m.images_per_s for m in values) for name, values in samples.items()}

    def median(name: str, attribute: str) -> float:
        # Per-image CPU and the time fractions hardly depend on the load: the median round is the honest value.
        return round(float(np.median([getattr(m, attribute) for m in samples[name]])), 3)

    cpu = {name: median(name, "cpu_ms_per_image") for name in samples}
    return {
        "preprocess_img_s_one_core": round(best["one_core"], 2),
        "preprocess_img_s_all_cores": round(best["all_cores"], 2),
        "preprocess_scaling": round(best["all_cores"] / best["one_core"], 3),
        "preprocess_scaling_target": round(0.8 * cores, 2),
        "preprocess_cores": cores,
        "preprocess_img_s_one_worker": round(best["one_worker"], 2),
        "preprocess_img_s_threads": round(best["threads"], 2),
        "preprocess_threads": DECODE_THREADS,
        "preprocess_speedup_vs_threads": round(best["all_cores"] / best["threads"], 3),
        "preprocess_cpu_ms_per_image": {name: round(v, 1) for name, v in cpu.items()},
        "preprocess_scaling_cpu_bound": round(cores * cpu["one_core"] / cpu["all_cores"], 3),
        # The pool's serial part: its parent alone caps the pool at 1000 / this many images/s.
        "preprocess_parent_cpu_ms_per_image_all_cores": median("all_cores", "parent_cpu_ms_per_image"),
        # How the workers of the all-cores pool spent the run: idle is the pool's own loss (starved of work);
        # waiting for a CPU is what other processes on the machine took.
        "preprocess_workers_running_fraction": median("all_cores", "running_fraction"),
        "preprocess_workers_waiting_for_cpu_fraction": median("all_cores", "waiting_for_cpu_fraction"),
        "preprocess_workers_idle_fraction": median("all_cores", "idle_fraction"),
        "preprocess_one_core_waiting_for_cpu_fraction": median("one_core", "waiting_for_cpu_fraction"),
        "preprocess_rounds_img_s": {name: [round(m.images_per_s, 2) for m in values] for name, values in samples.items()},
        "preprocess_images": images,
        "preprocess_image_size": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}",
        "preprocess_box": f"{BOX[0]}x{BOX[1]}",
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cores", type=int, default=None, help="workers for the all-cores pool (default: available cores)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where generated images are cached")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(images=args.images, rounds=args.rounds, batch_size=args.batch_size, work_dir=args.work_dir,
                 cores=args.cores)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def _section_run(bench) -> dict[str, object]:
    return run(images=int(bench.sizes["preprocess_images"]), rounds=int(bench.sizes["preprocess_rounds"]),
               work_dir=bench.cache)


def _section():  # built here, not at import, so that this file also runs on its own without the package
    from tests.benchmarks.common import Metric, Section

    return Section(
        name="preprocess",
        run=_section_run,
        full_sizes={"preprocess_images": 40, "preprocess_rounds": 5},
        quick_sizes={"preprocess_images": 6, "preprocess_rounds": 1},
        metrics=(
            Metric("preprocess, one core", "preprocess_img_s_one_core", "{:.1f} img/s"),
            Metric("preprocess, all cores (worker processes)", "preprocess_img_s_all_cores", "{:.1f} img/s"),
            Metric("preprocess scaling", "preprocess_scaling", "{:.2f}x", ">= 0.8 x cores",
                   lambda v, r: v >= float(r["preprocess_scaling_target"])),
        ),
        report_keys=("preprocess_img_s_one_core", "preprocess_img_s_all_cores", "preprocess_scaling"),
    )


SECTION = _section()


if __name__ == "__main__":
    sys.exit(main())
