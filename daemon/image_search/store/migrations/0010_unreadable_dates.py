"""image_embeddings.taken_at: NULL where an earlier version stored a date taken whose time in UTC falls
outside years 1-9999 (EXIF "9999:12:31 23:59:59" at -14:00 is 10000-01-01 13:59:59 in UTC; "0001:01:01
00:00:00" at +14:00 is 1 BC). No datetime holds such a value, so every search whose hits held the row
failed; ``metadata.picture_metadata`` now reads such a date as no date, and this step makes those rows
what it would have made them: no date, no offset (date filters exclude them, as any undated picture).
One line for each row cleared, naming its path (stored text); the ``taken_at`` index finds them."""

import structlog

NEEDS_DIMENSION = True

log = structlog.get_logger("image_search.store")

# The path and the value each row held, for its log line.
CLEAR_UNREADABLE_DATES = """
UPDATE image_embeddings AS e SET taken_at = NULL, taken_at_offset_minutes = NULL
FROM (SELECT id, taken_at FROM image_embeddings
      WHERE taken_at < '0001-01-01 00:00:00+00' OR taken_at > '9999-12-31 23:59:59.999999+00') AS old
WHERE e.id = old.id
RETURNING e.file_path, old.taken_at::text
"""


def apply(context) -> bool:
    context.cur.execute(CLEAR_UNREADABLE_DATES)
    for path, stored in context.cur.fetchall():
        log.warning("stored_date_cleared", path=path, taken_at=stored,
                    reason="outside years 1-9999 in UTC, which no search can read back: now no date")
    return True
