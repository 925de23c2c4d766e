"""A query's answer, one ``Hit`` per picture (per content: copies of one file are one hit): what the store returns, and what the result bundle and the
contact sheet show. Kept apart from the store so that drawing a sheet never imports the database driver."""

from __future__ import annotations

from dataclasses import dataclass


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
