"""Smoke test of the fleet benchmark: ``fleet.py --quick`` runs end to end (one service, then two sharing a
database) and reports every key as a positive, finite number. No timing is asserted."""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import warm
from tests.benchmarks.fleet import REPORT_KEYS

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)  # its own subprocess timeout is 600 s, plus its checks and a loaded machine
def test_quick_fleet_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    report_path = tmp_path / "fleet.json"
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.fleet", "--quick", "--json", str(report_path),
                           "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, warm.WARM_VARIABLE: "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-16000:]
    report = json.loads(report_path.read_text())
    assert report["quick"] is True
    for key in REPORT_KEYS:
        value = report[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
