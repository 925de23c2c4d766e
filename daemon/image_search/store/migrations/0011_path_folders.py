"""``image_paths.folder`` is what a folder filter reads (``store.filters``): a picture is in every folder
one of its paths is in, not only in its representative's. This step gives it the B-tree that
``image_embeddings.folder`` has (0005: text_pattern_ops, for ``folder LIKE 'a/b/%'``), and fills the
folder of each representative's path where 0008 copied a NULL (rows whose headers waited for 0006, which
fills both from then on: ``metadata.fill_metadata``).
"""

from ..metadata import FILL_PATH_FOLDERS

NEEDS_DIMENSION = True  # it reads image_embeddings

CREATE_PATH_FOLDER_INDEX = ("CREATE INDEX IF NOT EXISTS image_paths_folder_idx "
                            "ON image_paths (folder text_pattern_ops)")


def apply(context) -> bool:  # IF NOT EXISTS, IS NULL: applied again after a lost record, it changes nothing
    context.cur.execute(CREATE_PATH_FOLDER_INDEX)
    context.cur.execute(FILL_PATH_FOLDERS)
    return True
