"""A processed folder serves one source folder: its copies are named by their source's path inside
``source-directory``, so a second source folder with files of the same paths would overwrite them and the
first's rows would show the second's pictures. The folder records its source when it is first used (an
earlier version's folder adopts the configured one), and a start with another source is a config error.
Files only: the start refuses before any database or model (the CLI's exit code is in test_cli.py)."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from image_search.config import Config, ConfigError, load_config
from image_search.errors import ExitCode, ProcessedFolderMissing
from image_search.runtime import open_runtime
from image_search.sync import SOURCE_MARKER, check_processed_folder, claim_processed_folder
from tests.support.files import save_picture, write_config


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path))


def nothing_indexed() -> list[str]:  # the index of a first start
    return []


def processed_files(cfg: Config) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in cfg.processed_directory.rglob("*") if p.is_file()}


def test_a_processed_folder_records_its_source_and_refuses_another(cfg: Config, tmp_path: Path) -> None:
    claim_processed_folder(cfg, nothing_indexed)  # the first start
    marker = cfg.processed_directory / SOURCE_MARKER
    assert marker.read_bytes() == os.fsencode(cfg.source_directory.resolve())
    save_picture(cfg.processed_directory / "a.png.jpg", seed=1)  # a copy made meanwhile
    claim_processed_folder(cfg, nothing_indexed)  # the next start, with the same source
    alias = tmp_path / "alias"
    alias.symlink_to(cfg.source_directory)
    claim_processed_folder(dataclasses.replace(cfg, source_directory=alias), nothing_indexed)  # the same folder, through a link
    kept = processed_files(cfg)

    other = tmp_path / "other-images"
    save_picture(other / "a.png", seed=2)  # a file of the same path: its copy would take a.png.jpg's place
    with pytest.raises(ConfigError) as refused:
        claim_processed_folder(dataclasses.replace(cfg, source_directory=other), nothing_indexed)
    assert refused.value.exit_code == ExitCode.USAGE
    message = str(refused.value)
    assert message.startswith(f"config key 'processed-directory' ({cfg.processed_directory}) holds the processed "
                              f"copies of source-directory {cfg.source_directory.resolve()}, not of {other.resolve()}")
    assert f"Give 'processed-directory' a folder of its own for {other.resolve()}" in message
    assert processed_files(cfg) == kept  # nothing written, the marker as it was


def test_an_earlier_versions_processed_folder_adopts_the_configured_source(cfg: Config, tmp_path: Path) -> None:
    """Installed before processed folders recorded their source: copies there, no marker. The start goes on
    with the configured source, which the folder records from then on; another is refused after that."""
    save_picture(cfg.processed_directory / "album" / "c.png.jpg", seed=3)
    copies = processed_files(cfg)
    claim_processed_folder(cfg, lambda: [str(cfg.source_directory / "album" / "c.png")])
    marker = cfg.processed_directory / SOURCE_MARKER
    assert marker.read_bytes() == os.fsencode(cfg.source_directory.resolve())
    assert {p: b for p, b in processed_files(cfg).items() if p != marker} == copies
    with pytest.raises(ConfigError, match="holds the processed copies of source-directory"):
        claim_processed_folder(dataclasses.replace(cfg, source_directory=tmp_path / "other-images"), nothing_indexed)


@pytest.mark.parametrize("unmounted", ["an empty mount point", "no folder", "a mount point a rescan wrote into"])
def test_a_processed_folder_without_the_copies_the_index_holds_is_not_started_on(cfg: Config, unmounted: str) -> None:
    """Its disk unmounted (a USB disk unplugged, a share not up yet, mounted by hand: in no fstab), the processed
    folder is the empty mount point on the disk under it, or not there at all. Claimed afresh, every copy would
    be made again onto that disk, filling it. Refused as a missing source folder is (exit 8: systemd tries
    again), nothing written; until the user says it was emptied on purpose with an empty record."""
    processed = cfg.processed_directory
    indexed = [str(cfg.source_directory / "a.png"), str(cfg.source_directory / "album" / "b.png"), "/elsewhere/c.png"]
    if unmounted == "no folder":
        processed.rmdir()
    elif unmounted == "a mount point a rescan wrote into":
        (processed / ".mount-points").write_text("[]")
    kept = processed_files(cfg)
    with pytest.raises(ProcessedFolderMissing) as refused:
        claim_processed_folder(cfg, lambda: indexed)
    assert refused.value.exit_code == ExitCode.SOURCE_MISSING
    state = "does not exist" if unmounted == "no folder" else "is empty"
    assert str(refused.value).startswith(f"processed-directory {processed} {state}, but the processed copies of 2 "
                                         "indexed paths were made there: not starting")
    assert str(refused.value).endswith(f"(mkdir -p {processed} && touch {processed / SOURCE_MARKER}): the copies "
                                       "are then made again from the source files")
    assert processed_files(cfg) == kept and processed.exists() == (unmounted != "no folder")

    processed.mkdir(exist_ok=True)  # as every start makes it
    claim_processed_folder(cfg, lambda: indexed[2:])  # the index holds none of this source's: a first use
    (processed / SOURCE_MARKER).unlink()
    (processed / SOURCE_MARKER).touch()  # the user's word: emptied on purpose
    claim_processed_folder(cfg, lambda: indexed)
    assert (processed / SOURCE_MARKER).read_bytes() == os.fsencode(cfg.source_directory.resolve())


def test_a_processed_folder_claimed_before_is_refused_without_its_record_whatever_the_index_holds(
        cfg: Config, tmp_path: Path) -> None:
    """cleanup-on-exit, the default, empties the index at every exit: the index cannot tell that copies were
    made. The installation's own record of its claims, in state-directory, can. The start is refused before
    any folder is made (mkdir -p would make the disk's folders on the disk under it) or the database starts
    (this unit tier would fail the test if one did)."""
    usb = tmp_path / "media" / "usb"
    cfg = dataclasses.replace(cfg, processed_directory=usb / "processed")
    claim_processed_folder(cfg, nothing_indexed)  # the first start, the disk mounted
    save_picture(cfg.processed_directory / "a.png.jpg", seed=1)
    usb.rename(tmp_path / "usb-away")  # unplugged: not even the folder is there
    for state in ("does not exist", "is empty"):
        with pytest.raises(ProcessedFolderMissing) as refused:
            with open_runtime(cfg, cleanup=False):
                pass
        assert refused.value.exit_code == ExitCode.SOURCE_MISSING
        assert str(refused.value).startswith(
            f"processed-directory {cfg.processed_directory} {state}, but this installation made its processed copies "
            f"there (recorded in {cfg.state_directory / 'processed-folders'}): not starting")
        if state == "does not exist":
            assert not usb.exists()  # nothing made on the disk under it
            cfg.processed_directory.mkdir(parents=True)  # then the empty mount point
    assert list(cfg.processed_directory.iterdir()) == []
    shutil.rmtree(usb)
    (tmp_path / "usb-away").rename(usb)  # mounted again
    assert check_processed_folder(cfg)
    elsewhere = dataclasses.replace(cfg, processed_directory=tmp_path / "elsewhere")
    assert not check_processed_folder(elsewhere)  # never claimed: a first use

    # The README's way to give the folder a new source: the old folder moved away, for a first use by the new.
    moved = dataclasses.replace(cfg, source_directory=tmp_path / "new-images")
    with pytest.raises(ConfigError, match="holds the processed copies of source-directory"):
        check_processed_folder(moved)
    usb.rename(tmp_path / "old-processed-disk")
    assert not check_processed_folder(moved)
    claim_processed_folder(moved, nothing_indexed)
    assert (cfg.processed_directory / SOURCE_MARKER).read_bytes() == os.fsencode(moved.source_directory.resolve())


def test_a_processed_folder_on_a_stale_share_is_away_not_a_config_error(cfg: Config, monkeypatch) -> None:
    """An NFS share whose server restarted answers ESTALE for the folder and all in it: away, as an unmounted
    disk is (exit 8, which systemd tries again), not a permission to fix (exit 2, never restarted)."""
    claim_processed_folder(cfg, nothing_indexed)
    processed, read_bytes, isdir = cfg.processed_directory, Path.read_bytes, os.path.isdir

    def stale(path: Path) -> bytes:
        if path.parent == processed:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", stale)
    monkeypatch.setattr(os.path, "isdir", lambda path: False if Path(path) == processed else isdir(path))
    with pytest.raises(ProcessedFolderMissing) as refused:
        check_processed_folder(cfg)
    assert refused.value.exit_code == ExitCode.SOURCE_MISSING
    assert str(refused.value).startswith(f"processed-directory {processed} cannot be looked at "
                                         f"({os.strerror(errno.ESTALE)}), but this installation made its processed")
    monkeypatch.setattr(os.path, "isdir", isdir)  # the folder answers, only its record does not: say what it is
    with pytest.raises(ConfigError, match=re.escape(f"cannot be read or written ({os.strerror(errno.ESTALE)})")):
        check_processed_folder(cfg)


def test_an_entry_of_the_users_on_the_markers_name_is_a_config_error(cfg: Config) -> None:
    (cfg.processed_directory / SOURCE_MARKER).mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"{cfg.processed_directory / SOURCE_MARKER}, which records")):
        claim_processed_folder(cfg, nothing_indexed)


def test_a_start_with_another_source_is_refused_before_the_database(cfg: Config, tmp_path: Path) -> None:
    """``open_runtime``, every command's start: refused before any database starts (this unit tier would
    fail the test if one did) and before anything is written into the processed folder."""
    claim_processed_folder(cfg, nothing_indexed)
    kept = processed_files(cfg)
    with pytest.raises(ConfigError, match="holds the processed copies of source-directory"):
        with open_runtime(dataclasses.replace(cfg, source_directory=tmp_path / "other-images"), cleanup=False):
            pass
    assert processed_files(cfg) == kept


def test_a_rescan_removes_only_what_processed_holds_for_no_source(cfg: Config) -> None:
    """Copies (with their thumbnails) that no row names and that no file will have, and a crashed write's
    temporary file, go; the copies named, files of yours, the folder's records and anything just written stay."""
    from image_search.sync import ORPHAN_MIN_AGE_S, remove_orphaned_copies

    processed = cfg.processed_directory
    named = processed / "kept" / "a.png.jpg"
    files = {
        named: True, named.with_name(".a.png.jpg.thumb.jpg"): True,
        processed / "gone" / "b.png.jpg": False, processed / "gone" / ".b.png.jpg.thumb.jpg": False,
        processed / "kept" / ".c.png.jpg.thumb.jpg": False,  # a thumbnail alone
        processed / "kept" / ".tmp-1a2b3c4d.jpg": False,
        processed / "kept" / "notes.jpg": True,  # no thumbnail beside it: not ours to take
        processed / "kept" / "todo.txt": True,
        processed / SOURCE_MARKER: True, processed / ".mount-points": True,
    }
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    time.sleep(0.05)
    fresh = processed / "new" / "d.png.jpg"  # another service's, its row not committed yet
    fresh.parent.mkdir()
    fresh.write_bytes(b"x")
    fresh.with_name(".d.png.jpg.thumb.jpg").write_bytes(b"x")
    moved = processed / "new" / "e.png.jpg"  # another service's relink of a copy, as the walk passed
    (processed / "kept" / "e.png.jpg").write_bytes(b"x")
    (processed / "kept" / ".e.png.jpg.thumb.jpg").write_bytes(b"x")
    os.utime(processed / "kept" / "e.png.jpg", (0, 0))  # written long ago: a rename keeps that
    (processed / "kept" / "e.png.jpg").rename(moved)
    (processed / "kept" / ".e.png.jpg.thumb.jpg").rename(moved.with_name(".e.png.jpg.thumb.jpg"))
    now = os.stat(fresh).st_ctime + ORPHAN_MIN_AGE_S - 0.01  # the files above are older than that

    assert remove_orphaned_copies(cfg, {str(named)}, now=lambda: now) == 4
    assert {p for p, stays in files.items() if p.exists()} == {p for p, stays in files.items() if stays}
    assert fresh.exists() and moved.exists() and not (processed / "gone").exists()


@pytest.mark.integration  # chattr: a subprocess
def test_copies_for_no_source_that_a_folder_keeps_are_named_once_with_the_fix(cfg: Config) -> None:
    """A folder under processed/ that refuses the removal (another user's, immutable) kept its copies for
    files long gone without a word, at every start."""
    import subprocess

    from structlog.testing import capture_logs

    from image_search.sync import ORPHAN_MIN_AGE_S, remove_orphaned_copies

    locked = cfg.processed_directory / "2023"
    for name in ("a.png.jpg", ".a.png.jpg.thumb.jpg", "b.png.jpg", ".b.png.jpg.thumb.jpg"):
        save_picture(locked / name, seed=1)
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        with capture_logs() as logs:
            removed = remove_orphaned_copies(cfg, set(), now=lambda: time.time() + ORPHAN_MIN_AGE_S + 1)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert removed == 0 and len(list(locked.iterdir())) == 4
    [kept] = [e for e in logs if e["event"] == "processed_copies_kept"]
    assert (kept["path"], kept["count"], kept["log_level"]) == (str(locked), 4, "warning")
    assert "(Operation not permitted)" in kept["reason"] and "owner, permissions or attributes" in kept["action"]
