"""A query's answer, one ``Hit`` per picture: what the store returns, and what the result bundle and the
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
