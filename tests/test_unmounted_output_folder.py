"""output/ on a disk of its own (a USB disk, a share mounted by hand or by the desktop: in no fstab) that is not
mounted. In its place is the empty mount point on the disk under it, or no folder at all where the desktop
removed its mount point with the disk. Nothing told the service: results were written there, and each query
dropped into the inbox moved into its result, on the wrong disk, hidden under the mount once the disk was back.
The output folder's marker (``OUTPUT_MARKER``, written with its first result) is on the disk with the results;
the folders this installation wrote results into are remembered in state-directory. A folder written into
before that now looks as an unmounted disk's does takes no result: the queries wait in the inbox, said once,
until it is back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.errors import OutputUnwritable
from image_search.output import OUTPUT_CLAIMS_RECORD, OUTPUT_MARKER, make_output_folder, prepare_output_folder
from image_search.config import Config
from image_search.watch import ChangeKind, Folder
from tests.support.files import inbox_files, written_into

AWAY = "but this installation wrote its results there before"


def drop_query(story, name: str) -> Path:
    query = story.inbox / name
    shutil.copyfile(story.images / "a.png", query)
    story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    return query


@pytest.mark.integration
def test_a_query_waits_in_the_inbox_while_the_output_folders_disk_is_not_mounted(story_factory) -> None:
    story = story_factory({"a.png": 1})
    output = story.cfg.output_directory
    story.ask("first.png", story.images / "a.png")
    on_disk = written_into(output)
    assert (output / OUTPUT_MARKER).is_file() and len(on_disk) == 1
    disk = output.with_name("usb-disk")
    output.rename(disk)  # "unmounted"
    output.mkdir()  # its mount point, empty, on the disk under it

    query = drop_query(story, "second.png")
    with capture_logs() as logs:
        story.let_settle_periods_pass(6)
    assert inbox_files(story.inbox) == ["second.png"] and query.read_bytes() == (story.images / "a.png").read_bytes()
    assert list(output.iterdir()) == []  # nothing written onto the disk under the mount point
    (waiting,) = [e for e in logs if e["event"] == "output_unwritable" and e["log_level"] == "warning"]
    assert f"cannot write results into {output}: it is empty, {AWAY}" in waiting["reason"]
    assert "its disk is not mounted" in waiting["reason"]
    assert f"mkdir -p {output} && touch {output / OUTPUT_MARKER}" in waiting["reason"]
    assert not [e for e in logs if e["event"] in ("query_failed", "query_crashed")]

    output.rmdir()
    disk.rename(output)  # mounted again
    story.clock.advance(30)  # the outage's retry is due
    story.run_until_idle()
    assert inbox_files(story.inbox) == []
    assert (story.bundle("second.png") / "second.jsonl").is_file()
    assert [p.name for p in written_into(output)][:1] == [on_disk[0].name] and len(written_into(output)) == 2


@pytest.mark.integration
def test_a_start_with_the_output_folders_mount_point_gone_makes_nothing_and_answers_once_it_is_back(
        story_factory, tmp_path) -> None:
    """A desktop mounts a USB disk at /media/<user>/<label> and removes that folder with the disk: the output
    folder then is not there, nor the folder above it. Made again by the start (``mkdir -p``), it would hold
    the disk's mount point, and the desktop would mount the disk at another name once plugged in."""
    media = tmp_path / "media"
    story = story_factory({"a.png": 1}, output_directory=str(media / "usb" / "results"))
    story.ask("first.png", story.images / "a.png")
    media.joinpath("usb").rename(tmp_path / "usb-disk")  # unplugged: media/ is empty

    with capture_logs() as logs:
        again = story_factory(after=story)
    (said,) = [e for e in logs if e["event"] == "output_folder_away"]
    assert f"cannot write results into {media / 'usb' / 'results'}: it is not there, {AWAY}" in said["detail"]
    drop_query(again, "second.png")
    again.let_settle_periods_pass(6)
    assert inbox_files(again.inbox) == ["second.png"] and list(media.iterdir()) == []

    (tmp_path / "usb-disk").rename(media / "usb")  # plugged in again
    again.clock.advance(30)
    again.run_until_idle()
    assert inbox_files(again.inbox) == [] and len(written_into(media / "usb" / "results")) == 2


# The choices a start and each result make, one by one (no service, no database).

def config(tmp_path: Path, output: Path) -> Config:
    (tmp_path / "state").mkdir(exist_ok=True)
    return Config(output_directory=output, state_directory=tmp_path / "state")


def used_before(tmp_path: Path, output: Path) -> Config:
    """A config whose output folder took a result before, and is now as the test leaves it."""
    cfg = config(tmp_path, output)
    make_output_folder(output, cfg.state_directory)
    assert (output / OUTPUT_MARKER).is_file()
    return cfg


@pytest.mark.unit
def test_a_first_use_makes_and_marks_the_folder_and_remembers_it(tmp_path) -> None:
    output = tmp_path / "a" / "b" / "output"
    cfg = used_before(tmp_path, output)
    assert (cfg.state_directory / OUTPUT_CLAIMS_RECORD).read_text() == f'[["{output}"]]\n'
    make_output_folder(output, cfg.state_directory)  # again: as it was
    assert (cfg.state_directory / OUTPUT_CLAIMS_RECORD).read_text() == f'[["{output}"]]\n'


@pytest.mark.unit
@pytest.mark.parametrize("gone", ["emptied", "parent-emptied", "parent-gone"])
def test_a_folder_written_into_before_that_looks_unmounted_takes_nothing(tmp_path, gone: str) -> None:
    output = tmp_path / "mnt" / "usb"
    cfg = used_before(tmp_path, output)
    shutil.rmtree(output if gone == "emptied" else output.parent)
    if gone == "emptied":
        output.mkdir()
    elif gone == "parent-emptied":
        output.parent.mkdir()
    with pytest.raises(OutputUnwritable, match="its disk is not mounted"):
        make_output_folder(output, cfg.state_directory)
    with capture_logs() as logs:
        prepare_output_folder(cfg)  # a start: said, and nothing made
    assert [e["event"] for e in logs] == ["output_folder_away"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        {"state", OUTPUT_CLAIMS_RECORD} | {"parent-gone": set(), "parent-emptied": {"mnt"}, "emptied": {"mnt", "usb"}}[gone])

    output.mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).touch()  # emptied on purpose: as the message says
    make_output_folder(output, cfg.state_directory)


@pytest.mark.unit
def test_a_folder_removed_by_hand_from_beside_other_files_is_made_again(tmp_path) -> None:
    output = tmp_path / "home" / "output"
    cfg = used_before(tmp_path, output)
    (output.parent / "photos").mkdir()
    shutil.rmtree(output)
    prepare_output_folder(cfg)
    make_output_folder(output, cfg.state_directory)
    assert (output / OUTPUT_MARKER).is_file()


@pytest.mark.unit
def test_an_earlier_versions_output_folder_is_adopted(tmp_path) -> None:
    output = tmp_path / "output"
    cfg = used_before(tmp_path, output)
    (output / OUTPUT_MARKER).unlink()  # as an earlier version left it: results, no marker
    (output / "20240102-030405").mkdir()
    make_output_folder(output, cfg.state_directory)
    assert (output / OUTPUT_MARKER).is_file()
