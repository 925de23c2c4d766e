"""Search: the terms of a query made into one vector, the store's ranking of the pictures that pass its
filters and floor, and the result bundle.

Every query is a ``query.QuerySpec``: a picture (its looks, through the same preprocessing and model as
the index), a ``.txt`` file or typed words (the model's text tower), or a query document (``querydoc``):
several terms, each weighted, some pushed away (``unlike``), with filters, a top-k and a floor.

The terms become one vector: the sum of each term's unit embedding times its weight (negative for an
unlike term), made unit length again. A hit's similarity is its cosine to that vector. CLIP has no
notion of negation: "unlike people" is one more direction subtracted, not a logical NOT.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog
from PIL import Image

from .config import Config
from .entries import FileIdentity, LinkPolicy
from .errors import UnusableFile
from .hits import Hit
from .output import DocumentQuery, ImageQuery, Query, TextQuery, write_result_bundle
from .preprocess import PreparedImage, preprocess_for
from .query import Completeness, DuplicatesRequest, QueryRecord, QuerySpec, TermKind, likes_nothing, single_term
from .querydoc import QueryDocument, is_query_document, pictures_folder, read_query_document
from .store import EmbeddingStore
from .textquery import is_text_query, read_text_query

if TYPE_CHECKING:  # torch is imported only where a model is loaded
    from .embed import Embedder

log = structlog.get_logger(__name__)

# Terms whose weighted sum is shorter than this (unit vectors: ``a`` and ``unlike a``) point nowhere.
_CANCELLED_NORM = 1e-6


class TermsCancelOut(UnusableFile):
    """A query whose terms, weighted, sum to nothing (the same picture or words liked and unliked
    equally): there is no direction to rank by."""


@dataclass(frozen=True)
class SearchResult:
    query_path: Path | None  # None for a typed text query
    hits: list[Hit]
    bundle: Path
    query_text: str | None = None  # the words of a text query
    completeness: Completeness = Completeness(True)


def combine(weights: Sequence[float], vectors: np.ndarray) -> np.ndarray | None:
    """The unit vector of ``sum(weight_i * vector_i)``, or None when the terms cancel out. Only the weights'
    ratios matter: they are scaled to at most 1 first, so no weight, however large, overflows the sum."""
    scaled = np.asarray(weights, dtype=np.float64)
    scaled = scaled / np.abs(scaled).max()
    total = (scaled[:, None] * np.asarray(vectors, dtype=np.float64)).sum(axis=0)
    norm = float(np.linalg.norm(total))
    return None if norm < _CANCELLED_NORM else (total / norm).astype(np.float32)


def _links_for(path: Path, cfg: Config, links: LinkPolicy | None) -> LinkPolicy | None:
    """The link rule for reading a term's picture: None (any link) where the query came from the command
    line (``links`` None); else the rule of the folder the picture really is in: source-directory's for
    a picture there (``querydoc`` resolved the path, and either folder may be reached through a link),
    the inbox's (``links``) for one in the inbox."""
    if links is None:
        return None
    inside_source = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(cfg.source_directory))
    return cfg.source_links if inside_source else links


# How a query's picture is read: its path and the link rule it is read by, to the picture as processed
# (with ``image``: the contact sheet shows it). In this process for a command (``read_here``); the
# service's in a worker of its own (``inbox.QueryPictures``).
PictureReader = Callable[[Path, LinkPolicy | None], PreparedImage]


def read_here(cfg: Config) -> PictureReader:
    """Query pictures read and decoded in this process, as a command does."""
    return lambda path, links: preprocess_for(path, cfg, links)


def query_vector(spec: QuerySpec, *, cfg: Config, embedder: Embedder, links: LinkPolicy | None,
                 query_path: Path, read_picture: PictureReader | None = None) -> tuple[np.ndarray, Image.Image | None]:
    """The query's one vector, and the first liked picture as processed (for the contact sheet).

    ``links``: the rule of the folder the query came from (the inbox's; None: any, a file the user named
    on the command line); a picture in source-directory follows that folder's rule. A picture or words given
    more than once are read and embedded once. ``read_picture``: how (default: ``read_here``). Raises
    PreprocessError for a picture that cannot be used, NoTextTower for words a model cannot read,
    TermsCancelOut."""
    if likes_nothing(spec.terms):  # before any picture is read
        raise TermsCancelOut(query_path, "the query has nothing left to look for: each picture or words it likes "
                                         "it also unlikes as much or more (a term given twice counts once, its "
                                         "weights added), so it would only push pictures away; change a weight "
                                         "or drop a term")
    texts = [term for term in spec.terms if term.kind is TermKind.TEXT]
    pictures = [term for term in spec.terms if term.kind is TermKind.IMAGE]
    words = list(dict.fromkeys(term.value for term in texts))
    read = read_picture or read_here(cfg)
    prepared = {path: read(path, _links_for(path, cfg, links)) for path in dict.fromkeys(term.picture_path for term in pictures)}
    vectors = dict(zip(words, embedder.embed_texts(words))) if words else {}
    if prepared:  # the same way in as the indexer's pictures
        vectors.update(zip(prepared, embedder.embed_images(list(prepared.values()))))
    rows = [vectors[term.value] for term in texts] + [vectors[term.picture_path] for term in pictures]
    combined = combine([t.signed_weight for t in (*texts, *pictures)], np.stack(rows))
    if combined is None:
        raise TermsCancelOut(query_path, "the terms cancel out: what the query likes it also unlikes as much, so "
                                         "there is no direction to rank by; change a weight or drop a term")
    liked = next((_as_processed(prepared[term.picture_path]) for term in pictures if not term.unlike), None)
    return combined, liked


def _as_processed(prepared: PreparedImage) -> Image.Image:
    """The picture as processed, for the contact sheet: decoded here, or from its processed JPEG when a
    worker decoded it (embedded from the worker's pixels, as the index's pictures are)."""
    if prepared.image is not None:
        return prepared.image
    with Image.open(io.BytesIO(prepared.jpeg_bytes)) as copy:
        return copy.convert("RGB")


def search_query(spec: QuerySpec, query: Query, *, cfg: Config, embedder: Embedder, store: EmbeddingStore,
                 given: dict[str, object] | None = None, now: datetime | None = None, move_query: bool = False,
                 links: LinkPolicy | None = None, not_yet_indexed: int | None = None,
                 read_as: FileIdentity | None = None, read_picture: PictureReader | None = None) -> SearchResult:
    """Search with one query and write its result bundle: ``spec`` is what is searched, ``query`` how
    the bundle names and holds it, ``given`` the query as the user wrote it (a document, the flags);
    ``not_yet_indexed``: the pictures the service has noticed and not indexed yet (``QueryRecord``);
    ``read_as``: the query file as it was before it was read (``write_result_bundle``); ``read_picture``:
    see ``query_vector``."""
    started = time.monotonic()
    named = query.path if query.path is not None else Path("typed text")
    vector, picture = query_vector(spec, cfg=cfg, embedder=embedder, links=links, query_path=named,
                                   read_picture=read_picture)
    top_k = spec.top_k if spec.top_k is not None else cfg.top_k
    ranking = store.ranking(vector, top_k, filters=spec.filters, min_similarity=spec.min_similarity)
    if isinstance(query, (ImageQuery, DocumentQuery)) and query.picture is None:
        query = dataclasses.replace(query, picture=picture)
    asked = QueryRecord(spec, ranking.completeness, top_k, given, not_yet_indexed)
    bundle = write_result_bundle(cfg.output_directory, query, ranking.hits, cfg, now=now, move_query=move_query,
                                 asked=asked, read_as=read_as)
    text = query.text if isinstance(query, TextQuery) else None
    _log_answer(ranking.hits, bundle, started, asked, query=query.path if query.path is not None else "typed text",
                **({"text": text if len(text) <= 200 else text[:199] + "…"} if text is not None else {}))
    return SearchResult(query.path, ranking.hits, bundle, query_text=text, completeness=ranking.completeness)


def _log_answer(hits: list[Hit], bundle: Path, started: float, asked: QueryRecord, **query: Path | str) -> None:
    fields = {**query, "result": bundle, "hits": len(hits), "duration_ms": round((time.monotonic() - started) * 1000)}
    if not asked.completeness.complete:
        fields["incomplete"] = asked.completeness.reason
    if asked.not_yet_indexed is not None:
        fields["not_yet_indexed"] = asked.not_yet_indexed
    spec = asked.spec
    if hits:
        log.info("search_answered", best=Path(hits[0].file_path), similarity=round(hits[0].similarity, 4), **fields)
    elif spec.filters.empty and spec.min_similarity is None:
        log.warning("search_empty_index", detail="the index holds no images yet: the ranking is empty", **fields)
    else:
        log.info("search_answered_none", detail="no picture passes the filters and the floor", **fields)


def search_image(query_path: Path, *, cfg: Config, embedder: Embedder, store: EmbeddingStore,
                 now: datetime | None = None, move_query: bool = False, links: LinkPolicy | None = None) -> SearchResult:
    """Search with one image file and write its result bundle. Raises PreprocessError for a bad file.
    ``links``: the symbolic links that may be followed to it (None: any, for a file the user named)."""
    spec = single_term(TermKind.IMAGE, str(query_path), query_path)
    return search_query(spec, ImageQuery(query_path), cfg=cfg, embedder=embedder, store=store, now=now,
                        move_query=move_query, links=links)


def search_text(text: str, *, cfg: Config, embedder: Embedder, store: EmbeddingStore, source_path: Path | None = None,
                now: datetime | None = None, move_query: bool = False) -> SearchResult:
    """Search with the words of a text query and write its result bundle.

    ``source_path``: the ``.txt`` file the words were read from (``read_text_query``), moved into the
    bundle with ``move_query``; None for typed words (``--text``, the prompt). Raises NoTextTower when
    the model cannot read text.
    """
    return search_query(single_term(TermKind.TEXT, text), TextQuery(text, source_path), cfg=cfg, embedder=embedder,
                        store=store, now=now, move_query=move_query)


def search_file(path: Path, *, cfg: Config, embedder: Embedder, store: EmbeddingStore, move_query: bool = False,
                links: LinkPolicy | None = None, spec: QuerySpec | None = None,
                given: dict[str, object] | None = None, document: QueryDocument | None = None,
                not_yet_indexed: int | None = None, read_as: FileIdentity | None = None,
                read_picture: PictureReader | None = None) -> SearchResult:
    """A query file: a picture is searched by its looks, a ``.txt`` file by its words, a ``.json`` file
    is a query document (``querydoc``: its pictures may wait in ``querydoc.pictures_folder(path)``, which moves
    into the bundle with it). Raises PreprocessError, TextQueryError or QueryDocumentError for a bad
    file, NoTextTower for words a model cannot read, TermsCancelOut.

    ``links``: the symbolic links that may be followed to it (the inbox's; None for a file the user
    named). ``spec``: the query the command line's flags made of this file (``given``: those flags);
    None searches the file alone. ``document``: the query document at ``path``, already read (the
    inbox's); its own keys are its ``given``. ``not_yet_indexed``: the pictures the service has noticed
    and not indexed yet (``QueryRecord``; None from a command). ``read_as``: the file as it was before
    ``document`` was read (else it is looked at here, before the file is read): with ``move_query``, a
    file that is no longer that one stays where it is (``write_result_bundle``). A
    ``{"duplicates": true}`` document is answered by the duplicates report (``duplicates.write_report``):
    its folder is the result's ``bundle``."""
    query: Query
    if move_query and read_as is None:
        read_as = FileIdentity.of(path)  # before the read: a change after it shows at the move
    if is_query_document(path):
        document = document or read_query_document(path, cfg, links)
        if isinstance(document.asks, DuplicatesRequest):  # its answer is the duplicates report
            return _report_duplicates(document.asks, path, cfg=cfg, store=store, move_query=move_query)
        spec, given = document.asks, document.given  # a document takes no flags (``cli`` refuses them)
        query = DocumentQuery(path, pictures_folder(path), document.data)
    elif is_text_query(path):
        text = spec.terms[0].value if spec is not None else read_text_query(path, links)
        spec = spec or single_term(TermKind.TEXT, text)
        query = TextQuery(text, path)
    else:
        spec = spec or single_term(TermKind.IMAGE, str(path), path)
        query = ImageQuery(path)
    return search_query(spec, query, cfg=cfg, embedder=embedder, store=store, given=given, move_query=move_query,
                        links=links, not_yet_indexed=not_yet_indexed, read_as=read_as, read_picture=read_picture)


def _report_duplicates(request: DuplicatesRequest, path: Path, *, cfg: Config, store: EmbeddingStore,
                       move_query: bool) -> SearchResult:
    from .duplicates import Kind, write_report  # the grouping code, only where a report is asked for

    report = write_report(cfg, store, kinds=[Kind(k) for k in request.kinds], folders=request.folders,
                          document=path if move_query else None)
    return SearchResult(path, [], report)
