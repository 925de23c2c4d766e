"""Incremental indexing: bring the table in line with a set of source files, doing as little as possible.

Per file, cheapest check first: a stored path with the same size, mtime and model means nothing to
do; otherwise decode and hash, and a stored content with the same hash and model needs only its
paths updated (a rename, a touch, a copy: each copy is a path of the one row) - no model work. Only
new content is embedded.

Decoding, orienting, fitting, JPEG encoding, hashing, the model's own resize and crop and saving the
processed copies run in worker processes (``workers.PreprocessPool``), so this thread only stacks the
uint8 pixels and runs the model; the next batch is prepared while the current one is embedded, and the
rows of the one before travel to the database meanwhile (``store.writer.RowWriter``, a thread and a
connection of its own; batches that wait for it are written together).
(Saving was this thread's largest stage before, issue 16; it still saves what no worker did: the batched
JPEG decoder's pictures, or one a worker could not write, so that a full disk is reported as before.) With the model
on CUDA, plain JPEGs are decoded there instead, in batches (``gpudecode.GpuJpegReader``): the next
batch's files are read and hashed by threads while the current one is embedded, and decoded on the
device after it (one device, one queue of work); the other files still take the workers.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog
from tqdm import tqdm

from .config import Config
from .errors import holds_no_folder, writing_into
from .metadata import PictureMetadata, relative_folder
from .names import escape
from .pixels import to_model_pixels
from .preprocess import (ModelInput, PreparedImage, PreprocessError, normalised_pixels, processed_folder_gone,
                         processed_folder_present, processed_path_for, save_processed)
from .store import EmbeddingRow, EmbeddingStore, SourceRecord, StoredContent
from .store.writer import RowWriter, Ticket
from .sync import (Refusals, claim_processed_folder, compare_folder, holds_no_file, is_current, remove_processed,
                   stat_or_none)
from .workers import HEARTBEAT_EVERY_S, BatchHandle, PreprocessPool, ProcessedFolders

if TYPE_CHECKING:  # torch is imported only where a model is loaded
    from .embed import Embedder
    from .gpudecode import GpuJpegReader

log = structlog.get_logger(__name__)


@dataclass
class IndexSummary:
    seen: int = 0
    embedded: int = 0
    unchanged: int = 0
    relinked: int = 0  # same content already stored: path or metadata updated, no model work
    copies: int = 0  # new paths of content another file still holds: recorded, no model work
    removed: int = 0
    missing_copies: int = 0  # unchanged files whose processed copy or thumbnail was gone: read again to make it
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    deferred: list[Path] = field(default_factory=list)  # still being written: not read, try again later
    # Contents a path read anew no longer holds: their other paths (a hard link, a link to that path) may
    # hold the new bytes too, with no event of their own.
    left: set[str] = field(default_factory=set)

    def merge(self, other: IndexSummary) -> None:
        self.seen += other.seen
        self.embedded += other.embedded
        self.unchanged += other.unchanged
        self.relinked += other.relinked
        self.copies += other.copies
        self.removed += other.removed
        self.missing_copies += other.missing_copies
        self.skipped.extend(other.skipped)
        self.deferred.extend(other.deferred)
        self.left |= other.left

    def as_log_fields(self) -> dict[str, int]:
        return {"seen": self.seen, "embedded": self.embedded, "unchanged": self.unchanged,
                "relinked": self.relinked, "copies": self.copies, "removed": self.removed,
                "missing_copies": self.missing_copies, "skipped": len(self.skipped)}


class PreparingBatch(Protocol):
    """A batch handed to the reader (``workers.BatchHandle``, ``gpudecode``'s batches): its outcomes."""

    def wait(self, timeout: float) -> bool:
        """True once ``results`` has its files read, waiting up to ``timeout`` seconds for that."""
        ...

    def results(self) -> Sequence[PreparedImage | PreprocessError]: ...


@dataclass(frozen=True)
class _Candidate:
    path: Path
    size: int
    mtime_ns: int
    stored_hash: str | None = None  # the content its row held when it was looked at


@dataclass(frozen=True)
class _Read:
    """A file of a batch, read: its look before reading, what the workers made of it, its processed copy."""

    candidate: _Candidate
    image: PreparedImage
    processed: Path


def _refused(candidate: _Candidate, reason: str, summary: IndexSummary, refusals: Refusals) -> None:
    """``candidate`` skipped for ``reason``: one warning, and a debug line when a rescan reads it again as
    it was and it is refused for the same reason."""
    summary.skipped.append((candidate.path, reason))
    news = refusals.is_news(candidate.path, candidate.size, candidate.mtime_ns, reason)
    (log.warning if news else log.debug)("image_skipped", path=candidate.path, reason=reason)


def _usable(batch: Sequence[_Candidate], outcomes: Sequence[PreparedImage | PreprocessError],
            defer: Callable[[Path, PreprocessError], bool] | None, summary: IndexSummary,
            refusals: Refusals) -> list[tuple[_Candidate, PreparedImage]]:
    """The files of a batch that were read; the others counted in ``summary`` as deferred or skipped."""
    prepared: list[tuple[_Candidate, PreparedImage]] = []
    for candidate, outcome in zip(batch, outcomes):
        if isinstance(outcome, PreprocessError) and defer is not None and defer(candidate.path, outcome):
            summary.deferred.append(candidate.path)
        elif isinstance(outcome, PreprocessError):
            _refused(candidate, outcome.reason, summary, refusals)
        else:
            prepared.append((candidate, outcome))
    return prepared


def blocked_processed_reason(processed: Path, exc: OSError) -> str:
    """Why a file's processed copy cannot be written when an entry in processed-directory is in its way
    (a file where a folder goes, a folder where a file goes)."""
    return (f"its processed copy {escape(processed)} cannot be written: {exc.strerror} "
            f"({escape(exc.filename2 or exc.filename or processed)}): an entry in processed-directory holds a name it needs; "
            "it is left as it is: move it away and the file is indexed at the next rescan or start")


def refusing_entry(exc: PermissionError, processed_directory: Path) -> Path | None:
    """What under processed-directory refused a write with ``exc`` (EACCES, EPERM): the copy or thumbnail
    it would replace (an immutable file) where its folder takes writes, else that folder. None when it is
    processed-directory itself, or nothing under it: the ingest's outage."""
    name = exc.filename2 or exc.filename  # a rename's target, else the file or folder being made
    if name is None:
        return None
    target = Path(os.fsdecode(name))
    if not target.is_relative_to(processed_directory) or target == processed_directory:
        return None
    if os.access(target.parent, os.W_OK) and os.path.lexists(target):
        return target
    folder = target.parent
    return folder if folder != processed_directory else None


def denied_processed_reason(entry: Path, exc: PermissionError) -> str:
    """Why a file's processed copy cannot be written where an entry under processed-directory refuses it."""
    where = (f"written into {escape(entry)}" if entry.is_dir() else f"written: {escape(entry)} cannot be replaced")
    return (f"its processed copy cannot be {where} ({exc.strerror}): this user may not write "
            f"{'into that folder' if entry.is_dir() else 'that file'} (another user's, or immutable): fix its "
            "owner, permissions or attributes, and the file is read again at the next rescan or start; the "
            "others go on")


def _row(read: _Read, vector: np.ndarray, cfg: Config) -> EmbeddingRow:
    c = read.candidate
    return EmbeddingRow(file_path=str(c.path), file_name=c.path.name, file_hash=read.image.file_hash,
                        processed_path=str(read.processed), source_size=c.size, source_mtime_ns=c.mtime_ns,
                        model_name=cfg.model_name, embedding=vector, metadata=read.image.metadata,
                        folder=relative_folder(c.path, cfg.source_directory), phash=read.image.phash)


def _gone_paths(to_embed: Sequence[_Read], stored: dict[str, StoredContent]) -> list[str]:
    """Paths of content being embedded again (another model's) that are no longer files: they leave it."""
    return [p for r in to_embed if (content := stored.get(r.image.file_hash)) is not None
            for p in content.paths if p != str(r.candidate.path) and holds_no_file(Path(p))]


def _remove_copies_of(gone: Sequence[str], cfg: Config) -> None:
    """The processed copies and thumbnails of ``gone``, paths whose file is no longer there and whose rows
    were just dropped: ``processed/`` holds one copy per stored path, not one per path a file ever had."""
    for path in gone:
        remove_processed(cfg, Path(path))


def _batch_keys(prepared: Sequence[tuple[_Candidate, PreparedImage]]) -> set[str]:
    """The hashes and paths a batch reads and writes (what a queued write must not change under it)."""
    return {image.file_hash for _, image in prepared} | {str(c.path) for c, _ in prepared}


def _copy_found(read: _Read, same_as: Path, summary: IndexSummary) -> None:
    summary.copies += 1
    log.info("image_copy", path=read.candidate.path, file_hash=read.image.file_hash, same_as=same_as)


def _changed_batches(paths: Iterable[Path], known: dict[str, SourceRecord], summary: IndexSummary,
                     progress: Callable[[int], None] | None, *, size: int, model_name: str,
                     reread: Collection[Path] = frozenset()) -> Iterator[list[_Candidate]]:
    """Batches of the files that need reading; unchanged ones whose processed copies are there
    (``sync.is_current``) and vanished ones are counted in ``summary`` and never opened. ``reread``: files
    the watcher saw written, read whatever their stat says (their content hashed: no model work if stored)."""
    batch: list[_Candidate] = []
    for path in paths:
        summary.seen += 1
        st = stat_or_none(path)
        record = known.get(str(path))
        if st is not None and _to_read(path, st, record, model_name, reread):
            batch.append(_Candidate(path, st.st_size, st.st_mtime_ns, record.file_hash if record is not None else None))
            if len(batch) >= size:
                yield batch
                batch = []
            continue
        if st is None:
            summary.skipped.append((path, "file disappeared before it could be read"))
            log.warning("image_skipped", path=path, reason="file disappeared before it could be read")
        else:
            summary.unchanged += 1
        if progress:
            progress(1)
    if batch:
        yield batch


def _to_read(path: Path, st: os.stat_result, record: SourceRecord | None, model_name: str,
             reread: Collection[Path]) -> bool:
    """The file at ``path`` is to be read: it differs from its row (``sync.is_current``), or the watcher saw
    it written (``reread``), which a rewrite keeping its size and mtime leaves no other trace of."""
    if not is_current(record, st, model_name):
        return True
    if path not in reread:
        return False
    log.info("image_reread", path=path, reason="written while watched, its size and mtime as stored: read again "
             "to compare its content")
    return True


def _jpeg_device(embedder: Embedder, cfg: Config, requested: str | None) -> str | None:
    """Where plain JPEGs are decoded in batches (``Indexer``'s ``jpeg_decode_device``), or None."""
    if embedder.pixel_spec is None:  # the model's own processor wants PIL images on the host
        return None
    if requested == "auto":
        return str(embedder.device) if embedder.device.type == "cuda" and cfg.gpu_jpeg_decode else None
    return requested


def _start_parts(cfg: Config, embedder: Embedder, store: EmbeddingStore, workers: int | None,
                 jpeg_decode_device: str | None) -> tuple[RowWriter, PreprocessPool, GpuJpegReader | None]:
    """An ``Indexer``'s row writer, worker pool and batched JPEG decoder (None: every file takes the pool).
    What started is stopped again when a later part fails (workers that cannot start, a decoder that
    cannot open): no writer thread or connection outlives a failed start."""
    with ExitStack() as started:
        # Rows are written beside the indexer's thread, which embeds the next batch meanwhile.
        writer = RowWriter(store)
        started.callback(writer.close)
        pool = PreprocessPool(max_size=(cfg.resize_width, cfg.resize_height), max_pixels=cfg.max_image_pixels,
                              model_input=model_input_for(embedder), links=cfg.source_links, workers=workers,
                              processed=ProcessedFolders(cfg.source_directory, cfg.processed_directory))
        started.callback(pool.close)
        gpu = None
        device = _jpeg_device(embedder, cfg, jpeg_decode_device)
        if device is not None:
            from .gpudecode import open_gpu_reader  # imports torch, as the embedder already has

            assert embedder.pixel_spec is not None
            gpu = open_gpu_reader(pool, device, spec=embedder.pixel_spec, threads=pool.worker_count or 1,
                                  state_directory=cfg.state_directory)
        started.pop_all()
    return writer, pool, gpu


@dataclass
class BatchInFlight:
    """A batch between ``Indexer.submit`` and its rows committed: every path it was given, what the look
    before reading found (unchanged, vanished), the files being read, the reader's handle, and once
    ``Indexer.finish`` embedded it, the write of its rows (None: nothing to write)."""

    paths: tuple[Path, ...]
    summary: IndexSummary
    candidates: list[_Candidate]
    preparing: PreparingBatch | None
    reread: frozenset[Path] = frozenset()  # seen written: read again whatever their stat, if it goes back to pending
    write: Ticket | None = None
    # Files deleted or moved away while being read (a slow file set aside): what their read finds is not written.
    dropped: set[Path] = field(default_factory=set)

    def drop(self, paths: Collection[Path]) -> None:
        """``paths``, where it holds them, are no longer its: their outcome, once read, is not written."""
        gone = set(self.paths).intersection(paths)
        self.dropped |= gone
        self.paths = tuple(p for p in self.paths if p not in gone)
        self.reread = self.reread - gone

    def read_within(self, timeout: float) -> bool:
        """Its files are read (``Indexer.finish`` waits for no file), waiting up to ``timeout`` seconds."""
        return self.preparing is None or self.preparing.wait(timeout)

    @property
    def settled(self) -> bool:
        """Its write is over, committed or failed (``write.error``), or it had none."""
        return self.write is None or self.write.done.is_set()

    @property
    def committed(self) -> bool:
        """Its rows are in (or it had none to write): searchable, whether or not the service counted it yet."""
        return self.settled and (self.write is None or self.write.error is None)


class Indexer:
    """Indexes source files of one config into one store with one embedder."""

    def __init__(self, cfg: Config, embedder: Embedder, store: EmbeddingStore, *, workers: int | None = None,
                 defer: Callable[[Path, PreprocessError], bool] | None = None,
                 jpeg_decode_device: str | None = "auto", heartbeat: Callable[[], None] | None = None,
                 refusals: Refusals | None = None) -> None:
        """``jpeg_decode_device``: where plain JPEGs are decoded in batches. "auto": the model's CUDA
        device when config key 'gpu-jpeg-decode' allows, else nowhere (the CPU workers decode every
        file); None: nowhere; "cpu" or "cuda": there (the tests run the batched path on "cpu").
        ``heartbeat``: called about once a second while this thread waits for the CPU workers (the
        service's watchdog ping: a wait bounded by ``workers.FILE_SECONDS_LIMIT`` per file is no hang).
        ``refusals``: the files refused before (the service's ``FolderSync.refusals``), named once.
        Writes the processed folder's record of its source first, where a start did not
        (``sync.claim_processed_folder``): without it no copy is written there (``processed_folder_present``)."""
        claim_processed_folder(cfg, store.sources)
        self.cfg = cfg
        self.refusals = refusals or Refusals()
        # The service's test for "this file is still being written": such a file is deferred, not skipped.
        self.defer = defer
        self.embedder = embedder
        self.store = store
        # Images read and embedded together: on CUDA as many as a forward pass holds (measured at load),
        # so the GPU is fed full passes; on the CPU batch-size, so a query never waits behind a long pass.
        # Each batch's rows are one write (store/writer.py); writes that wait behind one are committed together.
        self.read_batch_size = (max(cfg.batch_size, embedder.max_batch) if embedder.device.type == "cuda"
                                else cfg.batch_size)
        # True while this thread only waits for files to be read and decoded: a stop may cut that wait
        # short (a read that never returns, on a dead network mount) with nothing half-done.
        self.waiting_for_files = False
        self.heartbeat = heartbeat
        self._writer, self._pool, self._gpu = _start_parts(cfg, embedder, store, workers, jpeg_decode_device)
        if self._gpu is not None:
            self._gpu.heartbeat = heartbeat  # its batches wait for the CPU workers' files too

    @property
    def decoded_on_device(self) -> int:
        """Files decoded by the batched JPEG decoder so far (0 when every file took the CPU workers)."""
        return self._gpu.decoded_on_device if self._gpu is not None else 0

    def close(self) -> None:
        self._writer.close()
        if self._gpu is not None:
            self._gpu.close()
        self._pool.close()

    def flush(self) -> None:
        """Wait until every row embedded so far is committed; raise a write's failure (DatabaseUnavailable...)."""
        self._writer.flush()

    def wait_written(self) -> None:
        """Wait until every write handed over is done; each batch's ``write`` tells how it went."""
        self._writer.wait()

    def index_paths(self, paths: Iterable[Path], *, progress: Callable[[int], None] | None = None) -> IndexSummary:
        """Index ``paths`` (files under ``source-directory``) in batches; return what happened.

        Pipelined: the next batch is decoded in the thread pool while the current one is embedded and
        written, and no more than those two batches are ever held in memory.
        """
        paths = list(paths)
        known = self.store.sources(str(p) for p in paths)  # only these rows, never the whole table
        summary = IndexSummary()
        in_flight: tuple[list[_Candidate], PreparingBatch] | None = None

        def finish(batch: list[_Candidate], preparing: PreparingBatch) -> None:
            summary.merge(self._finish_batch(batch, self._outcomes(preparing))[0])
            self._writer.raise_failure()  # a lost database stops the run here, not after every batch was embedded
            if progress:
                progress(len(batch))

        for batch in _changed_batches(paths, known, summary, progress, size=self.read_batch_size,
                                      model_name=self.cfg.model_name):
            preparing = (self._gpu or self._pool).submit([c.path for c in batch])
            if in_flight is not None:
                finish(*in_flight)
            in_flight = (batch, preparing)
        if in_flight is not None:
            finish(*in_flight)
        self.flush()
        return summary

    def submit(self, paths: Sequence[Path], *, reread: frozenset[Path] = frozenset()) -> BatchInFlight:
        """Start one batch (``paths``, at most ``read_batch_size``): the look at each file's stat now, the
        reading and decoding in the background; ``finish`` embeds and writes it. The service keeps two in
        flight, so the next batch is read while this one is embedded, as ``index_paths`` does. ``reread``:
        the paths the watcher saw written, read whatever their stat says."""
        summary = IndexSummary()
        known = self.store.sources(str(p) for p in paths)
        batches = _changed_batches(paths, known, summary, None, size=self.read_batch_size,
                                   model_name=self.cfg.model_name, reread=reread)
        candidates = [c for batch in batches for c in batch]
        preparing = (self._gpu or self._pool).submit([c.path for c in candidates]) if candidates else None
        return BatchInFlight(tuple(paths), summary, candidates, preparing, reread=reread)

    def set_aside_slow(self, batch: BatchInFlight, *, keep: Collection[Path] = ()) -> BatchInFlight | None:
        """Its files that a worker has been reading for ``workers.SLOW_FILE_S`` or more, but those in ``keep``,
        as a batch of their own (``batch`` keeps the rest and may be finished without them); None if it has
        none. Only the CPU workers' batches: a device batch is read whole."""
        if not isinstance(batch.preparing, BatchHandle):
            return None
        split = self._pool.set_aside_slow(batch.preparing,
                                          keep=[i for i, c in enumerate(batch.candidates) if c.path in keep])
        if split is None:
            return None
        handle, indices = split
        slow = [batch.candidates[i] for i in indices]
        slow_paths = {c.path for c in slow}
        batch.candidates = [c for c in batch.candidates if c.path not in slow_paths]
        batch.paths = tuple(p for p in batch.paths if p not in slow_paths)
        reread = batch.reread & slow_paths
        batch.reread = batch.reread - slow_paths
        return BatchInFlight(tuple(c.path for c in slow), IndexSummary(), slow, handle, reread=reread)

    def finish(self, batch: BatchInFlight) -> IndexSummary:
        """Wait for a submitted batch's files, embed what is new and hand its rows to the writer
        (``batch.settled`` says when that is over, ``batch.write`` how it went); what happened. Its
        ``dropped`` files are left out."""
        if batch.preparing is not None:
            outcomes = self._outcomes(batch.preparing)
            kept = [(c, o) for c, o in zip(batch.candidates, outcomes) if c.path not in batch.dropped]
            batch.candidates = [c for c, _ in kept]
            summary, batch.write = self._finish_batch(batch.candidates, [o for _, o in kept])
            batch.summary.merge(summary)
        return batch.summary

    def _outcomes(self, preparing: PreparingBatch) -> Sequence[PreparedImage | PreprocessError]:
        """Wait for a batch's outcomes, marked ``waiting_for_files``, calling ``heartbeat`` meanwhile."""
        self.waiting_for_files = True
        try:
            if self.heartbeat is not None and isinstance(preparing, BatchHandle):
                while True:
                    try:
                        return preparing.results(timeout=HEARTBEAT_EVERY_S)
                    except TimeoutError:
                        self.heartbeat()
            return preparing.results()
        finally:
            self.waiting_for_files = False

    def _finish_batch(self, batch: Sequence[_Candidate],
                      outcomes: Sequence[PreparedImage | PreprocessError]) -> tuple[IndexSummary, Ticket | None]:
        """What happened to a batch's files, and the write of its new rows (None: nothing to write)."""
        summary = IndexSummary()
        prepared = _usable(batch, outcomes, self.defer, summary, self.refusals)
        if not prepared:
            return summary, None
        if self._writer.touches(_batch_keys(prepared)):  # an earlier batch's rows hold this one's content or paths
            self._writer.wait()
        stored = self.store.contents(p.file_hash for _, p in prepared)
        to_embed: list[_Read] = []
        first: dict[str, Path] = {}  # each content's first file in this batch
        later: list[tuple[_Read, Path]] = []  # a content's further files in this batch, and its first
        for candidate, image in prepared:
            # A worker saved it where processed_path_for says (the pool's ProcessedFolders are this config's).
            processed = image.saved_to or processed_path_for(candidate.path, self.cfg.source_directory,
                                                             self.cfg.processed_directory)
            if image.saved_to is None:  # not saved by a worker (the GPU decoder's, or a worker's write failed)
                # Inside writing_into: an entry of the user's in the way (ENOTDIR too) is this file's loss,
                # not the run's, and the entry is left as it is; so is a sub-folder this user may not write
                # into (one made by another user). A full or read-only disk stops the run, and so does
                # processed-directory itself not a folder, or not writable (every file would be skipped), or
                # not the folder the copies were made in (its disk unmounted: the copies would land under it).
                if not (processed_folder_present(self.cfg.processed_directory)
                        or holds_no_folder(self.cfg.processed_directory)):  # that one's words: below
                    raise processed_folder_gone(self.cfg.processed_directory)
                with writing_into(self.cfg.processed_directory, "a processed image"):
                    try:
                        save_processed(image, processed)
                    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                        if holds_no_folder(self.cfg.processed_directory):
                            raise
                        _refused(candidate, blocked_processed_reason(processed, exc), summary, self.refusals)
                        continue
                    except PermissionError as exc:
                        if (denied := refusing_entry(exc, self.cfg.processed_directory)) is None:
                            raise
                        _refused(candidate, denied_processed_reason(denied, exc), summary, self.refusals)
                        continue
            read = _Read(candidate, image, processed)
            if image.file_hash in first:
                later.append((read, first[image.file_hash]))
                continue
            first[image.file_hash] = candidate.path
            content = stored.get(image.file_hash)
            if content is None or content.model_name != self.cfg.model_name \
                    or not self._known_content(read, content, summary):
                to_embed.append(read)
        write = None
        if to_embed:
            vectors = self.embedder.embed_images([r.image for r in to_embed])
            to_embed, vectors, later = _finite_only(to_embed, vectors, later, summary, self.refusals)
            if to_embed:
                write = self._embed(to_embed, vectors, [read for read, _ in later], stored, summary)
        for read, same_as in later:  # their content is stored by the first (or by its write, once committed)
            if write is None:
                self._record(read)
            _copy_found(read, same_as, summary)
        skipped = {path for path, _ in summary.skipped}  # their rows are as they were
        summary.left = {c.stored_hash for c, image in prepared
                        if c.stored_hash not in (None, image.file_hash) and c.path not in skipped}
        return summary, write

    def _known_content(self, read: _Read, content: StoredContent, summary: IndexSummary) -> bool:
        """A file whose content is stored with this model: a new copy of it (another path holds it still),
        or the file of a path known already (touched) or of paths that are gone (renamed), relinked.
        False when the content went meanwhile (another service dropped it): it is embedded instead. A file
        that had no row when looked at and whose row now says what it says was stored meanwhile by another
        process (a service beside ``index`` or ``search``, a member of the fleet): counted unchanged."""
        c = read.candidate
        path = str(c.path)
        others = [p for p in content.paths if p != path]
        gone = [p for p in others if holds_no_file(Path(p))]  # one that cannot be looked at now stays
        if c.stored_hash is None and not gone and content.records(path, c.size, c.mtime_ns):
            summary.unchanged += 1
            return True
        kept = [p for p in others if p not in gone]
        copy = path not in content.paths and bool(kept)
        if not self._record(read, metadata=None if copy else read.image.metadata, replaces=gone):
            return False
        _remove_copies_of(gone, self.cfg)  # a file moved where its move went unseen: its copies are made anew
        if copy:
            _copy_found(read, Path(kept[0]), summary)
        else:
            summary.relinked += 1
        return True

    def _record(self, read: _Read, *, metadata: PictureMetadata | None = None, replaces: Sequence[str] = (),
                store: EmbeddingStore | None = None) -> bool:
        """``read``'s path as a path of its stored content, no model work; False if that content is gone."""
        c = read.candidate
        return (store or self.store).update_source(
            read.image.file_hash, file_path=str(c.path), file_name=c.path.name, processed_path=str(read.processed),
            source_size=c.size, source_mtime_ns=c.mtime_ns, metadata=metadata, replaces=replaces,
            folder=relative_folder(c.path, self.cfg.source_directory))

    def _embed(self, to_embed: Sequence[_Read], vectors: np.ndarray, later: Sequence[_Read],
               stored: dict[str, StoredContent], summary: IndexSummary) -> Ticket:
        """Hand the rows of new content (or content another model embedded), its ``vectors``, to the writer,
        then the paths of copies of it in this batch (``later``); paths of such content that are gone leave it."""
        started = time.monotonic()
        rows = [_row(r, vector, self.cfg) for r, vector in zip(to_embed, vectors)]
        gone = _gone_paths(to_embed, stored)

        def then(store: EmbeddingStore) -> None:
            if gone:
                store.delete_paths(gone)
                _remove_copies_of(gone, self.cfg)
            for read in later:
                self._record(read, store=store)

        # Everything the write changes: its contents and paths, and the contents its later copies join (a
        # copy of content stored before this batch), so that a batch reading any of them waits for it.
        keys = {*(r.file_hash for r in rows), *(r.file_path for r in rows), *gone,
                *(str(r.candidate.path) for r in later), *(r.image.file_hash for r in later)}
        write = self._writer.submit(rows, keys=keys, then=then if gone or later else None)
        summary.embedded += len(rows)
        log.debug("batch_indexed", count=len(rows), duration_ms=round((time.monotonic() - started) * 1000))
        return write

    def index_folder(self, *, show_progress: bool | None = None) -> IndexSummary:
        """Index everything under ``source-directory`` and drop rows whose source is gone."""
        started = time.monotonic()
        state = compare_folder(self.cfg, self.store)
        done = state.files - len(state.changed)  # by the rescan alone: unchanged, or renamed and relinked
        summary = IndexSummary(seen=done, unchanged=done - state.renamed, relinked=state.renamed,
                               removed=len(state.removed), missing_copies=len(state.missing_copies))
        for entry in state.skipped:
            summary.skipped.append((entry.path, entry.reason))
            log.warning("image_skipped", path=entry.path, reason=entry.reason)
        show = sys.stderr.isatty() if show_progress is None else show_progress
        with tqdm(total=state.files, initial=done, desc="indexing", unit="img", disable=not show,
                  file=sys.stderr) as bar, self.store.bulk_load(len(state.changed)):
            summary.merge(self.index_paths(state.changed, progress=bar.update))
        log.info("index_complete", duration_ms=round((time.monotonic() - started) * 1000),
                 **summary.as_log_fields())
        return summary


NOT_FINITE = ("the model gave no usable embedding for this picture (its vector holds NaN or infinity: on a GPU in "
              "half precision, an overflow); nothing was stored for it")


def _finite_only(to_embed: Sequence[_Read], vectors: np.ndarray, later: Sequence[tuple[_Read, Path]],
                 summary: IndexSummary, refusals: Refusals) -> tuple[list[_Read], np.ndarray, list[tuple[_Read, Path]]]:
    """The pictures whose embedding is a finite vector, their vectors, and the copies of them in the batch.
    The others, and their copies, are skipped with one line each: PostgreSQL refuses such a vector, and the
    write of the whole group would fail with it, again at every start."""
    finite = np.isfinite(vectors).all(axis=1)
    if finite.all():
        return list(to_embed), vectors, list(later)
    broken = {r.image.file_hash for r, ok in zip(to_embed, finite) if not ok}
    for read in [*(r for r in to_embed if r.image.file_hash in broken),
                 *(r for r, _ in later if r.image.file_hash in broken)]:
        _refused(read.candidate, NOT_FINITE, summary, refusals)
    return ([r for r, ok in zip(to_embed, finite) if ok], vectors[finite],
            [(r, first) for r, first in later if r.image.file_hash not in broken])


def model_input_for(embedder: Embedder) -> ModelInput:
    """What the workers hand the model: its own input at its size when ``pixels.py`` mirrors its
    processor, else the normalised picture for the model's processor."""
    if embedder.pixel_spec is not None:
        return partial(to_model_pixels, spec=embedder.pixel_spec)
    return normalised_pixels
