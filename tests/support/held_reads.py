"""Reads held in the preprocessing workers (``stuck_read/sitecustomize.py``): a file named ``stuck*`` is
never read; the first one named ``slow*`` is read, then held ``slow_s`` seconds (later ones are not).
``mark`` is made when a worker begins on either."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.env import child_env

STUCK_READ = Path(__file__).parent / "stuck_read"


def _held(mark: Path, slow_s: float) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(STUCK_READ), os.environ.get("PYTHONPATH", "")]),
            "STUCK_READ_MARK": str(mark), "STUCK_READ_SLOW_S": str(slow_s)}


def hold_reads(monkeypatch: pytest.MonkeyPatch, mark: Path, *, slow_s: float = 0.0) -> None:
    """Workers started by this process from now on hold reads as above."""
    for name, value in _held(mark, slow_s).items():
        monkeypatch.setenv(name, value)


def held_reads_env(mark: Path, *, slow_s: float = 0.0) -> dict[str, str]:
    """The environment of a child process whose workers hold reads as above."""
    return child_env(**_held(mark, slow_s))
