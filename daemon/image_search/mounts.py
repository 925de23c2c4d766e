"""Which disks the system expects under a folder and which are mounted now: a sub-folder of
``source-directory`` that ``/etc/fstab`` names as a mount point but that is not mounted (a NAS share not
up yet, a USB disk unplugged) is an empty directory, and its pictures must not read as deleted.

A mount made by hand (or by a systemd unit) is in neither fstab nor, once it is gone, mountinfo: so the mount
points seen mounted under the source folder at a rescan are remembered in processed-directory
(``MOUNT_RECORD``, ``remember_mounts``), and one of them with nothing mounted is kept as one fstab names.
A remembered point whose folder is deleted was taken away on purpose, and is forgotten. A hand mount never
seen mounted by a rescan cannot be told from a folder emptied on purpose (the README says so).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from .preprocess import write_atomically

log = structlog.get_logger(__name__)

FSTAB = Path("/etc/fstab")
MOUNTINFO = Path("/proc/self/mountinfo")

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # both tables write a space in a path as \040


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


# In processed-directory (which serves one source folder): the real paths of the mount points seen mounted under
# it, a JSON list.
MOUNT_RECORD = ".mount-points"


@dataclass(frozen=True)
class MountTable:
    """The mount points fstab names (``expected``), those mounted now (``mounted``), and those seen mounted at
    an earlier rescan (``remembered``), as absolute paths."""

    expected: frozenset[Path]
    mounted: frozenset[Path]
    remembered: frozenset[Path] = frozenset()

    def unmounted_under(self, folder: Path) -> list[Path]:
        """The expected or remembered mount points at or under ``folder`` that are not mounted, named under
        ``folder`` as given (the tables name real paths: ``folder`` may be reached through a link)."""
        real = Path(os.path.realpath(folder))
        return sorted(Path(folder) / point.relative_to(real)
                      for point in (self.expected | self.remembered) - self.mounted if point.is_relative_to(real))

    def in_fstab(self, point: Path) -> bool:
        return Path(os.path.realpath(point)) in self.expected


def remember_mounts(table: MountTable, folder: Path, record: Path) -> MountTable:
    """``table`` with ``remembered``: the mount points at or under ``folder`` in ``record`` and those mounted
    there now, less those whose folder is gone; ``record`` is rewritten when that changes (a record that
    cannot be written costs this protection only, never the rescan)."""
    real = Path(os.path.realpath(folder))
    known = _recorded(record)
    seen = {point for point in (known or set()) | table.mounted if point.is_relative_to(real) and os.path.isdir(point)}
    if seen != known:  # None (unreadable) too: written again, so that it is said once
        try:
            write_atomically(record, (json.dumps(sorted(map(os.fsdecode, seen))) + "\n").encode())
        except OSError as exc:
            log.warning("mount_points_not_recorded", path=record, error=exc.strerror)
    return MountTable(table.expected, table.mounted, frozenset(seen))


def _recorded(record: Path) -> set[Path] | None:
    """The points in ``record``: none when there is none, None when it cannot be read."""
    try:
        points = json.loads(record.read_bytes())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        log.warning("mount_points_record_unreadable", path=record, error=str(exc))
        return None
    return {Path(p) for p in points if isinstance(p, str)} if isinstance(points, list) else None


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
