"""Reserved for the copies work (another branch brings the real step 0007): DELETE THIS FILE when that
branch is merged. It does nothing; it only keeps the steps numbered without a gap on this branch."""

NEEDS_DIMENSION = True  # as the real step will (it touches image_embeddings)


def apply(context) -> bool:
    return True
