"""The embeddings table, of the dimension the model confirmed (or the one an existing table has)."""

NEEDS_DIMENSION = True

CREATE_EMBEDDINGS = """
CREATE TABLE IF NOT EXISTS image_embeddings (
    id BIGSERIAL PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    file_path TEXT NOT NULL,
    file_name TEXT NOT NULL,
    file_hash TEXT UNIQUE NOT NULL,
    processed_path TEXT NOT NULL,
    source_size BIGINT NOT NULL,
    source_mtime_ns BIGINT NOT NULL,
    model_name TEXT NOT NULL,
    embedding vector({dimension}) NOT NULL
)
"""
CREATE_PATH_INDEX = "CREATE INDEX IF NOT EXISTS image_embeddings_file_path_idx ON image_embeddings (file_path)"


def apply(context) -> bool:  # IF NOT EXISTS: an earlier version's table is adopted as it is
    context.cur.execute(CREATE_EMBEDDINGS.format(dimension=int(context.dimension)))
    context.cur.execute(CREATE_PATH_INDEX)
    return True
