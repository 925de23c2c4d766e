"""A query's filters (``query.Filters``) as SQL: one WHERE condition on ``image_embeddings`` and its
named parameters. Every value the user gave travels as a parameter; only fixed text and the
parameters' generated names are written into the statement.

- folders: each one matches itself and everything under it, at folder boundaries, on the stored
  (``names.escape``) text: ``folder = f OR folder LIKE 'f/%'`` ('2023' holds '2023/june', never
  '2023-old'); several folders: any of them. '' or '.' is the whole source (no condition). A picture
  is in a folder where any of its paths is, not only its representative: a copy in 'selects/' of a
  photo first indexed in '2023/' passes 'selects', which the row's own folder never says. So the
  condition is the row's folder (its representative's, through ``image_embeddings``' folder index), or
  its hash among those of the copies in the folder, looked up first (``copies_in``: ``image_paths.copy``,
  through the partial index of migration 0012; none in a library without copies) and given as a list:
  the planner knows its length, the key's index finds its rows beside the folder index's, and a row is
  tested against it by a hash. Reading every path's folder instead looked each of a folder's rows up
  twice (at 1% of 100,000 rows, 15.0 ms against 10.4, ``tests/benchmarks/filtered.py``); the copies as
  a subquery's array were searched from their start for each row (30,000 copies: 5 s for a count).
- dates: ``taken_at >= taken_after`` (inclusive), ``taken_at < taken_before`` (exclusive); a NULL
  ``taken_at`` fails every comparison, so a picture without a date never passes a date filter.
- camera: a case-insensitive substring (ILIKE) of make and model joined by a space (a missing one
  is empty text).
- formats: ``format = ANY(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg2.extensions

from ..names import escape
from ..query import Filters

MATCH_ALL = "TRUE"
# Make and model as one text, as the camera filter reads it: also the expression of migration 0007's
# trigram index, which serves only this exact expression (changing it needs a migration of its own).
CAMERA_TEXT = "(coalesce(camera_make, '') || ' ' || coalesce(camera_model, ''))"


@dataclass(frozen=True)
class FilterSql:
    """A WHERE condition (``MATCH_ALL`` when nothing is filtered) and its named parameters."""

    where: str = MATCH_ALL
    params: dict[str, object] = field(default_factory=dict)

    @property
    def filtered(self) -> bool:
        return self.where != MATCH_ALL


def like_escaped(text: str) -> str:
    """``text`` as a LIKE pattern that matches itself only (backslash is LIKE's default escape)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def folder_text(folder: str) -> str | None:
    """The stored text of a folder filter, relative to source-directory without '.' or empty parts;
    None for the whole source ('' or '.')."""
    parts = [part for part in folder.split("/") if part not in ("", ".")]
    return escape("/".join(parts)) if parts else None


def holds(folder: str, stored: str) -> bool:
    """Whether the folder filter's text ``folder`` holds the stored folder ``stored``: ``folder_match``'s
    rule, for a row already read."""
    return stored == folder or stored.startswith(folder + "/")


def folder_match(column: str, folders: tuple[str, ...], params: dict[str, object]) -> str | None:
    """The condition that ``column`` (a stored folder) is one of ``folders`` or under one, its values added
    to ``params``; None where the whole source is among them."""
    texts = [folder_text(f) for f in folders]
    if not texts or None in texts:  # the whole source is among them: every picture passes
        return None
    alternatives = []
    for i, text in enumerate(dict.fromkeys(texts)):
        params[f"folder_{i}"] = text
        params[f"folder_{i}_under"] = like_escaped(text) + "/%"
        alternatives.append(f"{column} = %(folder_{i})s OR {column} LIKE %(folder_{i}_under)s")
    return " OR ".join(alternatives)


# More copies in a folder than this are not listed: the list is text in each statement, and a folder
# that holds so many is searched through the HNSW index, whose candidates a subquery's hashed set tests
# as well (a folder holding a copy of each of 100,000 pictures: 32 ms a search that way, 305 ms with the
# list, most of it parsing; 1,000 copies beside 1,038 pictures: 19 ms with the list).
MOST_COPIES_LISTED = 2_000


def _copies(folders: tuple[str, ...], params: dict[str, object]) -> str | None:
    """The query of the hashes of the contents with a copy (a path not their representative) in ``folders``
    or under them; None for the whole source."""
    held = folder_match("held.folder", folders, params)
    return None if held is None else f"SELECT held.file_hash FROM image_paths AS held WHERE held.copy AND ({held})"


def copies_in(cur: psycopg2.extensions.cursor, folders: tuple[str, ...]) -> list[str] | None:
    """The hashes of the contents with a copy in ``folders`` or under them (none, and no query, for no
    folder or the whole source), or None for more than ``MOST_COPIES_LISTED`` paths of copies."""
    params: dict[str, object] = {}
    query = _copies(folders, params)
    if query is None:
        return []
    cur.execute(f"{query} LIMIT {MOST_COPIES_LISTED + 1}", params)
    found = [file_hash for (file_hash,) in cur.fetchall()]
    return None if len(found) > MOST_COPIES_LISTED else sorted(set(found))


def filter_sql_on(cur: psycopg2.extensions.cursor, filters: Filters) -> FilterSql:
    """``filter_sql`` with the copies in the folders filtered on, read on ``cur`` (its transaction)."""
    return filter_sql(filters, copies=copies_in(cur, filters.folders))


def filter_sql(filters: Filters, *, copies: list[str] | None) -> FilterSql:
    """The condition a row must meet to pass every given filter; ``copies``: ``copies_in`` the folders
    filtered on (``filter_sql_on`` reads them), None for too many to list (the subquery, then)."""
    params: dict[str, object] = {}
    conditions = []
    row = folder_match("folder", filters.folders, params)
    if row is not None:
        if copies is None:
            row += f" OR file_hash IN ({_copies(filters.folders, params)})"
        elif copies:
            params["copies"] = copies
            row += " OR file_hash = ANY(%(copies)s)"
        conditions.append(row)
    if filters.taken_after is not None:
        params["taken_after"] = filters.taken_after
        conditions.append("taken_at >= %(taken_after)s")
    if filters.taken_before is not None:
        params["taken_before"] = filters.taken_before
        conditions.append("taken_at < %(taken_before)s")
    if filters.camera is not None:
        params["camera"] = "%" + like_escaped(filters.camera) + "%"
        conditions.append(f"{CAMERA_TEXT} ILIKE %(camera)s")
    if filters.formats:
        params["formats"] = sorted({f.lower() for f in filters.formats})
        conditions.append("format = ANY(%(formats)s)")
    if not conditions:
        return FilterSql()
    return FilterSql(" AND ".join(f"({c})" for c in conditions), params)
