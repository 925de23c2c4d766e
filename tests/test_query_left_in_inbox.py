"""A query the service may not remove from the inbox: a shared drop folder with the sticky bit (mode 1777,
owned by someone else) lets only a file's owner remove it, and an immutable file cannot be removed at all.
The answer's last step, moving the query into its result, was refused; that was taken for an outage of
output/ ("this user may not write there: fix the folder's owner"), the query came first again at every
retry, and no later query was ever answered. Now the result holds a copy, the query stays where it is,
said once, and is answered anew only if it changes. (``chattr +i`` stands in for the sticky folder: both
refuse the unlink with EPERM.)

A real ``Service`` over the embedded PostgreSQL and the tiny model, driven in-process (``story_factory``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.watch import ChangeKind, Folder
from tests.support.files import immutable

pytestmark = pytest.mark.integration


def results(story) -> list[Path]:
    return sorted(p for p in story.cfg.output_directory.iterdir() if not p.name.startswith("."))


def answered_and_looked_at_again(story, *queries: Path) -> list[dict]:
    """The ``queries`` noticed and answered, then the inbox looked at whole (events lost), with no outage,
    failure or crash said; what was logged meanwhile."""
    for query in queries:
        story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    with capture_logs() as logs:
        story.run_until_idle()
        story.service.inbox.queue_waiting()  # events lost: the folder is looked at whole
        story.run_until_idle()
    assert not [e for e in logs if e["event"] in ("output_unwritable", "query_failed", "query_crashed")]
    return logs


def test_a_query_that_may_not_leave_the_inbox_is_answered_once_and_holds_up_no_other(story_factory) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    kept, other = story.inbox / "kept.png", story.inbox / "other.png"
    shutil.copyfile(story.images / "a.png", kept)
    shutil.copyfile(story.images / "b.png", other)
    with immutable(kept):
        logs = answered_and_looked_at_again(story, kept, other)
        bundles = {next(b.glob("*.query.png")).name: b for b in results(story)}
        assert sorted(bundles) == ["kept.query.png", "other.query.png"]  # each answered once
        assert (bundles["kept.query.png"] / "kept.query.png").read_bytes() == kept.read_bytes()  # a copy
        assert sorted(p.name for p in story.inbox.iterdir()) == ["kept.png"]  # the other one moved, as always
        (left,) = [e for e in logs if e["event"] == "query_left_in_inbox"]
        assert left["path"] == kept and left["reason"] == "Operation not permitted"
        best = json.loads((bundles["kept.query.png"] / "kept.jsonl").read_text().splitlines()[0])["file_path"]
        assert best == str(story.images / "a.png")

    shutil.copyfile(story.images / "b.png", kept)  # written again, and removable now: answered anew
    story.notice(Folder.INBOX, ChangeKind.CLOSED, kept)
    story.run_until_idle()
    assert len(results(story)) == 3 and list(story.inbox.iterdir()) == []


def test_a_duplicates_document_that_may_not_leave_the_inbox_is_reported_once(story_factory) -> None:
    story = story_factory({"a.png": 1, "b.png": 2, "c.png": 1})  # c.png: a copy of a.png
    document = story.inbox / "dups.json"
    document.write_text('{"duplicates": true}\n', encoding="utf-8")
    with immutable(document):
        logs = answered_and_looked_at_again(story, document)
        (report,) = results(story)
        assert (report / "dups.query.json").read_bytes() == document.read_bytes()
        assert [e["path"] for e in logs if e["event"] == "query_left_in_inbox"] == [document]
        assert [p.name for p in story.inbox.iterdir()] == ["dups.json"]


def test_a_query_document_whose_folder_may_not_leave_is_answered_once_and_holds_up_no_other(story_factory) -> None:
    """Its folder of pictures dropped by another user (``sudo cp -r``: the service's user may not move it), or
    copied from read-only media. The document moved into its result, the folder's move failed, the document
    went back, and the failure was taken for an outage of output/: the query was tried again for ever, ahead
    of every other. Now both stay, the result holds a copy of the document, and the next query is answered."""
    story = story_factory({"a.png": 1, "b.png": 2})
    folder = story.inbox / "album"
    folder.mkdir()
    shutil.copyfile(story.images / "b.png", folder / "x.png")
    document = story.inbox / "album.json"
    document.write_text('{"image": "x.png"}', encoding="utf-8")
    other = story.inbox / "other.png"
    shutil.copyfile(story.images / "a.png", other)
    with immutable(folder):
        logs = answered_and_looked_at_again(story, document, other)
        assert sorted(p.name for p in story.inbox.iterdir()) == ["album", "album.json"]
        assert [p.name for p in folder.iterdir()] == ["x.png"]
        bundles = {next(b.glob("*.query.*")).name: b for b in results(story)}
        assert sorted(bundles) == ["album.query.json", "other.query.png"]  # each answered once
        assert (bundles["album.query.json"] / "album.query.json").read_bytes() == document.read_bytes()
        best = json.loads((bundles["album.query.json"] / "album.jsonl").read_text().splitlines()[0])["file_path"]
        assert best == str(story.images / "b.png")
        assert [e["folder"] for e in logs if e["event"] == "query_left_in_inbox"] == [folder]
