"""Entries: what a name in a watched folder is, and reading it without surprises.

A folder can hold more than files: named pipes (a read waits forever for a writer), sockets, devices
(``/dev/zero`` never ends), and symbolic links to anywhere the service's user can read (``/etc/shadow``,
someone's private pictures). So a file is read only

- when ``stat`` says it is a regular file: anything else is refused before it is opened;
- through a link only as ``follow-symlinks`` allows (``LinkPolicy``);
- opened non-blocking, and refused again if the open descriptor is not a regular file (the name may
  have been replaced between the two looks);
- up to the size ``stat`` gave, plus a margin: a file that grows past that is still being written
  (``StillGrowing``), never read without end.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from .errors import ImageSearchError
from .names import escape
from .wording import counted

# Read at most this much beyond the size stat gave: a file still being appended to is seen as such.
GROWTH_MARGIN_BYTES = 1 << 20


@dataclass(frozen=True)
class FileIdentity:
    """Which file a name holds, and which version of it: a file rewritten in place keeps its inode and
    changes its size or times; one renamed over the name has another inode. (Two writes of the same size
    within one tick of the kernel's file clock, a few ms, look alike: that much is beyond a stat.)"""

    device: int
    inode: int
    size: int
    modified_ns: int
    changed_ns: int

    @classmethod
    def of(cls, path: Path, *, follow_links: bool = True) -> FileIdentity | None:
        """The identity of the file at ``path`` (through a link, as it is read; ``follow_links`` False: of
        the entry itself), None when it is gone."""
        try:
            st = os.stat(path, follow_symlinks=follow_links)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FollowLinks(StrEnum):
    """Config key ``follow-symlinks``: which symbolic links in a watched folder are followed."""

    INSIDE = "inside"  # only a link whose target stays inside the folder (the default)
    ALL = "all"  # every link, wherever it points
    NONE = "none"  # no link at all


class EntryRefused(ImageSearchError):
    """A name that is not read: not a regular file, or a link the policy does not follow. ``reason``
    says which, in the user's words."""

    def __init__(self, path: Path, reason: str, *, growing: bool = False) -> None:
        super().__init__(f"{escape(path)}: {reason}")
        self.path = path
        self.reason = reason
        self.growing = growing  # a regular file still being written: worth another look later


def kind_of(mode: int) -> str | None:
    """What a non-regular entry is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


@dataclass(frozen=True)
class LinkPolicy:
    """How far reads may go from ``root`` through symbolic links (``follow``), for one watched folder."""

    follow: FollowLinks
    root: Path
    key: str = "source-directory"  # the folder's config key, for messages
    # The service's own folders (config key, folder) that no link leads onto, into or above, whatever
    # ``follow`` says: the service would read what it writes itself (processed copies of processed copies,
    # one level more at every rescan), its results, the queries waiting in the inbox, its database.
    own_folders: tuple[tuple[str, Path], ...] = ()

    def refusal(self, path: Path) -> str | None:
        """Why reading ``path`` would go where the policy forbids, or None when it may be read. A path
        with no link on the way from ``root`` is always fine (``root`` itself may be a link: that is the
        user's own choice of folder)."""
        if _no_link_below(path, self.root):  # the common case, without resolving both paths from /
            return None
        real = Path(os.path.realpath(path))
        real_root = Path(os.path.realpath(self.root))
        if not real.is_relative_to(real_root) and (own := self.own_folder_refusal(real)) is not None:
            return own
        if self.follow is FollowLinks.ALL:
            return None
        if self.follow is FollowLinks.INSIDE:
            if real.is_relative_to(real_root):
                return None
            return (f"symbolic link to {escape(real)}, outside {self.key}: not followed (config key "
                    f"'follow-symlinks' is 'inside'; 'all' follows every link)")
        lexical = Path(os.path.abspath(path))
        if lexical.is_relative_to(self.root) and real == real_root / lexical.relative_to(self.root):
            return None
        shown = os.readlink(path) if os.path.islink(path) else real
        return f"symbolic link to {escape(shown)}: not followed (config key 'follow-symlinks' is 'none')"

    def own_folder_refusal(self, target: Path, *, what: str = "") -> str | None:
        """Why a link to ``target`` (resolved; ``what``: "the folder " for a folder) is never followed: it
        is one of ``own_folders``, lies inside one or holds one. None when it reaches none of them."""
        for key, folder in self.own_folders:
            own = Path(os.path.realpath(folder))
            if target == own:
                reached = f"which is {key}"
            elif target.is_relative_to(own):
                reached = f"inside {key} ({escape(own)})"
            elif own.is_relative_to(target):
                reached = f"which holds {key} ({escape(own)})"
            else:
                continue
            return (f"symbolic link to {what}{escape(target)}, {reached}: never followed, whatever 'follow-symlinks' "
                    "says (the service's own folders are never read as pictures)")
        return None


def _no_link_below(path: Path, root: Path) -> bool:
    """True when ``path`` names an entry inside ``root`` (lexically, no ``..``) and no part of it below
    ``root`` is a symbolic link: then it resolves to the same entry under ``root``'s own target, which
    every policy lets be read. False when that cannot be told so cheaply (the caller then resolves both):
    a link on the way, a missing part, a path outside ``root`` or spelt with ``..``. One lstat per part
    below ``root`` (one for a file at its top), where resolving both paths costs one per part of each."""
    try:
        relative = Path(path).relative_to(root)
    except ValueError:
        return False
    if not relative.parts or ".." in relative.parts:
        return False
    current = os.fspath(root)
    for part in relative.parts:
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return False
        except OSError:
            return False
    return True


def check_regular(path: Path, links: LinkPolicy | None = None) -> os.stat_result:
    """The stat of the regular file ``path`` leads to, or ``EntryRefused``; never opens anything.
    ``links``: None follows any link (a file named on the command line); OSError passes through."""
    if links is not None:
        refused = links.refusal(path)
        if refused is not None:
            raise EntryRefused(path, refused)
    st = os.stat(path)
    kind = kind_of(st.st_mode)
    if kind is not None:
        raise EntryRefused(path, f"is {kind}, not a regular file: skipped without opening it")
    return st


@contextmanager
def open_regular(path: Path, links: LinkPolicy | None = None) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """The regular file at ``path``, open for reading, with its stat: checked (``check_regular``), opened
    non-blocking (no open of a pipe or device ever waits) and checked again on the descriptor, since
    the name may have been replaced between the two looks. ``EntryRefused`` or OSError."""
    checked = check_regular(path, links)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if links is not None and links.follow is FollowLinks.NONE:
        flags |= os.O_NOFOLLOW  # a link put in the file's place after the check is not followed either
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and flags & os.O_NOFOLLOW:
            raise EntryRefused(path, "became a symbolic link while being opened: not followed") from None
        raise
    with os.fdopen(fd, "rb", buffering=0) as handle:
        opened = os.fstat(fd)
        kind = kind_of(opened.st_mode)
        if kind is not None:
            raise EntryRefused(path, f"is {kind}, not a regular file: skipped")
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            checked = opened  # replaced by another regular file meanwhile: this one is what is read
        yield handle, checked


def read_regular(path: Path, links: LinkPolicy | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (``open_regular``), read up to its size plus a margin.
    A file that grows past that is still being written: ``EntryRefused`` with ``growing``."""
    with open_regular(path, links) as (handle, st):
        wanted = st.st_size + GROWTH_MARGIN_BYTES
        data = read_at_most(handle, wanted + 1)
    if len(data) > wanted:
        raise EntryRefused(path, f"still being written (it grew past {counted(st.st_size, 'byte')} while being read)",
                           growing=True)
    return data


def read_at_most(handle: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes from ``handle``, fewer only at its end."""
    chunks, left = [], size
    while left > 0:
        chunk = handle.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
