"""The environment of the test (or benchmark) process and of the ``image-search`` processes it starts."""

from __future__ import annotations

import os
import sys

# The tiny model is on disk: never reach for the Hugging Face hub.
OFFLINE_HUB = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Set by systemd for the unit that runs us (e.g. CI under systemd): a child must not inherit them,
# or it would notify (or log to the journal) on our behalf.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
# The service's own configuration variables: a developer's shell must not change what a test runs.
CONFIG_VARIABLE_PREFIX = "IMAGE_SEARCH_"


# One intra-op thread per process: the suite runs pytest-xdist workers and many image-search processes on
# few cores, and OpenMP threads spinning against each other there cost CPU time, not coverage (the product
# keeps torch's default; the tiny model gains nothing from threads).
ONE_TORCH_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def use_one_torch_thread() -> None:
    """This process and its children run torch on one thread (before torch is imported)."""
    os.environ.update(ONE_TORCH_THREAD)


def write_bytecode() -> None:
    """This process and its children cache what they compile (``__pycache__``), whatever the shell says.

    With PYTHONDONTWRITEBYTECODE set (this workplace's sessions set it) no process keeps a ``.pyc``,
    so each one the suite starts (every pytest-xdist worker, the warm parent, each worker pool and
    benchmark, each service under systemd) compiles torch and transformers from source again: 15 s
    against 5 s for one cold import here. Measured on 2 cores, the whole suite took 6:57 with it set
    and 4:05 with the cache written."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False


def use_offline_hub() -> None:
    """Make this process offline for the model hub (before transformers is imported)."""
    os.environ.update(OFFLINE_HUB)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for an ``image-search`` child: ours, offline, without systemd's per-unit
    variables and without IMAGE_SEARCH_* settings; then ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(CONFIG_VARIABLE_PREFIX) and key not in SYSTEMD_VARIABLES}
    env.update(OFFLINE_HUB)
    env.update(extra)
    return env
