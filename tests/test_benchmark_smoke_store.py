"""Smoke test of the benchmark's preprocessing, store and ceiling sections (tests/support/benchmark_smoke.py):
every key there, a positive finite number. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.benchmark_smoke import run_quick_benchmark

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)  # its own subprocess timeout is 600 s, plus its checks and a loaded machine
def test_quick_benchmark_of_preprocessing_and_the_store_writes_a_complete_report(tmp_path: Path) -> None:
    run_quick_benchmark(tmp_path, ("preprocess", "store", "ceiling"))
