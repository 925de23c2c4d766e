"""A ``{"duplicates": true}`` document answered by the running service (``story_factory``: the real loop,
the embedded PostgreSQL, the tiny model). The report can take minutes on a large library: the service
must stay alive for systemd all along (WATCHDOG=1), go on answering queries and indexing, and stop at
once on SIGTERM, leaving the document in the inbox for the next start and no half-written result.

The report's long step (the grouping) is slowed down by hand here: it waits until the story lets it go,
looking at the report's checkpoint meanwhile as the real grouping does."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import image_search.duplicates
from image_search.watch import ChangeKind, Folder
from tests.support.files import save_picture, written_into

pytestmark = pytest.mark.integration

WAIT_S = 20.0  # real seconds a story waits for the loop (running on its own thread) to get somewhere
HELD_S = 10.0  # the longest the grouping is held: what the loop does meanwhile must be done by then


class SlowGrouping:
    """``duplicates.find_groups``, held until ``let_go`` (or ``held_for_s`` at most), calling the report's
    checkpoint meanwhile; ``stopped`` once the checkpoint ended it."""

    def __init__(self, held_for_s: float) -> None:
        self.held_for_s = held_for_s
        self.started = threading.Event()
        self.released = threading.Event()
        self.stopped = threading.Event()
        self.finished = threading.Event()
        self._find_groups = image_search.duplicates.find_groups

    def __call__(self, *args, **kwargs):
        checkpoint = kwargs.get("checkpoint", lambda: None)
        self.started.set()
        deadline = time.monotonic() + self.held_for_s
        while not self.released.is_set() and time.monotonic() < deadline:
            try:
                checkpoint()
            except BaseException:
                self.stopped.set()
                raise
            time.sleep(0.01)
        self.finished.set()
        return self._find_groups(*args, **kwargs)

    def let_go(self) -> None:
        self.released.set()


class LoopThread:
    """``Service._loop`` (what ``run`` does once ready) on a thread of its own, the fake clock ticking a
    second every 20 ms of real time, so that the loop's pings, settle periods and idle waits go by."""

    def __init__(self, story) -> None:
        self.story = story
        self.thread = threading.Thread(target=story.service._loop, name="service-loop", daemon=True)
        self._ticking = True
        self._ticker = threading.Thread(target=self._tick, name="clock", daemon=True)

    def _tick(self) -> None:
        while self._ticking:
            self.story.clock.advance(1.0)
            time.sleep(0.02)

    def __enter__(self) -> LoopThread:
        self._ticker.start()
        self.thread.start()
        return self

    def stop(self) -> None:
        """A stop asked for (as SIGTERM does), and the loop waited for."""
        self.story.service.stop.set()
        self.thread.join(timeout=WAIT_S)

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.story.service.stop.set()
            self.thread.join(timeout=WAIT_S)
        self._ticking = False
        self._ticker.join()


def pings(story) -> int:
    return sum(1 for fields in story.notifier.sent if "WATCHDOG=1" in fields)


def during(grouping: SlowGrouping, condition, what: str) -> None:
    """``condition`` comes true while the grouping is still held."""
    while not condition():
        assert not grouping.finished.is_set(), f"only once the report's grouping was done: {what}"
        time.sleep(0.02)


def drop(story, name: str, content: str) -> Path:
    path = story.inbox / name
    path.write_text(content, encoding="utf-8")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, path)
    return path


def results(story) -> list[Path]:
    return written_into(story.cfg.output_directory)


def test_a_long_report_keeps_the_watchdog_fed_answers_queries_indexes_and_ends_at_a_stop(
        story_factory, monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # systemd's watchdog: a ping due every second
    story = story_factory({"a.png": 1, "b.png": 2})
    grouping = SlowGrouping(held_for_s=HELD_S)
    monkeypatch.setattr(image_search.duplicates, "find_groups", grouping)
    document = drop(story, "dupes.json", json.dumps({"duplicates": True}))
    with LoopThread(story) as loop:
        assert grouping.started.wait(WAIT_S), "the report never began"
        before = pings(story)
        # While the report is held: a second of the fake clock goes by every 20 ms, a ping is due each.
        during(grouping, lambda: pings(story) >= before + 3, "the watchdog pinged three times")
        drop(story, "red.txt", "red")
        during(grouping, lambda: any((r / "red.query.txt").is_file() for r in results(story)),
               "a text query answered")
        save_picture(story.images / "c.png", seed=3, size=(108, 72))
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / "c.png")
        during(grouping, lambda: str(story.images / "c.png") in story.rows(), "a new picture indexed")
        loop.stop()
    story.service.close()
    # Ended by the stop, at a checkpoint: not by waiting for the grouping to run out its HELD_S (no timing asserted).
    assert not loop.thread.is_alive(), "the loop never ended"
    assert not grouping.finished.is_set(), "the stop waited for the report's grouping to end"
    assert grouping.stopped.is_set(), "the report went on after the stop"
    assert document.is_file(), "the document stays in the inbox for the next start"
    assert [r.name for r in results(story) if not any(r.glob("red.*"))] == []  # no report, whole or half

    # The next start answers it.
    grouping.let_go()
    again = story_factory(after=story)
    assert not document.exists()
    (report,) = [r for r in results(again) if (r / "dupes.query.json").is_file()]
    assert json.loads((report / "summary.json").read_text())["pictures"] == 3


def test_a_report_whole_before_the_stop_reached_it_is_answered_not_said_to_be_stopped(story_factory) -> None:
    """The report's thread moved the document into its folder; the stop came before the loop looked."""
    story = story_factory({"a.png": 1, "b.png": 2})
    document = drop(story, "dupes.json", json.dumps({"duplicates": True}))
    for _ in range(50):  # the loop's passes, the clock past each settle period, until the report begins
        if story.service.inbox.report is not None:
            break
        story.clock.advance(5)
        story.service.step()
    report = story.service.inbox.report
    assert report.wait(WAIT_S) and report.written
    with capture_logs() as logs:
        story.service.close()
    events = [e["event"] for e in logs]
    assert "duplicates_report_stopped" not in events, events
    assert not document.exists()
    (folder,) = [r for r in results(story) if (r / "dupes.query.json").is_file()]
    assert json.loads((folder / "summary.json").read_text())["pictures"] == 2


def test_a_duplicates_document_written_again_while_its_report_is_made_is_answered_anew(story_factory,
                                                                                       monkeypatch) -> None:
    """The report keeps what asked for it; the document, now a search, stays and is answered after it (it was
    answered at once and moved away, and the report then failed on its missing document)."""
    story = story_factory({"a.png": 1, "b.png": 2})
    grouping = SlowGrouping(held_for_s=HELD_S)
    monkeypatch.setattr(image_search.duplicates, "find_groups", grouping)
    asked = json.dumps({"duplicates": True})
    document = drop(story, "dupes.json", asked)
    with LoopThread(story) as loop:
        assert grouping.started.wait(WAIT_S), "the report never began"
        with capture_logs() as logs:
            drop(story, "dupes.json", json.dumps({"text": "a red bicycle and more"}))  # longer: another file
            time.sleep(0.5)  # the loop's passes meanwhile (the fake clock ticks)
            assert document.is_file() and not any(r.glob("dupes.*") for r in results(story))
            grouping.let_go()
            during_loop = time.monotonic() + WAIT_S
            while len([r for r in results(story) if any(r.glob("dupes.*"))]) < 2:
                assert time.monotonic() < during_loop, "the report and the search were not both written"
                time.sleep(0.05)
        loop.stop()
    assert "query_crashed" not in [e["event"] for e in logs]
    (report,) = [r for r in results(story) if (r / "summary.json").is_file()]
    assert (report / "dupes.query.json").read_text(encoding="utf-8") == asked
    (search,) = [r for r in results(story) if (r / "dupes.jsonl").is_file()]
    assert json.loads((search / "dupes.query.json").read_text(encoding="utf-8")) == {"text": "a red bicycle and more"}
    assert not document.exists()


def test_a_report_a_full_disk_holds_up_is_begun_once_in_the_log_and_written_once_there_is_room(story_factory) -> None:
    """output/ full: the report is begun again at each retry of the outage, and each said
    ``duplicates_report_begun`` at info (six lines in 35 s, two a minute after that, all night long)."""
    from tests.support.failures import small_disk

    story = story_factory({"a.png": 1, "b.png": 2})
    with small_disk(story.cfg.output_directory, size="64k"):
        filler = story.cfg.output_directory / ".filler"
        filler.write_bytes(b"\0" * 64 * 1024)
        document = drop(story, "dupes.json", json.dumps({"duplicates": True}))
        with capture_logs() as logs:
            for _ in range(4):  # the outage's retries: 1, 2, 4 and 8 s of the fake clock apart
                story.let_settle_periods_pass(2)
                if story.service.inbox.report is not None:  # written on its thread: failed when it is done
                    assert story.service.inbox.report.wait(timeout=WAIT_S)
                story.let_settle_periods_pass(2)
                story.clock.advance(10)
            begun = [e["log_level"] for e in logs if e["event"] == "duplicates_report_begun"]
            assert len([e for e in logs if e["event"] == "output_unwritable" and e["log_level"] == "warning"]) == 1
            filler.unlink()
            story.clock.advance(30)
            story.run_until_idle()
        # Begun again at each retry (at debug: not seen where the run's log level hides it), said once.
        assert [level for level in begun if level != "debug"] == ["info"]
        assert not document.exists()
        (report,) = [r for r in results(story) if (r / "dupes.query.json").is_file()]
        assert json.loads((report / "summary.json").read_text())["pictures"] == 2
