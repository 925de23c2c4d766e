"""No silent skips in CI: a pytest plugin (loaded by tests/conftest.py) that fails the run when a test was
skipped for any reason but the one allowed, the GPU tier's "needs CUDA" on a machine without CUDA.

A skip is a test that did not prove what it names; on a developer's machine that may be fine (no
systemd, no root), in CI it hides a broken check behind a green run. Enforced where ``CI`` is true or
``IMAGE_SEARCH_TESTS_NO_SKIPS=1`` (``.ci/run`` sets both ways); elsewhere the skips are only listed, as pytest's
``-ra`` lists them anyway.
"""

from __future__ import annotations

import os

import pytest

# The only skip CI accepts, and only for tests marked ``gpu`` (tests/test_gpu.py).
NEEDS_CUDA = "needs CUDA"
GPU_MARKER = "gpu"


def enforced(environ: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    return environ.get("CI", "").lower() in ("true", "1") or environ.get("IMAGE_SEARCH_TESTS_NO_SKIPS") == "1"


def skip_reason(report: pytest.TestReport) -> str:
    """The reason a skipped report gives, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def is_allowed(report: pytest.TestReport) -> bool:
    return GPU_MARKER in report.keywords and skip_reason(report) == NEEDS_CUDA


class SkipWatch:
    """Collects the skips that are not allowed; fails the session on them where that is enforced."""

    def __init__(self) -> None:
        self.unexpected: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and not is_allowed(report):
            self.unexpected.append(f"{report.nodeid}: {skip_reason(report)}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.unexpected and enforced() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.unexpected:
            return
        if enforced():
            terminalreporter.section("skips not allowed in CI", sep="=", red=True, bold=True)
            terminalreporter.line(f"only tests marked '{GPU_MARKER}' may be skipped, with \"{NEEDS_CUDA}\"; these "
                                  "were skipped, so the run fails:")
        else:
            terminalreporter.section("skipped (CI would fail on these)", sep="=", yellow=True)
        for line in self.unexpected:
            terminalreporter.line(f"  {line}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipWatch(), "image-search-skip-watch")
