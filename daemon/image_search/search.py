"""Search: a query image through the same preprocessing and model as the index, or a text query
through the model's text tower; top-k by cosine similarity."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .config import Config
from .entries import LinkPolicy
from .output import ImageQuery, TextQuery, write_result_bundle
from .preprocess import preprocess_for
from .hits import Hit
from .store import EmbeddingStore
from .textquery import is_text_query, read_text_query

if TYPE_CHECKING:  # torch is imported only where a model is loaded
    from .embed import Embedder

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SearchResult:
    query_path: Path | None  # None for a typed text query
    hits: list[Hit]
    bundle: Path
    query_text: str | None = None  # the words of a text query


def search_image(query_path: Path, *, cfg: Config, embedder: Embedder, store: EmbeddingStore,
                 now: datetime | None = None, move_query: bool = False, links: LinkPolicy | None = None) -> SearchResult:
    """Search with one image file and write its result bundle. Raises PreprocessError for a bad file.
    ``links``: the symbolic links that may be followed to it (None: any, for a file the user named)."""
    started = time.monotonic()
    prepared = preprocess_for(query_path, cfg, links)
    vector = embedder.embed_images([prepared])[0]  # the same way in as the indexer's pictures
    hits = store.search(vector, cfg.top_k)
    bundle = write_result_bundle(cfg.output_directory, ImageQuery(query_path, prepared.image), hits, cfg, now=now,
                                 move_query=move_query)
    _log_answer(hits, bundle, started, query=query_path)
    return SearchResult(query_path, hits, bundle)


def search_text(text: str, *, cfg: Config, embedder: Embedder, store: EmbeddingStore, source_path: Path | None = None,
                now: datetime | None = None, move_query: bool = False) -> SearchResult:
    """Search with the words of a text query and write its result bundle.

    ``source_path``: the ``.txt`` file the words were read from (``read_text_query``), moved into the
    bundle with ``move_query``; None for typed words (``--text``, the prompt). Raises NoTextTower when
    the model cannot read text.
    """
    started = time.monotonic()
    vector = embedder.embed_texts([text])[0]
    hits = store.search(vector, cfg.top_k)
    bundle = write_result_bundle(cfg.output_directory, TextQuery(text, source_path), hits, cfg, now=now,
                                 move_query=move_query)
    _log_answer(hits, bundle, started, query=source_path if source_path is not None else "typed text",
                text=text if len(text) <= 200 else text[:199] + "…")
    return SearchResult(source_path, hits, bundle, query_text=text)


def _log_answer(hits: list[Hit], bundle: Path, started: float, **query: Path | str) -> None:
    fields = {**query, "result": bundle, "hits": len(hits),
              "duration_ms": round((time.monotonic() - started) * 1000)}
    if hits:
        log.info("search_answered", best=Path(hits[0].file_path), similarity=round(hits[0].similarity, 4), **fields)
    else:
        log.warning("search_empty_index", detail="the index holds no images yet: the ranking is empty", **fields)


def search_file(path: Path, *, cfg: Config, embedder: Embedder, store: EmbeddingStore,
                move_query: bool = False, links: LinkPolicy | None = None) -> SearchResult:
    """A query file: a picture is searched by its looks, a ``.txt`` file by its words. Raises
    PreprocessError (or TextQueryError) for a bad file, NoTextTower for words a model cannot read.
    ``links``: the symbolic links that may be followed to it (the inbox's; None for a file the user named)."""
    if is_text_query(path):
        return search_text(read_text_query(path, links), cfg=cfg, embedder=embedder, store=store, source_path=path,
                           move_query=move_query)
    return search_image(path, cfg=cfg, embedder=embedder, store=store, move_query=move_query, links=links)
