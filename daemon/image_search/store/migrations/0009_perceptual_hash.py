"""image_embeddings.phash: the picture's perceptual hash (``image_search.phash``, 32 bytes), what makes
two contents near-copies of one picture. Written at ingest by the CPU path; NULL in the rows of earlier
versions and in those the GPU decoder wrote, until ``duplicates.fill_missing_hashes`` computes it from
the row's processed copy (its thumbnail), with no model work and without reading the user's files."""

NEEDS_DIMENSION = True

ADD_PHASH = "ALTER TABLE image_embeddings ADD COLUMN IF NOT EXISTS phash BYTEA NULL"


def apply(context) -> bool:
    context.cur.execute(ADD_PHASH)
    return True
