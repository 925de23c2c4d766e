"""Reads held in the preprocessing workers (``stuck_read/sitecustomize.py``): a file named ``stuck*`` is
never read; one named ``slow*`` is read, then held ``slow_s`` seconds (its later reads are not).
``mark`` is made when a worker begins on either. And what the slow-file stories share: the ``slow_begun``
fixture (``SLOW_S`` seconds; a file is slow after 0.3 s), ``step_until`` and ``drop``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from image_search.watch import ChangeKind, Folder
from tests.support.env import child_env
from tests.support.files import save_picture
from tests.support.story import SETTLE, Story

STUCK_READ = Path(__file__).parent / "stuck_read"


def _held(mark: Path, slow_s: float, spin: bool = False) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(STUCK_READ), os.environ.get("PYTHONPATH", "")]),
            "STUCK_READ_MARK": str(mark), "STUCK_READ_SLOW_S": str(slow_s), **({"STUCK_READ_SPIN": "1"} if spin else {})}


def hold_reads(monkeypatch: pytest.MonkeyPatch, mark: Path, *, slow_s: float = 0.0, spin: bool = False) -> None:
    """Workers started by this process from now on hold reads as above (``spin``: computing, not asleep)."""
    for name, value in _held(mark, slow_s, spin).items():
        monkeypatch.setenv(name, value)


def held_reads_env(mark: Path, *, slow_s: float = 0.0) -> dict[str, str]:
    """The environment of a child process whose workers hold reads as above."""
    return child_env(**_held(mark, slow_s))


SLOW_S = 10.0  # how long the slow picture holds its worker: far longer than anything else here takes


@pytest.fixture
def slow_begun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Set before the service starts its workers. The mark: the slow read was begun."""
    import image_search.workers as workers

    monkeypatch.setattr(workers, "SLOW_FILE_S", 0.3)
    mark = tmp_path / "slow-begun"
    hold_reads(monkeypatch, mark, slow_s=SLOW_S)
    return mark


def step_until(story: Story, condition: Callable[[], object], what: str, timeout: float) -> None:
    """The loop's passes, the clock past each settle period, until ``condition`` holds (``timeout``: real s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        story.clock.advance(SETTLE + 0.01)
        story.service.step()


def drop(story: Story, name: str, seed: int) -> Path:
    path = save_picture(story.images / name, seed=seed, size=(120, 90))
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)
    return path
