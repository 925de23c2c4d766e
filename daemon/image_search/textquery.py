"""Text queries from files: a UTF-8 ``.txt`` dropped into the inbox is a query made of words.

``read_text_query`` gives the file's whole text, trimmed, or raises ``TextQueryError`` saying exactly
what is wrong with it: gone, empty or only whitespace, larger than 64 KiB, not UTF-8, or not text.
"""

from __future__ import annotations

from pathlib import Path

from .entries import EntryRefused, LinkPolicy, open_regular, read_at_most
from .errors import UnusableFile
from .preprocess import unreadable_reason

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
    try:
        with open_regular(path, links) as (handle, _):
            data = read_at_most(handle, MAX_TEXT_QUERY_BYTES + 1)  # never more than the limit and one byte
    except EntryRefused as exc:
        raise TextQueryError(path, exc.reason) from None
    except OSError as exc:
        raise TextQueryError(path, unreadable_reason(exc, "a text file")) from None
    if not data:
        raise EmptyTextQuery(path, "empty file (0 bytes): write the words to search for in it")
    if len(data) > MAX_TEXT_QUERY_BYTES:
        size = _size_or_none(path)
        raise TextQueryError(
            path,
            f"text query too large: {f'{size:,} bytes' if size is not None else 'more than that'} is above the "
            f"limit of {MAX_TEXT_QUERY_BYTES:,} bytes (64 KiB); a query is a few words or sentences",
        )
    if data.startswith(_UTF16_BOMS):
        raise TextQueryError(path, "not UTF-8 text (it is UTF-16, as some Windows editors save): save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not part of the query
    except UnicodeDecodeError as exc:
        raise TextQueryError(
            path, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} is not valid UTF-8): "
                  "save it as UTF-8",
        ) from None
    if "\x00" in text:
        raise TextQueryError(path, "not a text file (it contains NUL bytes)")
    query = text.strip()
    if not query:
        raise TextQueryError(path, f"the text query is empty: the file holds only whitespace ({len(data)} bytes)")
    return query


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
