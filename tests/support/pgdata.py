"""One initialised pgdata per test session, copied into each test tree instead of running initdb there.

A tree whose service uses the embedded PostgreSQL would run initdb when its server first starts: 3 s
on an idle 2-core machine, 20 s on a loaded one, and the suite starts well over a hundred such
servers. pgserver skips initdb for a pgdata that has one (``PG_VERSION``), so ``seed`` copies a pgdata
made once per session into the tree's state directory: the server a test starts is still its own,
started and stopped by the code under test, on its own data. Only the initdb is shared.

``enable`` (a session fixture in conftest.py) turns this on, and names the template in the environment
(``TEMPLATE_VARIABLE``) so that a benchmark a test runs as a subprocess seeds from the same one; a
benchmark run by hand keeps its own under its work folder (``enable_for_benchmark``): initdb is not
what any benchmark measures. A test of the very first start passes ``fresh_pgdata=True`` to
``write_config``.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

_root: Path | None = None
_template: Path | None = None
TEMPLATE_VARIABLE = "IMAGE_SEARCH_TESTS_PGDATA_TEMPLATE"


def enable(root: Path) -> None:
    """Keep the session's template under ``root`` (made on first use: a unit-tier run never makes one)."""
    global _root
    _root = root
    os.environ[TEMPLATE_VARIABLE] = str(root)


def enable_for_benchmark(work: Path) -> None:
    """A benchmark's trees seed from the test session's template when a test runs it, else from one of its own."""
    enable(Path(os.environ.get(TEMPLATE_VARIABLE) or work / "pgdata-template"))


def _made_template() -> Path | None:
    """The template, made by the first process of the session that needs it (pytest-xdist's workers share
    it: they wait on a lock while one makes it, and never run pgserver's first-time set-up side by side)."""
    global _template
    if _root is None:
        return None
    if _template is None:
        from image_search.store import EmbeddedPostgres

        _root.mkdir(parents=True, exist_ok=True)
        pgdata = _root / "pgdata"
        with open(_root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (pgdata / "PG_VERSION").exists():
                EmbeddedPostgres(pgdata).stop()  # initdb, start, stop: a cleanly shut down, empty cluster
        _template = pgdata
    return _template


def seed(state_directory: Path) -> None:
    """Give ``state_directory`` a copy of the session's initialised pgdata, unless it has one already."""
    target = state_directory / "pgdata"
    if target.exists():
        return
    template = _made_template()
    if template is None:
        return
    # cp -a keeps the owner: run as root, pgserver's initdb ran as its own system user and the server
    # refuses a data directory that user does not own.
    subprocess.run(["cp", "-a", str(template), str(target)], check=True)
