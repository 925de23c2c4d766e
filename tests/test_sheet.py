"""The contact sheet and the result bundles that carry it, read back as a person would look at them.

Processed images here are flat colours, so "this cell shows the best match" is a pixel check on the
saved JPEG, and "the aspect ratio is kept" is the shape of the coloured area inside a cell.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path
from stat import S_IMODE

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

from image_search import output as output_module
from image_search import sheet as sheet_module
from image_search.config import Config
from image_search.errors import OutputUnwritable
from image_search.output import DocumentQuery, ImageQuery, TextQuery, text_query_stem, write_result_bundle
from image_search.query import Completeness, Filters, QueryRecord, QuerySpec, Term, TermKind
from image_search.preprocess import thumbnail_path_for
from image_search.sheet import CELL_HEIGHT, CELL_WIDTH, GAP, HEADING_HEIGHT, THUMB, cell_box, render_contact_sheet
from image_search.hits import Hit
from tests.support.failures import a_folder_move_that_stops_part_way, moves_as_onto_another_filesystem
from tests.support.privileges import give_to_unprivileged, reachable_dir, unprivileged
from tests.support.files import written_into

RED, GREEN, BLUE, ORANGE = (220, 30, 30), (30, 180, 60), (40, 60, 220), (250, 150, 20)


def processed(tmp_path: Path, name: str, colour: tuple[int, int, int], size: tuple[int, int] = (400, 300)) -> Path:
    path = tmp_path / "processed" / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def hit(rank: int, name: str, path: Path, similarity: float = 0.9) -> Hit:
    return Hit(rank, similarity - rank / 100, name, f"/photos/{name}", str(path), f"hash{rank}")


def near(actual: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 24) -> bool:
    return all(abs(int(a) - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def centre(sheet: Image.Image, index: int, cells: int) -> tuple[int, ...]:
    left, top, right, bottom = cell_box(index, cells)
    return sheet.getpixel(((left + right) // 2, (top + bottom) // 2))


def coloured_extent(sheet: Image.Image, index: int, cells: int, colour: tuple[int, int, int]) -> tuple[int, int]:
    """Width and height of the area of ``colour`` inside cell ``index``'s picture square."""
    square = np.asarray(sheet.crop(cell_box(index, cells)).convert("RGB"), dtype=np.int16)
    mask = (np.abs(square - np.array(colour)) <= 40).all(axis=2)
    ys, xs = np.nonzero(mask)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def sheet_size(cells: int) -> tuple[int, int]:
    columns = min(5, cells)
    rows = -(-cells // columns)
    return GAP + columns * (CELL_WIDTH + GAP), HEADING_HEIGHT + rows * (CELL_HEIGHT + GAP)


# --- the sheet ----------------------------------------------------------------------------------------------


def test_cells_hold_the_query_then_the_hits_in_rank_order(tmp_path: Path) -> None:
    hits = [hit(1, "red.jpg", processed(tmp_path, "red", RED)), hit(2, "green.jpg", processed(tmp_path, "green", GREEN)),
            hit(3, "blue.jpg", processed(tmp_path, "blue", BLUE))]
    sheet = render_contact_sheet(hits, query_name="query.png", query_picture=Image.new("RGB", (300, 300), ORANGE))
    assert sheet.size == sheet_size(4) == (1160, 380)
    assert near(centre(sheet, 0, 4), ORANGE)
    assert [near(centre(sheet, i, 4), c) for i, c in enumerate([RED, GREEN, BLUE], start=1)] == [True] * 3


def test_a_stored_thumbnail_is_what_the_cell_shows(tmp_path: Path) -> None:
    """The indexer stores a small copy beside each processed JPEG; the sheet reads that one (fast), and
    the processed JPEG only where no thumbnail exists."""
    with_thumb = processed(tmp_path, "with-thumb", RED)
    Image.new("RGB", (64, 48), GREEN).save(thumbnail_path_for(with_thumb), format="JPEG")
    without = processed(tmp_path, "without", BLUE)
    sheet = render_contact_sheet([hit(1, "a.jpg", with_thumb), hit(2, "b.jpg", without)], query_name="q.png",
                                 query_picture=Image.new("RGB", (300, 300), ORANGE))
    assert near(centre(sheet, 1, 3), GREEN) and near(centre(sheet, 2, 3), BLUE)


def test_eleven_cells_wrap_into_rows_of_five(tmp_path: Path) -> None:
    colours = [tuple(int(v) for v in np.random.default_rng(i).integers(0, 256, 3)) for i in range(10)]
    hits = [hit(i + 1, f"p{i}.jpg", processed(tmp_path, f"p{i}", c)) for i, c in enumerate(colours)]
    path = tmp_path / "q.sheet.jpg"
    sheet_module.save_contact_sheet(render_contact_sheet(hits, query_name="q.jpg", query_text="q"), path)
    with Image.open(path) as saved:  # read back from the JPEG, as a viewer would
        assert saved.format == "JPEG" and saved.size == sheet_size(11) == (1448, 1060)
        saved = saved.convert("RGB")
        for rank, colour in enumerate(colours, start=1):
            assert near(centre(saved, rank, 11), colour), rank


def test_a_top_k_of_a_thousand_is_a_sheet_of_the_first_hits_and_how_many_more(tmp_path: Path, cfg: Config) -> None:
    """top-k may be 1,000: a sheet of all of them was 65,980 px high, more than a JPEG holds, and the query
    failed. The sheet shows the first 98 and a cell saying how many more the .jsonl holds, which has all."""
    red = processed(tmp_path, "red", RED)
    hits = [hit(rank, f"p{rank}.jpg", red, similarity=2.0) for rank in range(1, 1001)]
    bundle = write_result_bundle(cfg.output_directory, TextQuery("everything"), hits, cfg)
    assert len((bundle / "everything.jsonl").read_text().splitlines()) == 1000
    with Image.open(bundle / "everything.sheet.jpg") as sheet:
        assert sheet.size == sheet_size(100)
        assert near(centre(sheet.convert("RGB"), 98, 100), RED)
        assert not near(centre(sheet.convert("RGB"), 99, 100), RED)  # the last cell: "902 more hits"


def test_a_caption_with_folders_keeps_its_end_which_tells_copies_apart() -> None:
    """Copies that share a name are captioned with their folders (the duplicates report); shortened in the
    middle, 'Trip to the mountains 2023/IMG_0001.jpg' and '... 2023 copy/IMG_0001.jpg' read the same."""
    width = CELL_WIDTH - 2 * sheet_module.PADDING
    shown = [sheet_module._fit_end(f"Trip to the mountains 2023{suffix}/IMG_0001.jpg", sheet_module._CAPTION, width)
             for suffix in ("", " copy")]
    assert shown[0] != shown[1] and all(s.startswith("…") for s in shown)
    assert shown[1].endswith("copy/IMG_0001.jpg") and shown[0].endswith("2023/IMG_0001.jpg")


def test_aspect_ratios_are_kept(tmp_path: Path) -> None:
    wide = processed(tmp_path, "wide", RED, size=(800, 200))
    tall = processed(tmp_path, "tall", BLUE, size=(150, 600))
    sheet = render_contact_sheet([hit(1, "wide.jpg", wide), hit(2, "tall.jpg", tall)], query_name="q", query_text="q")
    width, height = coloured_extent(sheet, 1, 3, RED)
    assert width == THUMB and abs(height - THUMB / 4) <= 2
    width, height = coloured_extent(sheet, 2, 3, BLUE)
    assert height == THUMB and abs(width - THUMB / 4) <= 2


def test_a_missing_processed_image_is_a_placeholder_cell_not_a_crash(tmp_path: Path) -> None:
    present = processed(tmp_path, "green", GREEN)
    sheet = render_contact_sheet([hit(1, "gone.jpg", tmp_path / "processed" / "gone.jpg"), hit(2, "green.jpg", present)],
                                 query_name="q", query_text="q")
    left, top, _, _ = cell_box(1, 3)
    assert sheet.getpixel((left + 5, top + 5)) == sheet_module.PLACEHOLDER  # the centre carries its words
    assert np.asarray(sheet.crop(cell_box(1, 3)).convert("L")).min() < 160
    assert near(centre(sheet, 2, 3), GREEN)


def test_an_empty_index_gives_a_sheet_that_says_so(tmp_path: Path) -> None:
    sheet = render_contact_sheet([], query_name="q.png", query_picture=Image.new("RGB", (64, 64), ORANGE))
    assert sheet.size == sheet_size(2)
    assert near(centre(sheet, 0, 2), ORANGE)
    message = sheet.crop(cell_box(1, 2)).convert("L")
    assert message.getextrema()[0] < 160  # words are drawn on the grey placeholder


def test_japanese_korean_and_cyrillic_have_real_glyphs() -> None:
    text = "夕焼けの海辺 赤い自転車 서울 야경 Москва café"
    faces = sheet_module._faces()
    assert all(any(ord(c) in face.codepoints for face in faces) for c in text if not c.isspace())
    # Missing glyphs would all be the same box: the same characters in another order would look the same.
    forward = np.asarray(sheet_module._text_block("赤い自転車", (THUMB, THUMB)))
    backward = np.asarray(sheet_module._text_block("車転自い赤", (THUMB, THUMB)))
    assert (forward < 128).any() and not np.array_equal(forward, backward)


def ink_lines(ink: np.ndarray) -> int:
    """How many lines of text: runs of pixel rows with ink, separated by rows without."""
    inked = ink.any(axis=1)
    return int(inked[0]) + int(np.count_nonzero(inked[1:] & ~inked[:-1]))


def test_a_long_text_query_is_wrapped_inside_its_cell() -> None:
    block = sheet_module._text_block("a red bicycle leaning on a wall " * 40, (THUMB, THUMB))
    ink = np.asarray(block.convert("L")) < 128
    assert ink.any() and block.size == (THUMB, THUMB)
    # Wrapped: many lines, none running off the cell's sides (an unwrapped line, centred, would cross both).
    assert ink_lines(ink) >= 5, ink_lines(ink)
    assert not ink[:, 0].any() and not ink[:, -1].any()
    # A short query is one line.
    assert ink_lines(np.asarray(sheet_module._text_block("a red bicycle", (THUMB, THUMB)).convert("L")) < 128) == 1


def test_wrapping_breaks_at_spaces_and_inside_words_without_any_and_every_line_fits() -> None:
    style = sheet_module._Style(20, sheet_module.REGULAR, sheet_module.INK)
    width = THUMB - 4
    words = "a red bicycle leaning on a wall " * 6
    lines = sheet_module._wrap(words, style, width)
    assert len(lines) > 3 and all(sheet_module._width(line, style) <= width for line in lines)
    assert " ".join(lines) == words.strip()  # broken at spaces: no word is cut, none lost
    japanese = "夕焼けの海辺に赤い自転車が止まっている" * 4  # no spaces to break at
    lines = sheet_module._wrap(japanese, style, width)
    assert len(lines) > 1 and all(sheet_module._width(line, style) <= width for line in lines)
    assert "".join(lines) == japanese


# --- bundles ------------------------------------------------------------------------------------------------


@pytest.fixture()
def cfg(tmp_path: Path) -> Config:
    (tmp_path / "state").mkdir(exist_ok=True)
    return Config(output_directory=tmp_path / "output", state_directory=tmp_path / "state", model_name="tiny/test-model",
                  top_k=3)


def only_bundle(cfg: Config) -> Path:
    (bundle,) = written_into(cfg.output_directory)
    return bundle


def test_an_image_query_bundle_carries_its_sheet(tmp_path: Path, cfg: Config) -> None:
    query = processed(tmp_path, "query", ORANGE, size=(120, 90)).rename(tmp_path / "holiday.png.jpg")
    hits = [hit(1, "red.jpg", processed(tmp_path, "red", RED)), hit(2, "green.jpg", processed(tmp_path, "green", GREEN))]
    bundle = write_result_bundle(cfg.output_directory, query, hits, cfg)
    assert sorted(p.name for p in bundle.iterdir()) == ["holiday.png.jpg", "holiday.png.json", "holiday.png.jsonl",
                                                       "holiday.png.sheet.jpg"]
    with Image.open(bundle / "holiday.png.sheet.jpg") as sheet:
        sheet = sheet.convert("RGB")
        assert sheet.size == sheet_size(3)
        assert near(centre(sheet, 0, 3), ORANGE)  # decoded from the query file itself
        assert near(centre(sheet, 1, 3), RED)
    assert "query-text" not in json.loads((bundle / "holiday.png.json").read_text())


def test_a_typed_text_query_bundle(tmp_path: Path, cfg: Config) -> None:
    hits = [hit(1, "red.jpg", processed(tmp_path, "red", RED))]
    bundle = write_result_bundle(cfg.output_directory, TextQuery("  a red bicycle!"), hits, cfg)
    assert sorted(p.name for p in bundle.iterdir()) == [
        "a-red-bicycle.jpg", "a-red-bicycle.json", "a-red-bicycle.jsonl", "a-red-bicycle.query.txt",
        "a-red-bicycle.sheet.jpg"]
    settings = json.loads((bundle / "a-red-bicycle.json").read_text(encoding="utf-8"))
    assert settings["query-text"] == "  a red bicycle!" and settings["model-name"] == "tiny/test-model"
    assert (bundle / "a-red-bicycle.query.txt").read_text(encoding="utf-8") == "  a red bicycle!\n"
    assert json.loads((bundle / "a-red-bicycle.jsonl").read_text())["file_name"] == "red.jpg"
    with Image.open(bundle / "a-red-bicycle.sheet.jpg") as sheet:
        assert sheet.size == sheet_size(2)
        assert near(centre(sheet.convert("RGB"), 1, 2), RED)


def test_a_japanese_text_query_from_the_inbox_moves_in_beside_its_results(tmp_path: Path, cfg: Config) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    dropped = inbox / "自転車.txt"
    dropped.write_text("赤い自転車\n", encoding="utf-8")
    hits = [hit(1, "夕焼け.jpg", processed(tmp_path, "sunset", ORANGE))]
    bundle = write_result_bundle(cfg.output_directory, TextQuery("赤い自転車", dropped), hits, cfg, move_query=True)
    assert not dropped.exists()
    assert sorted(p.name for p in bundle.iterdir()) == ["自転車.jpg", "自転車.json", "自転車.jsonl", "自転車.query.txt",
                                                       "自転車.sheet.jpg"]
    assert (bundle / "自転車.query.txt").read_text(encoding="utf-8") == "赤い自転車\n"
    assert json.loads((bundle / "自転車.json").read_text(encoding="utf-8"))["query-text"] == "赤い自転車"


@pytest.mark.timeout(20)  # the way it went wrong: mkdir failing on a dangling link, for ever
def test_entries_of_the_users_with_a_result_folders_name_are_passed_by_never_replaced(cfg: Config) -> None:
    now = datetime(2024, 5, 6, 7, 8, 9)
    output = cfg.output_directory
    output.mkdir(parents=True, exist_ok=True)
    (output / "20240506-070809").write_text("mine\n")  # a file, a dangling link and an empty folder of the user's
    (output / "20240506-070809-2").symlink_to(output / "nowhere")
    (output / "20240506-070809-3").mkdir()
    bundle = write_result_bundle(output, TextQuery("a cat"), [], cfg, now=now)
    assert bundle.name == "20240506-070809-4"
    assert (output / "20240506-070809").read_text() == "mine\n"
    assert (output / "20240506-070809-2").is_symlink() and list((output / "20240506-070809-3").iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750)])
def test_a_result_folder_gets_the_mode_mkdir_gives_under_the_umask(cfg: Config, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        bundle = write_result_bundle(cfg.output_directory, TextQuery("a cat"), [], cfg)
    finally:
        os.umask(previous)
    assert oct(S_IMODE(bundle.stat().st_mode)) == oct(mode)


def test_a_result_a_killed_process_was_writing_is_removed_at_the_next_start_and_no_other(cfg: Config) -> None:
    """kill -9 while a result folder was being built left it in output/ for good. Its name says which
    process of which host and boot built it: one of this host whose process is gone (or of an earlier
    boot, whatever its pid is now) is removed; another host's (a fleet writing into the same folder), a
    live process's, one holding the user's query (moved in before the kill) and anything else stay."""
    output = cfg.output_directory
    output.mkdir(parents=True, exist_ok=True)
    host, boot = output_module._this_host(), output_module._this_boot()
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    gone = [output / f".tmp-result-{host}-{boot}-{no_such_pid}-a1b2c3d4",
            output / f".tmp-duplicates-{host}-{boot}-{no_such_pid}-x_9y8z7w",
            output / f".tmp-result-{host}-{'0' * 8 if boot != '0' * 8 else '1' * 8}-{os.getpid()}-q"]  # a boot ago
    kept = [output / f".tmp-result-other-host-{boot}-{no_such_pid}-a1b2c3d4",
            output / f".tmp-result-{host}-{boot}-{os.getpid()}-q", output / ".tmp-result-mine",
            output / "20260101-120000"]
    holding = output / f".tmp-result-{host}-{boot}-{no_such_pid}-held"
    for folder in (*gone, *kept, holding):
        folder.mkdir()
        (folder / "q.jsonl").write_text("{}\n")
    (holding / "holiday.query.png").write_bytes(b"the user's picture")
    with capture_logs() as logs:
        output_module.remove_abandoned(output)
    assert not any(folder.exists() for folder in gone)
    assert all(folder.is_dir() for folder in kept) and (holding / "holiday.query.png").is_file()
    assert sorted(e["path"] for e in logs if e["event"] == "abandoned_result_removed") == sorted(map(str, gone))
    assert [(e["path"], e["query"]) for e in logs if e["event"] == "abandoned_result_holds_a_query"] == [
        (str(holding), ["holiday.query.png"])]
    building = output_module.temporary_folder(output, "result")  # what a result is built in: named so
    assert building.name.startswith(f".tmp-result-{host}-{boot}-{os.getpid()}-")


def test_a_result_folder_whose_process_number_was_taken_by_a_later_process_is_the_dead_ones(cfg: Config) -> None:
    """A container restarted after a kill keeps its host name and boot, and its main process gets the dead
    one's number again: the folder was passed over as a live process's, without a line, and the query it
    held stayed hidden. A process started after the folder's last write is not its writer."""
    output = cfg.output_directory
    output.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-result-{output_module._this_host()}-{output_module._this_boot()}-{os.getpid()}"
    before_this_process = [output / f"{prefix}-old", output / f"{prefix}-held"]
    for folder in before_this_process:
        folder.mkdir()
        (folder / "q.jsonl").write_text("{}\n")
    (output / f"{prefix}-held" / "q.query.png").write_bytes(b"the user's picture")
    for folder in before_this_process:
        os.utime(folder, (1_000_000_000, 1_000_000_000))  # 2001: before this process started
    with capture_logs() as logs:
        output_module.remove_abandoned(output)
    assert not (output / f"{prefix}-old").exists() and (output / f"{prefix}-held" / "q.query.png").is_file()
    assert [e["query"] for e in logs if e["event"] == "abandoned_result_holds_a_query"] == [["q.query.png"]]


def test_an_abandoned_result_holds_a_query_by_what_was_moved_in_not_by_its_names(cfg: Config) -> None:
    """A query named ``my.query.notes.png``: every file of its result has ".query" in its name, and a folder
    killed before the query moved in was kept for ever, its advice naming the settings file as the query."""
    output = cfg.output_directory
    query = output.parent / "inbox" / "my.query.notes.png"
    query.parent.mkdir(parents=True)
    query.write_bytes(b"the user's picture")
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    prefix = f".tmp-result-{output_module._this_host()}-{output_module._this_boot()}-{no_such_pid}"
    output.mkdir(parents=True, exist_ok=True)
    before, after = output / f"{prefix}-before", output / f"{prefix}-after"
    for folder in (before, after):
        folder.mkdir()
        for suffix in (".json", ".jsonl", ".sheet.jpg"):
            (folder / f"my.query.notes{suffix}").write_text("{}\n")
    (before / ".moved-in").write_bytes(b"")  # the record a result folder gets: nothing moved in yet
    assert output_module.move_answered_query(query, after / "my.query.notes.query.png")  # then killed
    with capture_logs() as logs:
        output_module.remove_abandoned(output)
    assert not before.exists()
    assert [e["query"] for e in logs if e["event"] == "abandoned_result_holds_a_query"] == [
        ["my.query.notes.query.png"]]
    bundle = output_module.publish(after, output)  # a result once whole: the record goes, as it is published
    assert sorted(p.name for p in bundle.iterdir()) == [
        "my.query.notes.json", "my.query.notes.jsonl", "my.query.notes.query.png", "my.query.notes.sheet.jpg"]


def test_a_host_name_with_a_slash_still_names_a_folder(cfg: Config, monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "odd/host name")
    cfg.output_directory.mkdir(parents=True, exist_ok=True)
    assert output_module.temporary_folder(cfg.output_directory, "result").name.startswith(".tmp-result-odd_host_name-")


def test_an_empty_index_still_gets_a_sheet(cfg: Config) -> None:
    bundle = write_result_bundle(cfg.output_directory, TextQuery("a cat"), [], cfg)
    assert sorted(p.name for p in bundle.iterdir()) == ["a-cat.json", "a-cat.jsonl", "a-cat.query.txt", "a-cat.sheet.jpg"]
    with Image.open(bundle / "a-cat.sheet.jpg") as sheet:
        assert sheet.size == sheet_size(2)


def test_a_query_that_is_a_relative_link_still_leads_to_its_picture_from_the_result(tmp_path: Path, cfg: Config) -> None:
    """``inbox/q.png -> sub/t.png`` (a link the inbox follows): the query moved into its result as the link
    itself, which from there led nowhere."""
    picture = tmp_path / "inbox" / "sub" / "t.png"
    picture.parent.mkdir(parents=True)
    Image.new("RGB", (50, 40), RED).save(picture)
    query = tmp_path / "inbox" / "q.png"
    query.symlink_to("sub/t.png")
    hits = [hit(1, "red.jpg", processed(tmp_path, "red", RED))]
    bundle = write_result_bundle(cfg.output_directory, ImageQuery(query), hits, cfg, move_query=True)
    moved = bundle / "q.query.png"
    assert moved.is_symlink() and moved.read_bytes() == picture.read_bytes()
    assert not os.path.lexists(query) and picture.is_file()  # the link moved; the picture it leads to stays


def test_a_failed_bundle_moves_the_query_back_and_leaves_nothing(tmp_path: Path, cfg: Config, monkeypatch) -> None:
    dropped = tmp_path / "q.txt"
    dropped.write_text("a red bicycle", encoding="utf-8")
    hits = [hit(1, "red.jpg", processed(tmp_path, "red", RED))]
    real_move = output_module.move_out
    moves: list[Path] = []

    def move_then_fail(source: Path, target: Path) -> None:  # the move in succeeds, the next step fails
        real_move(source, target)
        moves.append(target)
        if len(moves) == 1:  # the move back goes through
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_module, "move_out", move_then_fail)
    with pytest.raises(OutputUnwritable, match="No space"):  # the folder named, with the fix
        write_result_bundle(cfg.output_directory, TextQuery("a red bicycle", dropped), hits, cfg, move_query=True)
    assert len(moves) == 2 and dropped.read_text(encoding="utf-8") == "a red bicycle"  # moved in, then back
    assert written_into(cfg.output_directory) == []  # no bundle, no hidden temporary folder


def test_a_query_move_is_all_or_nothing(tmp_path: Path, monkeypatch) -> None:
    """``move_out`` links, then unlinks the query: an unlink refused (a sticky inbox, an immutable file) left
    the link in the result folder beside the query, which the clean-up then could not put back (its name
    taken) and named as lost. Nor does a move ever take the place of an entry already there."""
    from image_search.output import move_out

    query, target = tmp_path / "q.png", tmp_path / "out" / "q.query.png"
    target.parent.mkdir()
    query.write_bytes(b"the user's picture")
    real_unlink = os.unlink

    def refused(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if Path(path) == query:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(output_module.os, "unlink", refused)
        with pytest.raises(PermissionError):
            move_out(query, target)
    assert query.read_bytes() == b"the user's picture" and not target.exists()
    target.write_bytes(b"another")
    with pytest.raises(FileExistsError):
        move_out(query, target)
    assert query.read_bytes() == b"the user's picture" and target.read_bytes() == b"another"


def test_a_full_disk_at_the_best_matchs_copy_is_the_result_folders_not_a_missing_picture(
        tmp_path: Path, cfg: Config, monkeypatch) -> None:
    """The best match's processed copy is there; the result folder cannot take its copy. Not
    "best_match_image_missing" at every retry of a service waiting for room: the result folder is full."""
    dropped = tmp_path / "q.txt"
    dropped.write_text("a red bicycle", encoding="utf-8")
    hits = [hit(1, "red.jpg", processed(tmp_path, "red", RED))]

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    for writer in ("copyfileobj", "_fastcopy_sendfile"):  # the disk is full whichever way the bytes go
        monkeypatch.setattr(output_module.shutil, writer, full_disk)
    with capture_logs() as logs, pytest.raises(OutputUnwritable, match="No space"):
        write_result_bundle(cfg.output_directory, TextQuery("a red bicycle", dropped), hits, cfg, move_query=True)
    assert not [e for e in logs if e["event"] == "best_match_image_missing"]
    assert dropped.exists() and written_into(cfg.output_directory) == []


def test_a_sheet_that_cannot_be_written_fails_the_bundle_before_the_query_moves(tmp_path: Path, cfg: Config,
                                                                                  monkeypatch) -> None:
    dropped = tmp_path / "q.txt"
    dropped.write_text("a red bicycle", encoding="utf-8")

    def full_disk(sheet: Image.Image, path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_module, "save_contact_sheet", full_disk)
    with pytest.raises(OutputUnwritable, match="No space"):  # the folder named, with the fix
        write_result_bundle(cfg.output_directory, TextQuery("a red bicycle", dropped), [], cfg, move_query=True)
    assert dropped.exists() and written_into(cfg.output_directory) == []


@pytest.mark.parametrize("holder", ["file", "dangling link"])
def test_an_output_folder_whose_name_a_file_or_link_holds_is_unwritable_and_keeps_the_query(
        tmp_path: Path, cfg: Config, holder: str) -> None:
    """Not an unexpected error that fails the query for good: the service stops as for a read-only
    output folder (exit 7), the query kept in the inbox, the user's entry untouched."""
    dropped = tmp_path / "q.txt"
    dropped.write_text("a red bicycle", encoding="utf-8")
    output = cfg.output_directory
    if holder == "file":
        output.write_text("mine\n")
    else:
        output.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputUnwritable, match="not a folder holds its name"):
        write_result_bundle(output, TextQuery("a red bicycle", dropped), [], cfg, move_query=True)
    assert dropped.read_text(encoding="utf-8") == "a red bicycle"
    assert output.is_symlink() or output.read_text() == "mine\n"


def document_in_inbox(tmp_path: Path) -> tuple[Path, Path, QueryRecord]:
    """``inbox/trip.json`` with its folder ``inbox/trip/`` holding one picture, and the query as understood."""
    inbox = tmp_path / "inbox"
    (inbox / "trip").mkdir(parents=True)
    given = {"image": "beach.jpg", "unlike-text": "people", "folder": "2023"}
    document = inbox / "trip.json"
    document.write_text(json.dumps(given), encoding="utf-8")
    Image.new("RGB", (40, 30), BLUE).save(inbox / "trip" / "beach.jpg")
    spec = QuerySpec(terms=(Term(TermKind.IMAGE, "beach.jpg", path=inbox / "trip" / "beach.jpg"),
                            Term(TermKind.TEXT, "people", unlike=True)), filters=Filters(folders=("2023",)))
    return document, inbox / "trip", QueryRecord(spec, Completeness(True), 3, given)


def test_a_query_document_moves_in_with_its_folder_and_records_what_was_asked(tmp_path: Path, cfg: Config) -> None:
    document, folder, asked = document_in_inbox(tmp_path)
    hits = [hit(1, "red.jpg", processed(tmp_path, "red", RED))]
    bundle = write_result_bundle(cfg.output_directory, DocumentQuery(document, folder), hits, cfg, move_query=True,
                                 asked=asked)
    assert not document.exists() and not folder.exists()  # the inbox empties itself
    assert sorted(p.name for p in bundle.iterdir()) == ["trip.jpg", "trip.json", "trip.jsonl", "trip.query",
                                                       "trip.query.json", "trip.sheet.jpg"]
    assert (bundle / "trip.query" / "beach.jpg").is_file()
    assert json.loads((bundle / "trip.query.json").read_text()) == asked.given
    recorded = json.loads((bundle / "trip.json").read_text())
    assert recorded["query"] == asked.given and recorded["complete"] is True
    assert [t["unlike"] for t in recorded["understood"]["terms"]] == [False, True]
    assert recorded["understood"]["folder"] == ["2023"]
    with Image.open(bundle / "trip.sheet.jpg") as sheet:  # the first cell shows the terms as text, not the picture
        assert not near(centre(sheet.convert("RGB"), 0, 2), BLUE)


def test_a_failed_document_bundle_puts_the_document_and_its_folder_back(tmp_path: Path, cfg: Config,
                                                                       monkeypatch) -> None:
    document, folder, asked = document_in_inbox(tmp_path)

    def full_disk(path: Path, mode: int) -> None:  # the last step before the rename: everything has moved in
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_module.os, "chmod", full_disk)
    with pytest.raises(OutputUnwritable):
        write_result_bundle(cfg.output_directory, DocumentQuery(document, folder), [], cfg, move_query=True, asked=asked)
    assert document.is_file() and (folder / "beach.jpg").is_file()
    assert written_into(cfg.output_directory) == []


def test_no_hits_under_filters_says_so_rather_than_calling_the_index_empty(tmp_path: Path, cfg: Config) -> None:
    spec = QuerySpec(terms=(Term(TermKind.TEXT, "cat"),), filters=Filters(camera="leica"))
    bundle = write_result_bundle(cfg.output_directory, TextQuery("cat"), [], cfg,
                                 asked=QueryRecord(spec, Completeness(True), 3))
    assert json.loads((bundle / "cat.json").read_text())["understood"]["camera"] == "leica"
    rendered = render_contact_sheet([], query_name="cat", query_text="cat",
                                    no_hits="no picture passes the filters and the floor")
    empty_index = render_contact_sheet([], query_name="cat", query_text="cat")
    assert np.asarray(rendered).tobytes() != np.asarray(empty_index).tobytes()


def test_a_typed_text_query_cannot_be_moved(cfg: Config) -> None:
    with pytest.raises(ValueError, match="typed"):
        write_result_bundle(cfg.output_directory, TextQuery("a cat"), [], cfg, move_query=True)


def test_an_image_query_given_its_processed_pixels_is_not_decoded_again(tmp_path: Path, cfg: Config) -> None:
    gone = tmp_path / "already-moved.jpg"  # the file is not read: the sheet uses the pixels given
    bundle = write_result_bundle(cfg.output_directory, ImageQuery(gone, Image.new("RGB", (50, 40), BLUE)), [], cfg)
    with Image.open(bundle / "already-moved.sheet.jpg") as sheet:
        assert near(centre(sheet.convert("RGB"), 0, 2), BLUE)


@pytest.mark.parametrize(("text", "stem"), [
    ("a red bicycle", "a-red-bicycle"),
    ("  A Red Bicycle?! ", "A-Red-Bicycle"),
    ("赤い自転車", "赤い自転車"),
    ("../../etc/passwd", "etc-passwd"),
    ("?!", "text-query"),
    ("snake_case and/or path\\name", "snake-case-and-or-path-name"),
    ("x" * 100, "x" * 48),
])
def test_text_query_stem(text: str, stem: str) -> None:
    assert text_query_stem(text) == stem


@pytest.mark.parametrize("name", ["IMG_20240812_183012_HDR_very_long_name_indeed.heic", "a" * 250 + ".jpeg",
                                  "夕焼けの海辺" * 20 + ".jpg", "short.jpg"])
def test_a_long_file_name_is_shortened_in_the_middle_keeping_its_extension(name: str) -> None:
    width = CELL_WIDTH - 2 * sheet_module.PADDING
    caption = sheet_module._fit_line(name, sheet_module._CAPTION, width, keep_end=sheet_module._extension_length(name))
    assert sheet_module._width(caption, sheet_module._CAPTION) <= width
    assert caption == name or ("…" in caption and caption.endswith(name[-8:]) and caption[:4] == name[:4])


def a_document_with_its_folder(inbox: Path) -> DocumentQuery:
    """``inbox/q.json`` asking for ``inbox/q/a.png``, beside ``q/b.png`` and ``q/sub/c.png``."""
    (inbox / "q" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (inbox / "q" / name).write_bytes(name.encode())
    document = inbox / "q.json"
    document.write_text('{"image": "a.png"}')
    return DocumentQuery(document, inbox / "q", document.read_bytes())


def left_whole(inbox: Path) -> bool:
    return ((inbox / "q.json").read_text() == '{"image": "a.png"}' and
            {str(p.relative_to(inbox / "q")): p.read_bytes() for p in (inbox / "q").rglob("*") if p.is_file()} == {
                "a.png": b"a.png", "b.png": b"b.png", "sub/c.png": b"sub/c.png"})


def test_a_query_documents_folder_that_cannot_be_deleted_once_copied_stays_whole_with_its_document(
        tmp_path: Path, cfg: Config, monkeypatch) -> None:
    """Onto another filesystem, its pictures copied into the result and the original not deleted: the
    document was left in the unfinished result folder, hidden, and the folder's copy beside it. Then each
    try was taken for an outage of output/, and the query held up the inbox for ever. Now both stay, whole,
    and the result holds a copy of the document."""
    query = a_document_with_its_folder(tmp_path / "inbox")
    a_folder_move_that_stops_part_way(monkeypatch, tmp_path / "inbox" / "q")
    with capture_logs() as logs:
        bundle = write_result_bundle(cfg.output_directory, query, [], cfg, move_query=True)
    assert left_whole(tmp_path / "inbox")
    assert sorted(p.name for p in bundle.iterdir()) == ["q.json", "q.jsonl", "q.query.json", "q.sheet.jpg"]
    assert (bundle / "q.query.json").read_bytes() == query.data
    assert [(e["path"], e["folder"]) for e in logs if e["event"] == "query_left_in_inbox"] == [(query.path, query.folder)]
    assert written_into(cfg.output_directory) == [bundle]  # no unfinished result folder left


@pytest.mark.parametrize("where", ["same filesystem", "another filesystem"])
def test_a_query_documents_folder_this_user_may_not_move_stays_with_its_document(monkeypatch, where: str) -> None:
    """Dropped with ``sudo cp -r`` into the service's inbox (root's folder: the service's user may not rename
    it, which needs a write into it), or copied from read-only media (0555: its copy is 0555 too, and was left
    behind, undeletable, at every try). Run as ``nobody`` where this is root."""
    with reachable_dir() as base:
        inbox, output, state = base / "inbox", base / "output", base / "state"
        for folder in (inbox, output, state):
            folder.mkdir()
            give_to_unprivileged(folder)
        query = a_document_with_its_folder(inbox)
        give_to_unprivileged(query.path)
        if where == "another filesystem":  # the service's own, read-only: its copy is made, and read-only too
            for path in (query.folder, *query.folder.rglob("*")):
                give_to_unprivileged(path)
            moves_as_onto_another_filesystem(monkeypatch, query.folder)
        for folder in (query.folder, query.folder / "sub"):
            folder.chmod(0o555)
        cfg = Config(output_directory=output, state_directory=state, model_name="tiny/test-model", top_k=3)
        with unprivileged(), capture_logs() as logs:
            bundle = write_result_bundle(output, query, [], cfg, move_query=True)
        assert left_whole(inbox)
        assert (bundle / "q.query.json").read_bytes() == query.data and not (bundle / "q.query").exists()
        assert [e["path"] for e in logs if e["event"] == "query_left_in_inbox"] == [query.path]
        assert written_into(output) == [bundle]  # no copy of the folder left behind
        for folder in (query.folder, query.folder / "sub"):
            folder.chmod(0o755)


def test_a_folder_put_back_keeps_what_was_made_in_its_place_meanwhile(tmp_path: Path) -> None:
    """A result that failed after its document's folder moved in puts the folder back. Where an entry of that
    name was made in the inbox meanwhile, the merge skipped it, then deleted the folder it was moving back:
    the user's original picture with it."""
    home, moved = tmp_path / "inbox" / "q", tmp_path / "output" / ".tmp-result" / "q.query"
    moved.mkdir(parents=True)
    (moved / "a.png").write_bytes(b"the original")
    (moved / "b.png").write_bytes(b"b")
    home.mkdir(parents=True)
    (home / "a.png").write_bytes(b"dropped meanwhile")
    with capture_logs() as logs:
        output_module.move_back(moved, home, output_module._return_folder)
    assert {p.name: p.read_bytes() for p in home.iterdir()} == {"a.png": b"dropped meanwhile", "b.png": b"b"}
    assert [p.read_bytes() for p in moved.iterdir()] == [b"the original"]  # kept, where the log says
    assert [e["kept_at"] for e in logs if e["event"] == "query_not_put_back"] == [moved]


def test_a_name_holding_a_character_some_readers_end_a_line_at_stays_on_its_line(tmp_path: Path, cfg: Config) -> None:
    """U+2028, U+2029 and U+0085 are text a valid UTF-8 name may hold, which JSON writes as it is; Python's
    splitlines (and JavaScript before ES2019) end a line there, and the .jsonl read as broken records."""
    name = "a\u2028b\x85c\u2029d.jpg"
    bundle = write_result_bundle(cfg.output_directory, TextQuery("a cat"),
                                 [hit(1, name, processed(tmp_path, "x", RED))], cfg)
    (line,) = (bundle / "a-cat.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["file_name"] == name
