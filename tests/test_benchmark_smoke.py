"""Smoke test of the benchmark: ``python -m tests.benchmarks.run --quick`` runs end to end and writes
a complete, sane report.

No timing is asserted (shared, noisy machines): only that every key is there and is a positive,
finite number (memory growth may be negative: finite is enough), and that the chart is a PNG.
"""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support import warm
from tests.benchmarks.common import TRASH_MARK
from tests.benchmarks.run import REPORT_KEYS

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent

MAY_BE_ZERO_OR_NEGATIVE = {"rss_growth_mb"}


@pytest.mark.timeout(900)  # its own subprocess timeout is 600 s, plus its checks and a loaded machine
def test_quick_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    report_path, chart_path = tmp_path / "report.json", tmp_path / "chart.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.run", "--quick", "--json", str(report_path), "--chart",
         str(chart_path), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, warm.WARM_VARIABLE: "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["quick"] is True
    for key in REPORT_KEYS:
        assert key in report, key
        value = report[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        if key not in MAY_BE_ZERO_OR_NEGATIVE:
            assert value > 0, (key, value)
    assert 0 < report["recall_at_10"] <= 1
    # The index finds what the exact search finds: the README's target (1.000 measured at --quick's sizes).
    # Recall is no timing: a broken ef_search or index answers fewer or other rows on any machine.
    assert report["recall_at_10"] >= 0.95, report["recall_at_10"]
    assert report["search_uses_index"] == 1  # the index path, not an exact scan, was measured
    assert report["search_full_scan_matches_exact"] == 1  # the baseline's answers are the exact ones
    assert report["rescan_reindexed"] == 0
    # Filtered search is never short without saying so, and its recall holds on both of its paths.
    assert report["filtered_short_unflagged"] == 0 and report["floor_wrong_while_complete"] == 0
    assert min(report[f"filtered_recall_at_10_{level}"] for level in ("50", "10", "1", "0_1")) >= 0.95
    # What the sections put aside instead of deleting while they measured is gone once the run ends.
    assert [str(p) for p in (tmp_path / "work").rglob(f"*{TRASH_MARK}*")] == []
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    with Image.open(chart_path) as im:
        assert im.format == "PNG" and im.size[0] > 500
