"""Smoke test of the benchmark's service, filtered-search and duplicates sections
(tests/support/benchmark_smoke.py): every key there, a positive finite number. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.benchmark_smoke import run_quick_benchmark

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)  # its own subprocess timeout is 600 s, plus its checks and a loaded machine
def test_quick_benchmark_of_the_service_and_filtered_search_writes_a_complete_report(tmp_path: Path) -> None:
    report = run_quick_benchmark(tmp_path, ("service", "filtered", "duplicates"))
    assert report["rescan_reindexed"] == 0
    # Filtered search is never short without saying so, and its recall holds on both of its paths.
    assert report["filtered_short_unflagged"] == 0 and report["floor_wrong_while_complete"] == 0
    assert min(report[f"filtered_recall_at_10_{level}"] for level in ("50", "10", "1", "0_1")) >= 0.95
