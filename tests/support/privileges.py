"""Stories about folders a user cannot read or write, told as such even when the tests run as root (CI does):
root reads and writes any folder, so there the story runs with the effective user and group of ``nobody``.

``unprivileged()`` drops to ``nobody`` for the block (effective ids only, so it can come back) and checks
that the drop holds; ``reachable_dir()`` is a scratch folder ``nobody`` owns (pytest's own tmp_path is
root's, 0700, and ``nobody`` could not even reach it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

UNPRIVILEGED_USER = "nobody"


def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam(UNPRIVILEGED_USER)


@contextmanager
def unprivileged() -> Iterator[None]:
    """The block runs as ``nobody`` when this process is root; as this user otherwise (no privilege to drop)."""
    if os.geteuid() != 0:
        yield
        return
    user = _nobody()
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(user.pw_gid)
    os.seteuid(user.pw_uid)
    try:
        # A story that still ran with root's rights would prove nothing: the drop must hold.
        assert not os.access("/root", os.W_OK, effective_ids=True), "still privileged"
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def give_to_unprivileged(path: Path) -> None:
    """Make ``path`` belong to the user ``unprivileged()`` runs as (a no-op when not root)."""
    if os.geteuid() == 0:
        user = _nobody()
        os.chown(path, user.pw_uid, user.pw_gid)


@contextmanager
def reachable_dir() -> Iterator[Path]:
    """A fresh folder the unprivileged user owns and can reach, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="image-search-unprivileged-"))
    try:
        path.chmod(0o755)
        give_to_unprivileged(path)
        yield path
    finally:
        for folder, dirs, _ in os.walk(path):  # a folder the story locked must not stop the cleanup
            for name in dirs:
                os.chmod(os.path.join(folder, name), 0o755)
        shutil.rmtree(path, ignore_errors=True)
