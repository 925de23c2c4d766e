"""Which disks the system expects under a folder and which are mounted now: a sub-folder of
``source-directory`` that ``/etc/fstab`` names as a mount point but that is not mounted (a NAS share not
up yet, a USB disk unplugged) is an empty directory, and its pictures must not read as deleted.

Only the two tables are read: a mount made by hand and never written into fstab cannot be told from a
folder emptied on purpose, and is not protected (the README says so).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

FSTAB = Path("/etc/fstab")
MOUNTINFO = Path("/proc/self/mountinfo")

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # both tables write a space in a path as \040


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountTable:
    """The mount points fstab names (``expected``) and those mounted now (``mounted``), as absolute paths."""

    expected: frozenset[Path]
    mounted: frozenset[Path]

    def unmounted_under(self, folder: Path) -> list[Path]:
        """The expected mount points at or under ``folder`` that are not mounted, named under ``folder`` as
        given (fstab names real paths: ``folder`` may be reached through a link)."""
        real = Path(os.path.realpath(folder))
        return sorted(Path(folder) / point.relative_to(real)
                      for point in self.expected - self.mounted if point.is_relative_to(real))


def read_mount_table(fstab: Path = FSTAB, mountinfo: Path = MOUNTINFO) -> MountTable:
    """Both tables; a table that cannot be read counts as empty (a container without fstab expects nothing)."""
    return MountTable(expected=frozenset(_fstab_points(fstab)), mounted=frozenset(_mountinfo_points(mountinfo)))


def _fstab_points(path: Path) -> list[Path]:
    points = []
    for fields in _lines(path):
        # fs_spec fs_file fs_vfstype ...: swap and "none" are no place in the file tree
        if len(fields) >= 2 and fields[1].startswith("/") and (len(fields) < 3 or fields[2] != "swap"):
            points.append(Path(os.path.normpath(_unescape(fields[1]))))
    return points


def _mountinfo_points(path: Path) -> list[Path]:
    # id parent major:minor root mount-point options ...
    return [Path(_unescape(fields[4])) for fields in _lines(path) if len(fields) >= 5]


def _lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        log.debug("mount_table_unreadable", path=path, error=exc.strerror)
        return []
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
