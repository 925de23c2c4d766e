"""Names as ``names.escape`` writes them (schema.NAMES). Rows of an earlier version hold names raw; only
those with a backslash or a control character differ, and are rewritten once, so they are found again."""

import psycopg2.extras
import structlog

from ...names import escape
from ..schema import NAMES, SET_META, meta_is

NEEDS_DIMENSION = True

log = structlog.get_logger("image_search.store")

RAW_NAMES = """
SELECT id, file_path, file_name, processed_path FROM image_embeddings
WHERE file_path ~ %(pattern)s OR file_name ~ %(pattern)s OR processed_path ~ %(pattern)s
"""
RAW_NAME_PATTERN = r"[[:cntrl:]\\]"  # a control character or a backslash
REWRITE_NAMES = "UPDATE image_embeddings SET file_path = %s, file_name = %s, processed_path = %s WHERE id = %s"


def done_before(cur) -> bool:
    return meta_is(cur, "names", NAMES)


def apply(context) -> bool:
    cur = context.cur
    cur.execute(RAW_NAMES, {"pattern": RAW_NAME_PATTERN})
    rows = [(escape(path), escape(name), escape(processed), row_id) for row_id, path, name, processed in cur.fetchall()]
    if rows:
        psycopg2.extras.execute_batch(cur, REWRITE_NAMES, rows)
        log.info("names_escaped", rows=len(rows), detail="names with a backslash or a control character "
                 "are now stored escaped (\\ and \\xNN), as every name is")
    cur.execute(SET_META, ("names", NAMES))
    return True
