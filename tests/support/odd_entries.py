"""Odd entries for the tests: names in any bytes Linux allows, and folders that hold pipes, sockets,
devices and links besides pictures."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.files import save_picture

# Byte runs a name is made of: plain letters, spaces, a newline, a backslash and what looks like an
# escape, bytes that are not UTF-8, and valid characters of two and three bytes.
_PIECES = (b"a", b"Z", b"7", b" ", b"-", b".", b"\n", b"\t", b"\\", b"\\xff", b"\xff", b"\xfe", b"\x80", b"\xc3",
           "é".encode(), "写".encode(), "😀".encode(), b"\x7f", b"%", b"'", b'"', b"~")
IMAGE_SUFFIXES = (b".png", b".jpg", b".JPG", b".webp")


def fs_name(raw: bytes) -> str:
    """The name Python gives a file whose name is ``raw`` (``os.fsdecode``)."""
    return os.fsdecode(raw)


def random_name(rng: random.Random, *, suffix: bytes = b"", longest: int = 255) -> bytes:
    """A name of 1 to ``longest`` bytes (ending in ``suffix``) from ``_PIECES``: never ``/``, NUL, ``.`` or
    ``..``, and never hidden (a leading dot) or temporary (``~`` at the end), which discovery ignores."""
    room = longest - len(suffix)
    size = rng.choice((rng.randint(1, 12), rng.randint(1, 60), room))  # short, medium, and at the limit
    raw = b""
    while len(raw) < size:
        raw += rng.choice(_PIECES)
    raw = raw[:size].lstrip(b".") or b"n"
    raw = raw.rstrip(b"~") or b"n"
    return raw + suffix


@dataclass
class OddTree:
    """What ``make_odd_tree`` put in a folder: the pictures that must be indexed (path -> seed), and the
    picture-named entries that must be skipped (never opened)."""

    pictures: dict[Path, int] = field(default_factory=dict)
    refused: set[Path] = field(default_factory=set)
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def make_odd_tree(root: Path, rng: random.Random, *, entries: int, first_seed: int = 1000) -> OddTree:
    """``entries`` random entries under ``root`` (and its random sub-folders), each a picture, a file that
    is no picture, a pipe, a socket, a link to a picture outside, a dangling link, a link to /dev/zero,
    or a folder with a picture's name; names from ``random_name``. Pictures are all distinct."""
    tree = OddTree()
    outside = root.parent / f"{root.name}-outside"
    seed = first_seed
    folders = [root]
    for _ in range(entries):
        here = rng.choice(folders)
        kind = rng.choice(("picture", "picture", "picture", "text", "pipe", "socket", "link-out", "dangling",
                           "zero", "folder", "subfolder"))
        raw = random_name(rng, suffix=rng.choice(IMAGE_SUFFIXES), longest=255)
        path = here / fs_name(raw)
        if os.path.lexists(path):
            continue
        if kind == "picture":
            save_picture(path, seed=seed, fmt="PNG" if raw.lower().endswith(b".png") else
                         "JPEG" if raw.lower().endswith(b".jpg") else "WEBP")
            tree.pictures[path] = seed
            seed += 1
        elif kind == "text":
            path.write_bytes(b"not a picture\n")
            tree.refused.add(path)
        elif kind == "pipe":
            os.mkfifo(path)
            tree.refused.add(path)
        elif kind == "socket" and len(os.fsencode(path)) < 100:  # AF_UNIX addresses are short
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(os.fsencode(path))
            tree.sockets.append(sock)
            tree.refused.add(path)
        elif kind == "link-out":
            target = save_picture(outside / f"{seed}.png", seed=seed)
            seed += 1
            path.symlink_to(target)
            tree.refused.add(path)
        elif kind == "dangling":
            path.symlink_to(outside / "never-there.png")
            tree.refused.add(path)
        elif kind == "zero":
            path.symlink_to("/dev/zero")
            tree.refused.add(path)
        elif kind == "folder":
            path.mkdir()
            folders.append(path)
        elif kind == "subfolder":
            sub = here / fs_name(random_name(rng, longest=60))
            if not os.path.lexists(sub):
                sub.mkdir()
                folders.append(sub)
    return tree


def snapshot(root: Path) -> dict[bytes, tuple[int, int, int]]:
    """Every entry under ``root`` (links not followed): raw name -> (mode, size, mtime_ns): what a run must
    leave exactly as it was."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
