"""Text queries from files: a UTF-8 ``.txt`` dropped into the inbox is a query made of words.

``read_text_query`` gives the file's whole text, trimmed, or raises ``TextQueryError`` saying exactly
what is wrong with it: gone, empty or only whitespace, larger than 64 KiB, not UTF-8, or not text.
"""

from __future__ import annotations

from pathlib import Path

from .entries import EntryRefused, LinkPolicy, open_regular, read_at_most
from .errors import UnusableFile
from .preprocess import unreadable_reason
from .wording import counted

# Extensions (lower case) of files that are text queries rather than pictures.
TEXT_QUERY_EXTENSIONS: tuple[str, ...] = (".txt",)
# A query is a phrase or a paragraph; 64 KiB is far more than any model reads (CLIP: 77 tokens,
# jina-clip-v2: 8,192) and keeps a misplaced log file from being tokenised whole.
MAX_TEXT_QUERY_BYTES = 64 * 1024

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class TextQueryError(UnusableFile):
    """A text query file that cannot be used, with the specific reason (``path``, ``reason``).

    An UnusableFile, as a picture's PreprocessError is, so code that turns a bad query file into
    ``inbox/failed/`` handles both kinds; an empty file's reason starts with "empty file", as for a
    picture still being written.
    """


class EmptyTextQuery(TextQueryError):
    """An empty query file: like a picture still being written, the service waits for it a while."""

    still_arriving = True


def is_text_query(path: Path) -> bool:
    return Path(path).suffix.lower() in TEXT_QUERY_EXTENSIONS


def read_text_query(path: Path, links: LinkPolicy | None = None) -> str:
    """The whole UTF-8 text of ``path``, trimmed of surrounding whitespace; TextQueryError if unusable
    (also for a pipe, a device, or a link ``links`` does not follow: see ``entries``)."""
    path = Path(path)
    data = read_limited(path, links, MAX_TEXT_QUERY_BYTES, TextQueryError, "a text file")
    if not data:
        raise EmptyTextQuery(path, "empty file (0 bytes): write the words to search for in it")
    if len(data) > MAX_TEXT_QUERY_BYTES:
        raise TextQueryError(
            path,
            f"text query too large: {size_shown(path)} is above the limit of {MAX_TEXT_QUERY_BYTES:,} bytes (64 KiB); "
            "a query is a few words or sentences",
        )
    try:
        text = decoded_text(data)
    except ValueError as exc:
        raise TextQueryError(path, str(exc)) from None
    query = text.strip()
    if not query:
        raise TextQueryError(path, f"the text query is empty: the file holds only whitespace ({counted(len(data), 'byte')})")
    return query


def read_limited(path: Path, links: LinkPolicy | None, limit: int, error: type[UnusableFile], expected: str) -> bytes:
    """At most ``limit`` + 1 bytes of the regular file ``path`` (more than ``limit``: too large, without
    reading it all); ``error(path, reason)`` when it cannot be read (``expected``: what it should be)."""
    try:
        with open_regular(path, links) as (handle, _):
            return read_at_most(handle, limit + 1)
    except EntryRefused as exc:
        raise error(path, exc.reason) from None
    except OSError as exc:
        raise error(path, unreadable_reason(exc, expected)) from None


def decoded_text(data: bytes) -> str:
    """``data`` as UTF-8 text, a leading byte-order mark dropped (it is not part of the text); ValueError
    whose message is the reason, in the user's words, when it is not UTF-8 text."""
    if data.startswith(_UTF16_BOMS):
        raise ValueError("not UTF-8 text (it is UTF-16, as some Windows editors save): save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} is not valid UTF-8): "
                         "save it as UTF-8") from None
    if "\x00" in text:
        raise ValueError("not a text file (it contains NUL bytes)")
    return text


def size_shown(path: Path) -> str:
    """The file's size for a "too large" message ("70,000 bytes"), or "more than that" when it is gone."""
    try:
        return counted(path.stat().st_size, "byte")
    except OSError:
        return "more than that"
