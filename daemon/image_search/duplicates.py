"""The duplicates report: which pictures of the index are copies, near-copies or similar, and which one of
each group to keep. It only reads the index and writes a result folder: nothing in the user's folders is
ever deleted, moved or rewritten.

Three kinds of group, each answering its own question (a picture may be in one group of each kind):

- ``copy``: the same bytes (one file_hash) under several paths; members are the paths.
- ``near-copy``: the same picture saved again (another JPEG quality, size or format, metadata stripped,
  turned by an EXIF flag): perceptual hashes (``phash``) within ``near-copy-max-distance`` bits.
- ``similar``: retakes and bursts: embeddings' cosine similarity at least ``similar-min-similarity``
  and, where both have a date taken, taken within ``burst-seconds`` of each other.

Groups are complete-linkage (``groups``): every pair in a group meets the threshold. The one to keep
is a suggestion: the largest original (width x height, then bytes), the earliest date taken breaking
ties, then the path. ``write_report`` writes ``output-directory/<stamp>/``:

- ``duplicates.jsonl``: one group a line: ``group`` (1, 2...), ``kind``, ``keep`` (its file_path),
  ``members`` (the kept one first), each with ``file_path``, ``copies`` (the other paths of the same
  bytes), ``file_hash``, ``width``, ``height``, ``bytes``, ``format``, ``taken_at`` and ``similarity``
  to the kept one (copy: 1; near-copy: 1 - hash distance / 255; similar: cosine similarity);
- ``duplicates-NNNN.jpg``: contact sheets, pages of groups, the one to keep framed;
- ``summary.json``: the counts per kind, the thresholds used, the pictures looked at.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog
from PIL import Image

from .config import Config
from .entries import FileIdentity
from .errors import writing_into
from .geometry import THUMBNAIL_REDUCING_GAP, THUMBNAIL_RESAMPLE, thumbnail_size
from .groups import Checkpoint, complete_linkage, go_on, near_copy_pairs, similar_pairs
from .hits import shown_similarity
from .names import escape, fit_name, name_bytes
from .output import json_line, make_output_folder, move_answered_query, move_back, publish, temporary_folder
from .phash import HASH_BITS, as_words, distance, perceptual_hash
from .preprocess import thumbnail_path_for
from .runtime import ShutdownRequested
from .sheet import MAX_COLUMNS, Tile, render_tiles, save_contact_sheet
from .store.duplicates import StoredPicture, fill_hashes, missing_hashes, read_pictures
from .store.metadata import taken_at_text
from .wording import counted

if TYPE_CHECKING:
    from .store import EmbeddingStore

log = structlog.get_logger(__name__)

REPORT = "duplicates.jsonl"
SUMMARY = "summary.json"
SHEET_NAME = "duplicates-{:04d}.jpg"
ROWS_PER_PAGE = 10  # sheet rows (of MAX_COLUMNS pictures) a page holds
ROWS_PER_GROUP = 2  # a group shows at most this many rows; the last tile then says how many more
CHECK_EVERY_GROUPS = 1000  # lines of duplicates.jsonl written between two checkpoints


class Kind(str, Enum):
    COPY = "copy"
    NEAR_COPY = "near-copy"
    SIMILAR = "similar"


ALL_KINDS: tuple[Kind, ...] = (Kind.COPY, Kind.NEAR_COPY, Kind.SIMILAR)


def parse_kinds(text: str) -> tuple[Kind, ...]:
    """``--kind copy,near-copy`` as kinds, in ``ALL_KINDS`` order; ValueError naming the ones known."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in {kind.value for kind in ALL_KINDS}]
    if unknown or not names:
        raise ValueError(f"unknown kind {', '.join(repr(n) for n in unknown) or '(none given)'}: "
                         f"the kinds are {', '.join(kind.value for kind in ALL_KINDS)}")
    return tuple(kind for kind in ALL_KINDS if kind.value in names)

# ``similar-min-similarity`` when the config leaves it 0, by model family (the first name found in the
# model's name, lower case; else ``DEFAULT_SIMILAR``). Not measured here (the tests' weights are
# random): CLIP ViT image-image cosines of retakes are commonly reported around 0.9-0.95 and of
# unrelated photos below 0.8; jina-clip and SigLIP spread image pairs more widely. See the README's
# "Duplicates" for how to tune it on one's own pictures.
SIMILAR_BY_FAMILY: tuple[tuple[str, float], ...] = (("jina-clip", 0.90), ("siglip", 0.90), ("clip", 0.92))
DEFAULT_SIMILAR = 0.92


def similar_threshold(model_name: str) -> float:
    """The default ``similar-min-similarity`` of a model, by its family."""
    name = model_name.lower()
    return next((value for family, value in SIMILAR_BY_FAMILY if family in name), DEFAULT_SIMILAR)


@dataclass(frozen=True)
class Thresholds:
    near_copy_max_distance: int  # bits of ``phash.HASH_BITS``
    similar_min_similarity: float
    burst_seconds: float

    @classmethod
    def of(cls, cfg: Config) -> Thresholds:
        similar = cfg.similar_min_similarity or similar_threshold(cfg.model_name)
        return cls(cfg.near_copy_max_distance, similar, cfg.burst_seconds)

    def to_json(self) -> dict[str, float | int]:
        return {"near-copy-max-distance": self.near_copy_max_distance,
                "similar-min-similarity": self.similar_min_similarity, "burst-seconds": self.burst_seconds}


@dataclass(frozen=True)
class Member:
    """One picture of a group: a path of a content (``copy``) or a content by its first path."""

    picture: StoredPicture
    file_path: str
    similarity: float  # to the kept one

    @property
    def copies(self) -> list[str]:
        """The other paths holding the same bytes."""
        return [path for path in self.picture.paths if path != self.file_path]


@dataclass(frozen=True)
class Group:
    kind: Kind
    members: tuple[Member, ...]  # the one to keep first

    @property
    def keep(self) -> Member:
        return self.members[0]


def _keep_order(member: Member) -> tuple[float, int, float, str]:
    """Sorts the one to keep first: most pixels, then most bytes, then the earliest date taken, then the path."""
    p = member.picture
    pixels = (p.width or 0) * (p.height or 0)
    taken = p.taken_at.timestamp() if p.taken_at is not None else math.inf
    return (-pixels, -p.bytes, taken, member.file_path)


def _group(kind: Kind, members: list[Member], similarity_to: Callable[[Member, Member], float]) -> Group:
    ordered = sorted(members, key=_keep_order)
    keep = ordered[0]
    return Group(kind, tuple(Member(m.picture, m.file_path, 1.0 if m is keep else similarity_to(keep, m))
                             for m in ordered))


def copy_groups(pictures: Sequence[StoredPicture]) -> list[Group]:
    """A group of each content held in two files or more: a file's other names are no copies of it. The
    one to keep is a file one of its symbolic links leads to, if any (deleted as a copy, it would leave
    the link leading nowhere), then the first by path."""
    groups = []
    for p in pictures:
        files = separate_files(p.paths) if len(p.paths) > 1 else []
        if len(files) > 1:
            targets = {os.path.realpath(path) for path in p.paths if os.path.islink(path)}
            ordered = sorted(files, key=lambda path: (os.path.realpath(path) not in targets, path))
            groups.append(Group(Kind.COPY, tuple(Member(p, path, 1.0) for path in ordered)))
    return groups


def separate_files(paths: Sequence[str]) -> list[str]:
    """The paths that are files of their own, in order: not a symbolic link (suggested to keep, its target
    deleted as the copy, it would lead nowhere) nor a second name of a file already listed (a hard link:
    deleting either frees nothing). A path that cannot be looked at (gone since, another host's) counts."""
    files: list[str] = []
    seen: set[tuple[int, int]] = set()
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            files.append(path)
            continue
        if stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        files.append(path)
    return files


def near_copy_groups(pictures: Sequence[StoredPicture], max_distance: int,
                     checkpoint: Checkpoint = go_on) -> list[Group]:
    """Complete-linkage groups of contents whose perceptual hashes are within ``max_distance`` bits
    (contents without a hash yet take no part)."""
    hashed = [i for i, p in enumerate(pictures) if p.phash is not None]
    words = as_words([pictures[i].phash for i in hashed])  # type: ignore[misc]
    pairs, dist = near_copy_pairs(words, max_distance, checkpoint)

    def similarity(keep: Member, m: Member) -> float:
        return 1.0 - distance(keep.picture.phash, m.picture.phash) / HASH_BITS  # type: ignore[arg-type]

    return [_group(Kind.NEAR_COPY, [Member(pictures[hashed[i]], pictures[hashed[i]].paths[0], 0.0) for i in group],
                   similarity) for group in complete_linkage(pairs, -dist.astype(np.float64), checkpoint)]


def similar_groups(pictures: Sequence[StoredPicture], embeddings: np.ndarray, min_similarity: float,
                   burst_seconds: float, checkpoint: Checkpoint = go_on) -> list[Group]:
    """Complete-linkage groups of contents whose embeddings are alike, taken close in time where dated."""
    taken = np.array([p.taken_at.timestamp() if p.taken_at is not None else np.nan for p in pictures])
    pairs, sims = similar_pairs(embeddings, taken, min_similarity, burst_seconds, checkpoint)
    index = {p.file_hash: i for i, p in enumerate(pictures)}

    def similarity(keep: Member, m: Member) -> float:
        return float(embeddings[index[keep.picture.file_hash]] @ embeddings[index[m.picture.file_hash]])

    return [_group(Kind.SIMILAR, [Member(pictures[i], pictures[i].paths[0], 0.0) for i in group], similarity)
            for group in complete_linkage(pairs, sims, checkpoint)]


def find_groups(pictures: Sequence[StoredPicture], embeddings: np.ndarray | None, kinds: Sequence[Kind],
                thresholds: Thresholds, checkpoint: Checkpoint = go_on) -> list[Group]:
    """Every group of ``kinds``, kind by kind in ``ALL_KINDS`` order, each kind's groups by the kept path.
    ``checkpoint``: see ``groups.Checkpoint``."""
    found: list[Group] = []
    for kind in ALL_KINDS:
        if kind not in kinds:
            continue
        if kind is Kind.COPY:
            groups = copy_groups(pictures)
        elif kind is Kind.NEAR_COPY:
            groups = near_copy_groups(pictures, thresholds.near_copy_max_distance, checkpoint)
        else:
            assert embeddings is not None, "the similar kind needs the embeddings"
            groups = similar_groups(pictures, embeddings, thresholds.similar_min_similarity, thresholds.burst_seconds,
                                    checkpoint)
        found.extend(sorted(groups, key=lambda g: (g.keep.file_path, g.keep.picture.file_hash)))
    return found


def _stored_picture_hash(processed: Path) -> int | None:
    """The perceptual hash of a row from its processed copy: the thumbnail file ingest wrote beside it
    (what ingest hashed), else the processed JPEG fitted to the thumbnail's size; None if neither reads."""
    for path in (thumbnail_path_for(processed), processed):
        try:
            with Image.open(path, formats=("JPEG",)) as im:
                target = thumbnail_size(im.size)
                im.draft("RGB", target)
                rgb = im.convert("RGB")
                if rgb.size != target:
                    rgb = rgb.resize(target, THUMBNAIL_RESAMPLE, reducing_gap=THUMBNAIL_REDUCING_GAP)
                return perceptual_hash(rgb)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return None


def fill_missing_hashes(store: EmbeddingStore, checkpoint: Checkpoint = go_on) -> int:
    """Give every row without a perceptual hash (written by an earlier version, or by the GPU decoder) its
    hash from its processed copy: no model work, and the user's files are not read. Returns the rows
    filled; a row whose processed copy is gone stays without (it takes no part in near-copies).
    ``checkpoint`` is called before each picture: what it raises ends the fill, nothing written."""
    todo = missing_hashes(store)
    if not todo:
        return 0

    def hashed(processed: Path) -> int | None:
        checkpoint()  # the pictures not begun yet end at once too: the pool's threads are waited for at exit
        return _stored_picture_hash(processed)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="phash") as pool:
        found = list(pool.map(hashed, [Path(processed) for _, processed in todo]))
    filled = fill_hashes(store, {h: value for (h, _), value in zip(todo, found) if value is not None})
    log.info("perceptual_hashes_filled", rows=len(todo), filled=filled,
             detail="near-copy detection needs them; computed from the processed copies (no model work)")
    return filled


def group_record(number: int, group: Group) -> dict[str, object]:
    """One line of ``duplicates.jsonl``; paths escaped as every stored path is (``names.escape``)."""
    return {
        "group": number,
        "kind": group.kind.value,
        "keep": escape(group.keep.file_path),
        "members": [{
            "file_path": escape(m.file_path),
            "copies": [escape(path) for path in m.copies],
            "file_hash": m.picture.file_hash,
            "width": m.picture.width,
            "height": m.picture.height,
            "bytes": m.picture.bytes,
            "format": m.picture.format,
            "taken_at": taken_at_text(m.picture.taken_at, m.picture.taken_at_offset_minutes),
            "similarity": shown_similarity(m.similarity),
        } for m in group.members],
    }


def _group_rows(number: int, group: Group) -> list[list[Tile]]:
    """A group's sheet rows: the one to keep first (marked), at most ``ROWS_PER_GROUP`` rows; the last
    tile says how many more the group has when they do not fit."""
    room = ROWS_PER_GROUP * MAX_COLUMNS
    shown = list(group.members[:room]) if len(group.members) <= room else list(group.members[:room - 1])
    tiles = [Tile(Path(m.picture.processed_path),
                  f"#{number} {group.kind.value} · keep" if m is group.keep else f"#{number} · similarity {m.similarity:.4f}",
                  caption, marked=m is group.keep) for m, caption in zip(shown, _captions([escape(m.file_path) for m in shown]))]
    if len(shown) < len(group.members):
        more = len(group.members) - len(shown)
        tiles.append(Tile(None, f"#{number} · {more} more", f"see {REPORT}", missing=f"{more} more in {REPORT}"))
    return [tiles[i:i + MAX_COLUMNS] for i in range(0, len(tiles), MAX_COLUMNS)]


def _captions(paths: Sequence[str]) -> list[str]:
    """Each path by its name, or by as many of its last folders as tell it from the others shown with it:
    copies made with ``cp`` share their name, and the sheet must say which one is kept."""
    parts = [tuple(part for part in Path(path).parts if part != "/") for path in paths]
    depth = [1] * len(paths)
    while True:
        captions = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = {c for c in captions if captions.count(c) > 1}
        grown = [d + 1 if c in clashing and d < len(p) else d for p, d, c in zip(parts, depth, captions)]
        if grown == depth:
            return captions
        depth = grown


def sheet_pages(groups: Sequence[Group]) -> list[list[list[Tile]]]:
    """The groups laid out on pages of at most ``ROWS_PER_PAGE`` rows; a group never spans two pages."""
    pages: list[list[list[Tile]]] = []
    page: list[list[Tile]] = []
    for number, group in enumerate(groups, start=1):
        rows = _group_rows(number, group)
        if page and len(page) + len(rows) > ROWS_PER_PAGE:
            pages.append(page)
            page = []
        page.extend(rows)
    if page:
        pages.append(page)
    return pages


def _write_page(folder: Path, number: int, pages: int, rows: list[list[Tile]]) -> None:
    # Short enough for a page of groups of two (560 px): framed is the one suggested to keep.
    heading = f"Framed: the one to keep · nothing deleted · page {number}/{pages}"
    save_contact_sheet(render_tiles(rows, heading=heading),
                       folder / SHEET_NAME.format(number))


def _write_sheets(folder: Path, groups: Sequence[Group], checkpoint: Checkpoint = go_on) -> int:
    """Draw and save the sheet pages, on a thread per core (Pillow decodes, draws and encodes much of a
    page without the GIL: threads beat processes here, measured); the number written. ``checkpoint`` is
    called before each page."""
    pages = sheet_pages(groups)

    def write_page(number: int, rows: list[list[Tile]]) -> None:
        checkpoint()
        _write_page(folder, number, len(pages), rows)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="duplicates-sheet") as pool:
        list(pool.map(write_page, range(1, len(pages) + 1), pages))
    return len(pages)


def summary(groups: Sequence[Group], *, pictures: int, kinds: Sequence[Kind], thresholds: Thresholds,
            folders: tuple[str, ...], model_name: str, without_hash: int, sheets: int) -> dict[str, object]:
    """What ``summary.json`` holds: ``folder`` the one asked for, a list where several were (None: all)."""
    counts = {kind.value: sum(1 for g in groups if g.kind is kind) for kind in kinds}
    in_groups = {kind.value: sum(len(g.members) for g in groups if g.kind is kind) for kind in kinds}
    if not pictures:
        message = "the index holds no pictures" + _in_folders(folders)
    elif not groups:
        message = f"no duplicates among {counted(pictures, 'picture')}"
    else:
        message = f"{counted(len(groups), 'group')} among {counted(pictures, 'picture')}; nothing was deleted, moved or changed"
    shown = [escape(folder) for folder in folders]
    return {"message": message, "pictures": pictures, "folder": (shown[0] if len(shown) == 1 else shown or None),
            "kinds": [kind.value for kind in kinds], "groups": counts, "members": in_groups,
            "pictures_without_perceptual_hash": without_hash, "model-name": model_name,
            "thresholds": thresholds.to_json(), "sheets": sheets}


def _in_folders(folders: tuple[str, ...]) -> str:
    if not folders:
        return ""
    return f" in folder{'s' if len(folders) > 1 else ''} " + ", ".join(f"'{escape(folder)}'" for folder in folders)


def write_report(cfg: Config, store: EmbeddingStore, *, kinds: Sequence[Kind] = ALL_KINDS, folders: tuple[str, ...] = (),
                 now: datetime | None = None, document: Path | None = None, read_as: tuple[FileIdentity, bytes] | None = None,
                 checkpoint: Checkpoint = go_on) -> Path:
    """Find the groups of ``kinds`` among the index's pictures (``folders``: relative to source-directory,
    each and everything under it, a picture with a path in any of them; none: all) and write the report folder ``output-directory/<stamp>/``
    (built under a hidden name, then renamed: it appears complete or not at all). Rows without a
    perceptual hash get it first (``fill_missing_hashes``). Returns the folder. An empty index (or
    folder) gives an empty report whose summary says so. A full or read-only output folder is
    ``OutputUnwritable``. ``document``: the inbox's ``{"duplicates": true}`` document that asked, moved
    into the report as ``<stem>.query.json``. ``checkpoint`` is called between the steps and within each
    (``groups.Checkpoint``): what it raises ends the report with no folder left behind and ``document``
    where it was; once the document is moved, the report is only renamed into place, and nothing stops it.
    ``read_as``: the document as it was when it was read, and its bytes: one written again since is left in the
    inbox (to be answered anew) and the report holds the bytes that asked for it."""
    kinds = tuple(kind for kind in ALL_KINDS if kind in kinds)
    thresholds = Thresholds.of(cfg)
    if Kind.NEAR_COPY in kinds:
        fill_missing_hashes(store, checkpoint)
    pictures, embeddings = read_pictures(store, folders=folders, embeddings=Kind.SIMILAR in kinds, checkpoint=checkpoint)
    groups = find_groups(pictures, embeddings, kinds, thresholds, checkpoint=checkpoint)
    with writing_into(cfg.output_directory, "a duplicates report"):
        final = _publish(cfg.output_directory, cfg.state_directory, groups, now=now, document=document, read_as=read_as, checkpoint=checkpoint,
                         details=lambda sheets: summary(
            groups, pictures=len(pictures), kinds=kinds, thresholds=thresholds, folders=folders,
            model_name=cfg.model_name, without_hash=sum(1 for p in pictures if p.phash is None), sheets=sheets))
    log.info("duplicates_report_written", folder=final, pictures=len(pictures),
             **{kind.value.replace("-", "_"): sum(1 for g in groups if g.kind is kind) for kind in kinds})
    if not pictures:
        log.warning("duplicates_report_empty", folder=final, detail="the index holds no pictures"
                    + _in_folders(folders) + ": the report is empty")
    return final


def _publish(output_dir: Path, state_dir: Path, groups: Sequence[Group], *, now: datetime | None,
             details: Callable[[int], dict[str, object]], document: Path | None,
             read_as: tuple[FileIdentity, bytes] | None, checkpoint: Checkpoint) -> Path:
    """Write the report under a hidden temporary folder, ``document`` moved in (``<stem>.query.json``;
    back where it was if the report fails), then rename it to a free ``<stamp>[-N]`` name."""
    make_output_folder(output_dir, state_dir)
    tmp = temporary_folder(output_dir, "duplicates")
    moved: Path | None = None
    try:
        with open(tmp / REPORT, "w", encoding="utf-8") as fh:
            for number, group in enumerate(groups, start=1):
                if number % CHECK_EVERY_GROUPS == 0:
                    checkpoint()
                fh.write(json_line(group_record(number, group)))
        sheets = _write_sheets(tmp, groups, checkpoint)
        with open(tmp / SUMMARY, "w", encoding="utf-8") as fh:
            json.dump(details(sheets), fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        checkpoint()  # the last: from here on the report is whole, and the document moves into it
        if document is not None:
            stem = fit_name(document.stem, reserve=len(".query") + name_bytes(document.suffix))
            into = tmp / f"{stem}.query{document.suffix}"
            # Looked at last, as a search result does (output.py): a document written again while the report
            # was made is not the one that asked; it stays, and the report keeps the bytes that did.
            if read_as is not None and FileIdentity.of(document) != read_as[0]:
                into.write_bytes(read_as[1])
                log.warning("query_changed_while_answered", path=document,
                            detail="the document was written again (or replaced, or removed) while its report was "
                                   "made: the report holds what asked for it, and the document as it is now stays "
                                   "in the inbox to be answered anew")
            else:
                moved = into
                if not move_answered_query(document, moved):
                    moved = None  # a copy: the document itself stays in the inbox
        return publish(tmp, output_dir, now)
    except BaseException:
        if moved is not None and moved.exists():
            assert document is not None
            move_back(moved, document)  # never lose what the user dropped, nor take the place of a new one
        if moved is None or not os.path.lexists(moved):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


class ReportThread:
    """One duplicates report written on a thread of its own, over a connection of its own
    (``EmbeddingStore.sibling``): on a large library it takes minutes, which the service loop spends
    pinging systemd's watchdog, answering queries and indexing, looking now and then whether the report
    is ``done``. ``stop`` ends it at its next checkpoint (about a second at most): no report folder, and
    the document still where it was. The thread is a daemon: a step that overran its checkpoint cannot
    hold the process's exit."""

    def __init__(self, cfg: Config, store: EmbeddingStore, *, kinds: Sequence[Kind], folders: tuple[str, ...],
                 document: Path, read_as: tuple[FileIdentity, bytes] | None = None) -> None:
        self.document = document
        self._read_as = read_as
        self.read_as = read_as[0] if read_as is not None else None  # the document as it was read
        self._stopping = threading.Event()
        self._outcome: Path | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(cfg, store, kinds, folders), name="duplicates-report",
                                        daemon=True)
        self._thread.start()

    def _checkpoint(self) -> None:
        if self._stopping.is_set():
            raise ShutdownRequested(0)

    def _run(self, cfg: Config, store: EmbeddingStore, kinds: Sequence[Kind], folders: tuple[str, ...]) -> None:
        try:
            own = store.sibling()
            try:
                self._outcome = write_report(cfg, own, kinds=kinds, folders=folders, document=self.document,
                                             read_as=self._read_as, checkpoint=self._checkpoint)
            finally:
                own.close()
        except BaseException as exc:  # the loop's to judge (``result``), as if it had run the report itself
            self._outcome = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Path:
        """The report's folder, once ``done``; raises what the report raised."""
        assert self.done, "the report is still being written"
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome

    @property
    def written(self) -> bool:
        """Done, and the report is in its folder (its document moved in)."""
        return self.done and isinstance(self._outcome, Path)

    def wait(self, timeout: float) -> bool:
        """Wait ``timeout`` seconds at most for the report to end; True if it did."""
        self._thread.join(timeout)
        return self.done

    def stop(self, timeout: float) -> bool:
        """End the report at its next checkpoint, waiting ``timeout`` seconds at most; True if it ended."""
        self._stopping.set()
        return self.wait(timeout)
