"""Query documents: a JSON file (dropped into the inbox, or given as ``image-search search --query``) that
says what to look for (words and pictures, each with a weight, and what to push away), which pictures
may answer (folders, dates taken, camera, format), how many, and how similar at least; and the same
from the ``search`` command's flags (``spec_from_flags``). Both give a ``query.QuerySpec``.

Every refusal is one line naming the problem and the fix: ``QueryDocumentError`` for a document,
``QueryFlagError`` for a flag. A picture a document names is read only inside ``source-directory`` or
the document's own folder (``inbox/<stem>/`` for ``inbox/<stem>.json``), whatever its path or its links
say; one that is not there yet is ``MissingPicture``, which the inbox waits for like a half-written file.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from .config import Config
from .entries import EntryRefused, FollowLinks, LinkPolicy, check_regular
from .errors import ExitCode, ImageSearchError, UnusableFile
from .names import escape, has_surrogate, unescape
from .preprocess import unreadable_reason
from .query import DUPLICATE_KINDS, FILTER_FORMATS, MAX_TOP_K, DuplicatesRequest, Filters, QuerySpec, Term, TermKind
from .textquery import decoded_text, is_text_query, read_limited, read_text_query, size_shown

QUERY_DOCUMENT_EXTENSIONS: tuple[str, ...] = (".json",)
# As for a .txt query: a query is a few terms and filters; 64 KiB keeps a misplaced file from being parsed whole.
MAX_QUERY_DOCUMENT_BYTES = 64 * 1024
# The terms of one query: its pictures are read and its texts embedded on the service's main thread, while
# the other queries and the ingest wait. 600 copies of one large picture in a 5 KB document held the loop
# for 91 s; 64 distinct pictures at the most pixels a picture may have still finish within minutes.
MAX_TERMS = 64
# The list keys of terms: the kind each holds, and whether it pushes away.
TERM_KEYS: dict[str, tuple[TermKind, bool]] = {
    "text": (TermKind.TEXT, False),
    "image": (TermKind.IMAGE, False),
    "unlike-text": (TermKind.TEXT, True),
    "unlike-image": (TermKind.IMAGE, True),
}
KEYS: tuple[str, ...] = (*TERM_KEYS, "folder", "taken-after", "taken-before", "camera", "format", "top-k",
                         "min-similarity")
# A document with "duplicates": true asks for the duplicates report instead, and takes only these.
DUPLICATES_KEYS: tuple[str, ...] = ("duplicates", "folder", "kind")
# Other names of the formats, as file extensions spell them.
FORMAT_ALIASES: dict[str, str] = {"jpg": "jpeg", "tif": "tiff", "heif": "heic"}

_T = TypeVar("_T")
_PLURAL = {"text": "words", "image": "pictures"}
_EXAMPLE = '{"text": "a red bicycle"}'
_DATE_FORM = 'an ISO 8601 date or date-time, e.g. "2023-05-06" or "2023-05-06T14:30:00+02:00"'
_NOTHING = ("the query has nothing to look for: give 'text' (words) or 'image' (pictures); 'unlike-text' and "
            "'unlike-image' only push pictures away")


class QueryDocumentError(UnusableFile):
    """A query document that cannot be used; ``reason`` names the problem and the fix, in one line."""


class IncompleteQueryDocument(QueryDocumentError):
    """An empty document, or JSON that stops short: what a document still being written looks like."""

    still_arriving = True


class MissingPicture(QueryDocumentError):
    """A picture the document names, inside the folders a document may name, that is not there: maybe
    still being copied beside the document. The reason says which picture and where it was looked for."""

    still_arriving = True


class QueryFlagError(ImageSearchError):
    """A ``search`` flag whose value cannot be used (``--after``, ``--top-k``...): the message names the
    flag, the problem and the fix."""

    exit_code = ExitCode.USAGE
    event = "usage_error"


class _Invalid(Exception):
    """Why a value cannot be used (the message); the document or the flags turn it into their error."""


class _Incomplete(_Invalid):
    """JSON that stops short."""


class _Missing(_Invalid):
    """A picture not found where it may be."""


def is_query_document(path: Path) -> bool:
    return Path(path).suffix.lower() in QUERY_DOCUMENT_EXTENSIONS


def document_folder(path: Path) -> Path:
    """The folder a document's pictures may be dropped into: ``inbox/q/`` for ``inbox/q.json``."""
    path = Path(path)
    return path.parent / path.stem


def pictures_folder(path: Path) -> Path | None:
    """A document's folder of pictures (``document_folder``) when it is there as a real folder, not a link
    (a folder that is a link leads elsewhere: its pictures are refused); else None."""
    folder = document_folder(path)
    return folder if folder.is_dir() and not folder.is_symlink() else None


@dataclass(frozen=True)
class QueryDocument:
    """A query document as read: ``data``, its bytes as written (a result that does not move the file in
    holds a copy of them); ``given``, its keys as given (a result's ``<stem>.json`` records them as
    ``query``); ``asks``, the query, or the duplicates report, it asks for."""

    data: bytes
    given: dict[str, object]
    asks: QuerySpec | DuplicatesRequest


def read_query_document(path: Path, cfg: Config, links: LinkPolicy | None = None) -> QueryDocument:
    """The document at ``path``, its query understood and its pictures found (``parse_query_document``);
    the file is read as a ``.txt`` query is (``links``: see ``entries``; None follows any link, for a
    document named on the command line). ``QueryDocumentError`` (or a subclass) when it cannot be used."""
    path = Path(path)
    data = read_limited(path, links, MAX_QUERY_DOCUMENT_BYTES, QueryDocumentError, "a query document (JSON)")
    given, asks = parse_query_document(data, path, source_directory=cfg.source_directory,
                                       follow=FollowLinks(cfg.follow_symlinks))
    return QueryDocument(data, given, asks)


def parse_query_document(data: bytes, path: Path, *, source_directory: Path, follow: FollowLinks = FollowLinks.INSIDE
                         ) -> tuple[dict[str, object], QuerySpec | DuplicatesRequest]:
    """The document's keys as given, and the query in ``data``, the bytes of the document at ``path`` (named in
    errors; its pictures are looked for in ``document_folder(path)``, then in ``source_directory``); each
    picture term's ``path`` is the file it resolved to, which must lie inside the folder it was found in
    whatever ``follow`` says; with ``follow`` ``none`` no link on its way is followed at all."""
    try:
        if not data:
            raise _Incomplete(f"empty file (0 bytes): write the query in it, e.g. {_EXAMPLE}")
        if len(data) > MAX_QUERY_DOCUMENT_BYTES:
            raise _Invalid(f"query document too large: {size_shown(path)} is above the limit of "
                           f"{MAX_QUERY_DOCUMENT_BYTES:,} bytes (64 KiB); a query is a few terms and filters")
        doc = _load_json(data)
        _refuse_unusable_text(doc)
        if isinstance(doc, dict) and "duplicates" in doc:
            return doc, _duplicates_request(doc, source_directory)
        spec = _spec_from_document(doc, source_directory)
        assert isinstance(doc, dict)  # _spec_from_document refuses anything else
        folders = (_Folder.of_document(path), _Folder.of_source(source_directory))
        terms = tuple(_found(term, folders, follow) if term.kind is TermKind.IMAGE else term for term in spec.terms)
    except _Missing as exc:
        raise MissingPicture(path, str(exc)) from None
    except _Incomplete as exc:
        raise IncompleteQueryDocument(path, str(exc)) from None
    except _Invalid as exc:
        raise QueryDocumentError(path, str(exc)) from None
    return doc, replace(spec, terms=terms)


def spec_from_flags(*, texts: Sequence[str] = (), files: Sequence[Path] = (), unlike: Sequence[str] = (),
                    folders: Sequence[str] = (), after: str | None = None, before: str | None = None,
                    camera: str | None = None, formats: Sequence[str] = (), top_k: str | None = None,
                    min_similarity: str | None = None, source_directory: Path) -> QuerySpec:
    """The query the ``search`` command's flags make: each text and file a term of weight 1 (a file named
    on the command line is read wherever it is; a ``.txt`` file's words are read here, ``TextQueryError``
    when they cannot be), each ``unlike`` text pushed away, the filters as a document's (``formats``: each
    may be a comma-separated list). ``QueryFlagError`` naming the flag whose value cannot be used."""
    try:
        terms = [Term(TermKind.TEXT, _text_value("--text", t)) for t in texts]
        terms += [Term(TermKind.TEXT, read_text_query(f)) if is_text_query(f)
                  else Term(TermKind.IMAGE, str(f), path=Path(f)) for f in files]
        terms += [Term(TermKind.TEXT, _text_value("--unlike", t), unlike=True) for t in unlike]
        if all(t.unlike for t in terms):
            raise _Invalid("the search has nothing to look for: give a FILE (a picture or a .txt of words) or "
                           "--text WORDS; --unlike only pushes pictures away")
        filters = Filters(
            folders=_unique(_folder("--folder", _named(f), source_directory) for f in folders),
            taken_after=None if after is None else _moment("--after", after),
            taken_before=None if before is None else _moment("--before", before),
            camera=None if camera is None else _camera("--camera", camera),
            formats=_unique(_format("--format", f) for listed in formats for f in listed.split(",")),
        )
        _check_range(filters, "--after", "--before")
        return QuerySpec(tuple(terms), filters,
                         top_k=None if top_k is None else _top_k("--top-k", _whole_number(top_k)),
                         min_similarity=None if min_similarity is None
                         else _min_similarity("--min-similarity", _number(min_similarity, float)))
    except _Invalid as exc:
        raise QueryFlagError(str(exc)) from None


# --- reading the document ---------------------------------------------------------------------------


def _load_json(data: bytes) -> object:
    """The JSON value ``data`` holds (UTF-8, as a .txt query; NaN, Infinity and repeated keys refused)."""
    try:
        text = decoded_text(data)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    if not text.strip():
        raise _Invalid(f"the document holds only whitespace: write the query in it, e.g. {_EXAMPLE}")
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        reason = (f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}: correct it there "
                  f"(a query document is a JSON object, e.g. {_EXAMPLE})")
        stops_short = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        raise (_Incomplete if stops_short else _Invalid)(reason) from None
    except RecursionError:
        raise _Invalid(f"not a query document: its JSON is nested too deeply; a query is one object of keys, "
                       f"e.g. {_EXAMPLE}") from None
    except ValueError:  # an integer of thousands of digits (int_max_str_digits)
        raise _Invalid("not a query document: it holds a number thousands of digits long; write numbers of a "
                       "few digits") from None


def _lone_surrogate(ch: str) -> bool:
    """Half of a character, ``\\ud83d`` of an emoji. Not one of U+DC80..U+DCFF: those are how Python (and a
    JSON document, escaped) writes the bytes of a file name that are not UTF-8 (``os.fsdecode``)."""
    return "\ud800" <= ch <= "\udfff" and not "\udc80" <= ch <= "\udcff"


def _refuse_unusable_text(doc: object) -> None:
    """JSON's ``\\u`` escapes can write what no text holds: half of a character (a lone UTF-16 surrogate)
    and NUL. Neither names a file, a folder or a camera, no model reads it, and either would fail far from
    here (the error file, the database, the tokenizer): refused at once, each string looked at, keys too."""
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            bad = next((ch for ch in value if ch == "\0" or _lone_surrogate(ch)), None)
            if bad == "\0":
                raise _Invalid("a text in the document holds NUL (\\u0000), which no name, folder, camera or "
                               "words hold: remove it")
            if bad is not None:
                raise _Invalid(f"a text in the document holds half of a character (\\u{ord(bad):04x}, a lone "
                               "UTF-16 surrogate): write the character itself, or both halves of its \\u escape")


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object; a key given twice would silently lose a value, so it is refused."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _Invalid(f"key {_shown(key)} appears twice in one object: give each key once (a list holds "
                           "several values)")
        seen[key] = value
    return seen


def _no_constant(name: str) -> object:
    raise _Invalid(f"not valid JSON: {name} is not a number JSON allows: write a finite number, e.g. 2 or 0.5")


def _duplicates_request(doc: dict[str, object], source_directory: Path) -> DuplicatesRequest:
    """``{"duplicates": true, "folder": "2023", "kind": ["copy", "near-copy"]}``: the report it asks for."""
    for key in doc:
        if key not in DUPLICATES_KEYS:
            raise _Invalid(_unknown_key(key, DUPLICATES_KEYS) + " (a duplicates document takes only these)")
    if doc["duplicates"] is not True:
        raise _Invalid(f"'duplicates' must be true (to ask for the duplicates report), got {_shown(doc['duplicates'])}"
                       "; leave the key out for a search")
    folders = _unique(_folder(name, _named(value), source_directory) for name, value in _entries(doc, "folder"))
    kinds = _unique(_kind(name, part) for name, value in _entries(doc, "kind")
                    for part in (value.split(",") if isinstance(value, str) else [value]))
    return DuplicatesRequest(folders, tuple(k for k in DUPLICATE_KINDS if k in kinds) if kinds else DUPLICATE_KINDS)


def duplicates_from_flags(*, folders: Sequence[str], kind: str, source_directory: Path) -> DuplicatesRequest:
    """The report the ``duplicates`` command's ``--folder`` (repeated: any of them) and ``--kind`` (a comma
    list) ask for, with a document's rules; ``QueryFlagError`` naming the flag."""
    try:
        return DuplicatesRequest(
            _unique(_folder("--folder", _named(f), source_directory) for f in folders),
            tuple(k for k in DUPLICATE_KINDS if k in {_kind("--kind", part) for part in kind.split(",")}))
    except _Invalid as exc:
        raise QueryFlagError(str(exc)) from None


def _kind(name: str, value: object) -> str:
    if not isinstance(value, str) or value.strip().lower() not in DUPLICATE_KINDS:
        raise _Invalid(f"{name} must be one of {', '.join(DUPLICATE_KINDS)} (or a list, or a comma list), "
                       f"got {_shown(value)}")
    return value.strip().lower()


def _spec_from_document(doc: object, source_directory: Path) -> QuerySpec:
    """The query a parsed document says, its pictures not yet looked for."""
    if not isinstance(doc, dict):
        raise _Invalid(f"the document is a JSON {_json_kind(doc)}, not an object: write an object of keys, "
                       f"e.g. {_EXAMPLE}")
    for key in doc:
        if key not in KEYS:
            raise _Invalid(_unknown_key(key, KEYS))
    terms = tuple(term for key in TERM_KEYS for term in _terms(key, _entries(doc, key)))
    if len(terms) > MAX_TERMS:
        raise _Invalid(f"{len(terms)} terms: a query takes at most {MAX_TERMS} (each picture is read and each "
                       "text embedded while other queries wait); a few well-chosen terms say as much")
    if all(term.unlike for term in terms):
        raise _Invalid(_NOTHING)
    filters = Filters(
        folders=_unique(_folder(name, _named(value), source_directory) for name, value in _entries(doc, "folder")),
        taken_after=_maybe(doc, "taken-after", _moment),
        taken_before=_maybe(doc, "taken-before", _moment),
        camera=_maybe(doc, "camera", _camera),
        formats=_unique(_format(name, value) for name, value in _entries(doc, "format")),
    )
    _check_range(filters, "'taken-after'", "'taken-before'")
    return QuerySpec(terms, filters, top_k=_maybe(doc, "top-k", _top_k),
                     min_similarity=_maybe(doc, "min-similarity", _min_similarity))


def _maybe(doc: dict[str, object], key: str, check: Callable[[str, object], _T]) -> _T | None:
    """``check("'key'", value)`` for a key the document gives, None for one it leaves out."""
    return check(f"'{key}'", doc[key]) if key in doc else None


def _entries(doc: dict[str, object], key: str) -> list[tuple[str, object]]:
    """The entries of a key that takes one value or a list of them (none: the key is left out), each with
    how a message names it ("'text' entry 2")."""
    if key not in doc:
        return []
    value = doc[key]
    if isinstance(value, list):
        if not value:
            raise _Invalid(f"'{key}' is an empty list: give at least one entry, or leave the key out")
        return [(f"'{key}' entry {i}", entry) for i, entry in enumerate(value, 1)]
    return [(f"'{key}'", value)]


def _terms(key: str, entries: list[tuple[str, object]]) -> list[Term]:
    """The terms of one of ``TERM_KEYS``: strings, or objects ``{"text"|"image": ..., "weight": w}``."""
    kind, unlike = TERM_KEYS[key]
    word = kind.name.lower()
    terms = []
    for name, entry in entries:
        weight = 1.0
        if isinstance(entry, dict):
            entry, weight = _weighted(name, entry, word, key)
        if not isinstance(entry, str):
            what = "words" if kind is TermKind.TEXT else "a picture's path"
            raise _Invalid(f"{name} must be {what} as a string, a list of them, or an object "
                           f'{{"{word}": "...", "weight": 2}}, got {_shown(entry)}')
        value_text = _text_value(name, entry) if kind is TermKind.TEXT else _path_value(name, _named(entry))
        terms.append(Term(kind, value_text, weight, unlike))
    return terms


def _weighted(name: str, entry: dict[str, object], word: str, key: str) -> tuple[object, float]:
    """The value and the weight of a weighted entry ``{"text": "...", "weight": 2}``."""
    for inner in entry:
        if inner not in (word, "weight"):
            if inner in ("text", "image"):
                raise _Invalid(f"{name} has \"{inner}\", but '{key}' holds {_PLURAL[word]}: write "
                               f"{{\"{word}\": \"...\", \"weight\": 2}}, or move it to '{key.replace(word, inner)}'")
            raise _Invalid(f"{name}: {_unknown_key(inner, (word, 'weight'))}")
    if word not in entry:
        raise _Invalid(f'{name} has no "{word}": write {{"{word}": "...", "weight": 2}}')
    weight = entry.get("weight", 1)
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        try:
            number = float(weight)
        except OverflowError:
            number = math.inf
        if math.isfinite(number) and number > 0:
            return entry[word], number
    raise _Invalid(f"{name}: 'weight' must be a positive finite number, e.g. 2 or 0.5, got {_shown(weight)} "
                   "(to push a term away, list it under 'unlike-text' or 'unlike-image')")


def _text_value(name: str, words: str) -> str:
    if has_surrogate(words):  # a name's undecodable byte is no word
        raise _Invalid(f"{name} holds a byte that is not UTF-8 text (\\udcXX): write the words as text")
    if not words.strip():
        raise _Invalid(f"{name} is empty: give the words to look for, e.g. \"a red bicycle\"")
    return words.strip()


def _named(value: _T) -> _T:
    """A path or folder a document names, in the text results print names in (``names.escape``:
    ``\\xNN`` a byte that is not UTF-8, ``\\\\`` a backslash): the name itself (``names.unescape``).
    A backslash that starts neither is kept, so ``a\\b.png`` names the file ``a\\b.png`` either way."""
    return unescape(value) if isinstance(value, str) else value  # type: ignore[return-value]


def _path_value(name: str, value: str) -> str:
    if not value:
        raise _Invalid(f"{name} is empty: give the picture's path, relative to source-directory, or its name in "
                       "the document's folder")
    if "\x00" in value:
        raise _Invalid(f"{name} holds a NUL character, which no path can: give the picture's path")
    return value


# --- filters, top-k, floor ------------------------------------------------------------------------------


def _folder(name: str, value: object, source_directory: Path) -> str:
    """A folder of source-directory that is there (for a search's filter and the duplicates report alike:
    a typo in its name would otherwise answer "no picture passes the filters", or "no duplicates"),
    relative to it and normalised ('2023/./june/' is '2023/june'); an absolute path inside source-directory
    is made relative; '..' that leaves it, or a path elsewhere, is refused."""
    form = 'a folder of source-directory, relative to it, e.g. "2023/june"'
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be {form} (a string, or a list of them), got {_shown(value)}")
    if not value.strip() or "\x00" in value:
        raise _Invalid(f"{name} is {'empty' if not value.strip() else 'not a path (NUL)'}: give {form}, or leave "
                       "it out to search every folder")
    if Path(value).is_absolute():
        inside = _inside(Path(value), source_directory)
        if inside is None:
            raise _Invalid(f"{name} {_shown(value)} is outside source-directory ({escape(source_directory)}): "
                           f"give {form}")
        relative = inside.as_posix()
    else:
        relative = os.path.normpath(value)
        if relative == ".." or relative.startswith("../"):
            raise _Invalid(f"{name} {_shown(value)} leaves source-directory: give {form}")
    if not (source_directory / relative).is_dir():
        raise _Invalid(f"{name} {_shown(value)} names no folder of source-directory ({escape(source_directory)}): "
                       "give a folder that is there, relative to source-directory, e.g. \"2023/june\"")
    link = next((p for p in _steps(source_directory, relative) if p.is_symlink()), None)
    if link is not None:  # never walked under that name: nothing would pass, and the answer would say complete
        raise _Invalid(f"{name} {_shown(value)} goes through the link {escape(link)}, whose pictures are indexed under "
                       f"the folder it leads to (or not at all): name that folder, relative to source-directory")
    return relative


def _steps(root: Path, relative: str) -> list[Path]:
    """Each folder from ``root`` down to ``root / relative``, ``root`` left out."""
    parts = [p for p in Path(relative).parts if p not in ("", ".")]
    return [root.joinpath(*parts[:n]) for n in range(1, len(parts) + 1)]


def _moment(name: str, value: object) -> datetime:
    """An ISO 8601 date (midnight) or date-time; without an offset, in this machine's local time zone."""
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be {_DATE_FORM}, as a string, got {_shown(value)}")
    try:
        moment = datetime.fromisoformat(value.strip())
        return moment if moment.tzinfo is not None else moment.astimezone()
    except ValueError:
        raise _Invalid(f"{name} {_shown(value)} is not a date: write {_DATE_FORM}") from None
    except (OverflowError, OSError):  # astimezone at the ends of the calendar
        raise _Invalid(f"{name} {_shown(value)} is too far from today for this system's time zone rules: give an "
                       "offset, e.g. +00:00, or a nearer date") from None


def _check_range(filters: Filters, after: str, before: str) -> None:
    """A range of dates taken that holds no instant (after inclusive, before exclusive) is refused."""
    if filters.taken_after is not None and filters.taken_before is not None \
            and filters.taken_after >= filters.taken_before:
        raise _Invalid(f"{after} ({filters.taken_after.isoformat()}) is not before {before} "
                       f"({filters.taken_before.isoformat()}): no picture can pass; give {after} earlier than "
                       f"{before} ({after} is inclusive, {before} exclusive)")


def _camera(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be a string, part of the camera's make and model, e.g. \"pixel 7\", got "
                       f"{_shown(value)}")
    if not value.strip():
        raise _Invalid(f"{name} is empty: give part of the camera's make and model, e.g. \"canon\", or leave it out")
    if has_surrogate(value):  # a camera's name is stored as text
        raise _Invalid(f"{name} holds a byte that is not UTF-8 text (\\udcXX): write the camera's name as text")
    return value.strip()


def _format(name: str, value: object) -> str:
    """One of ``FILTER_FORMATS``, in any case, with or without a dot; jpg, tif and heif are accepted."""
    known = ", ".join(FILTER_FORMATS)
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be a format name (a string, or a list of them) among {known}, got "
                       f"{_shown(value)}")
    fmt = value.strip().lower().removeprefix(".")
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FILTER_FORMATS:
        near = difflib.get_close_matches(fmt, (*FILTER_FORMATS, *FORMAT_ALIASES), n=1, cutoff=0.5)
        hint = f"did you mean '{FORMAT_ALIASES.get(near[0], near[0])}'? " if near else ""
        raise _Invalid(f"{name} {_shown(value)} is not a format the index records: {hint}use one of {known} "
                       "(jpg, tif and heif name jpeg, tiff and heic)")
    return fmt


def _top_k(name: str, value: object) -> int:
    if isinstance(value, float) and value.is_integer() and 1 <= value <= MAX_TOP_K:
        value = int(value)  # JSON has one kind of number: a writer that prints 10 as 10.0 means 10
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise _Invalid(f"{name} must be a whole number from 1 to {MAX_TOP_K}, got {_shown(value)}")
    return value


def _min_similarity(name: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and -1 <= value <= 1:
        return float(value)
    raise _Invalid(f"{name} must be a number from -1 to 1 (the cosine similarity a hit needs at least, e.g. "
                   f"0.2), got {_shown(value)}")


def _whole_number(text: str) -> object:
    """A flag's whole number: ``10``, or ``10.0`` as a document's top-k takes it; else the text, refused by name."""
    value = _number(text, int)
    if isinstance(value, str) and isinstance(number := _number(text, float), float) and number.is_integer():
        return int(number)
    return value


def _number(text: str, kind: type[int] | type[float]) -> object:
    """A flag's text as a number of ``kind``, or the text itself for the check to refuse by name."""
    try:
        return kind(text.strip())
    except ValueError:
        return text


# --- the document's pictures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Folder:
    """A folder a document's pictures may be read from: ``named`` as the paths give it (absolute),
    ``real`` the folder every picture in it must resolve inside, ``label`` how messages name it."""

    named: Path
    real: Path
    label: str

    @classmethod
    def of_document(cls, path: Path) -> _Folder:
        named = Path(os.path.abspath(document_folder(path)))
        # Its real place is beside the document: the folder itself being a link leads elsewhere.
        real = Path(os.path.realpath(named.parent)) / named.name
        return cls(named, real, f"the document's folder {escape(named)}/")

    @classmethod
    def of_source(cls, source_directory: Path) -> _Folder:
        named = Path(os.path.abspath(source_directory))
        return cls(named, Path(os.path.realpath(named)), f"source-directory ({escape(named)})")


def _found(term: Term, folders: tuple[_Folder, ...], follow: FollowLinks) -> Term:
    """``term`` with ``path``: the regular file its value names in the first of ``folders`` that holds
    it (an absolute value: in the folder it lies in). Whatever ``follow-symlinks`` says, the file must
    resolve inside that folder; with ``none`` no link is followed at all."""
    where = f"picture {_shown(term.value)} ('{'unlike-image' if term.unlike else 'image'}')"
    value = Path(term.value)
    if value.is_absolute():
        places = [(folder, rel) for folder in folders if (rel := _inside(value, folder.named)) is not None][:1]
        if not places:
            raise _Invalid(f"{where} is an absolute path outside {' and '.join(f.label for f in folders)}: give a "
                           "path relative to source-directory, or drop the picture into the document's folder")
    else:
        relative = Path(os.path.normpath(value))
        if relative.parts[:1] == ("..",):
            raise _Invalid(f"{where} leaves the folders a document may name ('..'): give a path inside "
                           "source-directory, relative to it, or drop the picture into the document's folder")
        places = [(folder, relative) for folder in folders]
    for folder, relative in places:
        candidate = folder.named / relative
        real = Path(os.path.realpath(candidate))
        if not real.is_relative_to(folder.real):
            raise _Invalid(f"{where}: {escape(candidate)} leads to {escape(real)}, outside {folder.label}, through "
                           "a symbolic link: a document's pictures are read only inside source-directory or the "
                           "document's folder; copy the picture there")
        try:
            check_regular(candidate, LinkPolicy(FollowLinks.NONE, folder.named) if follow is FollowLinks.NONE
                          else None)
        except FileNotFoundError:
            continue
        except EntryRefused as exc:
            raise _Invalid(f"{where}: {escape(candidate)} {exc.reason}") from None
        except OSError as exc:
            raise _Invalid(f"{where}: {escape(candidate)}: {unreadable_reason(exc, 'a picture')}") from None
        return replace(term, path=real)
    looked = " and ".join(escape(folder.named / relative) for folder, relative in places)
    raise _Missing(f"{where} is not there: looked for {looked}; drop it into the document's folder "
                   f"{escape(folders[0].named)}/ or correct the path (relative to source-directory)")


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` (absolute) relative to ``root``, as named or as ``root`` really is; None outside both."""
    lexical = Path(os.path.normpath(path))
    for base in (Path(os.path.abspath(root)), Path(os.path.realpath(root))):
        if lexical.is_relative_to(base):
            return lexical.relative_to(base)
    return None


# --- words for messages ---------------------------------------------------------------------------------


def _unknown_key(key: str, known: Sequence[str]) -> str:
    near = difflib.get_close_matches(key.lower().replace("_", "-").replace(" ", "-"), known, n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'?" if near else "remove it or correct its spelling"
    return f"unknown key {_shown(key)}: {hint} (the keys: {', '.join(known)})"


def _shown(value: object) -> str:
    """A value as a message shows it, one line, at most 60 characters: a string quoted, in the text names
    are printed in (``names.escape``, so a name reads as results print it); anything else as its JSON."""
    if isinstance(value, str):
        text = f'"{escape(value)}"'
    else:
        try:
            text = escape(json.dumps(value, ensure_ascii=False))
        except (TypeError, ValueError):
            text = escape(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value: object) -> str:
    kinds = {list: "list", str: "string", bool: "true or false", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))
