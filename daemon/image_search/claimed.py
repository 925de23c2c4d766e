"""The folders this installation has written into, each remembered in a record in state-directory.

A folder the service writes to (``processed-directory``, ``output-directory``) may be on a disk of its own
that is not always mounted. Missing or empty then, it looks like a folder never used; written into, it puts
everything onto the disk under the mount point, hidden again once the disk is back. The folder's own marker
file proves it is the real one; this record, kept off its disk, says it was used before, so that a start
can tell "not mounted" from "first use" even where nothing else remembers the folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

Claim = list[str]


def claims_in(record: Path) -> list[Claim] | None:
    """The claims ``record`` holds (a JSON list of lists of strings); None when it cannot be read (said,
    and left as it is: a record written by hand is the user's)."""
    try:
        claims = json.loads(record.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("folder_claims_unreadable", path=record, error=str(exc),
                    detail="a folder whose disk is not mounted is not told from one never used")
        return None
    return [c for c in claims if isinstance(c, list)] if isinstance(claims, list) else None


def claimed_before(record: Path, claim: Claim) -> bool:
    return claim in (claims_in(record) or [])


def remember_claim(record: Path, claim: Claim) -> None:
    """Add ``claim`` to ``record``. A record that cannot be read or written costs this protection only,
    never the run. Written whole under a temporary name, then renamed; its folder is never made here (the
    start makes state-directory)."""
    claims = claims_in(record)
    if claims is None or claim in claims:
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write((json.dumps([*claims, claim]) + "\n").encode())
            os.replace(tmp, record)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("folder_claim_not_recorded", path=record, error=exc.strerror or str(exc))


def holds_marker(folder: Path, name: str) -> bool:
    """True while ``folder`` holds its marker file ``name``: it is the folder that was written into, on its
    own disk. A marker that cannot be looked at (no permission, a stale network handle, an I/O error) is
    not taken for gone: the write that follows then names what is wrong."""
    try:
        os.lstat(os.path.join(folder, name))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        pass
    return True
