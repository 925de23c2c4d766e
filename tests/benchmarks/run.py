"""Benchmark: our paths against the original tool's naive paths, side by side in one run.

    uv run python -m tests.benchmarks.run [--quick] [--json PATH] [--chart PATH] [--work-dir DIR] [--only SECTION]

Run from the repository root. Ratios matter more than absolute times: these machines are shared and
noisy. Each section is a module of this package that measures one thing and hands ``SECTION`` to
this runner (see ``common.Section``):

0. preprocess - decode, orient, fit, JPEG, MD5 on one core and on every core (worker processes)
   (preprocess.py).
1. ingest  - camera-size JPEGs end to end, ``Indexer.index_folder`` versus the original
   one-at-a-time path (ingest.py).
2. search  - ``EmbeddingStore.search`` (HNSW) over 100,000 x 1024 vectors, recall and latency, versus
   the original full scan (search.py).
2b. filtered - ``EmbeddingStore.ranking`` with a folder filter matching 50%, 10%, 1% and 0.1% of those
   100,000 rows: recall, p95 against the unfiltered search, and no short answer left unflagged (filtered.py).
3. store   - writing 1024-d rows: binary COPY and a bulk index build against the text, row-by-row way,
   and recall during a bulk load (store_write.py).
4. ceiling - ``index`` of 5,000 small PNGs with a tiny 1024-d model against preprocessing alone on the
   same files, and the in-process service's ingest against ``index`` on 2,000 of them (ceiling.py).
5. service - the real ``image-search serve``: drop-to-result latency idle and under ingest, restart
   on unchanged files, memory (service.py).
6. duplicates - planted near-copies and copies among real files (precision, recall), and the
   duplicates report over 100,000 synthetic rows (duplicates.py).
7. gpu     - with --gpu: a random-weight CLIP ViT-L/14 on CUDA, the forward pass alone against
   ``embed_images`` (from device tensors) and ``index`` end to end (gpu.py).

This module only parses the flags, runs the sections, prints the table and writes the JSON report
and the chart. Generated images are cached under ``<work-dir>/cache`` (made once, reused by later
runs). ``--quick`` shrinks every size so CI can run it as a smoke test; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tests.support.env import use_offline_hub

use_offline_hub()  # before any section imports transformers

from image_search.logs import configure_logging  # noqa: E402
from tests.benchmarks import ceiling, duplicates, filtered, gpu, ingest, preprocess, search, service, store_write  # noqa: E402
from tests.benchmarks.common import Bench, Report, Section, empty_trash, fresh_dir, say  # noqa: E402
from tests.benchmarks.photos import GEN_VERSION  # noqa: E402
from tests.support import pgdata  # noqa: E402
from tests.support.model import save_tiny_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# In the order they run and print. A new section: a module with a SECTION, added here.
SECTIONS: tuple[Section, ...] = (preprocess.SECTION, ingest.SECTION, search.SECTION, filtered.SECTION,
                                 store_write.SECTION, ceiling.SECTION, service.SECTION, duplicates.SECTION,
                                 gpu.SECTION)
# Run only when asked for (--gpu, or --only gpu): it needs a CUDA device to mean anything.
ON_REQUEST = {gpu.SECTION.name}
FULL = {key: value for section in SECTIONS for key, value in section.full_sizes.items()}
QUICK = {key: value for section in SECTIONS for key, value in section.quick_sizes.items()}
REPORT_KEYS = tuple(key for section in SECTIONS if section.name not in ON_REQUEST for key in section.report_keys)


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


def print_table(report: Report) -> None:
    rows = []
    for metric in (m for section in SECTIONS for m in section.metrics):
        value = report.get(metric.key)
        shown = metric.fmt.format(value) if isinstance(value, (int, float)) else "n/a"
        verdict = ""
        if metric.check is not None and isinstance(value, (int, float)) and not report.get("quick"):
            verdict = "ok" if metric.check(value, report) else "MISSED"
        rows.append((metric.label, shown, metric.target, verdict))
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
    parser.add_argument("--only", choices=[s.name for s in SECTIONS], action="append",
                        help="run only these sections (repeatable); the report then lacks the others' keys")
    parser.add_argument("--gpu", action="store_true",
                        help="add the GPU section (a random-weight CLIP ViT-L/14 on CUDA; a smoke run without CUDA)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    chosen = set(args.only or [s.name for s in SECTIONS if s.name not in ON_REQUEST])
    if args.gpu:
        chosen.add(gpu.SECTION.name)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # The sections that run the product in this process log as the product does (``image-search``'s
    # default, log-level info): structlog's unconfigured default renders every debug line, a cost on the
    # main thread that no real run pays.
    configure_logging("info")
    pgdata.enable_for_benchmark(work)
    started = time.monotonic()
    report: Report = {"quick": args.quick, "sizes": sizes, "machine": machine_info(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    model_dir = work / "tiny-clip"
    if not (model_dir / "config.json").exists():
        fresh_dir(model_dir)
        save_tiny_clip(model_dir)

    bench = Bench(work=work, cache=work / "cache" / f"v{GEN_VERSION}", model_dir=model_dir, sizes=sizes,
                  quick=args.quick)
    for section in SECTIONS:
        if section.name in chosen:
            section_started = time.monotonic()
            report.update(section.run(bench))
            say(f"{section.name}: done in {time.monotonic() - section_started:.1f} s")
    report["duration_s"] = time.monotonic() - started
    empty_trash(work)  # once no section measures any more (see common.TRASH_MARK)

    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"report: {args.json}")
    if args.chart:
        from tests.benchmarks.chart import draw_chart

        draw_chart(report, args.chart)
        print(f"chart: {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
