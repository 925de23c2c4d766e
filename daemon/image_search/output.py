"""Output: the result bundle of one search, written so it appears complete or not at all.

``output-directory/yyyymmdd-hhmmss[-N]/`` holds, for a query whose stem is ``q``:
- ``q.json``: the effective config (password redacted); for a text query also ``query-text``; the query
  as given (a document's keys, or the command line's flags), as understood (``understood``: its terms
  with their weights, filters, top-k, floor), and ``complete`` (``query.QueryRecord``);
- ``q.jsonl``: one line per hit, best first;
- ``q.jpg``: the best match's processed image (absent when the index is empty);
- ``q.sheet.jpg``: the contact sheet (the query, then the hits with rank, similarity and name);
- the query itself: ``q.query.<ext>`` for a query file moved in from the inbox; a text query always
  has ``q.query.txt`` (moved in, or written from the words when they came from the command line), a
  query document ``q.query.json`` (moved in, or a copy of the one named on the command line); a
  query document's folder of pictures (``inbox/q/``) moves in with it as ``q.query/``. A query file
  written again while it was answered stays in the inbox, to be answered again: the bundle then holds
  what was answered (the words, the document's bytes, or the picture as processed, ``q.query.jpg``).

The stem of an image query or a text query file is its file name's stem. A text query typed on the
command line or at the prompt has no file: its stem is made from its words (``text_query_stem``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from PIL import Image

from .claimed import claimed_before, holds_marker, remember_claim
from .config import Config, check_writable_folder, create_folder
from .entries import FileIdentity
from .errors import OutputUnwritable, is_disk_outage, writing_into
from .names import escape, fit_name, name_bytes
from .preprocess import PreprocessError, preprocess_image
from .sheet import THUMB, render_contact_sheet, save_contact_sheet
from .hits import Hit, shown_similarity
from .query import QueryRecord, TermKind
from .wording import counted

log = structlog.get_logger(__name__)

# Characters that end a line for some readers (Python's splitlines, JavaScript before ES2019) though JSON lets
# a string hold them: a name of valid UTF-8 may (escape() leaves every character of it as it is).
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(value: object) -> str:
    """``value`` as one line of JSON Lines, its newline included: the text as written, but for the
    characters some readers take for a line's end, written as JSON's ``\\u`` escapes (read back the same)."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_ENDS) + "\n"


def hit_record(hit: Hit) -> dict[str, object]:
    return {
        "rank": hit.rank,
        "similarity": shown_similarity(hit.similarity),
        "file_name": escape(hit.file_name),
        "file_path": escape(hit.file_path),
        "processed_path": escape(hit.processed_path),
        "file_hash": hit.file_hash,
        "taken_at": hit.taken_at,
        "camera": hit.camera,
        "width": hit.width,
        "height": hit.height,
        "format": hit.format,
        "copies": [escape(path) for path in hit.copies],
    }


def move_out(source: Path, target: Path) -> None:
    """Move a file to ``target`` (new), by hard link and unlink where possible: a rename out of a watched
    folder makes watchdog hold back every later event of that folder for half a second, waiting for a
    pair. All or nothing: onto another filesystem a move copies, and a copy cut short (a full disk) left
    part of the file at ``target``, which the clean-up then moved back over the user's whole file. Never
    onto an entry at ``target`` (moved back, a query of that name dropped meanwhile is the user's)."""
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    if os.path.islink(source) and not os.path.isabs(led_to := os.readlink(source)):
        # A link moves as the link, and a relative one would lead nowhere from the result folder: it goes
        # as a link to the same place, named from the root.
        os.symlink(os.path.join(os.path.dirname(os.path.abspath(source)), led_to), target)
        _unlink_or_undo(source, target)
        return
    try:
        os.link(source, target)
    except FileExistsError:  # made meanwhile: a move would take its place
        raise
    except OSError:  # another filesystem, or no hard links there
        try:
            shutil.move(source, target)
        except BaseException:
            if os.path.lexists(source):  # not moved: what the copy left at ``target`` is ours, and goes
                with contextlib.suppress(OSError):
                    os.unlink(target)
            raise
        return
    _unlink_or_undo(source, target)


# In a result's temporary folder: the names of what is moved into it from the inbox, each written before its
# move, a NUL after each (a name holds any other byte). A folder a killed process left behind is kept, and
# named, only where it holds one of them (``remove_abandoned``); ``publish`` removes the record.
_MOVED_IN = ".moved-in"


def _record_moving_in(target: Path) -> None:
    with open(target.parent / _MOVED_IN, "ab") as record:
        record.write(os.fsencode(target.name) + b"\0")


def _moved_in(folder: str) -> list[str] | None:
    """The entries of the temporary ``folder`` moved in from the inbox, by its record; None where it has
    none (an earlier version's folder, or one killed before any move)."""
    try:
        with open(os.path.join(folder, _MOVED_IN), "rb") as record:
            names = [os.fsdecode(name) for name in record.read().split(b"\0") if name]
    except FileNotFoundError:
        return None
    return [name for name in names if os.path.lexists(os.path.join(folder, name))]


def move_answered_query(query: Path, target: Path) -> bool:
    """Move the answered ``query`` into its bundle at ``target`` (``move_out``). Where it may not leave the
    inbox (an inbox of another owner's with the sticky bit, a shared drop folder; an immutable file: its
    removal is refused), ``target`` gets a copy of its bytes, the query stays where it is, untouched, said
    once (``query_left_in_inbox``), and False is returned: the inbox answers it anew only once it changes.
    Such a query met an outage of output/ before and held up every query after it."""
    _record_moving_in(target)
    try:
        move_out(query, target)
    except PermissionError as exc:
        if not os.path.lexists(query) or os.path.lexists(target):
            raise
        shutil.copyfile(query, target)  # a refusal to write here is output/'s, as any other (``writing_into``)
        log.warning("query_left_in_inbox", path=query, reason=exc.strerror or str(exc), copy=target.name,
                    detail="answered, but this user may not remove it from the inbox (its folder has the sticky "
                           "bit and is not the service's, or the file is immutable): the result holds a copy; "
                           "move or delete it yourself, and it is answered anew if it changes")
        return False
    return True


def _unlink_or_undo(source: Path, target: Path) -> None:
    """The second half of a move by link: ``source`` unlinked, or, where it stays (a sticky inbox, an
    immutable file), ``target`` too, so that the file is in one place only."""
    try:
        os.unlink(source)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


class _CopyFailed(Exception):
    """A file's copy that met a disk's outage (``errors.DISK_OUTAGES``), carried past ``shutil.copytree``: it
    turns every OSError into a line of text in one ``shutil.Error``, and a full disk (ENOSPC) was then an
    unexpected error, not an outage."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _copy_or_say_why(source: str, target: str) -> object:
    try:
        return shutil.copy2(source, target)
    except OSError as exc:
        if is_disk_outage(exc):  # the target's disk: waited out; a file that cannot be read fails the query
            raise _CopyFailed(exc) from exc
        raise


def move_folder(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target`` (new), or leave it where it is. A rename where it can be:
    one that is refused (a folder this user may not change: its ``..`` entry, on another owner's folder
    without write permission; a sticky inbox; an immutable folder) is raised as it is, never tried again as a
    copy that could not delete the original. Onto another filesystem a move copies, then deletes the
    original, and a deletion that fails part way (an immutable file, a mount point inside) left both, the
    copy alone complete. Each entry the original lost is put back from the copy, the copy goes, and the
    error is raised: nothing of the user's is lost or doubled. A copy that meets a full or read-only disk
    is raised as its OSError, with its errno."""
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    try:
        shutil.move(source, target, copy_function=_copy_or_say_why)
    except BaseException as exc:
        if os.path.isdir(source) and os.path.isdir(target):
            _put_back(target, source)
            _remove_copy(target)
        if isinstance(exc, _CopyFailed):
            raise exc.error from None
        raise


def move_answered_folder(source: Path, target: Path) -> bool:
    """Move an answered query document's folder of pictures into its bundle at ``target`` (``move_folder``);
    False, nothing moved, where this user may not move it (its document then stays beside it: the
    folder is copied from read-only media, 0555, or dropped by another user with ``sudo cp -r``). It held
    up the inbox for ever before, retried as if output/ were the one refusing the write."""
    _record_moving_in(target)
    try:
        move_folder(source, target)
    except PermissionError:
        if os.path.lexists(target) or not os.path.isdir(source):
            raise
        return False
    return True


def _remove_copy(copy: Path) -> None:
    """This process's copy of a user's folder, removed. ``copytree`` copied the modes too: a folder copied
    from read-only media (0555) can be emptied only once it is writable again (it is this user's)."""
    for folder, _, _ in os.walk(copy):
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)
    shutil.rmtree(copy, ignore_errors=True)
    if os.path.lexists(copy):
        log.error("folder_copy_not_removed", path=copy, action="delete it by hand: the original is whole")


def _put_back(copy: Path, original: Path) -> None:
    """The entries of ``copy`` that ``original`` lacks, moved back into it (folders entry by entry). A file
    goes back by ``move_out``: never onto one made there meanwhile."""
    for entry in os.scandir(copy):
        there = original / entry.name
        if not os.path.lexists(there):
            if entry.is_dir(follow_symlinks=False):
                shutil.move(entry.path, there)
            else:
                with contextlib.suppress(FileExistsError):  # made meanwhile: it stays in ``copy``
                    move_out(Path(entry.path), there)
        elif entry.is_dir(follow_symlinks=False) and there.is_dir() and not there.is_symlink():
            _put_back(Path(entry.path), there)


def _return_folder(moved: Path, home: Path) -> None:
    """The folder ``moved`` back at ``home``: merged into it where ``home`` is still there (a move that
    stopped part way, ``move_folder``), else moved. What a merge cannot put back (an entry of that name
    made at ``home`` meanwhile) stays in ``moved``, raised as such: never deleted."""
    if not os.path.isdir(home):
        shutil.move(moved, home)
        return
    _put_back(moved, home)
    for folder, _, _ in os.walk(moved, topdown=False):  # what is left: folders emptied by the merge
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    if os.path.lexists(moved):
        raise FileExistsError(errno.EEXIST, "entries of these names were made in the folder meanwhile", str(moved))


def move_back(moved: Path, home: Path, move: Callable[[Path, Path], None] | None = None) -> None:
    """A query moved out, put back at ``home`` (by ``move``; a file's by ``move_out``: all or nothing, never
    over an entry made there meanwhile); one that cannot go back is named, where it is kept."""
    try:
        (move or move_out)(moved, home)
    except (OSError, shutil.Error) as exc:
        log.error("query_not_put_back", path=home, kept_at=moved, reason=exc.strerror or str(exc),
                  action="move it back by hand; the service will answer it then")


def temporary_folder(output_dir: Path, kind: str) -> Path:
    """A new hidden folder in ``output_dir`` to build a ``kind`` ("result", "duplicates") in, named with
    this host, this boot and this process, so that one a killed process left behind is known as such
    (``remove_abandoned``)."""
    return Path(tempfile.mkdtemp(dir=output_dir, prefix=f".tmp-{kind}-{_this_host()}-{_this_boot()}-{os.getpid()}-"))


_TEMPORARY = re.compile(r"^\.tmp-(?:result|duplicates)-(?P<host>.+)-(?P<boot>[0-9a-f]{8}|x)-(?P<pid>\d+)-[^-]+$")


def _this_host() -> str:
    """The host name as a file name can hold it (a kernel allows '/' in one)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "_"


def _this_boot() -> str:
    """This boot, by the start of the kernel's boot id: after a reboot the same pid is another process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text()[:8]
    except OSError:
        return "x"


def remove_abandoned(output_dir: Path) -> None:
    """Delete the folders ``temporary_folder`` made in ``output_dir`` for processes of this host that
    are gone (kill -9 while a result was written, a reboot): each held a result never published, which
    the query still in the inbox is answered again for. Another host's and a live process's are left
    alone, and so is one that holds a query moved in from the inbox (``<stem>.query...``, the user's): it
    is named in a warning, to be moved back by hand."""
    host, boot = _this_host(), _this_boot()
    try:
        entries = list(os.scandir(output_dir))
    except OSError:
        return  # no output folder yet, or none readable: the first write says what is wrong
    for entry in entries:
        found = _TEMPORARY.match(entry.name)
        if found is None or found["host"] != host or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(found["pid"])
        try:
            if found["boot"] == boot and _alive(pid, since=entry.stat(follow_symlinks=False).st_mtime):
                continue
            held = _moved_in(entry.path)
            if held is None:  # no record: by the names the moves give
                held = [name for name in os.listdir(entry.path) if _QUERY_INFIX in name]
        except OSError:
            continue
        if held:
            log.warning("abandoned_result_holds_a_query", path=entry.path, query=held,
                        action="a process was killed while it moved this query into its result: move the "
                               "query back into the inbox to have it answered, then delete the folder")
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("abandoned_result_removed", path=entry.path,
                 detail="left by a process that was killed while it wrote it; never published")


def _alive(pid: int, since: float) -> bool:
    """Process ``pid`` is alive and is the one that wrote last at ``since`` (epoch seconds): a process of
    that number started later is another, which took the number of the dead writer (a container
    restarted after a kill keeps its host name and boot, and its main process its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # a number no pid can be
        return True
    except PermissionError:  # another user's process: alive, and its start is looked at all the same
        pass
    started = _started_at(pid)
    return started is None or started <= since + 1.0  # a second's slack: the clock's ticks, the file system's


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started, in epoch seconds (from /proc: its start in ticks after boot)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_bytes().splitlines()
                    if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


# In output-directory: says it is the folder results were written into (``make_output_folder``), on its disk.
OUTPUT_MARKER = ".output-directory"
_OUTPUT_MARKER_TEXT = (b"image-search writes its results into this folder. Keep this file: without it, a folder\n"
                       b"that was written into before is taken for the empty mount point of a disk that is not\n"
                       b"mounted, and queries wait in the inbox until it is back.\n")
# In state-directory: the output folders this installation has written into (``claimed``), as configured.
OUTPUT_CLAIMS_RECORD = "output-folders"


def make_output_folder(output_dir: Path, state_dir: Path) -> None:
    """``output_dir``, ready for a result: the folder written into before (its ``OUTPUT_MARKER`` is there),
    or a first use, made if missing and marked. A folder written into before (``OUTPUT_CLAIMS_RECORD``) that
    now looks as an unmounted disk's does is ``OutputUnwritable``: results, and the queries moved into
    them, would land on the disk under the mount point, and be hidden once it is back. Nothing is written
    then, and the query waits in the inbox. A file or a link to nothing of the user's under the folder's
    name is ENOTDIR (``writing_into`` makes it ``OutputUnwritable``), never an unexpected error that fails
    the query. An earlier version's folder, results and no marker, is adopted."""
    if holds_marker(output_dir, OUTPUT_MARKER):
        return
    if _away(output_dir, state_dir):  # looks at the marker again: a lstat, on the rare way only
        raise _away_error(output_dir, state_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # exist_ok passes a folder only: a file or a dangling link holds the name
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(output_dir)) from None
    _mark(output_dir, state_dir)


def _mark(output_dir: Path, state_dir: Path) -> None:
    """Write ``output_dir``'s marker, and remember the folder as written into."""
    try:
        fd = os.open(output_dir / OUTPUT_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        pass  # another process marked it first
    else:
        with os.fdopen(fd, "wb") as handle:
            handle.write(_OUTPUT_MARKER_TEXT)
    remember_claim(state_dir / OUTPUT_CLAIMS_RECORD, [os.fsdecode(output_dir)])


def prepare_output_folder(cfg: Config) -> None:
    """At start, after ``ensure_directories``: ``output-directory`` is made if missing and checked as the
    others are (a ConfigError names the key). But one written into before that looks as an unmounted disk's
    does is left as it is (nothing made on the disk under it) and said once: the run goes on, and its
    queries wait in the inbox until the folder is back (``make_output_folder``)."""
    folder = cfg.output_directory
    if _away(folder, cfg.state_directory):
        log.warning("output_folder_away", path=folder, detail=str(_away_error(folder, cfg.state_directory)))
        return
    missing = not os.path.lexists(folder)
    create_folder("output-directory", folder)
    check_writable_folder("output-directory", folder)
    if missing:  # made again (removed by hand from beside other files): marked, or it would read as away, empty
        with contextlib.suppress(OSError):  # a full disk: said by the first result's write, as any outage is
            _mark(folder, cfg.state_directory)


def _away(output_dir: Path, state_dir: Path) -> bool:
    """``output_dir`` holds no marker, looks as an unmounted disk's folder does, and was written into before."""
    return (not holds_marker(output_dir, OUTPUT_MARKER) and _looks_unmounted(output_dir)
            and claimed_before(state_dir / OUTPUT_CLAIMS_RECORD, [os.fsdecode(output_dir)]))


def _looks_unmounted(folder: Path) -> bool:
    """What a folder on a disk that is not mounted looks like: the empty mount point, or no folder at all
    under a parent that is empty or missing too (a desktop removes its mount point with the disk). A folder
    removed by hand, from beside the user's other files, is not: it is made again."""
    try:
        with os.scandir(folder) as entries:
            return not any(entries)
    except FileNotFoundError:
        if os.path.islink(folder):
            return True  # a link to a folder that is not there: on the disk not mounted
    except OSError:
        return False  # not a folder, or one that cannot be listed: the write that follows names what is wrong
    try:
        with os.scandir(folder.parent) as entries:
            return not any(entries)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False


def _away_error(output_dir: Path, state_dir: Path) -> OutputUnwritable:
    folder, marker, record = escape(output_dir), escape(output_dir / OUTPUT_MARKER), state_dir / OUTPUT_CLAIMS_RECORD
    state = "is empty" if os.path.isdir(output_dir) else "is not there"
    return OutputUnwritable(
        f"cannot write results into {folder}: it {state}, but this installation wrote its results there before "
        f"(recorded in {escape(record)}), and its record of them ({marker}) is gone: its disk is not mounted "
        "(results, and the queries moved into them, would land on the disk under it, hidden once it is back), "
        "or it was emptied or removed: mount it or put it back; the queries wait in the inbox meanwhile. If you "
        f"emptied or removed it on purpose: mkdir -p {folder} && touch {marker}")


def publish(tmp: Path, output_dir: Path, now: datetime | None = None) -> Path:
    """Make the finished result folder ``tmp`` (made by ``mkdtemp`` in ``output_dir``) readable and give
    it its name, ``yyyymmdd-hhmmss`` or the first free ``-2``, ``-3``...: it appears complete or not at all."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp / _MOVED_IN)  # complete: no longer a folder a kill could leave holding the user's entries
    while True:
        final = _free_folder_name(output_dir, stamp)
        try:
            # rename() onto an existing *empty* folder would replace it: mkdir first fails loudly instead.
            os.mkdir(final)
        except FileExistsError:
            continue
        # mkdtemp made tmp 0700; a result is for the user to read, as far as the umask lets (0755 under
        # 022, 0750 under the unit's UMask=0027): the mode mkdir just gave, read rather than os.umask's
        # set-and-restore, which would change the mask under every other thread meanwhile.
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
            os.rename(tmp, final)
        except BaseException:
            os.rmdir(final)  # the empty folder made above to hold the name: the caller puts the rest back
            raise
        return final


def _free_folder_name(output_dir: Path, stamp: str) -> Path:
    """The first of ``stamp``, ``stamp-2``, ``stamp-3``... that no entry holds yet (a dangling link is an
    entry too: ``publish``'s mkdir would fail on it, for ever)."""
    candidate = output_dir / stamp
    n = 2
    while os.path.lexists(candidate):
        candidate = output_dir / f"{stamp}-{n}"
        n += 1
    return candidate


@dataclass(frozen=True)
class ImageQuery:
    """A query picture: its file, and (optional) its already processed pixels for the contact sheet;
    without them the sheet decodes the file again under the usual rules."""

    path: Path
    picture: Image.Image | None = None


@dataclass(frozen=True)
class TextQuery:
    """A query made of words: the text, and the ``.txt`` file it was read from (inbox, or a file named
    on the command line), or None when it was typed (``--text``, the interactive prompt)."""

    text: str
    path: Path | None = None


@dataclass(frozen=True)
class DocumentQuery:
    """A query document (``querydoc``): the ``.json`` file, and ``folder``, its ``inbox/<stem>/`` of
    pictures when there is one (it moves into the bundle with the document); ``data``, the document's
    bytes as read, which the bundle holds when the file itself stays where it is (``search --query``)."""

    path: Path
    folder: Path | None = None
    data: bytes = b""
    picture: Image.Image | None = None  # its one picture as processed, for the sheet (a plain document)


Query = ImageQuery | TextQuery | DocumentQuery


# Longest stem made from a typed query's words, in characters (a file name has 255 bytes; CJK
# characters take 3 each in UTF-8, and ".sheet.jpg" must still fit).
TEXT_STEM_CHARACTERS = 48
TEXT_STEM_FALLBACK = "text-query"


def text_query_stem(text: str) -> str:
    """The stem of a typed text query's files: its letters and digits (any script), every other run of
    characters made one ``-``, at most 48 characters; ``text-query`` if nothing is left.

    ``"a red bicycle"`` -> ``a-red-bicycle``; ``"赤い自転車"`` -> ``赤い自転車``; ``"?!"`` -> ``text-query``.
    """
    stem = re.sub(r"[\W_]+", "-", text).strip("-")[:TEXT_STEM_CHARACTERS].rstrip("-")
    return stem or TEXT_STEM_FALLBACK


# What the bundle adds to a query's stem: ``.sheet.jpg``, or ``.query`` and the query file's suffix.
_SHEET_SUFFIX, _QUERY_INFIX = ".sheet.jpg", ".query"


def _query_stem(query: Query) -> str:
    """The stem of the bundle's files, shortened (``names.fit_name``) where a file name made of it would
    pass 255 bytes."""
    if query.path is None:
        assert isinstance(query, TextQuery)
        return text_query_stem(query.text)
    stem = query.path.stem or query.path.name
    return fit_name(stem, reserve=max(len(_SHEET_SUFFIX), len(_QUERY_INFIX) + name_bytes(query.path.suffix)))


def _sheet_query_picture(query: ImageQuery, cfg: Config) -> Image.Image | None:
    """The query picture for the sheet: the one given, or the file decoded small under the usual
    format, orientation and size rules; None (a placeholder cell) if it cannot be read."""
    if query.picture is not None:
        return query.picture
    try:
        return preprocess_image(query.path, max_size=(THUMB, THUMB), max_pixels=cfg.max_image_pixels).image
    except PreprocessError as exc:
        log.warning("sheet_query_picture_unreadable", path=query.path, reason=exc.reason)
        return None


def _sheet_heading(query: Query, hits: Sequence[Hit], cfg: Config, asked: QueryRecord | None) -> str:
    what = f"“{' '.join(query.text.split())}”" if isinstance(query, TextQuery) else escape(query.path.name)
    found = f"{len(hits)} best match{'es' if len(hits) != 1 else ''}" if hits else "no matches"
    if asked is not None and not asked.completeness.complete:
        found += " (incomplete)"
    if asked is not None and asked.not_yet_indexed:
        found += f" ({counted(asked.not_yet_indexed, 'picture')} not indexed yet)"
    model = cfg.model_name
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        model = Path(model).name  # a local model directory: its name says enough on a picture
    return f"{found} for {what} · model {model}"


def write_result_bundle(output_dir: Path, query: Path | Query, hits: Sequence[Hit], cfg: Config,
                        *, now: datetime | None = None, move_query: bool = False,
                        asked: QueryRecord | None = None, read_as: FileIdentity | None = None) -> Path:
    """Write the bundle for one query; return its folder. Built under a hidden temp name, then renamed.

    ``query``: an ImageQuery (a bare Path means ImageQuery(path)) or a TextQuery. With ``move_query``
    the query file itself moves into the bundle as ``<stem>.query.<ext>`` (the service's inbox empties
    itself); if the bundle cannot be completed it is moved back. A text query that is not moved in
    gets its words written to ``<stem>.query.txt``, so every text bundle holds its query. ``read_as``:
    the query file as it was when it was read: one that is no longer that file (written again, replaced,
    gone) is not moved in; it stays in the inbox to be answered anew, and the bundle holds what was
    answered instead (``_keep_answered``). ``asked``:
    the query as given and understood, and whether the ranking is complete (recorded in ``<stem>.json``,
    and shown in the sheet's first cell when it has more than one term or a filter).
    A full disk (or a read-only or forbidden output folder) is ``OutputUnwritable``.
    """
    if isinstance(query, Path):
        query = ImageQuery(query)
    with writing_into(output_dir, "a result folder"):
        return _write_bundle(output_dir, query, hits, cfg, now=now, move_query=move_query, asked=asked,
                             read_as=read_as)


def _keep_answered(tmp: Path, stem: str, query: Query) -> None:
    """The bundle's copy of a query whose file changed while it was answered (the file itself stays in the
    inbox and is answered again): the words, the document's bytes, or the picture as it was processed."""
    assert query.path is not None
    if isinstance(query, TextQuery):
        (tmp / f"{stem}{_QUERY_INFIX}.txt").write_text(query.text + "\n", encoding="utf-8")
    elif isinstance(query, DocumentQuery):
        (tmp / f"{stem}{_QUERY_INFIX}{query.path.suffix}").write_bytes(query.data)
    elif query.picture is not None:  # its original bytes were never kept: the pixels that were searched
        query.picture.convert("RGB").save(tmp / f"{stem}{_QUERY_INFIX}.jpg", format="JPEG", quality=95)
    log.warning("query_changed_while_answered", path=query.path,
                detail="the file was written again (or replaced, or removed) while it was answered: the result "
                       "holds what was answered, and the file as it is now stays in the inbox to be answered anew")


def _render_sheet(query: Query, hits: Sequence[Hit], cfg: Config, asked: QueryRecord | None) -> Image.Image:
    """The contact sheet; its first cell shows the query: its picture, its words, or (a query of several
    terms or with filters) the terms and the filters."""
    spec = asked.spec if asked is not None else None
    plain = spec is None or (len(spec.terms) == 1 and not spec.terms[0].unlike and spec.filters.empty
                             and spec.min_similarity is None)
    text = query.text if isinstance(query, TextQuery) else None
    picture = None
    if plain and isinstance(query, ImageQuery):
        picture = _sheet_query_picture(query, cfg)
    elif plain and isinstance(query, DocumentQuery) and spec is not None:  # one term: shown as a file's is
        picture = query.picture
        text = spec.terms[0].value if spec.terms[0].kind is TermKind.TEXT else None
    if not plain:
        assert spec is not None
        text = "\n".join(spec.describe())
    no_hits = None
    if spec is not None and not (spec.filters.empty and spec.min_similarity is None):
        no_hits = "no picture passes the filters and the floor"
    return render_contact_sheet(
        hits,
        query_name=query.path.name if query.path is not None else "typed text query",
        query_picture=picture,
        query_text=text,
        query_label="Text query" if plain else "Query",
        heading=_sheet_heading(query, hits, cfg, asked),
        no_hits=no_hits,
    )


def _hits_without_processed_copy(hits: Sequence[Hit], query: Query) -> set[str]:
    """The hashes of the hits whose processed copy is gone (deleted by hand, a disk clean-up), each named in
    one line. The answer goes on without it: the sheet shows its thumbnail where that is left, else a grey
    cell saying so, and a best match without one has no ``<stem>.jpg``."""
    missing = set()
    for hit in hits:
        if not os.path.isfile(hit.processed_path):
            missing.add(hit.file_hash)
            log.warning("processed_copy_missing", path=hit.file_path, processed=hit.processed_path, rank=hit.rank,
                        query=query.path if query.path is not None else "typed text query",
                        action="made again from the source file by the next rescan (rescan-interval, or the next "
                               "start), or once processed-directory takes writes if it refuses them now")
    return missing


def _left_with_its_folder(document: Path, folder: Path, target: Path) -> None:
    """A query document whose folder of pictures may not leave the inbox (``move_answered_folder``) stays
    with it; ``target`` gets a copy of the document."""
    shutil.copyfile(document, target)  # a refusal to write here is output/'s, as any other (``writing_into``)
    log.warning("query_left_in_inbox", path=document, folder=folder, copy=target.name,
                detail="answered, but this user may not move its folder of pictures out of the inbox (another "
                       "user's, or not writable: copied from read-only media): the result holds a copy of the "
                       "document; both stay, and the document is answered anew if it changes")


def _write_bundle(output_dir: Path, query: Query, hits: Sequence[Hit], cfg: Config, *,
                  now: datetime | None, move_query: bool, asked: QueryRecord | None,
                  read_as: FileIdentity | None) -> Path:
    if move_query and query.path is None:
        raise ValueError("move_query needs a query file; this text query was typed, not read from a file")
    make_output_folder(output_dir, cfg.state_directory)
    without_copy = _hits_without_processed_copy(hits, query)
    stem = _query_stem(query)
    text = query.text if isinstance(query, TextQuery) else None
    # Rendered before anything moves: the sheet may need to read the query picture from its file.
    sheet = _render_sheet(query, hits, cfg, asked)
    tmp = temporary_folder(output_dir, "result")
    moved_query: Path | None = None
    moved_folder: Path | None = None
    try:
        # Escaped (names.escape): a folder named in bytes that are not UTF-8 still makes valid JSON.
        effective = {key: escape(value) if isinstance(value, str) else value
                     for key, value in cfg.to_json_dict(redact=True).items()}
        if text is not None:
            effective["query-text"] = text
        if asked is not None:
            effective.update(asked.record())
        # backslashreplace: a lone surrogate in the query as given (a document's "\udcff", a flag's bytes
        # that are not UTF-8) is written as JSON's own \uXXXX escape, which reads back as given.
        with open(tmp / f"{stem}.json", "w", encoding="utf-8", errors="backslashreplace") as fh:
            json.dump(effective, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        with open(tmp / f"{stem}.jsonl", "w", encoding="utf-8") as fh:
            for hit in hits:
                fh.write(json_line(hit_record(hit)))
        if hits and hits[0].file_hash not in without_copy:
            best = Path(hits[0].processed_path)
            try:
                best_file = open(best, "rb")
            except OSError as exc:
                log.warning("best_match_image_missing", path=best, reason=exc.strerror or str(exc))
            else:
                # Only the copy's source can be missing: a write that fails is the result folder's
                # (a full disk: ``writing_into`` makes it OutputUnwritable), not a missing picture.
                with best_file, open(tmp / f"{stem}.jpg", "wb") as copy:
                    shutil.copyfileobj(best_file, copy)
        save_contact_sheet(sheet, tmp / f"{stem}{_SHEET_SUFFIX}")
        if move_query:
            assert query.path is not None
            # Looked at last, just before the move: a query written again while it was answered is not the
            # one answered, and is left to be answered anew.
            if read_as is not None and FileIdentity.of(query.path) != read_as:
                _keep_answered(tmp, stem, query)
            else:
                # The folder of a document's pictures first: one that may not leave keeps its document beside it.
                target = tmp / f"{stem}{_QUERY_INFIX}{query.path.suffix}"
                folder = query.folder if isinstance(query, DocumentQuery) else None
                stays = False
                if folder is not None and folder.is_dir():
                    moved_folder = tmp / f"{stem}{_QUERY_INFIX}"  # before: a move that fails may leave part there
                    if not move_answered_folder(folder, moved_folder):
                        moved_folder, stays = None, True
                        _left_with_its_folder(query.path, folder, target)
                if not stays:
                    moved_query = target
                    if not move_answered_query(query.path, moved_query):
                        moved_query = None  # a copy: the query itself stays in the inbox, and its folder with it
                        if moved_folder is not None:
                            assert folder is not None
                            move_back(moved_folder, folder, _return_folder)
                            moved_folder = moved_folder if os.path.lexists(moved_folder) else None
        elif text is not None:  # typed, or a file left where it is: the bundle still records the words
            (tmp / f"{stem}{_QUERY_INFIX}.txt").write_text(text + "\n", encoding="utf-8")
        elif isinstance(query, DocumentQuery):  # a document left where it is: the bundle holds what it said
            (tmp / f"{stem}{_QUERY_INFIX}{query.path.suffix}").write_bytes(query.data)
        return publish(tmp, output_dir, now)
    except BaseException:
        # Never lose what the user dropped: the query first, then its folder (``move_folder`` left none
        # half-moved). Whatever cannot go back keeps the unfinished folder, named in the log.
        if moved_query is not None and moved_query.exists():
            assert query.path is not None
            move_back(moved_query, query.path)
        if moved_folder is not None and moved_folder.exists():
            assert isinstance(query, DocumentQuery) and query.folder is not None
            move_back(moved_folder, query.folder, _return_folder)
        if not any(p is not None and os.path.lexists(p) for p in (moved_query, moved_folder)):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
