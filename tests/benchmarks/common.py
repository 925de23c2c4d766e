"""What the benchmark sections share: the run's context, the section and table-line records, small helpers."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Sizes = Mapping[str, int | float]
Report = dict[str, object]


@dataclass(frozen=True)
class Bench:
    """One benchmark run, as every section sees it."""

    work: Path  # scratch: each section makes (and empties) a folder of its own here
    cache: Path  # generated images, kept between runs
    model_dir: Path  # the tiny CLIP
    sizes: Sizes  # every section's sizes, full or --quick
    quick: bool


@dataclass(frozen=True)
class Metric:
    """One line of the printed table: ``check(value, report)`` gives the verdict (full runs only)."""

    label: str
    key: str
    fmt: str
    target: str = ""
    check: Callable[[float, Report], bool] | None = None


@dataclass(frozen=True)
class Section:
    """What a section module (ingest.py, search.py, ...) hands to run.py as ``SECTION``."""

    name: str  # its --only value
    run: Callable[[Bench], Report]  # measures; returns its keys of the report
    full_sizes: Sizes
    quick_sizes: Sizes
    metrics: tuple[Metric, ...]  # its lines of the printed table, in order
    report_keys: tuple[str, ...]  # the keys a complete report must hold (the smoke test checks them)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def images_per_s(count: int, work: Callable[[], object]) -> float:
    """``count`` divided by the seconds ``work()`` takes, GPU work included (synchronised before and after)."""
    import torch  # only the GPU sections call this

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")
