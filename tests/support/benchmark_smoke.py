"""The benchmark's smoke tests share this: ``python -m tests.benchmarks.run --quick --only ...`` in a
subprocess, and the check that the sections asked for reported every key as a finite number (positive but
for memory growth). Three test files run three groups of sections: pytest-xdist gives each file to one
worker, and the whole run took about 150 s of one worker's time, the longest of the suite's files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from image_search.launcher import how_it_ended
from tests.benchmarks.common import TRASH_MARK
from tests.benchmarks.run import SECTIONS
from tests.support import warm

REPO = Path(__file__).resolve().parents[2]
MAY_BE_ZERO_OR_NEGATIVE = {"rss_growth_mb"}


def run_quick_benchmark(tmp_path: Path, sections: tuple[str, ...], *, chart: Path | None = None) -> dict:
    """The report of a quick run of ``sections``, checked complete; nothing it put aside is left behind."""
    report_path = tmp_path / "report.json"
    chart_flags = ["--chart", str(chart)] if chart is not None else []
    only = [flag for name in sections for flag in ("--only", name)]
    proc = subprocess.run(
        # faulthandler: a crash (one run in CI died silently between two sections) writes its stacks to stderr.
        [sys.executable, "-X", "faulthandler", "-m", "tests.benchmarks.run", "--quick", "--json", str(report_path), *chart_flags,
         *only, "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, warm.WARM_VARIABLE: "1"},
    )
    assert proc.returncode == 0, f"the benchmark {how_it_ended(proc.returncode)}\n{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
    report = json.loads(report_path.read_text())
    assert report["quick"] is True
    for key in (key for section in SECTIONS if section.name in sections for key in section.report_keys):
        assert key in report, key
        value = report[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        if key not in MAY_BE_ZERO_OR_NEGATIVE:
            assert value > 0, (key, value)
    # What the sections put aside instead of deleting while they measured is gone once the run ends.
    assert [str(p) for p in (tmp_path / "work").rglob(f"*{TRASH_MARK}*")] == []
    return report
