"""The paths of each stored content (``image_paths``, migration 0008): every file that holds it, one row a
path, and which of them ``image_embeddings.file_path`` names (the representative: what a hit shows first).
Each path says whether it is a copy, not the representative (``copy``, migration 0012), which the folder
filter reads: TRUE where not known, since a copy left FALSE would be missing from its folder's searches.

A content's row lives while one path holds it. Whatever takes paths away (a delete, a rename, a path
that now holds other bytes) ends with ``tidy`` on the contents it touched: a content left with no path
loses its row, one whose representative left gets another of its paths. Paths are stored escaped
(``names.escape``), as ``image_embeddings`` stores them; the caller escapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg2.extensions

PATHS_STEP = 8  # migrations/0008_paths.py: renumbering the step is renaming that file and this number

COLUMNS = "file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns, folder"
_ON_CONFLICT = """
ON CONFLICT (file_path) DO UPDATE SET file_hash = EXCLUDED.file_hash, file_name = EXCLUDED.file_name,
    processed_path = EXCLUDED.processed_path, source_size = EXCLUDED.source_size,
    source_mtime_ns = EXCLUDED.source_mtime_ns, folder = EXCLUDED.folder, copy = EXCLUDED.copy
"""
# A copy until ``tidy``, which every writer of one path runs after it, says otherwise.
WRITE = f"INSERT INTO image_paths ({COLUMNS}, copy) VALUES (%s, %s, %s, %s, %s, %s, %s, TRUE) {_ON_CONFLICT}"
# The rows of an upsert, from its staging table (``embeddings._STAGING_SCHEMA``), after the upsert made each
# its content's representative. The other paths those contents had are copies from then on (a content
# embedded again under another name), found by the staged hashes: a new content has no path yet, and the
# lookup finds nothing. One statement, not two, for a round trip less per batch; the two parts touch
# different rows (the first never a staged path).
WRITE_STAGED = f"""
WITH now_copies AS (
    UPDATE image_paths AS p SET copy = TRUE
    WHERE p.file_hash = ANY(ARRAY(SELECT file_hash FROM image_embeddings_incoming)) AND NOT p.copy
        AND NOT EXISTS (SELECT 1 FROM image_embeddings_incoming AS i WHERE i.file_path = p.file_path)
)
INSERT INTO image_paths ({COLUMNS}, copy) SELECT {COLUMNS}, FALSE FROM image_embeddings_incoming {_ON_CONFLICT}
"""
# Paths about to hold other content leave the content they held. Each staged path is looked up through
# the primary key: a join with the staging table (a TEMP table, never analysed) read all of image_paths
# per batch, 0.08 ms a row at 16,000 rows and growing with the table.
LEAVE_STAGED = """
DELETE FROM image_paths AS p
WHERE p.file_path = ANY(ARRAY(SELECT file_path FROM image_embeddings_incoming))
    AND NOT EXISTS (SELECT 1 FROM image_embeddings_incoming AS i
                    WHERE i.file_path = p.file_path AND i.file_hash = p.file_hash)
RETURNING p.file_hash
"""
LEAVE = "DELETE FROM image_paths WHERE file_path = ANY(%s) OR (file_path = %s AND file_hash <> %s) RETURNING file_hash"
DELETE = "DELETE FROM image_paths WHERE file_path = ANY(%s) RETURNING file_path, file_hash"
DELETE_UNDER = "DELETE FROM image_paths WHERE file_path LIKE %s ESCAPE '\\' RETURNING file_path, file_hash"
# Before a path is written: the content is still there, and no one drops it until this transaction ends.
# KEY SHARE, the weakest lock that does it: it blocks no update of the row (the duplicates report filling
# perceptual hashes, a re-embedding), which a stronger one would make a party to deadlocks with the
# contents ``tidy`` then locks. Two recorders of one content can still each hold it and meet at ``tidy``'s
# FOR UPDATE; PostgreSQL then rolls one back, and that one runs again (``Session.retrying``). One service
# never records a content from two threads at once: the indexer waits for the row writer's tickets that
# name it (``RowWriter.touches``).
HOLD_CONTENT = "SELECT 1 FROM image_embeddings WHERE file_hash = %s FOR KEY SHARE"
# Before contents that lost paths are dropped: wait for the writers of their paths (another service
# recording a copy), so the next statement sees every committed path.
_LOCK_CONTENTS = "SELECT 1 FROM image_embeddings WHERE file_hash = ANY(%(hashes)s) ORDER BY file_hash FOR UPDATE"
_DROP_PATHLESS = """
DELETE FROM image_embeddings AS e
WHERE e.file_hash = ANY(%(hashes)s) AND NOT EXISTS (SELECT 1 FROM image_paths AS p WHERE p.file_hash = e.file_hash)
"""
# The representative stays while it is a path of its content (its size and mtime follow a touch); else
# the first of the remaining paths by name takes its place. A folder unknown for that path (written
# before the headers were read, 0006) keeps the one the row has.
REPRESENT = """
UPDATE image_embeddings AS e SET file_path = p.file_path, file_name = p.file_name, processed_path = p.processed_path,
    source_size = p.source_size, source_mtime_ns = p.source_mtime_ns, folder = coalesce(p.folder, e.folder),
    updated_at = now()
FROM (SELECT DISTINCT ON (q.file_hash) q.* FROM image_paths AS q JOIN image_embeddings AS r USING (file_hash)
      WHERE q.file_hash = ANY(%(hashes)s) ORDER BY q.file_hash, q.file_path <> r.file_path, q.file_path) AS p
WHERE e.file_hash = p.file_hash
    AND (e.file_path, e.file_name, e.processed_path, e.source_size, e.source_mtime_ns, e.folder) IS DISTINCT FROM
        (p.file_path, p.file_name, p.processed_path, p.source_size, p.source_mtime_ns, coalesce(p.folder, e.folder))
"""
# After ``REPRESENT``: each path of these contents is a copy unless it is the representative.
_MARK_COPIES = """
UPDATE image_paths AS p SET copy = p.file_path <> e.file_path FROM image_embeddings AS e
WHERE p.file_hash = ANY(%(hashes)s) AND e.file_hash = p.file_hash AND p.copy <> (p.file_path <> e.file_path)
"""
# Every path of the contents a ranking found, by name: its hits' copies.
PATHS_OF = ("SELECT file_hash, file_path, file_name, processed_path, folder FROM image_paths "
            "WHERE file_hash = ANY(%s) ORDER BY file_path")
SOURCES = ("SELECT p.file_path, p.source_size, p.source_mtime_ns, p.file_hash, e.model_name, p.processed_path "
           "FROM image_paths AS p JOIN image_embeddings AS e USING (file_hash)")
SOURCES_AT = SOURCES + " WHERE p.file_path = ANY(%s)"
SOURCES_UNDER = SOURCES + " WHERE p.file_path LIKE %s ESCAPE '\\'"
# LEFT JOIN: a row some older program wrote without its path is stored content too (a path is added to it).
CONTENTS = """
SELECT e.file_hash, e.model_name,
       coalesce(array_agg(ARRAY[p.file_path, p.source_size::text, p.source_mtime_ns::text] ORDER BY p.file_path)
                FILTER (WHERE p.file_path IS NOT NULL), '{}')
FROM image_embeddings AS e LEFT JOIN image_paths AS p USING (file_hash)
WHERE e.file_hash = ANY(%s) GROUP BY e.file_hash, e.model_name
"""


@dataclass(frozen=True)
class StoredContent:
    """One stored content: the model that embedded it and every path known to hold it (unescaped, by name),
    with the size and mtime recorded for each (``stats``, in the order of ``paths``)."""

    model_name: str
    paths: tuple[str, ...]
    stats: tuple[tuple[int, int], ...]

    def records(self, path: str, size: int, mtime_ns: int) -> bool:
        """Whether ``path`` is stored with this size and mtime: its row says what the file says."""
        return any(p == path and s == (size, mtime_ns) for p, s in zip(self.paths, self.stats))


def tidy(cur: psycopg2.extensions.cursor, hashes: Iterable[str]) -> None:
    """After paths of ``hashes`` left or came: drop the contents no path holds, give each of the others
    a representative that is one of its paths, and mark the rest of its paths copies."""
    touched = sorted(set(hashes))
    if touched:
        cur.execute(_LOCK_CONTENTS, {"hashes": touched})
        cur.execute(_DROP_PATHLESS, {"hashes": touched})
        cur.execute(REPRESENT, {"hashes": touched})
        cur.execute(_MARK_COPIES, {"hashes": touched})


def record(cur: psycopg2.extensions.cursor, entry: tuple, replaces: list[str]) -> list[str] | None:
    """Write one path (``entry``: ``COLUMNS``' values, escaped) of a stored content, after the paths in
    ``replaces`` and any other content at that path left; the hashes they left (for ``tidy``). None,
    with nothing written, when the content is not stored (any more: its last path just went)."""
    file_path, file_hash = entry[0], entry[1]
    cur.execute(HOLD_CONTENT, (file_hash,))
    if cur.fetchone() is None:
        return None
    cur.execute(LEAVE, (replaces, file_path, file_hash))
    left = [row[0] for row in cur.fetchall()]
    cur.execute(WRITE, entry)
    return left


def forget(cur: psycopg2.extensions.cursor, delete: str, params: tuple) -> list[tuple[str, str]]:
    """Run ``DELETE`` or ``DELETE_UNDER``, then ``tidy`` the contents that lost paths; the paths forgotten
    (as stored: escaped), each with its content's hash."""
    cur.execute(delete, params)
    gone = cur.fetchall()
    tidy(cur, [file_hash for _, file_hash in gone])
    return [(path, file_hash) for path, file_hash in gone]
