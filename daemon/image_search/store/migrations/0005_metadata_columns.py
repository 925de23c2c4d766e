"""What a picture says about itself (``image_search.metadata``), in columns of its own, and its folder:

- ``taken_at``: EXIF ``DateTimeOriginal``; NULL without EXIF (or without the tag): date filters exclude it.
- ``taken_at_offset_minutes``: EXIF ``OffsetTimeOriginal`` in minutes east of UTC; NULL where the file
  gave none (``taken_at`` was then read as the service's local time) or there is no date.
- ``camera_make``, ``camera_model``: EXIF Make and Model; NULL where absent.
- ``width``, ``height``, ``format``: the original's size as shown (upright) and its format
  (jpeg png webp gif bmp tiff heic avif).
- ``folder``: the source's folder relative to source-directory ('' at its top), stored escaped as paths are.

NULL until a row is written by this version or the next step (0006) reads its file's header. B-tree
indexes on ``taken_at`` and ``folder`` for the filters a query will be able to name.
"""

NEEDS_DIMENSION = True

ADD_COLUMNS = """
ALTER TABLE image_embeddings
    ADD COLUMN IF NOT EXISTS taken_at TIMESTAMPTZ NULL,
    ADD COLUMN IF NOT EXISTS taken_at_offset_minutes INTEGER NULL,
    ADD COLUMN IF NOT EXISTS camera_make TEXT NULL,
    ADD COLUMN IF NOT EXISTS camera_model TEXT NULL,
    ADD COLUMN IF NOT EXISTS width INTEGER NULL,
    ADD COLUMN IF NOT EXISTS height INTEGER NULL,
    ADD COLUMN IF NOT EXISTS format TEXT NULL,
    ADD COLUMN IF NOT EXISTS folder TEXT NULL
"""
CREATE_TAKEN_AT_INDEX = "CREATE INDEX IF NOT EXISTS image_embeddings_taken_at_idx ON image_embeddings (taken_at)"
# text_pattern_ops: a folder filter matches 'a/b' and everything under 'a/b/' (LIKE 'a/b/%').
CREATE_FOLDER_INDEX = ("CREATE INDEX IF NOT EXISTS image_embeddings_folder_idx "
                       "ON image_embeddings (folder text_pattern_ops)")


def apply(context) -> bool:
    for statement in (ADD_COLUMNS, CREATE_TAKEN_AT_INDEX, CREATE_FOLDER_INDEX):
        context.cur.execute(statement)
    return True
