"""Search: a query image through the same preprocessing and model as the index, top-k by cosine similarity."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .config import Config
from .output import write_result_bundle
from .preprocess import preprocess_for
from .store import EmbeddingStore, Hit

if TYPE_CHECKING:  # torch is imported only where a model is loaded
    from .embed import Embedder

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SearchResult:
    query_path: Path
    hits: list[Hit]
    bundle: Path


def search_image(query_path: Path, *, cfg: Config, embedder: Embedder, store: EmbeddingStore,
                 now: datetime | None = None, move_query: bool = False) -> SearchResult:
    """Search with one image file and write its result bundle. Raises PreprocessError for a bad file."""
    started = time.monotonic()
    prepared = preprocess_for(query_path, cfg)
    vector = embedder.embed_images([prepared.image])[0]
    hits = store.search(vector, cfg.top_k)
    bundle = write_result_bundle(cfg.output_directory, query_path, hits, cfg, now=now, move_query=move_query)
    fields = {"query": str(query_path), "result": str(bundle), "hits": len(hits),
              "duration_ms": round((time.monotonic() - started) * 1000)}
    if hits:
        log.info("search_answered", best=hits[0].file_path, similarity=round(hits[0].similarity, 4), **fields)
    else:
        log.warning("search_empty_index", detail="the index holds no images yet: the ranking is empty", **fields)
    return SearchResult(query_path, hits, bundle)
