"""``image_paths``: every path that holds a stored content, one row per path. ``image_embeddings`` keeps one
row per content (``file_hash``) and its ``file_path`` stays the content's representative, one of its
paths; a second file of the same bytes is a path of the same content, not a row of its own.

Each path keeps what a rescan compares its file against (size, mtime) and where its processed copy is;
``folder`` as ``image_embeddings.folder`` has it (NULL for rows whose headers wait for step 0006: a
representative's folder is then kept, ``store.paths.REPRESENT``). The foreign key follows the identity
step (0003), which may still be waiting: a rehashed content keeps its paths, a dropped one loses them.

Filled from the rows there: each row's path. Should two rows name one path (a content changed under an
earlier version that left its old row), the newer keeps the path and the older, which no file holds
any more, is dropped. ``context.result``: the paths recorded.
"""

NEEDS_DIMENSION = True  # it refers to image_embeddings: wait until that table exists

CREATE_PATHS = """
CREATE TABLE IF NOT EXISTS image_paths (
    file_path TEXT PRIMARY KEY,
    file_hash TEXT NOT NULL REFERENCES image_embeddings (file_hash) ON UPDATE CASCADE ON DELETE CASCADE,
    file_name TEXT NOT NULL,
    processed_path TEXT NOT NULL,
    source_size BIGINT NOT NULL,
    source_mtime_ns BIGINT NOT NULL,
    folder TEXT NULL
)
"""
CREATE_HASH_INDEX = "CREATE INDEX IF NOT EXISTS image_paths_file_hash_idx ON image_paths (file_hash)"
FILL = """
INSERT INTO image_paths (file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns, folder)
SELECT DISTINCT ON (file_path) file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns, folder
FROM image_embeddings ORDER BY file_path, updated_at DESC, id DESC
ON CONFLICT (file_path) DO NOTHING
"""
DROP_PATHLESS = """
DELETE FROM image_embeddings AS e WHERE NOT EXISTS (SELECT 1 FROM image_paths AS p WHERE p.file_hash = e.file_hash)
"""


def apply(context) -> bool:  # IF NOT EXISTS, DO NOTHING: applied again after a lost record, it changes nothing
    cur = context.cur
    cur.execute(CREATE_PATHS)
    cur.execute(CREATE_HASH_INDEX)
    cur.execute(FILL)
    context.result = cur.rowcount
    cur.execute(DROP_PATHLESS)
    return True
