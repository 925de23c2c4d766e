"""A query file written again under the same name while the service answers it (a script that drops its
queries under one fixed name does it easily: the answer takes tens of ms). The result holds the query
that was answered, never the new content, and the new content is answered too, in a result of its own.

A real ``Service`` over the embedded PostgreSQL and the tiny model, driven in-process
(``story_factory``); the rewrite happens at the exact moment between reading the query and writing its
result (the one call between them is wrapped), as the second ``echo > inbox/q.txt`` or ``cp`` would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

import image_search.search
from image_search.preprocess import processed_path_for
from image_search.watch import ChangeKind, Folder

pytestmark = pytest.mark.integration


def rewrite_while_answered(monkeypatch, rewrite: Callable[[], None]) -> None:
    """``rewrite`` runs once, after the first query is read and searched, before its result is written.
    No watcher event is sent for it: the loop must not need one to see the query again."""
    write_result_bundle = image_search.search.write_result_bundle
    pending = [rewrite]

    def rewritten_first(*args, **kwargs):
        while pending:
            pending.pop()()
        return write_result_bundle(*args, **kwargs)

    monkeypatch.setattr(image_search.search, "write_result_bundle", rewritten_first)


def results(story) -> list[Path]:
    return sorted(p for p in story.cfg.output_directory.iterdir() if not p.name.startswith("."))


def best_match(bundle: Path, stem: str) -> str:
    return json.loads((bundle / f"{stem}.jsonl").read_text().splitlines()[0])["file_path"]


def test_a_text_query_written_again_while_answered_is_answered_again(story_factory, monkeypatch) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    query = story.inbox / "ow.txt"
    query.write_text("alpha 4\n", encoding="utf-8")
    rewrite_while_answered(monkeypatch, lambda: query.write_text("beta 4 (written again)\n", encoding="utf-8"))
    story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    with capture_logs() as logs:
        story.run_until_idle()

    answered = {json.loads((b / "ow.json").read_text(encoding="utf-8"))["query-text"]: b for b in results(story)}
    assert set(answered) == {"alpha 4", "beta 4 (written again)"}
    # Each result holds the query it answered.
    assert (answered["alpha 4"] / "ow.query.txt").read_text(encoding="utf-8") == "alpha 4\n"
    assert (answered["beta 4 (written again)"] / "ow.query.txt").read_text(encoding="utf-8") == "beta 4 (written again)\n"
    assert list(story.inbox.iterdir()) == [] and story.service.inbox.answered == 2
    (changed,) = [e for e in logs if e["event"] == "query_changed_while_answered"]
    assert changed["path"] == query


def test_a_picture_query_copied_over_while_answered_is_answered_again(story_factory, monkeypatch) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    a, b = story.images / "a.png", story.images / "b.png"
    assert a.stat().st_size != b.stat().st_size  # apart by size, whatever the file clock's tick
    query = story.inbox / "owi.png"
    shutil.copyfile(a, query)
    rewrite_while_answered(monkeypatch, lambda: shutil.copyfile(b, query))  # cp onto it: the same inode, new bytes
    story.notice(Folder.INBOX, ChangeKind.CLOSED, query)
    story.run_until_idle()

    answered = {best_match(bundle, "owi"): bundle for bundle in results(story)}
    assert set(answered) == {str(a), str(b)}
    first, second = answered[str(a)], answered[str(b)]
    # The first answer holds the picture it searched (as processed: its original bytes were not kept).
    assert (first / "owi.query.jpg").is_file() and not (first / "owi.query.png").exists()
    kept = pixels(first / "owi.query.jpg")
    assert distance(kept, pixels(processed(story, a))) < distance(kept, pixels(processed(story, b)))
    # The new content is answered as any query: the file itself moves into its result.
    assert (second / "owi.query.png").read_bytes() == b.read_bytes()
    assert list(story.inbox.iterdir()) == [] and story.service.inbox.answered == 2


def processed(story, source: Path) -> Path:
    return processed_path_for(source, story.cfg.source_directory, story.cfg.processed_directory)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((48, 36)), dtype=np.float64)


def distance(one: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(one - other).mean())
