"""Folder sync: keep the table and ``processed/`` in line with ``source-directory``, with no model work.

What a deleted file, a rename, a folder moved in or out, or a change made while nothing was running
means for the rows is decided here, for the CLI and the service alike. Files whose content may be new
are only listed (``compare_folder``) or handed to a ``ReadinessTracker`` (``FolderSync.apply``): the
indexer does the reading and the model work.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from tqdm import tqdm

from .claimed import Claim, claimed_before, remember_claim
from .config import Config, ConfigError, create_folder
from .discover import SkippedEntry, is_ignored_folder_path, is_image_candidate, path_too_long, scan_entry, scan_folder
from .entries import EntryRefused
from .errors import ProcessedFolderMissing, SourceFolderMissing, holds_no_folder, writing_into
from .metadata import PictureMetadata, metadata_of_file, relative_folder
from .mounts import MOUNT_RECORD, MountTable, read_mount_table, remember_mounts
from .names import escape
from .preprocess import (
    SOURCE_MARKER,
    TEMPORARY_PREFIX as _TEMPORARY_PREFIX,
    copy_name_of_thumbnail,
    create_beside,
    processed_folder_gone,
    processed_folder_present,
    processed_path_for,
    source_identity_of_file,
    thumbnail_name_for,
    thumbnail_path_for,
)
from .store import EmbeddingStore, PathMove, SourceRecord
from .store import metadata as stored_metadata
from .store.metadata import MetadataUpdate
from .readiness import ReadinessTracker
from .watch import Change, ChangeKind
from .wording import counted
from .workers import default_worker_count

log = structlog.get_logger(__name__)


MISSING_COPIES_NAMED = 10  # a rescan names this many missing processed copies, then counts the rest


@dataclass(frozen=True)
class FolderState:
    """The source folder against the table, from stat data (and the identity of renamed files)."""

    files: int  # image files on disk
    changed: list[Path]  # new, modified, or embedded by another model: to (re)index
    removed: list[str]  # paths forgotten because their file is gone (a content goes with its last path)
    renamed: int  # paths that followed their file to a new name while nothing was watching
    skipped: list[SkippedEntry]  # picture names that are not read: pipes, devices, links not followed
    # unchanged files whose processed copy or thumbnail is gone (deleted by hand, a disk clean-up): in
    # ``changed`` too, so they are read again and their copies made again (no model work, same row)
    missing_copies: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)  # sub-folders that could not be listed
    # A stop cut the comparison short: nothing was removed or listed (paths it did not reach may still
    # have their file), only the renames already followed were applied, each whole.
    cut_short: bool = False


def _cut_short(renamed: int = 0) -> FolderState:
    return FolderState(files=0, changed=[], removed=[], renamed=renamed, skipped=[], cut_short=True)


def stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def is_unchanged(record: SourceRecord | None, st: os.stat_result, model_name: str) -> bool:
    """Same size, mtime and model as the stored row: nothing to read."""
    return (record is not None and record.source_size == st.st_size and record.source_mtime_ns == st.st_mtime_ns
            and record.model_name == model_name)


class ProcessedListing:
    """Which entries each processed folder holds, each folder listed once (``os.scandir``) and its names
    kept: how a rescan tells that the processed copies of thousands of unchanged files are still there
    without two stats per file (README "Performance"). A snapshot: each rescan makes its own."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def holds_copies(self, processed_path: str) -> bool:
        """``copies_present``, read from the listing."""
        folder, name = os.path.split(processed_path)
        names = self._names.get(folder)
        if names is None:
            names = self._names[folder] = _entry_names(folder)
        return name in names and thumbnail_name_for(name) in names


def _entry_names(folder: str) -> frozenset[str]:
    """The names in ``folder``; none when it cannot be listed (gone, not a folder): its copies are made again,
    and a folder that cannot take them stops the run as any processed image that cannot be written does."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(entry.name for entry in entries)
    except OSError:
        return frozenset()


def copies_away(processed_root: Path) -> str | None:
    """Why a rescan cannot see processed-directory's copies now, or None when it can: the folder is not the
    one they were made in (``processed_folder_present``), or cannot be listed (no permission, a stale network
    handle, an I/O error: every copy would read as missing)."""
    if not processed_folder_present(processed_root):
        return str(processed_folder_gone(processed_root))
    try:
        with os.scandir(processed_root) as entries:
            next(entries, None)
    except OSError as exc:
        return (f"{escape(processed_root)} cannot be read ({exc.strerror or exc}): its copies are taken as there, "
                "and none is made again until it can")
    return None


def copies_present(processed_path: str) -> bool:
    """The processed JPEG at ``processed_path`` and its thumbnail are there (two stats: for a few files; a
    rescan of the whole folder reads ``ProcessedListing``)."""
    folder, name = os.path.split(processed_path)
    return os.path.lexists(processed_path) and os.path.lexists(os.path.join(folder, thumbnail_name_for(name)))


def is_current(record: SourceRecord | None, st: os.stat_result, model_name: str) -> bool:
    """Nothing to read: the file is unchanged (``is_unchanged``) and its processed copy and thumbnail are
    there (``copies_present``; a rescan asks its ``ProcessedListing`` instead). A copy deleted by hand or
    by a disk clean-up makes its file one to read again: the copies are made again from it, and its
    content, stored already, costs no model work."""
    return record is not None and is_unchanged(record, st, model_name) and copies_present(record.processed_path)


def remove_processed(cfg: Config, source: Path) -> None:
    """Delete the processed copy (and its thumbnail) of a source that is gone (derived data: a leftover
    costs only disk), and the folders that held nothing else: processed-directory mirrors the source
    folders, and a folder renamed there left its old name behind, empty, in here."""
    try:
        processed = processed_path_for(source, cfg.source_directory, cfg.processed_directory)
        processed.unlink(missing_ok=True)
        thumbnail_path_for(processed).unlink(missing_ok=True)
    except (OSError, ValueError):
        return
    remove_emptied(cfg, processed.parent)


# A processed file no row names is left this long after it was written before a rescan removes it: another
# service sharing the folders may have just written it for a row it has not committed yet.
ORPHAN_MIN_AGE_S = 120.0


def remove_orphaned_copies(cfg: Config, expected: set[str], *, stopping: Callable[[], bool] = lambda: False,
                           now: Callable[[], float] = time.time) -> int:
    """Delete what processed-directory holds for no source: each processed copy that is not in ``expected``
    (the copies the rows name, and those the files not indexed yet will have), with its thumbnail, and the
    temporary files of writes a crash cut short. A file renamed or deleted while nothing watched, after the
    table was emptied at an exit, left its copies with no row to name them: they stayed for good. A file
    of yours is never taken for one: a copy goes only beside its thumbnail (a hidden name that no source
    name makes), and nothing written in the last ``ORPHAN_MIN_AGE_S`` goes. Returns how many files went."""
    root = cfg.processed_directory
    older_than = now() - ORPHAN_MIN_AGE_S
    removed = 0
    kept: dict[str, tuple[int, str]] = {}  # folder -> the orphans it would not let go, and why
    for folder, _, names in os.walk(root, topdown=False):  # a folder's sub-folders first: it may empty
        if stopping():
            break
        if folder == str(root):
            names = [n for n in names if n not in (SOURCE_MARKER, MOUNT_RECORD)]
        present = set(names)
        removed_here = 0
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith(_TEMPORARY_PREFIX):
                orphan = True
            elif (copy := copy_name_of_thumbnail(name)) is not None:
                orphan = os.path.join(folder, copy) not in expected
            else:
                orphan = path not in expected and thumbnail_name_for(name) in present
            if orphan and _written_before(path, older_than):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # a folder of another user's, an immutable file: said once below
                    kept[folder] = (kept.get(folder, (0, ""))[0] + 1, exc.strerror or str(exc))
                    continue
                removed_here += 1
        if removed_here:
            removed += removed_here
            remove_emptied(cfg, Path(folder))
    if removed:
        log.info("processed_copies_removed", count=removed, folder=root,
                 reason="processed copies of files that are gone, which no row names")
    for folder, (count, why) in sorted(kept.items())[:_KEPT_FOLDERS_NAMED]:
        log.warning("processed_copies_kept", path=folder, count=count,
                    reason=f"copies of files that are gone, which no row names, cannot be removed ({why})",
                    action="fix the folder's owner, permissions or attributes, or delete them yourself; the "
                           "next start removes them")
    return removed


# Folders named by ``processed_copies_kept`` at most, per walk.
_KEPT_FOLDERS_NAMED = 10


def _written_before(path: str, moment: float) -> bool:
    """Written and renamed before ``moment``: a rename keeps the mtime but moves the ctime on (another
    service relinking a copy to a file's new name as this walk passed must not lose it)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return max(st.st_mtime, st.st_ctime) < moment


def remove_emptied(cfg: Config, folder: Path) -> None:
    """Remove ``folder`` of processed-directory and the folders above it, as long as each is empty."""
    while folder != cfg.processed_directory and folder.is_relative_to(cfg.processed_directory):
        try:
            folder.rmdir()  # only an empty one; a copy being written into it meanwhile makes it again
        except OSError:
            return
        folder = folder.parent


def paths_under(known: Iterable[str], folder: Path) -> list[str]:
    """The stored paths (``known``: paths, or records by path) inside ``folder``: the rows a rescan of it
    answers for, and the only ones it may remove."""
    return [p for p in known if Path(p).is_relative_to(folder)]


def ensure_source_folder(cfg: Config, store: EmbeddingStore) -> None:
    """At start, before anything is watched or compared: ``source-directory`` is created only on a fresh
    install (the index holds no path under it). A missing folder whose pictures are indexed is a disk or
    share not mounted (yet): ``SourceFolderMissing``, nothing removed, and systemd tries again later. An
    empty folder created over an unmounted mount point would have read as "every picture deleted"."""
    root = cfg.source_directory
    if root.is_dir():
        return
    _refuse_missing_with_rows(root, store)
    create_folder("source-directory", root)


def check_processed_folder(cfg: Config) -> bool:
    """At start, before any folder is made or the database starts (a config error costs nothing to find):
    ``processed-directory``'s copies are named by their source's path inside ``source-directory``, so a second
    source folder's files with the same paths would overwrite the first's copies, and the first's rows
    would show the second's pictures. The folder records the (real) source folder it serves in
    ``SOURCE_MARKER`` (``claim_processed_folder``); another source is a ``ConfigError`` that names both and
    the fix. One folder reached through a link is the same source. A folder this installation claimed before
    (``CLAIMS_RECORD``) that now holds neither record nor copy is ``ProcessedFolderMissing``: its disk is
    not mounted. True when the folder records this source; False when it records none yet (no record, or
    an empty one made by hand)."""
    marker = cfg.processed_directory / SOURCE_MARKER
    source = os.fsencode(cfg.source_directory.resolve())
    try:
        recorded = marker.read_bytes()
    except FileNotFoundError:
        if _holds_copies(cfg.processed_directory) or not _claimed_before(cfg):
            return False
        raise ProcessedFolderMissing(cfg.processed_directory, marker, claims=cfg.state_directory / CLAIMS_RECORD)
    except NotADirectoryError:
        return False  # not a folder: ensure_directories names it
    except OSError as exc:
        # A share gone stale (ESTALE), a disk's I/O error: where even the folder cannot be looked at, it is
        # away as an unmounted one is (exit 8, tried again), not a permission to fix (exit 2, never restarted).
        if not os.path.isdir(cfg.processed_directory) and _claimed_before(cfg):
            raise ProcessedFolderMissing(cfg.processed_directory, marker, claims=cfg.state_directory / CLAIMS_RECORD,
                                         state=f"cannot be looked at ({exc.strerror or exc})") from None
        raise _unreadable_marker(marker, exc) from None
    if recorded not in (source, b""):
        folder, was, now = escape(cfg.processed_directory), escape(os.fsdecode(recorded)), escape(os.fsdecode(source))
        raise ConfigError(
            f"config key 'processed-directory' ({folder}) holds the processed copies of source-directory {was}, "
            f"not of {now} (recorded in {escape(marker)}): two source folders sharing one processed folder would "
            "overwrite each other's copies wherever their files have the same path, and results would show the "
            f"wrong pictures. Give 'processed-directory' a folder of its own for {now}; or, if the pictures of "
            f"{was} have moved to {now} or are gone for good, move {folder} away first (the copies are made "
            "again from the source folder; pictures the index holds cost no model work)")
    return recorded == source


def claim_processed_folder(cfg: Config, indexed: Callable[[], Iterable[str]]) -> None:
    """At start, once the store is open and before anything is written into ``processed-directory``: the
    folder records its source (``check_processed_folder``) from its first use on, and an earlier version's
    folder (copies, no record) adopts the configured source. But a folder with neither record nor copies
    while the index holds pictures of this source (``indexed``: the sources the index holds, asked only
    then) is not the folder their copies were made in: its disk is not mounted (yet), or it was emptied or
    moved. ``ProcessedFolderMissing``, nothing written: every copy made again would land on the disk under
    the mount point. An empty record, made by hand, says "emptied on purpose": the copies are made again.
    The claim is remembered in state-directory (``CLAIMS_RECORD``), which ``check_processed_folder`` reads
    at the next start, whatever the index then holds (``cleanup-on-exit`` empties it)."""
    if not check_processed_folder(cfg):
        marker = cfg.processed_directory / SOURCE_MARKER
        if not os.path.lexists(marker) and not _holds_copies(cfg.processed_directory):
            if held := paths_under(indexed(), cfg.source_directory):
                raise ProcessedFolderMissing(cfg.processed_directory, marker, rows=len(held))
            create_folder("processed-directory", cfg.processed_directory)  # a first use
        try:
            with writing_into(cfg.processed_directory, "its record of the source folder", disk_only=True):
                _record_source(marker, os.fsencode(cfg.source_directory.resolve()))  # a full disk: exit 7, restarted
        except OSError as exc:
            raise _unreadable_marker(marker, exc) from None
        check_processed_folder(cfg)  # another first start may have recorded its source first
    _remember_claim(cfg)


# In state-directory: the processed folders this installation has claimed, each with the source folder it
# served (a JSON list of [processed-directory as configured, the source's real path]). Kept off the processed
# folder's disk, so that a start can tell that disk is away even when the index holds nothing
# (``cleanup-on-exit``, the default, empties it at every exit). A processed folder moved away because the
# source folder changed (README) is a first use for the new source.
CLAIMS_RECORD = "processed-folders"


def _claim_of(cfg: Config) -> Claim:
    return [os.fsdecode(cfg.processed_directory), os.fsdecode(cfg.source_directory.resolve())]


def _claimed_before(cfg: Config) -> bool:
    return claimed_before(cfg.state_directory / CLAIMS_RECORD, _claim_of(cfg))


def _remember_claim(cfg: Config) -> None:
    remember_claim(cfg.state_directory / CLAIMS_RECORD, _claim_of(cfg))


def _unreadable_marker(marker: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"config key 'processed-directory': {escape(marker)}, which records the source folder "
                       f"its processed copies belong to, cannot be read or written ({exc.strerror or exc}): "
                       "fix its permissions, or move away what holds its name")


def _holds_copies(folder: Path) -> bool:
    """``folder`` holds an entry besides the records this program keeps there: copies, or sub-folders of them.
    An unmounted disk's mount point holds none (or only what a rescan recorded there meanwhile). One that
    cannot be listed is not taken for empty: the write of its record then says what is wrong with it."""
    try:
        with os.scandir(folder) as entries:
            return any(entry.name not in (SOURCE_MARKER, MOUNT_RECORD) for entry in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def _record_source(marker: Path, source: bytes) -> None:
    """Record ``source`` in ``marker`` unless another start did first (then ``check_processed_folder`` reads
    what it recorded). Written whole under a temporary name, then linked to its own, which fails when one is
    there: never seen half-written, never written over by a second first start. An empty record (made by
    hand) is replaced."""
    fd, tmp = create_beside(marker)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(source)
        if os.path.lexists(marker) and marker.read_bytes() == b"":
            os.replace(tmp, marker)
        else:
            try:
                os.link(tmp, marker)
            except FileExistsError:
                return
            except OSError:  # a filesystem without hard links (some SMB mounts): renamed, unguarded against a race
                os.replace(tmp, marker)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("processed_folder_claimed", path=marker.parent, source=os.fsdecode(source),
             detail="processed-directory serves this source-directory only (README \"Preprocessing\")")


def _refuse_missing_with_rows(root: Path, store: EmbeddingStore) -> None:
    """``SourceFolderMissing`` when the index holds paths under the missing folder ``root``."""
    if held := paths_under(store.sources(), root):
        raise SourceFolderMissing(root, len(held))


def holds_no_file(path: Path) -> bool:
    """``path`` is known to hold no file now: it is not there (or a link's target is not: ENOENT, ENOTDIR),
    or it is no regular file. One that cannot be looked at now (a folder closed to this user, a share's
    stale handle or I/O error) is not known to be gone: its row stays, as a rescan keeps what a folder it
    cannot list holds."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode)


def resolves_to_a_file(path: Path) -> bool:
    """``path`` leads (through any links) to a regular file: a path of stored content that does not, a
    link whose target went or a copy deleted unseen, holds nothing any more."""
    st = stat_or_none(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def _identities(files: list[tuple[Path, tuple[int, int]]], *, progress: str | None = None,
                stopping: Callable[[], bool] = lambda: False) -> list[str | None]:
    """``source_identity_of_file`` of each (path, expected (size, mtime_ns)), in order, on every core
    (hashlib and file reads release the GIL); None for a file unreadable or changed meanwhile, and for
    every file not begun once ``stopping()`` says so. ``progress``: a tqdm label, shown on a terminal."""
    def identity(item: tuple[Path, tuple[int, int]]) -> str | None:
        if stopping():  # the files already being read finish; the rest are not begun
            return None
        try:
            return source_identity_of_file(*item)
        except (OSError, EntryRefused):
            return None

    with ThreadPoolExecutor(max_workers=default_worker_count(), thread_name_prefix="identity") as pool, \
            tqdm(total=len(files), desc=progress, unit="img", file=sys.stderr,
                 disable=progress is None or not sys.stderr.isatty()) as bar:
        found = []
        for result in pool.map(identity, files):
            found.append(result)
            bar.update()
        return found


def _unchanged_sources(records: list[SourceRecord], stopping: Callable[[], bool]) -> list[SourceRecord]:
    """The ``records`` whose source is on disk with its stored size and mtime (the same test that lets a
    rescan skip a file): one stat each, until ``stopping()`` says so."""
    unchanged = []
    for record in records:
        if stopping():
            break
        st = stat_or_none(Path(record.file_path))
        if st is not None and is_unchanged(record, st, record.model_name):
            unchanged.append(record)
    return unchanged


def _hashes_of_unchanged_sources(known: dict[str, SourceRecord], root: Path | None,
                                 stopping: Callable[[], bool]) -> dict[str, str]:
    """old file_hash -> source identity, for each stored source (under ``root``, when given) still on
    disk with its stored size and mtime, before and after it is read; changed or unreadable ones are left
    out (and, after a stop, the ones not reached)."""
    todo = _unchanged_sources([record for path, record in known.items()
                               if root is None or Path(path).is_relative_to(root)], stopping)
    identities = _identities([(Path(r.file_path), (r.source_size, r.source_mtime_ns)) for r in todo],
                             progress="re-hashing sources", stopping=stopping)
    return {record.file_hash: new for record, new in zip(todo, identities) if new is not None}


def migrate_identities(store: EmbeddingStore, root: Path | None = None, *,
                       stopping: Callable[[], bool] = lambda: False) -> int:
    """Once per database: give the rows of an earlier version (identity = MD5 of the processed JPEG)
    today's identity (MD5 of the source bytes) by reading each unchanged source once, with no decoding
    and no model work. Rows whose source changed or vanished keep their old hash: the rescan re-indexes
    or removes them as it would anyway; rows outside ``root`` (another source-directory's, which no
    rescan of this folder removes) keep their old hash. Returns the rows rewritten (0 when there was nothing to do).
    A stop (``stopping()``) before every source is read writes nothing: the migration stays pending, and
    the next start reads them all again (the unread ones would otherwise be re-embedded as changed)."""
    if not store.needs_identity_migration():
        return 0
    started = time.monotonic()
    known = store.sources()
    log.info("identity_migration_started", rows=len(known),
             detail="file_hash becomes the MD5 of each source file (read once, nothing is re-embedded)")
    new_hashes = _hashes_of_unchanged_sources(known, root, stopping)
    if stopping():
        log.info("identity_migration_stopped", rows=len(known), detail="nothing rewritten; the next start reads them again")
        return 0
    rewritten = store.migrate_identities(new_hashes)
    log.info("identity_migrated", rows=len(known), rewritten=rewritten, left_to_rescan=len(known) - len(new_hashes),
             duration_ms=round((time.monotonic() - started) * 1000))
    return rewritten


def _headers(files: list[tuple[Path, tuple[int, int]]], stopping: Callable[[], bool]) -> list[PictureMetadata | None]:
    """``metadata_of_file`` of each (path, expected (size, mtime_ns)), in order, on every core; None for
    every file not begun once ``stopping()`` says so."""
    def header(item: tuple[Path, tuple[int, int]]) -> PictureMetadata | None:
        return None if stopping() else metadata_of_file(*item)

    with ThreadPoolExecutor(max_workers=default_worker_count(), thread_name_prefix="headers") as pool, \
            tqdm(total=len(files), desc="reading headers", unit="img", file=sys.stderr,
                 disable=not sys.stderr.isatty()) as bar:
        found = []
        for result in pool.map(header, files):
            found.append(result)
            bar.update()
        return found


def migrate_metadata(store: EmbeddingStore, root: Path, *, stopping: Callable[[], bool] = lambda: False) -> int:
    """Once per database: give the rows of an earlier version their folder (from their path) and the
    metadata of their file's header (date taken, camera, size, format; ``image_search.metadata``), read
    from each unchanged source under ``root`` with no decoding and no model work. A changed or unreadable
    source keeps NULL metadata (the rescan re-indexes a changed one); a row outside ``root`` (another
    source-directory's) is left as it is. Returns the rows updated (0 when there was nothing to do).
    A stop (``stopping()``) before every header is read writes nothing: the migration stays pending."""
    if not stored_metadata.needs_metadata_migration(store):
        return 0
    started = time.monotonic()
    known = [record for path, record in store.sources().items() if Path(path).is_relative_to(root)]
    log.info("metadata_migration_started", rows=len(known),
             detail="date taken, camera, size and format are read from each source's header (nothing is re-embedded)")
    todo = _unchanged_sources(known, stopping)
    headers = dict(zip((r.file_hash for r in todo),
                       _headers([(Path(r.file_path), (r.source_size, r.source_mtime_ns)) for r in todo], stopping)))
    if stopping():
        log.info("metadata_migration_stopped", rows=len(known), detail="nothing updated; the next start reads them again")
        return 0
    updates = {r.file_hash: MetadataUpdate(relative_folder(r.file_path, root), headers.get(r.file_hash)) for r in known}
    updated = stored_metadata.migrate_metadata(store, updates)
    log.info("metadata_migrated", rows=len(known), updated=updated,
             with_metadata=sum(1 for m in headers.values() if m is not None),
             duration_ms=round((time.monotonic() - started) * 1000))
    return updated


def compare_folder(cfg: Config, store: EmbeddingStore, *, stopping: Callable[[], bool] = lambda: False,
                   mounts: MountTable | None = None, remove_orphans: bool = True,
                   said_before: Callable[[Path], bool] = lambda path: False) -> FolderState:
    """Bring the table in line with the folder as far as stat data allows: forget the paths (and processed
    copies) of sources that are gone (a row goes with its last path), and list the files whose size,
    mtime or model differ from their path's record, that no path names, or whose processed copy or
    thumbnail is gone (``missing_copies``: read again to make them, their content found stored). No
    decoding, no model work, so it can run while the model is still loading. A database of an earlier
    version first gets today's identity (``migrate_identities``); a file renamed or moved while nothing
    watched is recognised by its identity and its path follows it (``_follow_renames``).

    Only paths under ``source-directory`` are answered for: another folder's rows (another
    source-directory on the same database) are never removed here. A folder that is missing, or holds no
    picture while paths under it are stored, is a disk or share that is not mounted, never "every picture
    deleted": missing raises ``SourceFolderMissing`` (when paths under it are stored), empty keeps every
    row with one warning. So does a sub-folder that ``/etc/fstab`` names as a mount point, or that an earlier
    rescan saw mounted (``mounts.remember_mounts``), while nothing is mounted there (``mounts``: the system's
    tables when None), or that cannot be listed. While processed-directory is away (its disk unmounted:
    ``processed_folder_present``), no copy counts as missing and no row is removed.

    ``stopping()`` is asked between entries (a stat, a hash, a header each: a slow share or a large
    library makes minutes of them, longer than systemd waits for a stop): once it says so, the comparison
    ends ``cut_short``, before anything is removed. A path it did not reach is not a path whose file is gone.

    ``remove_orphans``: processed copies that no row names and no file will have go too
    (``remove_orphaned_copies``). Only a change made while nothing ran leaves those, so a start's rescan
    and ``index`` look (a walk of processed-directory: 0.1 s for 20,000 files' copies), not the later ones.

    ``said_before(path)``: the file was refused as it is (``Refusals.unchanged``), its reason said then: its
    missing copy is said again at debug only."""
    root = cfg.source_directory
    if not root.is_dir():  # gone since the start's check: never made here, a watch would see it as new
        _refuse_missing_with_rows(root, store)
        return FolderState(files=0, changed=[], removed=[], renamed=0, skipped=[])  # nothing there, nothing known
    migrate_identities(store, root, stopping=stopping)
    if not stopping():  # after the identities: the metadata is written by today's file_hash
        migrate_metadata(store, root, stopping=stopping)
    if stopping():
        return _cut_short()
    known = store.sources()
    scan = scan_folder(root, cfg.source_links, stopping=stopping)
    if stopping():  # the walk may have ended part-way: the files it did not list are not gone
        return _cut_short()
    # processed-directory not the folder the copies were made in (its disk unmounted), or not readable now (a
    # stale network handle): the copies are not missing, only away; none is made again, no row is removed.
    away = copies_away(cfg.processed_directory)
    copies_here = away is None
    # Every rescan notes the mount points under the folder, so that one not mounted later is known as one:
    # in processed-directory, so not while it is away (what it remembers is away with it).
    table = mounts or read_mount_table()
    if copies_here:
        table = remember_mounts(table, root, cfg.processed_directory / MOUNT_RECORD)
    on_disk = scan.images
    present = {str(path) for path in on_disk}
    vanished = [p for p in paths_under(known, root) if p not in present]
    if not on_disk and vanished:
        log.warning("source_folder_empty", path=root, kept=len(vanished),
                    reason="no picture in source-directory while the index holds paths under it: it looks "
                           "unmounted, so every row and processed copy is kept",
                    action="mount it; if you emptied it on purpose, empty the index (README \"A source folder "
                           "that is missing or empty\")")
        return FolderState(files=0, changed=[], removed=[], renamed=0, skipped=scan.skipped, unreadable=scan.unreadable)
    skipped = scan.skipped
    if vanished:
        # What a folder that could not be listed (permissions, a share's I/O error) holds is unknown: kept.
        vanished, kept = _kept_under(vanished, scan.unreadable)
        skipped = [SkippedEntry(e.path, f"{e.reason}; kept: {counted(kept[e.path], 'indexed path')} under it")
                   if kept.get(e.path) else e for e in skipped]
        vanished, kept = _kept_under(vanished, table.unmounted_under(root))
        for point, count in kept.items():
            named, undo = (("/etc/fstab names it a mount point", "take it out of /etc/fstab") if table.in_fstab(point)
                           else ("it was a mount point at an earlier rescan", "delete the empty folder"))
            log.warning("source_subfolder_unmounted", path=point, kept=count,
                        reason=f"{named} and nothing is mounted there: every row and processed copy under it is kept",
                        action=f"mount it; if its pictures are gone for good, {undo}")
    changed, new_files, displaced, missing_copies = [], [], [], []
    copies = ProcessedListing()
    for path in on_disk:
        if stopping():
            return _cut_short()
        st = stat_or_none(path)
        record = known.get(str(path))
        if st is not None and record is not None and is_unchanged(record, st, cfg.model_name):
            if copies_here and not copies.holds_copies(record.processed_path):
                missing_copies.append(path)
                if len(missing_copies) <= MISSING_COPIES_NAMED:
                    # A copy the last try could not write (its folder refuses writes) was named with why then.
                    (log.debug if said_before(path) else log.info)(
                        "processed_copy_missing", path=path, processed=record.processed_path,
                        action="made again from the source file (no model work)")
            continue
        changed.append(path)  # a file that vanished meanwhile is reported by the indexer
        if st is not None:
            (new_files if record is None else displaced).append((path, st))
    if len(missing_copies) > MISSING_COPIES_NAMED:  # a processed folder emptied (its record kept): not 20,000 lines
        log.info("processed_copies_missing", count=len(missing_copies), named=MISSING_COPIES_NAMED,
                 action="all made again from their source files (no model work)")
    # vanished: deleted, moved (perhaps within the folder), or now a pipe or a link the policy does not follow
    followed = _follow_renames(cfg, store, [known[p] for p in vanished], new_files, stopping)
    if stopping():  # the renames not followed yet would read as deletions
        return _cut_short(renamed=len(followed))
    # A rename followed while processed-directory refused its copies' move (read-only, full): made again.
    missing_copies += [path for path in followed if copies_here
                       and not copies_present(str(processed_path_for(path, root, cfg.processed_directory)))]
    moved_from = set(followed.values())
    shifted = _follow_shifts(cfg, store, [known[p] for p in vanished if p not in moved_from]
                             + [known[str(p)] for p, _ in displaced],
                             [*displaced, *((p, st) for p, st in new_files if p not in followed)], present, stopping)
    if stopping():
        return _cut_short(renamed=len(followed))
    moved_from |= shifted
    gone = [p for p in vanished if p not in moved_from]
    if away is not None:  # nor is a row removed: which mount points under the folder it remembers is away too
        log.warning("processed_folder_away", path=cfg.processed_directory, kept=len(gone), reason=away)
        gone = []
    changed = [p for p in changed if p not in followed] + missing_copies
    if gone:
        store.delete_paths(gone)
        for source in gone:
            remove_processed(cfg, Path(source))
        say_removed([(Path(source), 1, "source file is gone") for source in gone])  # the paths, or their folder
    # What a folder not listed or not mounted holds is unknown; and copies away are no orphans.
    if remove_orphans and copies_here and not scan.unreadable and not table.unmounted_under(root):
        expected = {record.processed_path for record in known.values()}
        expected.update(str(processed_path_for(path, root, cfg.processed_directory)) for path, _ in new_files)
        remove_orphaned_copies(cfg, expected, stopping=stopping)
    return FolderState(files=len(on_disk), changed=changed, removed=gone, renamed=len(followed), skipped=skipped,
                       missing_copies=missing_copies, unreadable=scan.unreadable)


def _kept_under(vanished: list[str], folders: list[Path]) -> tuple[list[str], dict[Path, int]]:
    """``vanished`` less the paths under ``folders`` (whose content is unknown), and how many each kept."""
    kept = {}
    for folder in folders:
        if under := set(paths_under(vanished, folder)):
            kept[folder] = len(under)
            vanished = [p for p in vanished if p not in under]
    return vanished, kept


def _follow_shifts(cfg: Config, store: EmbeddingStore, sources: list[SourceRecord],
                   targets: list[tuple[Path, os.stat_result]], present: set[str],
                   stopping: Callable[[], bool]) -> set[str]:
    """Files renamed onto names the index knows while nothing watched: a renumbering (``IMG_0001`` to
    ``IMG_0002``, ``IMG_0002`` to ``IMG_0003``, ...) or a swap. ``sources``: the records of paths that
    vanished (not in ``present``) or whose file is not as recorded; ``targets``: the files not as their
    path's record says. A target holding a source's bytes (the size and mtime a rename keeps, then the
    MD5) becomes a path of that content, all of them in one transaction (``EmbeddingStore.move_paths``),
    before any content is dropped for want of a path: followed one file at a time, each content whose path
    the next took was dropped, and embedded again when its file was read. Returns the vanished source
    paths that followed (their rows go with the move). The targets stay changed files: their processed
    copies are the old contents' pictures, removed here, so the indexer reads them again and finds their
    content stored."""
    by_stat: dict[tuple[int, int], list[SourceRecord]] = {}
    for record in sources:
        if record.model_name == cfg.model_name:
            by_stat.setdefault((record.source_size, record.source_mtime_ns), []).append(record)
    sized = [(path, st) for path, st in targets if (st.st_size, st.st_mtime_ns) in by_stat]
    if not sized:
        return set()
    identities = _identities([(path, (st.st_size, st.st_mtime_ns)) for path, st in sized], stopping=stopping)
    if stopping():  # a part of the moves would drop the contents whose own move was left out
        return set()
    root = cfg.source_directory
    moves: list[tuple[PathMove, str]] = []  # each with the path its content came from
    for (path, st), file_hash in zip(sized, identities):
        same = by_stat[(st.st_size, st.st_mtime_ns)]
        record = next((r for r in same if r.file_hash == file_hash and r.file_path != str(path)), None)
        if record is None:
            continue
        same.remove(record)  # each source follows one file (copies of one content moved together)
        moves.append((PathMove(str(path), record.file_hash, str(processed_path_for(path, root, cfg.processed_directory)),
                               st.st_size, st.st_mtime_ns, relative_folder(path, root),
                               leaves=None if record.file_path in present else record.file_path), record.file_path))
    if not moves:
        return set()
    store.move_paths([move for move, _ in moves])
    for move, was in moves:
        remove_processed(cfg, Path(move.file_path))  # the old content's picture: made again when read
        if move.leaves is not None:
            remove_processed(cfg, Path(move.leaves))
        log.info("image_renamed", path=move.file_path, previous=was, file_hash=move.file_hash,
                 detail="onto a name the index knew, while nothing watched")
    return {move.leaves for move, _ in moves if move.leaves is not None}


def _follow_renames(cfg: Config, store: EmbeddingStore, gone: list[SourceRecord],
                    new_files: list[tuple[Path, os.stat_result]], stopping: Callable[[], bool]) -> dict[Path, str]:
    """Paths whose file is gone, found again among ``new_files`` (path, stat) by identity (same size
    first, then the MD5 of the bytes; no decoding): each is relinked to its new path with its processed
    copy, no model work. Returns new path -> old path for every one relinked: all of them, or after a stop
    (``stopping()``) the ones relinked before it, each whole."""
    by_hash: dict[str, list[SourceRecord]] = {}  # copies of one content that moved: one new file each
    for record in gone:
        if record.model_name == cfg.model_name:
            by_hash.setdefault(record.file_hash, []).append(record)
    sizes = {records[0].source_size for records in by_hash.values()}
    sized = [(path, st) for path, st in new_files if st.st_size in sizes]
    if not sized:
        return {}
    identities = _identities([(path, (st.st_size, st.st_mtime_ns)) for path, st in sized], stopping=stopping)
    followed: dict[Path, str] = {}
    said: list[dict[str, object]] = []
    for (path, st), file_hash in zip(sized, identities):
        if stopping():
            break
        records = by_hash.get(file_hash or "")
        record = records.pop() if records else None  # each gone path follows one file
        if record is not None and relink(cfg, store, Path(record.file_path), path, record.file_hash, hashed=st,
                                         said=said):
            followed[path] = record.file_path
    say_renamed(said, detail="renamed while nothing watched")
    return followed


def relink(cfg: Config, store: EmbeddingStore, src: Path, dest: Path, file_hash: str, *,
           hashed: os.stat_result | None = None, kept: tuple[int, int] | None = None,
           said: list[dict[str, object]] | None = None) -> bool:
    """Move the path ``src`` of the content ``file_hash`` to ``dest`` (the same file under a new name; its
    other copies keep theirs), moving its processed copy and thumbnail along: no decoding, no model
    work. False (nothing changed) when the processed copy is missing, an entry is where its new processed
    copy goes, ``dest`` is no longer as it was when it was ``hashed``, or ``dest`` is gone: the caller has
    ``dest`` indexed instead. Given ``kept`` (the size and mtime a rename keeps), a ``dest`` already
    renamed on or deleted (its own event comes next, and takes the path on from here) is no reason to fail.
    processed-directory refusing the move (read-only, full, no permission, itself not a folder) is no
    reason either: the path follows its file, its copies do not (``copies_present`` says so, and the caller
    has them made again from ``dest`` once the folder takes writes); the old ones stay until a start's
    rescan removes them (``remove_orphaned_copies``). ``said``: where its ``image_renamed`` line's fields go
    (``say_renamed``: a folder's renames are one line), instead of the log."""
    root, processed_root = cfg.source_directory, cfg.processed_directory
    old_processed = processed_path_for(src, root, processed_root)
    new_processed = processed_path_for(dest, root, processed_root)
    now = stat_or_none(dest)
    if now is not None:
        if hashed is not None and (now.st_size, now.st_mtime_ns) != (hashed.st_size, hashed.st_mtime_ns):
            return False
        kept = (now.st_size, now.st_mtime_ns)
    elif kept is None:
        return False
    try:
        if not _move_copies(old_processed, new_processed, processed_root):
            return False
        refused = None
    except OSError as exc:
        refused = exc
    if refused is None:
        remove_emptied(cfg, old_processed.parent)  # the last picture of a folder renamed on the way
    if not store.update_source(file_hash, file_path=str(dest), file_name=dest.name, processed_path=str(new_processed),
                               source_size=kept[0], source_mtime_ns=kept[1],
                               folder=relative_folder(dest, root), replaces=[str(src)]):
        return False  # another service dropped the row meanwhile: ``dest`` is new content to index
    line: dict[str, object] = {"path": dest, "previous": src, "file_hash": file_hash}
    if refused is not None:
        line["processed"] = (f"not moved: {refused.strerror or refused} ({escape(refused.filename or new_processed)}); "
                             "made again from the source once processed-directory takes writes (no model work)")
    if said is None:
        log.info("image_renamed", **line)
    else:
        said.append(line)
    return True


# Files a line may name one by one; past that many in one go (a folder renamed, deleted or moved out, a
# rescan's renames), one line counts them and each file's own is at debug: a folder of 10,000 pictures
# renamed was 10,000 lines.
NAMED_AT_ONCE = 3


def _common_folder(paths: Iterable[object]) -> Path:
    return Path(os.path.commonpath([str(p) for p in paths]))


def say_renamed(lines: list[dict[str, object]], **summary: object) -> None:
    """The ``image_renamed`` lines of one go: each, up to ``NAMED_AT_ONCE``; else one ``images_renamed``
    (``count``, the folder they went to and came from, ``summary``), each file's own at debug."""
    if len(lines) <= NAMED_AT_ONCE:
        for line in lines:
            log.info("image_renamed", **line, **summary)
        return
    for line in lines:
        log.debug("image_renamed", **line)
    copies_left = sum("processed" in line for line in lines)
    path, previous = (_common_folder(line[key] for line in lines) for key in ("path", "previous"))
    # A folder renamed: its new and old names. Renames all over (a start's, of files here and there): the
    # folder that holds them, and one of them.
    where = ({"path": path, "previous": previous} if path != previous else
             {"folder": path, "first": lines[0]["path"], "first_previous": lines[0]["previous"]})
    log.info("images_renamed", count=len(lines), **where,
             **({"processed_not_moved": copies_left} if copies_left else {}), **summary)


def say_removed(lines: list[tuple[Path, int, str]]) -> None:
    """The ``rows_removed`` lines of one go (path, rows, reason): each, up to ``NAMED_AT_ONCE``; else one,
    with their folder and the rows in all, each path's own at debug."""
    if len(lines) <= NAMED_AT_ONCE:
        for path, count, reason in lines:
            log.info("rows_removed", path=path, count=count, reason=reason)
        return
    for path, count, reason in lines:
        log.debug("rows_removed", path=path, count=count, reason=reason)
    reasons = {reason for _, _, reason in lines}
    log.info("rows_removed", path=_common_folder(path for path, _, _ in lines), count=sum(c for _, c, _ in lines),
             paths=len(lines), reason=reasons.pop() if len(reasons) == 1 else "sources deleted or moved out")


def _move_copies(old: Path, new: Path, processed_root: Path) -> bool:
    """Rename the processed copy ``old`` and its thumbnail to ``new``. False when there is no copy to move or
    an entry of the user's is where the new one goes (indexing the file names it); an OSError when
    ``processed_root`` refuses the write, or is not the folder the copies are in (its disk unmounted:
    ``processed_folder_present``; no folder is made there)."""
    if not (processed_folder_present(processed_root) or holds_no_folder(processed_root)):
        raise FileNotFoundError(errno.ENOENT, "processed-directory's record of its source folder is gone (its disk is "
                                              "not mounted, or it was emptied or replaced)",
                                os.fspath(processed_root / SOURCE_MARKER))
    for attempt in (1, 2):
        try:
            new.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old, new)
            break
        except FileNotFoundError:
            # No copy to move; or its new folder, made just now, was removed as it emptied (``remove_emptied``,
            # from the row writer's thread): once more.
            if attempt == 2 or not os.path.lexists(old):
                return False
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            if holds_no_folder(processed_root):
                raise  # processed-directory itself is not a folder: its outage, not an entry in the way
            return False  # an entry of the user's in processed-directory is in the way: indexing ``dest`` names it
    try:
        os.replace(thumbnail_path_for(old), thumbnail_path_for(new))
    except OSError:
        pass  # none (made before thumbnails existed), or refused: made again from the file (``copies_present``)
    return True


class Refusals:
    """The files refused when read (not an image, broken, too large, their processed copy's name taken),
    with the size, mtime and reason they had then. A rescan reads them again, since a refusal may be
    passing (a stalled network mount, an entry in processed/ moved away); while a file stays as it was
    and is refused for the same reason, it is named once, not at every rescan."""

    def __init__(self) -> None:
        self._refused: dict[Path, tuple[int, int, str]] = {}

    def is_news(self, path: Path, size: int, mtime_ns: int, reason: str) -> bool:
        """Note ``path`` refused for ``reason`` at this size and mtime; whether that is news (to be said)."""
        seen, self._refused[path] = self._refused.get(path), (size, mtime_ns, reason)
        return seen != (size, mtime_ns, reason)

    def unchanged(self, path: Path) -> bool:
        """``path`` was refused and is still as it was then."""
        seen = self._refused.get(path)
        return seen is not None and (st := stat_or_none(path)) is not None and seen[:2] == (st.st_size,
                                                                                          st.st_mtime_ns)

    def forget(self, path: Path, *, folder: bool = False) -> None:
        """A file, or with ``folder`` a folder, gone or renamed: a file made there later is news, whatever it
        looks like. A file's is one lookup (``rm -rf`` of 10,000 refused files is an event each)."""
        self._refused.pop(path, None)
        if folder and self._refused:
            for refused in [p for p in self._refused if p.is_relative_to(path)]:
                del self._refused[refused]

    def keep_only(self, paths: Collection[Path]) -> None:
        """After a rescan: the refused files it found to read again (the others are gone or now stored)."""
        self._refused = {p: seen for p, seen in self._refused.items() if p in paths}


class FolderSync:
    """Applies what the watcher saw in ``source-directory``: rows follow deletions and renames at once;
    new and rewritten files wait in ``pending`` until they are complete, then the indexer reads them."""

    def __init__(self, cfg: Config, store: EmbeddingStore, pending: ReadinessTracker, *,
                 stopping: Callable[[], bool] = lambda: False,
                 finish_reading: Callable[[Collection[tuple[int, int]]], bool] = lambda stats: False,
                 reading: Callable[[], bool] = lambda: False, heartbeat: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.store = store
        self.pending = pending
        self.stopping = stopping  # the service's stop: a rescan under way ends at the next entry
        # Commits the rows of the batches being read that hold a file of one of the given (size, mtime):
        # True if there was one. ``reading``: whether a batch is being read at all.
        self.finish_reading = finish_reading
        self.reading = reading
        self.heartbeat = heartbeat  # the service's watchdog, during work of thousands of files
        self.removed = 0  # paths forgotten so far (deleted or moved-out sources)
        self._reported: set[SkippedEntry] = set()  # each skipped entry is logged once, not at every rescan
        self._unreadable: set[Path] = set()  # sub-folders the last walk of their place could not list
        self._rescanned = False  # whether a rescan has been said yet (the start's is)
        self.refusals = Refusals()  # the indexer's refusals: read again at each rescan, named once
        # What the changes applied remove and rename, said together (``say_what_changed``).
        self._removed_lines: list[tuple[Path, int, str]] = []
        self._renamed_lines: list[dict[str, object]] = []

    def _is_image(self, path: Path) -> bool:
        return is_image_candidate(path, self.cfg.source_directory)

    def rescan(self) -> int:
        """``compare_folder``, with every changed file queued for reading. Returns how many were queued:
        none when a stop cut it short (the caller, who stops, finds that in ``stopping()``; the next start
        rescans)."""
        started = time.monotonic()
        state = compare_folder(self.cfg, self.store, stopping=self.stopping, remove_orphans=not self._rescanned,
                               said_before=self.refusals.unchanged)
        if state.cut_short:
            log.info("rescan_stopped", renamed=state.renamed, duration_ms=round((time.monotonic() - started) * 1000),
                     detail="a stop was asked for: nothing removed or queued, the next start rescans")
            return 0
        self._report(state.skipped)
        self._unreadable = set(state.unreadable)
        self.pending.forget_marks_of_gone()
        self.removed += len(state.removed)
        queued = refused = 0
        self.refusals.keep_only(set(state.changed))
        for path in state.changed:
            if path not in self.pending:
                self.pending.note(path)
                queued += 1
                refused += self.refusals.unchanged(path)
        # The start's rescan is always said; a later one (rescan-interval: every 5 s, say) that found
        # nothing to do but read again the files refused before, as they were, is a debug line, not
        # 17,000 info lines a day.
        found = queued - refused or state.removed or state.renamed or state.missing_copies
        (log.info if found or not self._rescanned else log.debug)(
            "rescan_complete", files=state.files, queued=queued, refused_before=refused, removed=len(state.removed),
            renamed=state.renamed, missing_copies=len(state.missing_copies),
            duration_ms=round((time.monotonic() - started) * 1000))
        self._rescanned = True
        return queued

    def apply(self, change: Change) -> None:
        root = self.cfg.source_directory
        if change.kind is ChangeKind.DELETED:
            self._source_gone(change.path, change.is_directory)
        elif change.kind is ChangeKind.MOVED and change.dest is not None:
            dest_inside = change.dest.is_relative_to(root)
            if change.is_directory:
                # Into a folder a walk passes over (a NAS's #recycle, a trash): gone from the library, as a walk
                # would find; it stayed searchable from the trash.
                kept = dest_inside and not is_ignored_folder_path(change.dest, root)
                self._folder_moved(change.path, change.dest if kept else None)
            elif dest_inside and self._is_image(change.dest):
                self._file_moved(change.path, change.dest)
            else:
                self._source_gone(change.path, False)
        elif change.is_directory:
            # A folder moved or copied in, or made readable: its files may have produced no events of their
            # own. Each is read if its stat differs from its row's. Another folder's attribute change is not
            # walked: ``chmod -R`` and ``rsync -a`` change each folder's, and walked, a tree was walked once
            # per level (its files' own events carry any change to them).
            if change.path.is_dir() and change.path != root and not is_ignored_folder_path(change.path, root) and (
                    change.kind is ChangeKind.TOUCHED
                    or change.kind is ChangeKind.ATTRIBUTES and self._holds_unreadable(change.path)):
                for path in self._scan(change.path):
                    self.pending.note(path)
        elif change.kind in (ChangeKind.ATTRIBUTES, ChangeKind.STAT_CHANGED):  # read if its stat differs from its row's
            # chmod, touch; or a poll's news, which is a stat's. Marked as seen written, a poll's file was
            # read again by every member of a fleet whose poll came after another member had read it.
            self._noticed(change.path, closed=False, written=False)
        else:
            self._noticed(change.path, closed=change.kind is ChangeKind.CLOSED, written=True, seen_at=change.seen_at)

    def _noticed(self, path: Path, *, closed: bool, written: bool, seen_at: float | None = None) -> None:
        """A file the watcher saw appear or change waits to be read; one it saw ``written`` is read whatever
        its stat says (rewritten in place with its size and mtime kept, ``exiftool -P``, a stat would call
        it unchanged). A link is decided as the folder's scan decides it (a link is never a directory
        event, whatever it leads to): a broken one, a loop, a link to a folder is logged now, once, not at
        the next start."""
        if os.path.islink(path):
            scan = scan_entry(path, self.cfg.source_links)
            self._report(scan.skipped)
            found = scan.images
        else:
            found = [path] if self._is_image(path) else []
            if found and (too_long := path_too_long(path)) is not None:
                self._report([SkippedEntry(path, too_long)])
                found = []
        for picture in found:
            self.pending.note(picture, closed=closed, reread=written, written_at=seen_at)

    def _source_gone(self, path: Path, is_directory: bool) -> None:
        """A file or a folder deleted or moved out: its paths leave (a row with its content's last), but for
        those whose file is found again.

        - A path that holds a file again by the time this is applied (moved out and straight back, deleted
          and made again) is read as a file rewritten: its content found stored, or not.
        - inotify watches a folder made just before only from a moment after it was made, so ``mkdir new;
          mv a.jpg new/`` (or ``mv 2023/ new/``) arrives as the walk of ``new`` finding the files, then the
          old paths deleted. Removed at once, the rows would be gone by the time the new paths are read,
          and every picture embedded again. So the files being read are finished first (read at a new
          path, a stored content takes that path, its old one leading nowhere), and a waiting file with a
          gone path's size and mtime (which a rename keeps) and its MD5 is that path's file, moved."""
        self.refusals.forget(path, folder=is_directory)
        if is_directory and not path.is_dir() and not len(self.pending) and not self.reading():
            stored = []  # nothing waits or is being read: nothing to follow, nothing came back (rm -rf, at rest)
        else:
            stored = self._stored_at(path, is_directory)
        if stored and self.finish_reading({(r.source_size, r.source_mtime_ns) for r in stored}):
            stored = self._stored_at(path, is_directory)
        leaving: list[SourceRecord] = []
        missing: list[SourceRecord] = []
        for record in stored:
            old = Path(record.file_path)
            if not resolves_to_a_file(old):
                missing.append(record)
                continue
            self._noticed(old, closed=False, written=True)
            if old not in self.pending:  # there again as a link the policy does not follow
                leaving.append(record)
        moves = self._renamed(missing)
        for n, record in enumerate(missing, 1):
            if (moved_to := moves.get(record.file_path)) is not None:
                self._file_moved(Path(record.file_path), moved_to, record)
            else:
                leaving.append(record)
            if n % 100 == 0:
                self.heartbeat()  # a folder of thousands, moved into one made just before
        if self.stopping():
            return  # cut short by a stop (the hashing took what was begun): nothing removed, the next start rescans
        if is_directory and not path.is_dir():
            self.pending.forget_under(path)
            under = self.store.delete_under(str(path))
            removed, contents = list(under), set(under.values())
        elif is_directory or stored:
            for record in leaving:
                self.pending.forget(Path(record.file_path))
            gone = [r.file_path for r in leaving]
            removed = gone if gone and self.store.delete_paths(gone) else []
            contents = {r.file_hash for r in leaving}
        else:  # nothing stored there: a name that never held a picture, or one another service just forgot
            self.pending.forget(path)
            removed, contents = [], set()
        for source in removed:
            remove_processed(self.cfg, Path(source))
        if removed:
            self.removed += len(removed)
            self._removed_lines.append((path, len(removed), "source deleted or moved out"))
        self._forget_dead_copies(contents)

    def _stored_at(self, path: Path, is_directory: bool) -> list[SourceRecord]:
        """The stored path ``path``, or those inside it."""
        records = self.store.sources_under(str(path)) if is_directory else self.store.sources(at=[str(path)])
        return list(records.values())

    def _renamed(self, gone: list[SourceRecord]) -> dict[str, Path]:
        """Gone path -> the waiting path holding its file (its size and mtime, then its MD5), for the gone
        paths found so; the waiting files are hashed on every core, as a rescan's are (``_identities``)."""
        pairs = [(record, candidate) for record in gone
                 for candidate in self.pending.waiting_as(record.source_size, record.source_mtime_ns)]
        if not pairs:
            return {}
        found = _identities([(candidate, (r.source_size, r.source_mtime_ns)) for r, candidate in pairs],
                            stopping=self.stopping)
        moves: dict[str, Path] = {}
        taken: set[Path] = set()  # one file follows one gone path (copies of one content moved together)
        for (record, candidate), file_hash in zip(pairs, found):
            if file_hash == record.file_hash and record.file_path not in moves and candidate not in taken:
                moves[record.file_path] = candidate
                taken.add(candidate)
        return moves

    def _forget_dead_copies(self, contents: set[str], *, sparing: Collection[str] = ()) -> None:
        """After paths of ``contents`` left: their other paths under the folder that no longer lead to a
        file go too. A link to a deleted or renamed file yields no event of its own, and would otherwise
        keep the row (a hit naming a dangling link) until the next rescan."""
        if not contents:
            return
        root = self.cfg.source_directory
        dead = [Path(p) for content in self.store.contents(contents).values() for p in content.paths
                if p not in sparing and Path(p).is_relative_to(root) and holds_no_file(Path(p))]
        for path in dead:
            self.pending.forget(path)
            if self.store.delete_paths([str(path)]):
                remove_processed(self.cfg, path)
                self.removed += 1
                reason = ("symbolic link whose target is gone" if os.path.islink(path)
                          else "source file is gone (a copy of the file just removed)")
                self._removed_lines.append((path, 1, reason))

    def _read_if_not_current(self, path: Path, record: SourceRecord) -> None:
        """A path just relinked whose row still wants reading: embedded by another model (the rescan after a
        model change queued it under its old name) or its thumbnail missing (relinked without it)."""
        if record.model_name != self.cfg.model_name or not copies_present(str(processed_path_for(
                path, self.cfg.source_directory, self.cfg.processed_directory))):
            self.pending.note(path)

    def _not_as_stored(self, src: Path, record: SourceRecord | None, now: os.stat_result | None) -> bool:
        """The file that left ``src`` may not hold ``src``'s row's content: seen written since (a write just
        before a rename is often applied once the old name is gone: the mark stays), or noticed (a chmod, a
        touch) with a size or mtime its row does not have."""
        differs = now is not None and record is not None and (
            (now.st_size, now.st_mtime_ns) != (record.source_size, record.source_mtime_ns))
        # A rename keeps size and mtime: a file found at its new name without its row's was written there
        # since (a poll sees a rename and a write in place in one look, and the write's own event is the
        # rename's; the old picture's embedding was kept for the new content, for good).
        return self.pending.seen_written(src) or differs or (src in self.pending and (now is None or record is None))

    def _file_moved(self, src: Path, dest: Path, record: SourceRecord | None = None) -> None:
        """A rename inside the folder: the embedding follows the file, no model work, and so do its processed
        copy and thumbnail, also when ``dest`` is queued already (the walk of a folder made just before
        found it there): read at ``dest`` instead, it would get new copies and leave the old ones behind.
        A file renamed on before this is applied (``mv a t; mv b a; mv t b``) is followed name by name.
        ``record``: ``src``'s row, when the caller has just read it (a deleted folder's files, thousands)."""
        if (too_long := path_too_long(dest)) is not None:  # no row may hold it: the file leaves the index
            self._report([SkippedEntry(dest, too_long)])
            self._source_gone(src, False)
            return
        if record is None:
            record = self.store.sources(at=[str(src)]).get(str(src))
        changed = self._not_as_stored(src, record, stat_or_none(dest))
        self.pending.forget(src)
        self.refusals.forget(src)
        if record is None or changed:
            # Not indexed yet (a temp name renamed into place, over a picture perhaps: its size and mtime may
            # be the old picture's), or written since its row was: read at ``dest`` as the file it now is, and
            # ``src``'s path (a file no longer) leaves with its copies.
            self._noticed(dest, closed=True, written=True)
            if record is not None:
                self._forget_dead_copies({record.file_hash})
            return
        if relink(self.cfg, self.store, src, dest, record.file_hash, kept=(record.source_size, record.source_mtime_ns),
                  said=self._renamed_lines):
            self.pending.forget(dest)  # whatever was queued there is gone: the file there is as its row says
            self._read_if_not_current(dest, record)
        else:
            # Its processed copy is missing (deleted by hand) or an entry of the user's is where the new one
            # goes: read at ``dest``, where its content is found stored and takes over ``src``'s path.
            self._noticed(dest, closed=True, written=True)
        self._forget_dead_copies({record.file_hash}, sparing={str(src), str(dest)})  # links to the old name

    def _folder_moved(self, src: Path, dest: Path | None) -> None:
        if dest is None:
            self._source_gone(src, True)
            return
        moved = self.store.sources_under(str(src))
        new_paths = {old: dest / Path(old).relative_to(src) for old in moved}
        for old in [old for old, new in new_paths.items() if path_too_long(new) is not None]:
            self._file_moved(Path(old), new_paths.pop(old), moved.pop(old))  # leaves the index, said
        changed = {old for old, record in moved.items()
                   if self._not_as_stored(Path(old), record, stat_or_none(new_paths[old]))}
        self.pending.forget_under(src)
        self.refusals.forget(src, folder=True)
        for old, record in moved.items():
            new = new_paths[old]
            if old in changed:
                self.pending.note(new, reread=True)
            elif relink(self.cfg, self.store, Path(old), new, record.file_hash,
                        kept=(record.source_size, record.source_mtime_ns), said=self._renamed_lines):
                self._read_if_not_current(new, record)
            else:
                self.pending.note(new, reread=True)
        # The changed ones are read at their new paths; their old paths lead nowhere now.
        self._forget_dead_copies({moved[p].file_hash for p in changed})
        for path in self._scan(dest):
            if str(src / path.relative_to(dest)) not in moved:
                self.pending.note(path)

    def say_what_changed(self) -> None:
        """The rows the changes applied since the last call removed and renamed, said together
        (``say_removed``, ``say_renamed``): the service calls this once it has applied the changes waiting
        (``rm -rf`` of a folder is an event per file, then the folder's; ``mkdir new; mv 2023/ new/`` a walk
        of ``new``, then each old path's deletion)."""
        removed, self._removed_lines = self._removed_lines, []
        renamed, self._renamed_lines = self._renamed_lines, []
        say_renamed(renamed)
        say_removed(removed)

    def _holds_unreadable(self, folder: Path) -> bool:
        """``folder`` is, or holds, a sub-folder its last walk could not list."""
        return any(p.is_relative_to(folder) for p in self._unreadable)

    def _scan(self, folder: Path) -> list[Path]:
        """The pictures under ``folder`` (a sub-folder of source-directory, whose link rules apply)."""
        scan = scan_folder(folder, self.cfg.source_links)
        self._report([*scan.skipped, *filter(None, [scan.top_unreadable])])
        self._unreadable = {p for p in self._unreadable if not p.is_relative_to(folder)} | set(scan.unreadable)
        return scan.images

    def _report(self, skipped: list[SkippedEntry]) -> None:
        for entry in skipped:
            if entry not in self._reported:
                self._reported.add(entry)
                log.warning("image_skipped", path=entry.path, reason=entry.reason)

    def reported_elsewhere(self, skipped: list[tuple[Path, str]]) -> None:
        """Skips the indexer has logged already (a pipe noticed by the watcher): a rescan does not repeat them."""
        self._reported.update(SkippedEntry(path, reason) for path, reason in skipped)
