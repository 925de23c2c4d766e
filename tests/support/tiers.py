"""The test tiers, and a guard that keeps the unit tier what it says (a pytest plugin, loaded by conftest.py).

- **unit** (no marker): no PostgreSQL, no model, no subprocess. ``uv run pytest -m unit`` runs them all,
  in well under a minute on two cores: the tier to run while changing code.
- **integration** (``pytestmark = pytest.mark.integration``): a real PostgreSQL (the embedded one, its
  initdb shared by the session: tests/support/pgdata.py) or the tiny model, in this process.
- **e2e** (``pytestmark = pytest.mark.e2e``): processes, signals, a real systemd, several services.

A test module names its tier once, at the top; a test may name another for itself. A unit test that
reaches for a database connection, a child process or the model fails with ``UnitTierViolation``, so
"unit" is a fact checked at every run, not a label.
"""

from __future__ import annotations

import multiprocessing.process
import subprocess

import pytest

TIERS = ("unit", "integration", "e2e")


class UnitTierViolation(AssertionError):
    """A test of the unit tier reached for what only the integration and end-to-end tiers may use."""


def tier_of(item: pytest.Item) -> str:
    named = [tier for tier in TIERS[1:] if item.get_closest_marker(tier) is not None]
    if len(named) > 1:
        raise pytest.UsageError(f"{item.nodeid} is marked both {' and '.join(named)}: a test has one tier")
    return named[0] if named else "unit"


def _refuse(what: str):
    def refused(*args: object, **kwargs: object):
        raise UnitTierViolation(f"a unit test may not {what}: mark the test (or its module) "
                                "integration or e2e (tests/support/tiers.py)")
    return refused


# The fixtures that bring the model in (tests/conftest.py, tests/support/story.py).
MODEL_FIXTURES = frozenset({"tiny_model_dir", "embedder", "story_factory"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: no PostgreSQL, no model, no subprocess (the default: unmarked "
                                       "tests are unit tests; `uv run pytest -m unit`)")
    config.addinivalue_line("markers", "integration: a real PostgreSQL or the tiny model, in-process")
    config.addinivalue_line("markers", "e2e: processes, signals, a real systemd, several services")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Unmarked means unit; the marker makes `-m unit` select exactly them.
    for item in items:
        if tier_of(item) == "unit":
            item.add_marker(pytest.mark.unit)
    # The slow tiers first (a stable sort: files keep their order within a tier), so that pytest-xdist's
    # workers start on the long end-to-end files and finish together on the short unit ones.
    items.sort(key=lambda item: -TIERS.index(tier_of(item)))


def pytest_runtest_setup(item: pytest.Item) -> None:
    wanted = MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if tier_of(item) == "unit" and wanted:
        _refuse(f"load the model (it asks for {', '.join(sorted(wanted))})")()


@pytest.fixture(autouse=True)
def _unit_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if tier_of(request.node) != "unit":
        return
    import psycopg2

    from tests.support import pgdata

    monkeypatch.setattr(pgdata, "_root", None)  # its trees get no pgdata: no server ever starts for them
    monkeypatch.setattr(psycopg2, "connect", _refuse("connect to PostgreSQL"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("start a process"))
