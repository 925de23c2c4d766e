"""Smoke test of the benchmark, ingest and search: ``python -m tests.benchmarks.run --quick`` runs end to end
and writes a complete, sane report and its chart (tests/support/benchmark_smoke.py; the other sections in
test_benchmark_smoke_store.py and test_benchmark_smoke_service.py).

No timing is asserted (shared, noisy machines): only that every key is there and is a positive,
finite number (memory growth may be negative: finite is enough), and that the chart is a PNG.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.support.benchmark_smoke import run_quick_benchmark

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)  # its own subprocess timeout is 600 s, plus its checks and a loaded machine
def test_quick_benchmark_of_ingest_and_search_writes_a_complete_report(tmp_path: Path) -> None:
    chart_path = tmp_path / "chart.png"
    report = run_quick_benchmark(tmp_path, ("ingest", "search"), chart=chart_path)
    assert 0 < report["recall_at_10"] <= 1
    # The index finds what the exact search finds: the README's target (1.000 measured at --quick's sizes).
    # Recall is no timing: a broken ef_search or index answers fewer or other rows on any machine.
    assert report["recall_at_10"] >= 0.95, report["recall_at_10"]
    assert report["search_uses_index"] == 1  # the index path, not an exact scan, was measured
    assert report["search_full_scan_matches_exact"] == 1  # the baseline's answers are the exact ones
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    with Image.open(chart_path) as im:
        assert im.format == "PNG" and im.size[0] > 500
