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


# What ``fresh_dir`` puts aside: a hidden sibling named ``.<name>.trash-<ns>``, deleted by ``empty_trash``
# when the run ends. Deleting thousands of files in the middle of a run taxed every file the next
# minutes created. This VM's disk is ext4 without a journal, where allocating an inode skips each inode of
# the group freed in the last 60 s (360 s while its inode-table block is dirty): ``recently_deleted()`` in
# fs/ext4/ialloc.c, which runs only without a journal. ``perf`` showed it as 60-80% of the kernel time of
# creating a file after the ceiling section deleted its 10,000 scratch copies (0.3-0.9 ms a file against
# 0.05). The product's own runs do not delete thousands of files before they ingest; a benchmark that
# does measured its own cleanup.
TRASH_MARK = ".trash-"
# How deep under the work folder ``fresh_dir`` is used (a section's root, and folders in it).
_TRASH_DEPTH = 3


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path``; whatever was there is put aside for ``empty_trash`` (see TRASH_MARK)."""
    if path.exists():
        os.rename(path, path.with_name(f".{path.name}{TRASH_MARK}{time.time_ns()}"))
    path.mkdir(parents=True)
    return path


def empty_trash(work: Path) -> int:
    """Delete what ``fresh_dir`` put aside under ``work`` (this run's and any earlier run's); how many."""
    trashed = [p for depth in range(_TRASH_DEPTH) for p in work.glob("*/" * depth + f".*{TRASH_MARK}*")]
    for path in trashed:
        shutil.rmtree(path, ignore_errors=True)
    return len(trashed)


def file_create_ms(folder: Path, count: int = 2000, size: int = 6000) -> float:
    """Kernel CPU milliseconds to create one small file in a fresh ``folder`` (left for ``fresh_dir``'s
    trash): how much this disk charges right now for what ingest does twice per image (TRASH_MARK)."""
    folder = fresh_dir(folder)
    data = b"\0" * size
    before = os.times()
    for i in range(count):
        with open(folder / f"{i:05d}", "wb") as handle:
            handle.write(data)
    return (os.times().system - before.system) * 1000 / count


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
