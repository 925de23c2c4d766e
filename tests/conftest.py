"""Shared fixtures. The helpers the tests and the benchmark share live in tests/support/."""

from __future__ import annotations

import atexit
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.env import use_offline_hub, use_one_torch_thread, write_bytecode

use_one_torch_thread()  # before anything imports torch
write_bytecode()  # before anything big is imported, and before pytest-xdist starts its workers

from tests.support import pgdata, warm  # noqa: E402
from tests.support.db import embedded_database  # noqa: E402
from tests.support.model import save_tiny_clip  # noqa: E402
from image_search.store import Database  # noqa: E402
from tests.support.story import embedder, story_factory  # noqa: E402, F401  (fixtures: the service in-process)
from tests.support.held_reads import slow_begun  # noqa: E402, F401  (a fixture: a slow read in a worker)

use_offline_hub()

# CI fails on any skip but the GPU tier's "needs CUDA" (tests/support/skips.py).
pytest_plugins = ["tests.support.skips", "tests.support.tiers"]


@pytest.fixture(scope="session", autouse=True)
def _shared_start_up_costs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Test trees start from one initialised pgdata per session (tests/support/pgdata.py); under
    pytest-xdist its workers share one, in the folder above their own temp folders."""
    basetemp = tmp_path_factory.getbasetemp()
    shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    pgdata.enable(shared / "pgdata-template")
    warm.enable()  # and image-search runs fork from a warm parent (tests/support/warm.py)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Database]:
    """The embedded PostgreSQL of one test module (integration tier), started once for its tests; the
    module's ``DATABASE_CONFIG`` (config keys, as ``write_config`` takes them) sets it up."""
    config = getattr(request.module, "DATABASE_CONFIG", {})
    with embedded_database(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), **config) as db:
        yield db


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the controller starts the session's one warm parent (tests/support/warm.py)
    while the workers start; a unit-tier run starts no ``image-search`` process, and so none."""
    if (not os.environ.get("PYTEST_XDIST_WORKER") and config.getoption("numprocesses", None)
            and config.getoption("markexpr", "") != "unit" and os.environ.get("IMAGE_SEARCH_TESTS_COLD") != "1"):
        warm.share()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every test module is imported now, torch and transformers with them: hundreds of thousands of objects
    that live as long as this process. Frozen (as the service freezes its own once the model is loaded,
    runtime.py), the cyclic garbage collector stops walking them at each full collection: about 1 s of CPU
    each here, a dozen or more in a worker's session, and five more in pytest's own collections at exit."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # for the interpreter's last collection (runtime.py says why)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core and two more, at most four. Many tests mostly wait (on an
    ``image-search`` process, a lease, a timer); measured on 2 cores, 3 workers ran the suite in 6:19
    against 6:57 for 2, at 180% CPU against 165% (later runs of 3: 7:23-7:31, the machine is shared);
    later still, the same tree in 6:19 with 3 workers and 5:35 with 4 (pytest's own times, one after
    the other)."""
    return min(4, len(os.sched_getaffinity(0)) + 2)
