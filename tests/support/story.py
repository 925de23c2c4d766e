"""A real ``Service`` over its own folders, the real embedded PostgreSQL and the tiny model, driven
in-process on a fake clock (``story_factory``): what the service-loop stories share."""

from __future__ import annotations

import json
import os
import queue
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from image_search.config import Config, load_config
from image_search.mounts import MOUNT_RECORD
from image_search.names import unescape
from image_search.notify import Notifier
from image_search.preprocess import thumbnail_path_for
from image_search.runtime import Runtime, prepare_folders
from image_search.service import Service, StopFlag
from image_search.store import Database
from image_search.sync import SOURCE_MARKER, claim_processed_folder
from image_search.watch import Change, ChangeKind, Folder
from tests.support.clock import FakeClock
from tests.support.db import Row, database_rows, raw, rows_by_path
from tests.support.files import save_picture, write_config, written_into
from tests.support.model import TINY_DIMENSION

TOP_K = 3
SETTLE = 0.3
REPORT_WAIT_S = 60.0


class RecordingNotifier(Notifier):
    """sd_notify as a list: what the service would have told systemd, in order."""

    def __init__(self, output: Path) -> None:
        super().__init__(environ={})
        self.output = output
        self.sent: list[tuple[str, ...]] = []
        self.bundles_at_ready: list[str] | None = None

    def send(self, *fields: str) -> bool:
        if "READY=1" in fields:
            self.bundles_at_ready = [p.name for p in written_into(self.output) if not p.name.startswith(".")]
        self.sent.append(fields)
        return True


@dataclass
class Story:
    """One service over its own folders and database, and the handles a test drives it with."""

    cfg: Config
    database: Database
    service: Service
    changes: queue.SimpleQueue[Change]
    clock: FakeClock
    notifier: RecordingNotifier

    @property
    def images(self) -> Path:
        return self.cfg.source_directory

    @property
    def inbox(self) -> Path:
        return self.cfg.inbox_directory

    def notice(self, folder: Folder, kind: ChangeKind, path: Path, *, dest: Path | None = None,
               is_directory: bool = False) -> None:
        self.changes.put(Change(folder, kind, path, is_directory, dest))

    def delete_or_rename(self, path: Path, how: str, *, to: str) -> None:
        """``how``: "deleted" (``path`` unlinked) or "renamed" (to the name ``to`` beside it); noticed."""
        if how == "deleted":
            path.unlink()
            self.notice(Folder.IMAGES, ChangeKind.DELETED, path)
        else:
            path.rename(path.with_name(to))
            self.notice(Folder.IMAGES, ChangeKind.MOVED, path, dest=path.with_name(to))

    def run_until_idle(self, passes: int = 50) -> None:
        """Step the loop, moving the clock past every settle period, until a pass finds nothing to do."""
        for _ in range(passes):
            self.clock.advance(SETTLE + 0.01)
            worked = False
            while self.service.step():
                worked = True
            report = self.service.inbox.report  # written on a thread of its own: done when it is
            if report is not None:
                assert report.wait(timeout=REPORT_WAIT_S), "the duplicates report was not written in time"
                continue
            if not worked and not len(self.service.images) and not len(self.service.inbox.pending):
                return
        raise AssertionError("the service loop did not become idle")

    def let_settle_periods_pass(self, count: int) -> None:
        """``count`` settle periods go by with nothing new: the loop looks at what is pending each time."""
        for _ in range(count):
            self.clock.advance(SETTLE + 0.01)
            while self.service.step():
                pass

    def rows(self) -> dict[str, Row]:
        return rows_by_path(database_rows(self.database))

    def copies_in_processed(self) -> set[Path]:
        """Every file in processed-directory but its record of the source folder (and of mount points)."""
        return {p for p in self.cfg.processed_directory.rglob("*")
                if p.is_file() and p.name not in (SOURCE_MARKER, MOUNT_RECORD)}

    def paths(self) -> dict[str, tuple[str, Path]]:
        """Every stored path (a content's copies too, which ``rows`` names once): its hash and processed copy."""
        return {unescape(path): (file_hash, Path(unescape(processed))) for path, file_hash, processed in
                raw(self.database, "SELECT file_path, file_hash, processed_path FROM image_paths")}

    def copies_of_rows(self) -> set[Path]:
        """The processed copy and thumbnail of each stored path: what ``copies_in_processed`` should be."""
        processed = [p for _, p in self.paths().values()]
        return {*processed, *(thumbnail_path_for(p) for p in processed)}

    def bundle(self, query_name: str) -> Path:
        stem, ext = os.path.splitext(query_name)
        found = [b for b in self.cfg.output_directory.iterdir() if (b / f"{stem}.query{ext}").is_file()]
        assert len(found) == 1, (query_name, list(self.cfg.output_directory.iterdir()))
        return found[0]

    def ask(self, name: str, source: Path) -> list[str]:
        """Drop a copy of ``source`` into the inbox as ``name``; the ranked file paths of its answer."""
        shutil.copyfile(source, self.inbox / name)
        self.notice(Folder.INBOX, ChangeKind.CLOSED, self.inbox / name)
        self.run_until_idle()
        stem = Path(name).stem
        lines = (self.bundle(name) / f"{stem}.jsonl").read_text().splitlines()
        return [json.loads(line)["file_path"] for line in lines]


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path):
    from image_search.embed import Embedder

    return Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)


@pytest.fixture
def story_factory(tmp_path: Path, tiny_model_dir: Path, embedder) -> Iterator[Any]:
    made: list[Story] = []

    def make(files: dict[str, int] | None = None, *, start: bool = True, model: Any = None,
             after: Story | None = None, **overrides: object) -> Story:
        """A service over a tree of ``files`` of its own; ``after``: the next start of that story's service,
        over its folders and database, once it has stopped as a SIGTERM stops it (``Service.close``)."""
        if after is not None:
            stop(after)
            cfg, database = after.cfg, after.database
        else:
            root = tmp_path / f"tree{len(made)}"
            cfg = load_config(write_config(root, tiny_model_dir, top_k=TOP_K, settle_seconds=SETTLE, **overrides))
            database = Database(cfg)
        for name, seed in (files or {}).items():
            save_picture(cfg.source_directory / name, seed=seed, size=(96 + 4 * seed, 72))
        prepare_folders(cfg, with_inbox=True)  # as every start does (runtime.open_runtime), and then:
        store = database.open_store(dimension=cfg.dimension, create_table=False)
        claim_processed_folder(cfg, store.sources)
        rt = Runtime(cfg, store, lambda: model or embedder)
        changes: queue.SimpleQueue[Change] = queue.SimpleQueue()
        clock = FakeClock()
        notifier = RecordingNotifier(cfg.output_directory)
        service = Service(rt, changes=changes, stop=StopFlag(), notifier=notifier, clock=clock)
        story = Story(cfg, database, service, changes, clock, notifier)
        made.append(story)
        if start:
            service.start()
            story.run_until_idle()
        return story

    stopped: set[int] = set()

    def stop(story: Story) -> None:
        if id(story) not in stopped:
            stopped.add(id(story))
            story.service.close()
            story.service.rt.store.close()

    yield make
    for story in made:
        stop(story)
    for database in {id(story.database): story.database for story in made}.values():
        database.close()
