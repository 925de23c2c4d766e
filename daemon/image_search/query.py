"""A query as understood: the terms to look like (and unlike), each with its weight, the filters a hit
must pass, how many hits, and the relevance floor. Made from a query document (``querydoc``), the
command line's flags (``cli``), or a plain picture or ``.txt`` query; searched by ``search``; the
filters are turned into SQL by ``store.filters``; recorded in the result's ``<stem>.json``.

Pure data: no database, no model, no file is read here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from pathlib import Path

from .names import escape

# The format names a filter takes: those ``metadata.FORMAT_NAMES`` stores.
FILTER_FORMATS: tuple[str, ...] = ("jpeg", "png", "webp", "gif", "bmp", "tiff", "heic", "avif")
MAX_TOP_K = 1000
# The kinds of group a duplicates report finds (``duplicates.Kind``), in report order.
DUPLICATE_KINDS: tuple[str, ...] = ("copy", "near-copy", "similar")


class TermKind(IntEnum):
    TEXT = 1
    IMAGE = 2


@dataclass(frozen=True)
class Term:
    """One thing to look like (``unlike`` False) or to push away (True).

    ``value``: the words, or the picture's path as the query named it (a name, not its escaped text:
    ``record`` and ``describe`` escape it); ``path``: for a picture, the file
    it resolved to (inside ``source-directory`` or the document's ``inbox/<stem>/`` folder)."""

    kind: TermKind
    value: str
    weight: float = 1.0
    unlike: bool = False
    path: Path | None = None

    def record(self) -> dict[str, object]:
        """How ``<stem>.json`` lists the term."""
        return {"kind": self.kind.name.lower(), "value": escape(self.value), "weight": self.weight,
                "unlike": self.unlike}

    @property
    def signed_weight(self) -> float:
        return -self.weight if self.unlike else self.weight

    @property
    def picture_path(self) -> Path:
        """A picture term's file: the path it resolved to, else its value as given."""
        return self.path if self.path is not None else Path(self.value)


def likes_nothing(terms: Sequence[Term]) -> bool:
    """True when no term is left liked once the weights of the same words, or of the same picture, given more
    than once are added up (``"text": "cat"`` with ``"unlike-text": {"text": "cat", "weight": 2}``): the
    query would only push pictures away, and rank by unlikeness, as an unlike term alone would."""
    net: dict[tuple[TermKind, str], float] = {}
    for term in terms:
        key = (term.kind, term.value if term.kind is TermKind.TEXT else os.fspath(term.picture_path))
        net[key] = net.get(key, 0.0) + term.signed_weight
    return not any(weight > 0 for weight in net.values())


@dataclass(frozen=True)
class Filters:
    """What a hit must be, every given filter at once (none given: every picture).

    ``folders``: relative to ``source-directory``, matched at folder boundaries ('2023' is not
    '2023-old', and holds '2023/june'); ``taken_after`` inclusive, ``taken_before`` exclusive, both
    time-zone aware (a picture without a date taken never passes a date filter); ``camera``: a
    case-insensitive substring of the camera's make and model; ``formats``: among ``FILTER_FORMATS``."""

    folders: tuple[str, ...] = ()
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    camera: str | None = None
    formats: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == Filters()

    def record(self) -> dict[str, object]:
        """The filters given, as ``<stem>.json`` records them (kebab-case keys, as in a query document)."""
        out: dict[str, object] = {}
        if self.folders:
            out["folder"] = [escape(folder) for folder in self.folders]  # a name's bytes as text
        if self.taken_after is not None:
            out["taken-after"] = self.taken_after.isoformat()
        if self.taken_before is not None:
            out["taken-before"] = self.taken_before.isoformat()
        if self.camera is not None:
            out["camera"] = self.camera
        if self.formats:
            out["format"] = list(self.formats)
        return out


@dataclass(frozen=True)
class QuerySpec:
    """The whole query. ``top_k`` None: the config's; ``min_similarity`` None: no floor."""

    terms: tuple[Term, ...]
    filters: Filters = field(default_factory=Filters)
    top_k: int | None = None
    min_similarity: float | None = None

    def record(self) -> dict[str, object]:
        """The query as understood, as ``<stem>.json`` records it: every term with its weight, then what
        was given of the filters, top-k and the floor (kebab-case keys, as in a query document)."""
        out: dict[str, object] = {"terms": [term.record() for term in self.terms], **self.filters.record()}
        if self.top_k is not None:
            out["top-k"] = self.top_k
        if self.min_similarity is not None:
            out["min-similarity"] = self.min_similarity
        return out

    def describe(self) -> list[str]:
        """The query in a few short lines, for the contact sheet's first cell: each term (``−`` before an
        unlike one, ``×w`` after a weight other than 1), then the filters and the floor."""
        lines = []
        for term in self.terms:
            shown = f"“{' '.join(term.value.split())}”" if term.kind is TermKind.TEXT else escape(Path(term.value).name)
            weight = f" ×{term.weight:g}" if term.weight != 1 else ""
            lines.append(f"{'− ' if term.unlike else ''}{shown}{weight}")
        for key, value in self.filters.record().items():
            lines.append(f"{key} {', '.join(value) if isinstance(value, list) else value}")
        if self.min_similarity is not None:
            lines.append(f"min-similarity {self.min_similarity:g}")
        return lines


def single_term(kind: TermKind, value: str, path: Path | None = None) -> QuerySpec:
    """A plain query: one picture (by its looks) or one text (by its words), no filter, the config's top-k."""
    return QuerySpec(terms=(Term(kind, value, path=path),))


@dataclass(frozen=True)
class Completeness:
    """Whether a ranking holds min(top-k, the pictures that pass the filters and the floor) hits; when
    it does not (or that cannot be known), ``reason`` says why, for the user."""

    complete: bool
    reason: str | None = None

    def record(self) -> dict[str, object]:
        return {"complete": self.complete} if self.complete else {"complete": False, "incomplete-reason": self.reason}


@dataclass(frozen=True)
class QueryRecord:
    """What a result's ``<stem>.json`` says about its query: ``given``, the query as the user wrote it
    (the document, or the command line's flags; None for a plain picture or text), the query as
    understood (``spec``: terms with their weights, filters, top-k, floor) and whether the ranking is
    complete. ``not_yet_indexed``: how many pictures the service had noticed and not indexed yet when it
    answered (queries are answered ahead of an ingest backlog, so one of them may be missing from the
    hits, which ``complete`` cannot see); None where the answer came from a command, which indexes first."""

    spec: QuerySpec
    completeness: Completeness
    top_k: int
    given: dict[str, object] | None = None
    not_yet_indexed: int | None = None

    def record(self) -> dict[str, object]:
        """``query`` (as given), ``understood`` (terms, filters, top-k, floor), ``complete`` and
        ``not-yet-indexed``."""
        understood = {**self.spec.record(), "top-k": self.top_k}  # the effective top-k, given or the config's
        given = {"query": self.given} if self.given is not None else {}
        waiting = {"not-yet-indexed": self.not_yet_indexed} if self.not_yet_indexed is not None else {}
        return {**given, "understood": understood, **self.completeness.record(), **waiting}


@dataclass(frozen=True)
class DuplicatesRequest:
    """A query document that asks for the duplicates report (``{"duplicates": true}``): ``folders``,
    relative to source-directory (any of them; none: the whole index), and the ``kinds`` of group, among
    ``DUPLICATE_KINDS``."""

    folders: tuple[str, ...] = ()
    kinds: tuple[str, ...] = DUPLICATE_KINDS
