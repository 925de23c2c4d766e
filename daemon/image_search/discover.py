"""Discovery: which files under a folder are images we index, and which names are never ours."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
        if folder.startswith(".") or folder.lower() in IGNORED_DIRECTORIES:
            return True
    return is_ignored_name(parts[-1])


def is_image_candidate(path: Path, root: Path) -> bool:
    """A file we should try to index: a supported extension (any case) and not an ignored name."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_ignored_path(path, root)


def iter_images(root: Path) -> Iterator[Path]:
    """Yield every image candidate under ``root`` recursively, in a stable (sorted) order.

    Symlinked folders are not followed (loops); a symlinked file is indexed like a file.
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith(".") or d.lower() in IGNORED_DIRECTORIES))
        for name in sorted(filenames):
            path = here / name
            if is_image_candidate(path, root):
                yield path


def discover_images(root: Path) -> list[Path]:
    return list(iter_images(root))
