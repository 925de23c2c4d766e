"""Text and phone-format searches end to end: the tiny model, the real embedded PostgreSQL, real bundles.

- HEIC (made by pillow-heif) and AVIF pictures are indexed and queried through the real console script;
- text queries (typed, Japanese, and a dropped ``.txt`` moved into its bundle) go through
  ``search_text`` with the real model and store, and their contact sheets are read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.support import warm
from tests.support.env import child_env
from tests.support.files import write_config, written_into
from tests.support.model import TINY_DIMENSION
from image_search.config import Config, load_config
from image_search.embed import Embedder
from image_search.preprocess import preprocess_image, processed_path_for, save_processed
from image_search.search import search_text
from image_search.sheet import cell_box
from image_search.store import Database, EmbeddingRow, EmbeddingStore
from image_search.textquery import read_text_query

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "image-search"
COLOURS = {"red.png": (220, 30, 30), "green.heic": (30, 180, 60), "blue.avif": (40, 60, 220),
           "夕焼け.jpg": (250, 150, 20)}


def picture(colour: tuple[int, int, int], size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A flat colour with a white disc: the disc keeps the tiny model's vectors apart from pure fills."""
    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).ellipse([size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4], fill=(255, 255, 255))
    return im


def save_any(im: Image.Image, path: Path) -> Path:
    fmt = {".heic": "HEIF", ".avif": "AVIF"}.get(path.suffix.lower())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, quality=90)
    return path


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 30) -> bool:
    return all(abs(int(a) - int(e)) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- HEIC and AVIF through the console script ---------------------------------------------------------------


def test_heic_and_avif_are_indexed_and_answer_as_queries(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, top_k=4)
    for name, colour in COLOURS.items():
        save_any(picture(colour), tmp_path / "images" / name)
    queries = [save_any(picture(COLOURS["green.heic"]), tmp_path / "q-green.heic"),
               save_any(picture(COLOURS["blue.avif"]), tmp_path / "q-blue.avif")]
    # Forked from the session's warm parent (tests/support/warm.py): the console script's main() as a fresh
    # run does it, without paying the torch import again (a cold run cost this test ~45 s of its 48).
    run = warm.run([str(CLI), "search", "--config", str(config), *map(str, queries)], cwd=tmp_path, env=child_env(),
                   capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    bundles = written_into(tmp_path / "output")
    assert len(bundles) == 2
    for query, expected in zip(queries, ["green.heic", "blue.avif"], strict=True):
        (bundle,) = [b for b in bundles if (b / f"{query.stem}.jsonl").exists()]
        hits = [json.loads(line) for line in (bundle / f"{query.stem}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert {h["file_name"] for h in hits} == set(COLOURS)  # all four formats are in the index
        assert hits[0]["file_name"] == expected and hits[0]["similarity"] > 0.99
        assert (bundle / f"{query.stem}.sheet.jpg").exists()
        with Image.open(hits[0]["processed_path"]) as processed:  # the processed copy is a JPEG, right way up
            assert processed.format == "JPEG" and processed.size == (160, 120)
            assert near(processed.convert("RGB").getpixel((8, 8)), COLOURS[expected])


# --- text queries through search_text, the real model and store --------------------------------------------


@dataclass(frozen=True)
class Tree:
    root: Path
    cfg: Config
    embedder: Embedder
    store: EmbeddingStore


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Tree]:
    root = tmp_path_factory.mktemp("text-search")
    cfg = load_config(write_config(root, tiny_model_dir, top_k=3))
    embedder = Embedder.load(cfg.model_name, device="cpu", dimension=TINY_DIMENSION)
    database = Database(cfg)
    store = database.open_store(dimension=TINY_DIMENSION)
    store.clear()
    rows = []
    for name, colour in COLOURS.items():
        source = save_any(picture(colour), cfg.source_directory / name)
        prepared = preprocess_image(source, max_size=(cfg.resize_width, cfg.resize_height),
                                    max_pixels=cfg.max_image_pixels)
        processed = processed_path_for(source, cfg.source_directory, cfg.processed_directory)
        save_processed(prepared, processed)
        stat = source.stat()
        rows.append(EmbeddingRow(str(source), name, prepared.file_hash, str(processed), stat.st_size,
                                 stat.st_mtime_ns, cfg.model_name, embedder.embed_images([prepared.image])[0]))
    store.upsert(rows)
    try:
        yield Tree(root, cfg, embedder, store)
    finally:
        store.clear()
        store.close()
        database.close()


def expected_ranking(tree: Tree, text: str) -> list[str]:
    """The ranking by cosine similarity computed here, independently of the database."""
    query = tree.embedder.embed_texts([text])[0]
    names = list(COLOURS)
    images = tree.embedder.embed_images([picture(COLOURS[n]) for n in names])
    order = np.argsort(-(images @ query), kind="stable")
    return [names[i] for i in order[: tree.cfg.top_k]]


def test_a_typed_text_query_is_answered_with_a_full_bundle(tree: Tree) -> None:
    result = search_text("a red bicycle", cfg=tree.cfg, embedder=tree.embedder, store=tree.store)
    assert result.query_path is None and result.query_text == "a red bicycle"
    assert [h.file_name for h in result.hits] == expected_ranking(tree, "a red bicycle")
    bundle = result.bundle
    assert sorted(p.name for p in bundle.iterdir()) == [
        "a-red-bicycle.jpg", "a-red-bicycle.json", "a-red-bicycle.jsonl", "a-red-bicycle.query.txt",
        "a-red-bicycle.sheet.jpg"]
    assert json.loads((bundle / "a-red-bicycle.json").read_text(encoding="utf-8"))["query-text"] == "a red bicycle"
    best = result.hits[0]
    assert (bundle / "a-red-bicycle.jpg").read_bytes() == Path(best.processed_path).read_bytes()
    with Image.open(bundle / "a-red-bicycle.sheet.jpg") as sheet:
        sheet = sheet.convert("RGB")
        assert sheet.size == (1160, 380)  # the query and three hits in one row
        left, top, right, bottom = cell_box(1, 4)
        # The first hit's cell shows the best match (160x120, never enlarged, centred in its square):
        # its colour near the picture's top-left corner (the disc in the middle is white).
        corner = ((left + right) // 2 - 80 + 6, (top + bottom) // 2 - 60 + 6)
        assert near(sheet.getpixel(corner), COLOURS[best.file_name])
        assert sheet.getpixel((left + 3, top + 3)) == (255, 255, 255)  # outside the picture: the cell


def test_a_japanese_text_query(tree: Tree) -> None:
    result = search_text("赤い自転車", cfg=tree.cfg, embedder=tree.embedder, store=tree.store)
    assert [h.file_name for h in result.hits] == expected_ranking(tree, "赤い自転車")
    assert (result.bundle / "赤い自転車.sheet.jpg").exists()
    assert (result.bundle / "赤い自転車.query.txt").read_text(encoding="utf-8") == "赤い自転車\n"


def test_a_dropped_text_file_moves_into_its_bundle(tree: Tree) -> None:
    dropped = tree.cfg.inbox_directory / "bike.txt"
    dropped.write_text("  a red bicycle\n", encoding="utf-8")
    text = read_text_query(dropped)
    result = search_text(text, cfg=tree.cfg, embedder=tree.embedder, store=tree.store, source_path=dropped,
                         move_query=True)
    assert not dropped.exists()
    assert sorted(p.name for p in result.bundle.iterdir()) == [
        "bike.jpg", "bike.json", "bike.jsonl", "bike.query.txt", "bike.sheet.jpg"]
    assert (result.bundle / "bike.query.txt").read_text(encoding="utf-8") == "  a red bicycle\n"  # the file as dropped
    assert json.loads((result.bundle / "bike.json").read_text(encoding="utf-8"))["query-text"] == "a red bicycle"


def test_the_prompt_takes_words_that_name_no_file(tree: Tree, monkeypatch, capsys) -> None:
    from image_search.cli import interactive
    from image_search.indexer import Indexer
    from image_search.runtime import Runtime

    lines = iter(["a red bicycle", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    indexer = Indexer(tree.cfg, tree.embedder, tree.store, workers=0)
    try:
        assert interactive(Runtime(tree.cfg, tree.store, lambda: tree.embedder), indexer) == 0
    finally:
        indexer.close()
    out = capsys.readouterr().out
    assert "no file named 'a red bicycle': searching for pictures matching these words" in out
    bundle = Path(next(line for line in out.splitlines() if line.startswith(str(tree.cfg.output_directory))))
    assert (bundle / "a-red-bicycle.query.txt").read_text(encoding="utf-8") == "a red bicycle\n"
