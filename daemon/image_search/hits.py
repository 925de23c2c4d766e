"""A query's answer, one ``Hit`` per picture (per content: copies of one file are one hit): what the store returns, and what the result bundle and the
contact sheet show. Kept apart from the store so that drawing a sheet never imports the database driver."""

from __future__ import annotations

from dataclasses import dataclass

from .query import Completeness

# A similarity as results print it (q.jsonl, duplicates.jsonl): a floor copied from there is met by the
# hit it was copied from.
SIMILARITY_DECIMALS = 6


def shown_similarity(similarity: float) -> float:
    return round(similarity, SIMILARITY_DECIMALS)


@dataclass(frozen=True)
class Hit:
    rank: int
    similarity: float
    file_name: str
    file_path: str
    processed_path: str
    file_hash: str
    # What the original's header said (``image_search.metadata``); None where unknown.
    taken_at: str | None = None  # ISO 8601, with the picture's offset where its file gave one
    camera: str | None = None  # make and model
    width: int | None = None  # the original's, upright
    height: int | None = None
    format: str | None = None  # jpeg png webp gif bmp tiff heic avif
    copies: tuple[str, ...] = ()  # the other paths that hold the same bytes, by name (``file_path`` is one of them)


@dataclass(frozen=True)
class Ranking:
    """The hits of one query, best first, and whether they are all there are: ``completeness`` says
    whether ``hits`` holds min(k, the pictures passing the filters and the floor). ``matches``: how many
    pictures pass the filters (the floor aside), where the store counted them; None where it did not
    (more than it counts before going through the index)."""

    hits: list[Hit]
    completeness: Completeness
    matches: int | None
