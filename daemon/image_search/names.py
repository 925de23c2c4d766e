"""Names: any name Linux allows, written where only text goes, and kept within the filesystem's limits.

A Linux file name is bytes: anything but ``/`` and NUL, up to 255 of them. Python holds the bytes that
are not UTF-8 as lone surrogates (``os.fsdecode``'s ``surrogateescape``), which PostgreSQL, JSON files
and terminals refuse. ``escape`` writes such a name as text that every one of them accepts, and
``unescape`` gives back exactly the same name:

- a byte that is not part of valid UTF-8, or a control character (U+0000-U+001F, U+007F), is ``\\xNN``;
- a backslash is ``\\\\``;
- everything else (every valid UTF-8 character, any script) stays as it is.

So ``bad\\xff\\xfename.png`` on disk (bytes FF FE) is the text ``bad\\xff\\xfename.png``, while a name that
really is spelled with a backslash, ``a\\xff``, is the text ``a\\\\xff``: no two names share a text. The
mapping works character by character and never touches ``/``, so the text of a folder is a prefix of
the text of every path in it (the store's "everything under this folder" relies on that). This one
text is what the table stores, and what logs, result files and contact sheets show.

Names we derive (processed copies, thumbnails, result and failed-query files) are fitted to 255 bytes
by ``fit_name``: the start of the name, ``~`` and a hash of the whole name, then its suffixes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import PurePath

# The longest file name (bytes) of ext4, btrfs, xfs and most others, and the longest path a system call
# takes (bytes, with its NUL).
NAME_MAX = 255
PATH_MAX = 4096
# How a shortened name marks the cut: the start of the name, then this, then a hash of the whole name.
_CUT_MARK = "~"
_CUT_HASH_HEX = 12

_NEEDS_ESCAPE = re.compile(r"[\x00-\x1f\x7f\\\udc80-\udcff]")
_ESCAPED = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code - 0xDC00 if code >= 0xDC80 else code:02x}"


def has_surrogate(text: str) -> bool:
    """``text`` holds a UTF-16 surrogate: a byte of a name that is not UTF-8 (U+DC80..U+DCFF, ``os.fsdecode``),
    or half of a character that JSON's ``\\u`` escapes can write; neither is text a word or a setting holds."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def escape(name: str | PurePath) -> str:
    """The text of a name or path (see the module): valid UTF-8, one line, unambiguous."""
    return _NEEDS_ESCAPE.sub(_escape_char, os.fspath(name))


def _unescape_match(match: re.Match[str]) -> str:
    token = match.group(1)
    if token == "\\":
        return "\\"
    code = int(token[1:], 16)
    return chr(code) if code < 0x80 else chr(0xDC00 + code)  # a byte >= 0x80 alone is what fsdecode makes


def unescape(text: str) -> str:
    """The name ``escape`` made ``text`` from (``os.fsencode`` gives back its exact bytes). A backslash
    that starts no escape is kept as it is: text written before escaping existed reads as itself."""
    return _ESCAPED.sub(_unescape_match, text) if "\\" in text else text


def name_bytes(name: str) -> int:
    """The length of a name on disk, in bytes."""
    return len(os.fsencode(name))


def _cut_to_bytes(text: str, limit: int) -> str:
    """The longest start of ``text`` that is at most ``limit`` bytes on disk, cut between characters."""
    kept, used = [], 0
    for char in text:
        size = name_bytes(char)
        if used + size > limit:
            break
        kept.append(char)
        used += size
    return "".join(kept)


def fit_name(name: str, *, keep_suffix: str = "", reserve: int = 0) -> str:
    """``name`` itself when it fits in ``NAME_MAX - reserve`` bytes; else its start, ``~``, 12 hex digits
    of the MD5 of the whole name (so two long names that share their start stay apart) and
    ``keep_suffix`` (which ``name`` ends with: the extensions a reader of the folder needs to see)."""
    limit = NAME_MAX - reserve
    if name_bytes(name) <= limit:
        return name
    if keep_suffix and not name.endswith(keep_suffix):
        raise ValueError(f"{escape(name)} does not end with {escape(keep_suffix)}")
    digest = hashlib.md5(os.fsencode(name), usedforsecurity=False).hexdigest()[:_CUT_HASH_HEX]
    if name_bytes(keep_suffix) > limit // 2:
        keep_suffix = ""  # a "suffix" that long is no extension: the start of the name says more
    tail = f"{_CUT_MARK}{digest}{keep_suffix}"
    head = name[: len(name) - len(keep_suffix)] if keep_suffix else name
    return _cut_to_bytes(head, limit - name_bytes(tail)) + tail


def fits_path(path: str | PurePath) -> bool:
    """True when every name in ``path`` and the whole of it are within the system's limits."""
    raw = os.fsencode(path)
    return len(raw) < PATH_MAX and all(len(part) <= NAME_MAX for part in raw.split(b"/"))
