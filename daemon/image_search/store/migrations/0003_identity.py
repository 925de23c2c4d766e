"""The first data step: ``file_hash`` becomes the MD5 of each source file (schema.IDENTITY), without
re-embedding. Databases of the oldest versions hash the processed JPEG instead.

It needs outside input: the new hashes come from reading the source files, which the store cannot do
(it knows no source-directory, and reading thousands of files does not belong under the schema lock of
every start). So the step waits, pending and unrecorded, until ``sync.migrate_identities`` computes the
hashes and supplies them (``EmbeddingStore.migrate_identities``); it is recorded in the same transaction
as the rewrite. A table with no rows has nothing to rewrite: the step is applied at once (a new database).
"""

import psycopg2.extras

from ..schema import IDENTITY, SET_META, meta_is
from . import supplied_input

NEEDS_DIMENSION = True

BY_HASHES = "SELECT file_hash FROM image_embeddings WHERE file_hash = ANY(%s)"
DELETE_HASHES = "DELETE FROM image_embeddings WHERE file_hash = ANY(%s)"
# Old hash -> new hash in two statements: UNIQUE is checked row by row, so a new hash that equals an
# old hash not yet rewritten would collide mid-statement; the first step moves every row to a name no
# hash has, the second drops the prefix.
REHASH_PREFIX = "migrating:"
REHASH = f"""
UPDATE image_embeddings AS e SET file_hash = '{REHASH_PREFIX}' || v.new_hash, updated_at = now()
FROM (VALUES %s) AS v(old_hash, new_hash) WHERE e.file_hash = v.old_hash
"""
REHASH_DONE = f"""
UPDATE image_embeddings SET file_hash = substr(file_hash, {len(REHASH_PREFIX) + 1})
WHERE file_hash LIKE '{REHASH_PREFIX}%'
"""


def done_before(cur) -> bool:
    return meta_is(cur, "identity", IDENTITY)


def apply(context) -> bool:
    """Rewrite ``file_hash`` old -> new for the rows named in ``context.supplied``; ids, embeddings and
    paths stay. Rows not named keep their old hash (their files changed, so the indexer replaces them by
    path). Two rows whose sources turn out to be the same bytes keep one (the first named).
    ``context.result``: the rows rewritten."""
    cur, new_hashes = context.cur, supplied_input(context)
    if new_hashes is None:
        return False  # pending: sync.migrate_identities reads the files and supplies the hashes
    # A new hash some row keeps (a row not being rewritten: that content is stored already) wins.
    cur.execute(BY_HASHES, (list(new_hashes.values()),))
    taken = {row[0] for row in cur.fetchall()} - set(new_hashes)
    pairs: dict[str, str] = {}
    doubles: list[str] = []
    for old, new in new_hashes.items():
        if new in taken:
            doubles.append(old)
        else:
            taken.add(new)
            pairs[old] = new
    if doubles:
        cur.execute(DELETE_HASHES, (doubles,))
    if pairs:
        psycopg2.extras.execute_values(cur, REHASH, list(pairs.items()), page_size=10_000)
        cur.execute(REHASH_DONE)
    cur.execute(SET_META, ("identity", IDENTITY))
    context.result = len(pairs)
    return True
