"""A ranking: the ``k`` stored pictures most similar to a query vector among those that pass the
filters (``filters.filter_sql``) and the floor, best first, and whether that is all of them
(``hits.Ranking``). ``EmbeddingStore.ranking`` runs it in one transaction.

How it is never silently short:

1. The rows that pass are counted up to a bound (a B-tree or a scan of the small heap rows, never of the
   vectors): ``exact_search_below`` without filters, as before; with filters, ``EXACT_MATCHES_BELOW``
   (or ``exact_search_below`` if lower), and only where the planner does not expect far more rows than
   that (``ESTIMATE_MARGIN``: counting a wide filter's first 2,000 rows cost 5-16 ms, as much as the
   search); a filter's rows are scored as they are counted, in one statement. Fewer than the bound, or
   no valid HNSW index (a bulk load is rebuilding it): an exact search over the rows that pass, the
   floor in its WHERE or on its top k. Complete by construction.
2. Else through the HNSW index (the half-precision copy), re-ranked by the exact similarity. With
   filters, pgvector's iterative scan (``relaxed_order``) goes on past ``ef_search`` candidates until
   ``k`` rows pass the filters or ``SCAN_TUPLES`` index tuples were visited.
3. Fewer than ``k`` hits (at or above the floor) from the index: the rows that pass the filters are
   counted up to ``EXACT_FALLBACK_MAX_ROWS``. Without a floor, hits as many as the rows that pass are
   all of them; else at most that many rows are searched exactly, the floor in the WHERE: the answer
   is then complete. More than that many: the index's hits are returned with
   ``Completeness(False, reason)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import psycopg2.extensions

from ..hits import Hit, Ranking, shown_similarity
from ..names import unescape
from ..query import Completeness, Filters
from . import metadata as meta
from . import paths, schema
from .filters import FilterSql, filter_sql_on, folder_text, holds
from ..wording import counted

# A filter matching fewer rows than this is searched exactly. Reading a 1024-d vector (4 KB, TOASTed)
# costs ~12 us here, so an exact search over 1,000 rows takes ~15 ms, 10,000 rows ~190 ms; the index's
# iterative scan needs about k / (the fraction passing) tuples: ~40 ms at 1% of 100,000 rows, ~7 ms at
# 10% (measured beside ``tests/benchmarks/filtered.py``). The two cross near 2,000 rows at 100,000.
EXACT_MATCHES_BELOW = 2_000
# A filter the planner expects to pass more than this many times ``EXACT_MATCHES_BELOW`` rows goes to the
# index uncounted. The estimate only picks the path: a filter that turns out narrower costs a longer
# iterative scan (about k / its fraction of the table in tuples) and is still answered completely (3.).
ESTIMATE_MARGIN = 4
# Index tuples the iterative scan may visit for one filtered query (pgvector's default is 20,000). A
# filter matching a fraction p of the table needs about k / p of them; a scan that runs out is caught
# by the exact search (3.), so this only bounds the approximate path's cost (not tuned: no filter of
# ``tests/benchmarks/filtered.py`` that reaches the index comes near it).
SCAN_TUPLES = 100_000
# The most rows an exact search after a short index answer scans (3.): about 2-3 s on the shared 2-core
# machine of the benchmark (an exact search over 100,000 x 1024-d rows took 1.3-1.8 s there, over
# 10,000 about 0.2 s; ``tests/benchmarks/filtered.py``, its floor searches).
EXACT_FALLBACK_MAX_ROWS = 150_000
COMPLETE = Completeness(True)

_COLUMNS = (f"file_name, file_path, processed_path, file_hash, -(embedding <#> %(q)s) AS similarity, "
            f"{meta.HIT_COLUMNS}")
_FLOOR = "WHERE similarity >= %(floor)s"
# Below the floor by less than this, a similarity may print at it (6 decimals: half a unit, and some).
FLOOR_MARGIN = 1e-6
_ESTIMATE = "EXPLAIN (FORMAT JSON) SELECT 1 FROM image_embeddings WHERE {where}"
_COUNT_MATCHES = "SELECT count(*) FROM (SELECT 1 FROM image_embeddings WHERE {where} LIMIT %(bound)s) AS bounded"
# Full precision, no index usable: the exact answer. Each row's vector is read (detoasted) once: the
# similarity is computed in a subquery that OFFSET 0 keeps whole, and the floor and the order use it.
_EXACT = f"""
SELECT * FROM (SELECT {_COLUMNS} FROM image_embeddings WHERE {{where}} OFFSET 0) AS scored
{{floor}} ORDER BY similarity DESC LIMIT %(k)s
"""
# The same for a filter that passes few rows, counted in the same statement (its last column): the rows
# that pass, up to ``bound``, all scored. Fewer than ``bound``: the exact answer, the floor applied to
# its top k (best first, so those above the floor are all among them). A count of its own would find
# each passing row twice.
_EXACT_COUNTED = f"""
SELECT *, count(*) OVER () FROM (
    SELECT {_COLUMNS} FROM (SELECT * FROM image_embeddings WHERE {{where}} LIMIT %(bound)s) AS passing OFFSET 0
) AS scored ORDER BY similarity DESC LIMIT %(k)s
"""
# Top-k through the index (ordered by the half-precision copy), re-ranked by the exact similarity.
_INDEXED = f"""
SELECT * FROM (
    SELECT {_COLUMNS} FROM image_embeddings WHERE {{where}}
    ORDER BY embedding::halfvec({{dimension}}) <#> %(q)s::halfvec({{dimension}}) LIMIT %(k)s
) AS candidates ORDER BY similarity DESC
"""
_EF_SEARCH = "SELECT set_config('hnsw.ef_search', %s, true)"
_ITERATIVE = ("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true), "
              "set_config('hnsw.max_scan_tuples', %s, true)")


@dataclass(frozen=True)
class SearchSettings:
    """The store's search knobs (config ``ef-search``, ``exact-search-below``) and its vector size."""

    dimension: int
    ef_search: int
    exact_search_below: int


def indexed_sql(dimension: int, where: str = "TRUE") -> str:
    return _INDEXED.format(where=where, dimension=int(dimension))


def rank(cur: psycopg2.extensions.cursor, settings: SearchSettings, query: np.ndarray, k: int,
         filters: Filters = Filters(), min_similarity: float | None = None) -> Ranking:
    """The ranking (see the module), on ``cur``'s transaction; each hit with its copies (``paths``),
    read for the k hits alone, after the ranking."""
    ranking = _rank(cur, settings, query, k, filters, min_similarity)
    cur.execute(paths.PATHS_OF, ([hit.file_hash for hit in ranking.hits],))
    found: dict[str, list[_Path]] = {}
    for file_hash, *path in cur.fetchall():
        found.setdefault(file_hash, []).append(_Path(*path))
    return replace(ranking, hits=[_shown(hit, found.get(hit.file_hash, []), filters) for hit in ranking.hits])


@dataclass(frozen=True)
class _Path:
    """One path of a hit's content, as ``paths.PATHS_OF`` reads it (stored text)."""

    file_path: str
    file_name: str
    processed_path: str
    folder: str | None


def _shown(hit: Hit, held: list[_Path], filters: Filters) -> Hit:
    """``hit`` with its copies; under a folder filter, named by a path inside the folders asked for where
    its representative is outside them (a copy in 'selects/' of a photo first indexed in '2023/')."""
    wanted = [text for text in map(folder_text, filters.folders) if text is not None]
    if wanted and len(wanted) == len(filters.folders):
        inside = [p for p in held if p.folder is not None and any(holds(w, p.folder) for w in wanted)]
        if inside and all(unescape(p.file_path) != hit.file_path for p in inside):
            hit = replace(hit, file_path=unescape(inside[0].file_path), file_name=unescape(inside[0].file_name),
                          processed_path=unescape(inside[0].processed_path))
    return replace(hit, copies=tuple(unescape(p.file_path) for p in held if unescape(p.file_path) != hit.file_path))


def _rank(cur: psycopg2.extensions.cursor, settings: SearchSettings, query: np.ndarray, k: int,
          filters: Filters, min_similarity: float | None) -> Ranking:
    condition = filter_sql_on(cur, filters)
    # The SQL floor lets in what prints at the floor (``hits.shown_similarity``); ``_hits`` decides.
    sql_floor = None if min_similarity is None else min_similarity - FLOOR_MARGIN
    params: dict[str, object] = {**condition.params, "q": np.asarray(query, dtype=np.float32).reshape(-1),
                                 "k": k, "floor": sql_floor}
    if condition.filtered:
        few = _exact_if_few(cur, condition, params, min(settings.exact_search_below, EXACT_MATCHES_BELOW),
                            min_similarity)
        if few is not None:
            return few
        matches = None
    else:
        matches = _count(cur, condition, params, settings.exact_search_below)
    if matches is not None or not _index_valid(cur):
        return Ranking(_exact(cur, condition, params, min_similarity), COMPLETE, matches)
    cur.execute(_EF_SEARCH, (str(max(settings.ef_search, k)),))
    if condition.filtered:
        cur.execute(_ITERATIVE, (str(SCAN_TUPLES),))
    cur.execute(indexed_sql(settings.dimension, condition.where), params)
    found = _hits(cur.fetchall(), min_similarity)
    if len(found) >= k:
        return Ranking(found, COMPLETE, None)
    matches = _count(cur, condition, params, EXACT_FALLBACK_MAX_ROWS + 1)
    if matches is None:
        return Ranking(found, Completeness(False, _too_many(len(found), k, condition, min_similarity)), None)
    if min_similarity is None and len(found) >= matches:  # the index found every row that passes
        return Ranking(found, COMPLETE, matches)
    return Ranking(_exact(cur, condition, params, min_similarity), COMPLETE, matches)


def _count(cur: psycopg2.extensions.cursor, condition: FilterSql, params: dict[str, object],
           bound: int) -> int | None:
    """How many rows pass the filters, when fewer than ``bound``; else None."""
    cur.execute(_COUNT_MATCHES.format(where=condition.where), {**params, "bound": bound})
    found = int(cur.fetchone()[0])
    return found if found < bound else None


def _exact_if_few(cur: psycopg2.extensions.cursor, condition: FilterSql, params: dict[str, object],
                  bound: int, floor: float | None) -> Ranking | None:
    """The exact ranking where fewer than ``bound`` rows pass the filters; None where more do, or where the
    planner expects far more than that to (then uncounted). Scored as counted where the planner expects
    fewer than ``bound``; else counted first (``bound`` vectors read for nothing cost ~24 ms)."""
    cur.execute(_ESTIMATE.format(where=condition.where), params)
    expected = cur.fetchone()[0][0]["Plan"]["Plan Rows"]
    if expected > ESTIMATE_MARGIN * bound:
        return None
    if expected >= bound and _count(cur, condition, params, bound) is None:
        return None
    cur.execute(_EXACT_COUNTED.format(where=condition.where), {**params, "bound": bound})
    rows = cur.fetchall()
    matches = int(rows[0][-1]) if rows else 0
    if matches >= bound:
        return None
    return Ranking(_hits([row[:-1] for row in rows], floor), COMPLETE, matches)


def _index_valid(cur: psycopg2.extensions.cursor) -> bool:
    cur.execute(schema.INDEX_VALID)  # no index during a bulk load: every row is scanned, none missed
    return bool(cur.fetchone()[0])


def _exact(cur: psycopg2.extensions.cursor, condition: FilterSql, params: dict[str, object],
           floor: float | None) -> list[Hit]:
    cur.execute(_EXACT.format(where=condition.where, floor="" if floor is None else _FLOOR), params)
    return _hits(cur.fetchall(), floor)


def _hits(rows: list[tuple], floor: float | None) -> list[Hit]:
    """Hits from result rows (best first), those below ``floor`` left out: a hit passes at or above it, or
    printed at or above it (a floor copied from a result keeps the hit it was copied from; one written with
    more decimals than are printed keeps every hit above it)."""
    kept = [row for row in rows
            if floor is None or float(row[4]) >= floor or shown_similarity(float(row[4])) >= floor]
    return [
        Hit(rank=i, similarity=float(sim), file_name=unescape(name), file_path=unescape(path),
            processed_path=unescape(processed), file_hash=file_hash, **meta.hit_fields(tuple(extra), path))
        for i, (name, path, processed, file_hash, sim, *extra) in enumerate(kept, start=1)
    ]


def _too_many(found: int, k: int, condition: FilterSql, floor: float | None) -> str:
    above = " at or above the relevance floor" if floor is not None else ""
    many = (f"more than {EXACT_FALLBACK_MAX_ROWS:,} pictures pass the filters" if condition.filtered
            else f"the library holds more than {EXACT_FALLBACK_MAX_ROWS:,} pictures")
    narrow = "narrow the filters (a folder, dates)" if condition.filtered else "add a filter (a folder, dates)"
    return (f"the index found {found} of the {counted(k, 'picture')} asked for{above}, and {many}: too many to compare "
            f"one by one to make sure none was missed. To be sure, {narrow}"
            + (" or lower the relevance floor." if floor is not None else "."))
