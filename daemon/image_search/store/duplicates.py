"""What the duplicates report reads from ``image_embeddings``, in one statement, and the perceptual hashes
it fills in (migration 0009: NULL in rows of earlier versions and rows the GPU decoder wrote)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import psycopg2.extras

from ..names import unescape
from ..phash import from_bytes, to_bytes
from ..query import Filters
from .filters import filter_sql_on, folder_match
from .metadata import TAKEN_AT_SECONDS, taken_at_of

if TYPE_CHECKING:
    from .embeddings import EmbeddingStore

# Every picture (one row: one content) of the index or of a folder and everything under it (the
# search's folder filter, ``filters.filter_sql``: a picture with a path there), by file_hash, with every
# path that holds it: those in the folder first, then the row's own. The embedding in pgvector's binary
# form (vector_send: int16 dimension, int16 unused, big-endian float4s): read as bytes and viewed as
# floats, no text parsing of 100k x 1024 numbers.
PICTURES = f"""
SELECT file_hash, ARRAY(SELECT p.file_path FROM image_paths AS p WHERE p.file_hash = e.file_hash
                        ORDER BY {{outside}} p.file_path <> e.file_path, p.file_path),
    file_path, processed_path, phash, width, height, source_size, format, {TAKEN_AT_SECONDS},
    taken_at_offset_minutes, CASE WHEN %(embeddings)s THEN vector_send(embedding) END
FROM image_embeddings AS e
WHERE {{where}}
ORDER BY file_hash
"""
MISSING_HASHES = "SELECT file_hash, processed_path FROM image_embeddings WHERE phash IS NULL ORDER BY file_hash"
FILL_HASHES = """
UPDATE image_embeddings AS e SET phash = v.phash
FROM (VALUES %s) AS v(file_hash, phash) WHERE e.file_hash = v.file_hash AND e.phash IS NULL
"""
FETCH_ROWS = 2000  # rows per round trip of the server-side cursor


@dataclass(frozen=True)
class StoredPicture:
    """One content of the index as the duplicates report sees it."""

    file_hash: str
    paths: tuple[str, ...]  # every path holding these bytes: those in the folder read first, then the representative
    processed_path: str
    phash: int | None  # ``phash.perceptual_hash``; None until filled
    width: int | None  # the original's, upright
    height: int | None
    bytes: int  # the source file's size
    format: str | None
    taken_at: datetime | None
    taken_at_offset_minutes: int | None


def read_pictures(store: EmbeddingStore, *, folders: tuple[str, ...] = (), embeddings: bool = True,
                  checkpoint: Callable[[], None] = lambda: None) -> tuple[list[StoredPicture], np.ndarray | None]:
    """The index's pictures (with a path in one of ``folders``, relative to source-directory, or below it;
    none: all), by file_hash, and their embeddings as an (n, dimension) float32 array in the same order
    (None when not asked for: only the ``similar`` kind needs them). ``checkpoint`` is called before each round of rows:
    what it raises ends the read (a stop)."""
    if not store.has_table:
        return [], (np.zeros((0, store.dimension), dtype=np.float32) if embeddings else None)
    pictures: list[StoredPicture] = []
    vectors: list[np.ndarray] = []  # float32, a round of rows each (the big-endian bytes never all at once)
    pending: list[bytes] = []
    with store.session.transaction() as cur:
        condition = filter_sql_on(cur, Filters(folders=folders))
        params = {**condition.params, "embeddings": embeddings}
        inside = folder_match("p.folder", folders, params)  # the same parameters as the condition's
        outside = "" if inside is None else f"({inside}) IS NOT TRUE,"
        named = cur.connection.cursor(name="duplicates_pictures")  # server-side: rows arrive in rounds
        try:
            named.itersize = FETCH_ROWS
            named.execute(PICTURES.format(where=condition.where, outside=outside), params)
            for n, (file_hash, paths, path, processed, phash, width, height, size, fmt, taken_seconds, offset,
                    vector) in enumerate(named):
                if n % FETCH_ROWS == 0:
                    checkpoint()
                # A row an older program wrote without its path is its own one path.
                held = tuple(unescape(p) for p in paths) or (unescape(path),)
                pictures.append(StoredPicture(file_hash, held, unescape(processed),
                                              None if phash is None else from_bytes(phash), width, height, size,
                                              fmt, taken_at_of(taken_seconds, path), offset))
                if embeddings:
                    pending.append(bytes(vector)[4:])
                    if len(pending) == FETCH_ROWS:
                        vectors.append(_floats(pending, store.dimension))
                        pending = []
        finally:
            named.close()
    if not embeddings:
        return pictures, None
    vectors.append(_floats(pending, store.dimension))
    return pictures, np.concatenate(vectors)


def _floats(rows: list[bytes], dimension: int) -> np.ndarray:
    return np.frombuffer(b"".join(rows), dtype=">f4").astype(np.float32).reshape(len(rows), dimension)


def missing_hashes(store: EmbeddingStore) -> list[tuple[str, str]]:
    """(file_hash, processed_path) of every row without a perceptual hash."""
    if not store.has_table:
        return []
    with store.session.transaction() as cur:
        cur.execute(MISSING_HASHES)
        return [(file_hash, unescape(processed)) for file_hash, processed in cur.fetchall()]


def fill_hashes(store: EmbeddingStore, hashes: dict[str, int]) -> int:
    """Write the perceptual hash of each row named (by file_hash) that has none yet; the rows given."""
    if not hashes:
        return 0
    def fill() -> None:
        with store.session.transaction() as cur:
            psycopg2.extras.execute_values(cur, FILL_HASHES, [(h, to_bytes(v)) for h, v in hashes.items()],
                                           template="(%s, %s::bytea)", page_size=5000)
    store.session.retrying(fill)  # again if a service writing paths of these rows meanwhile deadlocked with it
    return len(hashes)
