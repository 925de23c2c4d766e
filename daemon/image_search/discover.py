"""Discovery: which files under a folder are images we index, and which names are never ours."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .entries import FollowLinks, LinkPolicy, kind_of
from .names import escape

# Extension (lower case) -> the Pillow format names (multi-picture MPO files open as JPEG) we let Pillow try for it. Opening with an
# explicit format list means no other decoder (PSD, EPS, FITS...) ever parses a user's file.
IMAGE_EXTENSIONS: dict[str, tuple[str, ...]] = {
    ".jpg": ("JPEG",),
    ".jpeg": ("JPEG",),
    ".jpe": ("JPEG",),
    ".png": ("PNG",),
    ".webp": ("WEBP",),
    ".gif": ("GIF",),
    ".bmp": ("BMP", "DIB"),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
    # What phones write today. HEIF is decoded by pillow-heif (registered in preprocess.py); AVIF by
    # Pillow's own plugin (Pillow >= 11.2 ships libavif; pillow-heif dropped its AVIF decoder).
    ".heic": ("HEIF",),
    ".heif": ("HEIF",),
    ".hif": ("HEIF",),  # Canon and Fujifilm cameras write HEIF under this name
    ".avif": ("AVIF",),
}
# Every format we decode, whatever the extension says: a .png that is really a JPEG still works.
SUPPORTED_FORMATS: tuple[str, ...] = tuple(dict.fromkeys(f for fs in IMAGE_EXTENSIONS.values() for f in fs))
# How each format is named to people; every user-visible list of formats is built from this.
_FORMAT_NAMES_FOR_PEOPLE: dict[str, str] = {
    "JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "DIB": "BMP", "TIFF": "TIFF",
    "HEIF": "HEIC/HEIF", "AVIF": "AVIF",
}


def supported_formats_for_people(conjunction: str = "or") -> str:
    """``JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF``: the formats we decode, for messages."""
    names = list(dict.fromkeys(_FORMAT_NAMES_FOR_PEOPLE[f] for f in SUPPORTED_FORMATS))
    return ", ".join(names[:-1]) + f" {conjunction} " + names[-1]

# Names that are work in progress or system clutter: ignored until renamed to a final name.
TEMPORARY_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", "~")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
IGNORED_DIRECTORIES = frozenset({"@eadir", "#recycle", "#snapshot", "$recycle.bin"})


def is_ignored_name(name: str) -> bool:
    """True for hidden files, AppleDouble ``._*``, Office ``~$`` locks, rsync temp files and partial downloads."""
    lower = name.lower()
    if name.startswith(".") or name.startswith("~$"):
        return True  # dotfiles, ._AppleDouble, rsync's .name.XXXXXX temp files, Office locks
    return lower in IGNORED_NAMES or lower.endswith(TEMPORARY_SUFFIXES)


def is_ignored_path(path: Path, root: Path) -> bool:
    """True when the file or any folder between ``root`` and it is hidden, temporary or system clutter."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return True
    if not parts:
        return True
    for folder in parts[:-1]:
        if _is_ignored_folder(folder):
            return True
    return is_ignored_name(parts[-1])


def is_ignored_folder_path(folder: Path, root: Path) -> bool:
    """True when the folder ``folder``, or one between ``root`` and it, is one a walk passes over (hidden, a
    NAS's recycle bin or thumbnails, a trash): what is moved or made there is not the library's."""
    try:
        parts = folder.relative_to(root).parts
    except ValueError:
        return True
    return any(_is_ignored_folder(part) for part in parts)


def is_image_candidate(path: Path, root: Path) -> bool:
    """A file we should try to index: a supported extension (any case) and not an ignored name."""
    return _is_candidate_name(path.name) and not is_ignored_path(path, root)


@dataclass(frozen=True)
class SkippedEntry:
    """A name that looks like a picture but is not read: ``reason`` says why, in the user's words."""

    path: Path
    reason: str


@dataclass
class FolderScan:
    """What a walk of a folder found: the pictures to read, and the entries it left alone."""

    images: list[Path] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)  # folders not listed (the top too): their content unknown
    top_unreadable: SkippedEntry | None = None  # the folder walked, not listed: a skip only its caller can tell


def scan_folder(folder: Path, links: LinkPolicy | None = None, *,
                stopping: Callable[[], bool] = lambda: False) -> FolderScan:
    """Walk ``folder`` recursively in a stable order (each folder's files sorted, then its sub-folders
    sorted, depth first) for image candidates that are regular files, as ``links`` allows (None: every
    link is followed, with ``folder`` as the boundary). Never opens a file. Once ``stopping()`` says so
    (asked between entries: a walk of a slow share can take minutes) the walk ends where it is, and what
    it found is only part of the folder: the caller, who asked, must not read it as the whole.

    - a pipe, socket or device with a picture's name is skipped, with its kind;
    - a link to a file is followed as ``links`` says; a broken one is skipped, naming its target;
    - a link to a folder is walked only under ``follow-symlinks: all``, and only when it leads out of the
      boundary (what is inside is walked under its own name); a folder is never walked twice, so a
      loop ends at once;
    - a link onto, into or above one of ``links.own_folders`` (the service's processed copies, results,
      inbox, database) is never followed, whatever the policy;
    - a sub-folder that cannot be listed is skipped with the reason.
    """
    folder = Path(folder)
    walk = _Walk(links if links is not None else LinkPolicy(FollowLinks.ALL, folder), top=folder, stopping=stopping)
    walk.folder(folder)
    walk.again_where_written()
    return walk.scan


def scan_entry(path: Path, links: LinkPolicy) -> FolderScan:
    """What ``scan_folder`` of ``links.root`` finds at its one entry ``path`` (one the watcher saw appear:
    a link, say), decided by the same rules: the picture it is, or why it is skipped; a link to a folder
    that may be walked is walked. Nothing for an entry that is gone, or that is hidden or lies in a
    hidden folder (which the folder's scan never looks into)."""
    path = Path(path)
    walk = _Walk(links, top=links.root)
    try:
        st = os.lstat(path)
        parts = path.relative_to(links.root).parts
    except (OSError, ValueError):
        return walk.scan
    if not parts or any(_is_ignored_folder(part) for part in parts[:-1]):
        return walk.scan
    with contextlib.suppress(OSError):  # the folder itself is walked already: a link out to its parent
        root = os.stat(links.root)  # does not bring the whole library in again
        walk.walked.add((root.st_dev, root.st_ino))
    mode = st.st_mode
    if walk.entry(path, is_link=stat.S_ISLNK(mode), is_dir=stat.S_ISDIR(mode), is_file=stat.S_ISREG(mode),
                  mode=lambda: mode):
        walk.folder(path)
    return walk.scan


def broken_link(path: Path) -> str | None:
    """Why the symbolic link ``path`` leads to nothing (its target does not exist, or cannot be reached:
    a loop of links), in the user's words; None when it leads somewhere, or is no link."""
    try:
        os.stat(path)
        return None
    except OSError as exc:
        try:
            target = os.readlink(path)
        except OSError:
            return None  # no link: a file that is gone, not a broken link
        what = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be reached ({exc.strerror})"
        return f"broken symbolic link: its target {escape(target)} {what}"


# The longest path (bytes of its text, ``names.escape``) the store's indexes take. A B-tree entry holds at most
# 2,704 bytes on PostgreSQL's 8 kB pages; a longer path (14 folders of 80 CJK characters: 3,600 bytes) failed
# its batch's write as if the database were away, and the batch was tried again for ever. Room is left for
# the fleet's "image:" before a path in its claims, and for the entries' headers.
MAX_PATH_BYTES = 2600


def path_too_long(path: Path) -> str | None:
    """Why ``path`` cannot be indexed, when it is longer than ``MAX_PATH_BYTES``; None when it can."""
    text = os.fspath(path)
    if len(text) * 4 <= MAX_PATH_BYTES:  # its text is at most 4 bytes a character (``\xNN``, UTF-8): at once
        return None
    length = len(escape(text).encode())
    if length <= MAX_PATH_BYTES:
        return None
    return (f"its path is {length:,} bytes, longer than the index takes ({MAX_PATH_BYTES:,}): move it into a "
            "folder nearer the top, or give its folders shorter names")


class _Walk:
    """One walk of ``scan_folder`` (or ``scan_entry``): what it found so far, and the folders it walked."""

    def __init__(self, links: LinkPolicy, *, top: Path, stopping: Callable[[], bool] = lambda: False) -> None:
        self.links = links
        self.top = top  # the folder asked for: one it cannot list is the caller's to report
        self.stopping = stopping
        self.boundary = Path(os.path.realpath(links.root))
        self.scan = FolderScan()
        self.walked: set[tuple[int, int]] = set()
        # Each folder listed, its identity, and its mtime just before it was listed (``again_where_written``).
        self.listed: list[tuple[Path, tuple[int, int], int]] = []

    def again_where_written(self) -> None:
        """List again the folders written into since they were listed, and walk what came into them. A
        picture or a folder moved into one the walk had passed, out of one it had not reached yet, was found
        in neither: its rows were removed as deleted and it was embedded again as new. Once: what moves
        during this second look is its own event's to tell (a walk of a share takes minutes; this, seconds)."""
        for here, key, mtime_ns in list(self.listed):
            if self.stopping():
                return
            try:
                written = os.stat(here).st_mtime_ns != mtime_ns
            except OSError:
                continue  # gone since: its own event says what became of it
            if written:  # its pictures are what its new listing says (one moved out is not there), and a
                # sub-folder that went while the walk went is gone from it, not unknown: walked where it went
                # (a rename keeps its identity), its rows follow it
                self.scan.images = [p for p in self.scan.images if p.parent != here]
                went = {u for u in self.scan.unreadable if u.parent == here and not os.path.lexists(u)}
                self.scan.unreadable = [u for u in self.scan.unreadable if u not in went]
                self.walked -= {k for path, k, _ in self.listed if path in went} | {key}
                self.folder(here)
        seen: set[Path] = set()
        self.scan.skipped = [e for e in self.scan.skipped if not (e.path in seen or seen.add(e.path))]
        self.scan.unreadable = list(dict.fromkeys(self.scan.unreadable))

    def folder(self, here: Path) -> None:
        if self.stopping():
            return
        try:
            st = os.stat(here)
            if (st.st_dev, st.st_ino) in self.walked:
                return
            self.walked.add((st.st_dev, st.st_ino))
            self.listed.append((here, (st.st_dev, st.st_ino), st.st_mtime_ns))
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except FileNotFoundError:
            # Gone while the walk went (renamed, deleted): no skip to report (its own event says what became
            # of it), but what it held is unknown to this walk, so a rescan keeps its rows.
            self.scan.unreadable.append(here)
            return
        except OSError as exc:
            self.scan.unreadable.append(here)
            entry = SkippedEntry(here, f"folder cannot be read ({exc.strerror or exc})")
            if here == self.top:
                self.scan.top_unreadable = entry
            else:
                self.scan.skipped.append(entry)
            return
        folders = []
        for entry in entries:
            if self.stopping():
                return
            path = here / entry.name
            # A DirEntry answers from the listing itself: no system call per entry but for odd ones.
            if self.entry(path, is_link=entry.is_symlink(), is_dir=entry.is_dir(follow_symlinks=False),
                          is_file=entry.is_file(follow_symlinks=False),
                          mode=lambda entry=entry: entry.stat(follow_symlinks=False).st_mode):
                folders.append(path)
        for sub in folders:
            self.folder(sub)

    def entry(self, path: Path, *, is_link: bool, is_dir: bool, is_file: bool, mode: Callable[[], int]) -> bool:
        """Decide about one entry: a picture goes to ``scan.images``, a refusal to ``scan.skipped``; True
        when it is a folder to walk. ``mode``: its own (lstat) mode, asked only for an odd entry."""
        if is_link:
            return _through_link(path, self.links, self.boundary, self.scan)
        if is_dir:
            return not _is_ignored_folder(path.name)
        if _is_candidate_name(path.name):
            if is_file:
                if (too_long := path_too_long(path)) is not None:
                    self.scan.skipped.append(SkippedEntry(path, too_long))
                else:
                    self.scan.images.append(path)
            else:
                kind = kind_of(mode())
                self.scan.skipped.append(SkippedEntry(path, f"is {kind}, not a regular file: skipped without opening it"))
        return False


def _through_link(path: Path, links: LinkPolicy, boundary: Path, scan: FolderScan) -> bool:
    """Decide about the symbolic link ``path``: a picture is added to ``scan.images`` or its refusal to
    ``scan.skipped``; True when it is a folder to walk."""
    target = os.path.realpath(path)
    try:
        st = os.stat(path)
    except OSError:
        broken = broken_link(path)
        if broken is not None and _is_candidate_name(path.name):
            scan.skipped.append(SkippedEntry(path, broken))
        return False
    if stat.S_ISDIR(st.st_mode):
        if _is_ignored_folder(path.name):
            return False
        if Path(target).is_relative_to(boundary):
            scan.skipped.append(SkippedEntry(path, f"symbolic link to the folder {escape(target)}, inside {links.key}: "
                                                   "not walked twice (its pictures are found under their own path)"))
            return False
        if (own := links.own_folder_refusal(Path(target), what="the folder ")) is not None:
            scan.skipped.append(SkippedEntry(path, own))  # never walked: the service's output would be its input
            return False
        if links.follow is FollowLinks.ALL:
            return True
        scan.skipped.append(SkippedEntry(path, f"symbolic link to the folder {escape(target)}, outside {links.key}: not "
                                               f"followed (config key 'follow-symlinks' is '{links.follow}'; 'all' "
                                               "walks it)"))
        return False
    if not _is_candidate_name(path.name):
        return False
    refused = links.refusal(path)
    kind = kind_of(st.st_mode)
    if refused is None and kind is not None:
        refused = f"symbolic link to {escape(target)}, which is {kind}, not a regular file: not opened"
    if refused is None:
        refused = path_too_long(path)
    if refused is not None:
        scan.skipped.append(SkippedEntry(path, refused))
    else:
        scan.images.append(path)
    return False


def _is_ignored_folder(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_DIRECTORIES


def _is_candidate_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not is_ignored_name(name)


def iter_images(root: Path, links: LinkPolicy | None = None) -> Iterator[Path]:
    """The pictures of ``scan_folder``, in its order."""
    yield from scan_folder(root, links).images


def discover_images(root: Path, links: LinkPolicy | None = None) -> list[Path]:
    return scan_folder(root, links).images
