"""CI fails on a skip: a run whose tests pass but one was skipped ends in failure, naming it and its reason,
except for the GPU tier's "needs CUDA" (tests/support/skips.py). Each story is a real pytest run in a
subprocess over a small test file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent

TESTS = textwrap.dedent('''
    import pytest

    def test_passes():
        pass

    @pytest.mark.gpu
    @pytest.mark.skipif(True, reason="needs CUDA")
    def test_on_the_gpu():
        pass

    @pytest.mark.gpu
    def test_gpu_marked_but_skipped_for_another_reason():
        pytest.skip("no driver today")

    def test_a_machine_without_systemd():
        pytest.skip("systemd-analyze is not installed")

    @pytest.mark.xfail(reason="a known bug")
    def test_known_bug():
        assert False
''')


def run_pytest(tmp_path: Path, selection: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_story.py").write_text(TESTS)
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "IMAGE_SEARCH_TESTS_NO_SKIPS", "PYTEST_ADDOPTS")}
    environ.update(env, PYTHONPATH=str(REPO))
    # -c /dev/null: not this project's settings (its testpaths); -p: the plugin tests/conftest.py loads.
    return subprocess.run([sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(tmp_path), "-p",
                           "tests.support.skips", "-p", "no:cacheprovider", "-q", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                           "-k", selection, str(tmp_path / "test_story.py")],
                          cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


def test_in_ci_a_skip_fails_the_run_and_is_named_with_its_reason(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "not nothing", CI="true")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "skips not allowed in CI" in run.stdout
    assert "test_story.py::test_a_machine_without_systemd: systemd-analyze is not installed" in run.stdout
    # A test marked gpu may skip only for want of CUDA.
    assert "test_story.py::test_gpu_marked_but_skipped_for_another_reason: no driver today" in run.stdout
    assert "test_on_the_gpu:" not in run.stdout and "test_known_bug:" not in run.stdout


def test_in_ci_the_gpu_tier_may_skip_for_want_of_cuda(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "test_passes or test_on_the_gpu or test_known_bug", IMAGE_SEARCH_TESTS_NO_SKIPS="1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 1 skipped, 2 deselected, 1 xfailed" in run.stdout, run.stdout


def test_outside_ci_skips_are_listed_and_the_run_passes(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "not nothing")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skipped (CI would fail on these)" in run.stdout
    assert "test_a_machine_without_systemd: systemd-analyze is not installed" in run.stdout
