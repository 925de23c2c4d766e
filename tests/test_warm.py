"""The warm parent the end-to-end tests fork their ``image-search`` runs from (tests/support/warm.py):
a run with the test process's environment, as it is by now (torch and the modules under test imported,
pytest's variables set), is forked, not started cold. When every run started cold by mistake, the whole
suite took twice as long, and nothing failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import warm
from tests.support.env import child_env, write_bytecode
from tests.support.failures import fault_env

pytestmark = pytest.mark.e2e

CLI = Path(sys.executable).parent / "image-search"


def test_a_run_with_this_process_environment_is_forked_from_the_warm_parent() -> None:
    import torch._inductor.config  # noqa: F401  (what a test process has imported by the end of a run)

    parent = warm.parent()
    env = child_env()
    differing = sorted(k for k in env.keys() | parent.env.keys() if env.get(k) != parent.env.get(k))
    assert warm.warmable(env, parent.env), differing
    with warm.popen([str(CLI), "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    stdin=subprocess.DEVNULL) as proc:
        out, err = proc.communicate(timeout=60)
    assert isinstance(proc, warm.WarmPopen)
    assert proc.returncode == 0 and "image-search" in out, err


def test_a_run_with_an_induced_fault_is_forked_too() -> None:
    env = fault_env(FAULT_NO_FONTS="1")
    assert warm.warmable(env, warm.parent().env)


def test_a_run_with_another_import_time_environment_starts_cold() -> None:
    assert not warm.warmable(child_env(OMP_NUM_THREADS="7"), warm.parent().env)


def test_the_processes_of_the_suite_keep_what_they_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """With PYTHONDONTWRITEBYTECODE in the shell, every process of the suite compiled torch and
    transformers from source again (15 s against 5 s each; the suite 6:57 against 4:05):
    tests/support/env.write_bytecode lifts it for this process and its children."""
    probe = "import os, sys; print(sys.dont_write_bytecode, 'PYTHONDONTWRITEBYTECODE' in os.environ)"
    child = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True, check=True)
    assert (sys.dont_write_bytecode, child.stdout.split()) == (False, ["False", "False"])
    # And whatever this shell says: the variable set, the helper conftest.py calls lifts it.
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    write_bytecode()
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ and sys.dont_write_bytecode is False


def test_torch_threads_wait_passively_unless_the_environment_says_otherwise() -> None:
    """Issue 16: torch's OpenMP threads spinning after each parallel region took their cores from the
    preprocessing workers (index 372-375 against 425-513 images/s on 2 cores). The package asks for
    passive waiting before anything of it imports torch; a value in the environment is kept."""
    probe = "import os, image_search.embed; print(os.environ['OMP_WAIT_POLICY'])"
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for env, expected in ((base, "PASSIVE"), ({**base, "OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")):
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [expected]
