"""``image_paths.copy``: whether a path is a copy, not its content's representative
(``image_embeddings.file_path``). A folder filter (``store.filters``) reads the representative's folder
from the row and the copies' folders from here, through a partial index that holds copies alone: in a
library without copies it is empty, and a filter costs what the row's folder alone did.

TRUE is the safe side: a representative marked as a copy is found twice and counted once, a copy left
FALSE would be missing from its folder's searches. So TRUE is the column's default, and the store sets
FALSE only where it knows the path is the representative (``store.paths``). Filled here without
rewriting the table: added FALSE, then TRUE for each path that is not its row's, then the default
made TRUE.

It also drops 0011's index of every path's folder, which no search reads any more and every path written
paid for.
"""

NEEDS_DIMENSION = True  # it reads image_embeddings

ADD_COPY = "ALTER TABLE image_paths ADD COLUMN IF NOT EXISTS copy BOOLEAN NOT NULL DEFAULT FALSE"
MARK_COPIES = """
UPDATE image_paths AS p SET copy = TRUE
WHERE NOT p.copy AND NOT EXISTS (SELECT 1 FROM image_embeddings AS e WHERE e.file_hash = p.file_hash
                                                                       AND e.file_path = p.file_path)
"""
COPY_BY_DEFAULT = "ALTER TABLE image_paths ALTER COLUMN copy SET DEFAULT TRUE"
CREATE_COPY_FOLDER_INDEX = ("CREATE INDEX IF NOT EXISTS image_paths_copy_folder_idx "
                            "ON image_paths (folder text_pattern_ops) WHERE copy")
DROP_PATH_FOLDER_INDEX = "DROP INDEX IF EXISTS image_paths_folder_idx"


def apply(context) -> bool:  # IF NOT EXISTS, NOT p.copy: applied again after a lost record, it changes nothing
    cur = context.cur
    for statement in (ADD_COPY, MARK_COPIES, COPY_BY_DEFAULT, CREATE_COPY_FOLDER_INDEX, DROP_PATH_FOLDER_INDEX):
        cur.execute(statement)
    return True
