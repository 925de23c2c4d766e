"""Rows written before 0005 get their metadata and folder from their files' headers, with no model work.

Like the identity step (0003) it needs outside input: the store knows no source-directory and reads no
file. So it waits, pending, until ``sync.migrate_metadata`` reads the header of each stored source and
supplies the values (``EmbeddingStore.migrate_metadata``); it is recorded in the same transaction as the
update. A table with no rows has nothing to fill: the step is applied at once (a new database).

``context.supplied``: file_hash -> ``store.metadata.MetadataUpdate``. Rows not named keep NULLs (their
file changed or vanished: the rescan re-indexes or removes them, and a row written again carries its
metadata). ``context.result``: the rows updated.
"""

from ..metadata import fill_metadata
from . import supplied_input

NEEDS_DIMENSION = True


def apply(context) -> bool:
    supplied = supplied_input(context)
    if supplied is None:
        return False  # pending: sync.migrate_metadata reads the headers and supplies the values
    context.result = fill_metadata(context.cur, supplied)
    return True
