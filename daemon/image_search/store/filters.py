"""A query's filters (``query.Filters``) as SQL: one WHERE condition on ``image_embeddings`` and its
named parameters. Every value the user gave travels as a parameter; only fixed text and the
parameters' generated names are written into the statement.

- folders: each one matches itself and everything under it, at folder boundaries, on the stored
  (``names.escape``) text: ``folder = f OR folder LIKE 'f/%'`` ('2023' holds '2023/june', never
  '2023-old'); several folders: any of them. '' or '.' is the whole source (no condition). A picture
  is in a folder where any of its paths is, not only its representative: a copy in 'selects/' of a
  photo first indexed in '2023/' passes 'selects', which the row's own folder never says. So the
  condition is the row's folder (its representative's, through ``image_embeddings``' folder index), or
  a path of it among the copies in the folder (``image_paths.copy``, through the partial index of
  migration 0012: in a library without copies it holds nothing, and the filter costs what the row's
  folder alone does). Reading every path's folder instead looked each of a folder's rows up twice: at
  1% of 100,000 rows, 15.0 ms against 10.4 (``tests/benchmarks/filtered.py``).
- dates: ``taken_at >= taken_after`` (inclusive), ``taken_at < taken_before`` (exclusive); a NULL
  ``taken_at`` fails every comparison, so a picture without a date never passes a date filter.
- camera: a case-insensitive substring (ILIKE) of make and model joined by a space (a missing one
  is empty text).
- formats: ``format = ANY(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..names import escape
from ..query import Filters

MATCH_ALL = "TRUE"
# Make and model as one text, as the camera filter reads it: also the expression of migration 0007's
# trigram index, which serves only this exact expression (changing it needs a migration of its own).
CAMERA_TEXT = "(coalesce(camera_make, '') || ' ' || coalesce(camera_model, ''))"


@dataclass(frozen=True)
class FilterSql:
    """A WHERE condition (``MATCH_ALL`` when nothing is filtered) and its named parameters, written twice.

    ``where`` is for a statement that finds the passing rows itself (a count, an exact search): a
    folder's copies are an array that ``image_embeddings``' key looks up, beside its folder index, so
    the rows come from the indexes alone. ``each_row`` is the same condition for a statement that tests
    rows another index hands it (the candidates of the HNSW scan): the copies are a hashed set, one probe
    a row, where that array would be searched from its start for every row. ``copies`` is the query of
    the copies in the folders filtered on (None: no folder filter), which the planner can estimate where
    it cannot guess the array's length."""

    where: str = MATCH_ALL
    params: dict[str, object] = field(default_factory=dict)
    each_row: str = MATCH_ALL
    copies: str | None = None

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


def _folders(folders: tuple[str, ...], params: dict[str, object]) -> tuple[str, str] | None:
    """The row's own folder as a condition, and the query of the copies in the folders."""
    row = folder_match("folder", folders, params)
    if row is None:
        return None
    held = folder_match("held.folder", folders, params)  # the same parameters again
    return row, f"SELECT held.file_hash FROM image_paths AS held WHERE held.copy AND ({held})"


def filter_sql(filters: Filters) -> FilterSql:
    """The condition a row must meet to pass every given filter."""
    params: dict[str, object] = {}
    conditions = []
    folders = _folders(filters.folders, params)
    if folders is not None:
        row, copies = folders
        conditions.append(f"{row} OR file_hash = ANY(ARRAY({copies}))")
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
    where = " AND ".join(f"({c})" for c in conditions)
    if folders is None:
        return FilterSql(where, params, where)
    each_row = " AND ".join(f"({c})" for c in (f"{row} OR file_hash IN ({copies})", *conditions[1:]))
    return FilterSql(where, params, each_row, copies)
