"""Query documents dropped into the inbox: ``<stem>.json`` with its pictures in ``inbox/<stem>/``,
answered by the real service loop over the real PostgreSQL and the tiny model (``story_factory``).

The stories look at what a user sees: the result folder (its ``.jsonl`` ranking, its ``.json`` record
of the query, the document and its folder moved in), or ``inbox/failed/`` with the reason."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.watch import ChangeKind, Folder
from tests.support.files import save_photo, save_picture, written_into

pytestmark = pytest.mark.integration


def drop(story, name: str, document: dict | str, pictures: dict[str, Path] | None = None) -> Path:
    """Write ``inbox/<name>`` (a dict as JSON, a string as it is) and its pictures into ``inbox/<stem>/``."""
    path = story.inbox / name
    if pictures:
        folder = story.inbox / Path(name).stem
        folder.mkdir()
        for picture_name, source in pictures.items():
            shutil.copyfile(source, folder / picture_name)
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    story.notice(Folder.INBOX, ChangeKind.CLOSED, path)
    return path


def answer(story, name: str) -> tuple[Path, list[dict], dict]:
    """The result folder of the document ``name``, its hits and its ``<stem>.json``."""
    bundle = story.bundle(name)
    stem = Path(name).stem
    hits = [json.loads(line) for line in (bundle / f"{stem}.jsonl").read_text().splitlines()]
    return bundle, hits, json.loads((bundle / f"{stem}.json").read_text())


def failure(story, name: str) -> str:
    return (story.inbox / "failed" / f"{name}.error.txt").read_text(encoding="utf-8")


def test_a_document_with_a_picture_from_its_folder_and_a_folder_filter(story_factory, tmp_path) -> None:
    story = story_factory({"2023/a.png": 1, "2023/june/b.png": 2, "2023-old/c.png": 3, "d.png": 4})
    query_picture = save_picture(tmp_path / "like-c.png", seed=3, size=(108, 72))  # c's picture, outside the filter
    drop(story, "trip.json", {"image": "holiday.png", "folder": "2023", "top-k": 5}, {"holiday.png": query_picture})
    story.run_until_idle()
    bundle, hits, record = answer(story, "trip.json")
    assert {Path(h["file_path"]).relative_to(story.images).as_posix() for h in hits} == {"2023/a.png", "2023/june/b.png"}
    assert record["complete"] is True and record["understood"]["folder"] == ["2023"]
    assert record["query"] == {"image": "holiday.png", "folder": "2023", "top-k": 5}  # as given
    assert record["understood"]["terms"] == [{"kind": "image", "value": "holiday.png", "weight": 1.0, "unlike": False}]
    assert (bundle / "trip.query" / "holiday.png").read_bytes() == query_picture.read_bytes()
    assert json.loads((bundle / "trip.query.json").read_text())["folder"] == "2023"
    assert sorted(p.name for p in story.inbox.iterdir()) == []  # the document and its folder moved in


def test_weighted_text_and_picture_terms_with_an_unlike_term_and_a_floor(story_factory) -> None:
    story = story_factory({"a.png": 1, "b.png": 2, "c.png": 3})
    drop(story, "mixed.json", {"text": [{"text": "a red bicycle", "weight": 0.5}],
                               "image": [{"image": "b.png", "weight": 2}], "unlike-image": "c.png",
                               "min-similarity": -1, "top-k": 2})
    story.run_until_idle()
    _, hits, record = answer(story, "mixed.json")
    assert [Path(h["file_path"]).name for h in hits][0] == "b.png"  # the heaviest term, from source-directory
    assert len(hits) == 2 and record["complete"] is True
    weights = [(t["kind"], t["weight"], t["unlike"]) for t in record["understood"]["terms"]]
    assert weights == [("text", 0.5, False), ("image", 2, False), ("image", 1.0, True)]
    drop(story, "plain.json", {"image": "c.png"})  # one picture of source-directory, read by its own folder's rule
    story.run_until_idle()
    assert Path(answer(story, "plain.json")[1][0]["file_path"]).name == "c.png"


def test_a_floor_no_picture_reaches_gives_an_empty_complete_answer(story_factory) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    drop(story, "strict.json", {"image": "a.png", "unlike-image": "b.png", "min-similarity": 0.9999999})
    story.run_until_idle()
    _, hits, record = answer(story, "strict.json")
    assert hits == [] and record["complete"] is True and record["understood"]["min-similarity"] == 0.9999999


def test_date_and_camera_filters_use_the_exif_written_into_the_pictures(story_factory) -> None:
    story = story_factory()
    photos = {
        "june.jpg": dict(taken="2023:06:01 12:00:00", offset="+02:00", camera=("Canon", "Canon EOS R5")),
        "july.jpg": dict(taken="2023:07:01 09:30:00", camera=("FUJIFILM", "X-T4")),
        "undated.jpg": dict(camera=("Canon", "Canon EOS R5")),
    }
    for seed, (name, exif) in enumerate(photos.items(), start=10):
        save_photo(story.images / name, seed, **exif)
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / name)
    story.run_until_idle()
    drop(story, "summer.json", {"text": "a photo", "taken-after": "2023-06-01T10:00:00Z",
                                "taken-before": "2023-08-01"})
    drop(story, "canon.json", {"text": "a photo", "camera": "canon eos"})
    drop(story, "early.json", {"text": "a photo", "taken-before": "2023-06-01T10:00:00Z"})
    story.run_until_idle()
    # 12:00 at +02:00 is 10:00 UTC: "after" is inclusive; an undated picture never passes a date filter.
    assert {Path(h["file_path"]).name for h in answer(story, "summer.json")[1]} == {"june.jpg", "july.jpg"}
    assert {Path(h["file_path"]).name for h in answer(story, "canon.json")[1]} == {"june.jpg", "undated.jpg"}
    assert answer(story, "early.json")[1] == []  # "before" is exclusive
    june = next(h for h in answer(story, "canon.json")[1] if h["file_path"].endswith("june.jpg"))
    assert june["taken_at"] == "2023-06-01T12:00:00+02:00" and june["camera"] == "Canon EOS R5"


BAD_DOCUMENTS = {
    "not-json.json": ("{not json", "not valid JSON"),
    "a-list.json": ('["a list"]', "not an object"),
    "unknown-key.json": ({"text": "cat", "colour": "red"}, 'unknown key "colour"'),
    "top-k.json": ({"text": "cat", "top-k": 5000}, "top-k"),
    "only-unlike.json": ({"unlike-text": "cat"}, "nothing to look for"),
    # The same words unliked twice as much as liked: only pushing away, as "unlike-text" alone would.
    "pushes-only.json": ({"text": "cat", "unlike-text": {"text": "cat", "weight": 2}}, "nothing left to look for"),
    "dates.json": ({"text": "cat", "taken-after": "2024-01-01", "taken-before": "2023-01-01"}, "taken-after"),
    "escape.json": ({"image": "../../config.json"}, "leaves the folders a document may name"),
    "failed.json": ({"text": "cat"}, "may not be named failed.json"),  # inbox/failed/ is no document's folder
    # A typo in a folder's name would otherwise read as "no picture passes the filters".
    "typo.json": ({"text": "cat", "folder": [".", "2032"]}, "'folder' entry 2 \"2032\" names no folder of "
                                                            "source-directory"),
}


def test_bad_documents_fail_each_with_its_reason_and_the_service_goes_on(story_factory) -> None:
    story = story_factory({"a.png": 1})
    for name, (document, _) in BAD_DOCUMENTS.items():
        drop(story, name, document)
    story.run_until_idle()
    for name, (document, reason) in BAD_DOCUMENTS.items():
        written = failure(story, name)
        assert reason in written, written
        assert (story.inbox / "failed" / name).read_text() == (document if isinstance(document, str)
                                                               else json.dumps(document))
    assert story.ask("next.png", story.images / "a.png")[0] == str(story.images / "a.png")


def test_a_missing_picture_waits_then_the_document_fails_saying_which_and_how_long(story_factory, tmp_path) -> None:
    story = story_factory({"a.png": 1})
    story.service.inbox.incomplete_grace = 5.0
    document = drop(story, "later.json", {"image": "late.png"}, {"other.png": story.images / "a.png"})
    story.let_settle_periods_pass(3)
    assert document.exists() and not (story.inbox / "failed").exists()  # it waits, as a half-written file does
    past = time.time() - 60
    for path in (document, *(story.inbox / "later").iterdir()):
        os.utime(path, (past, past))
    story.notice(Folder.INBOX, ChangeKind.CLOSED, document)
    story.run_until_idle()
    written = failure(story, "later.json")
    assert "late.png" in written and "waited 5 s" in written
    assert (story.inbox / "failed" / "later" / "other.png").is_file()  # its folder went with it


def test_a_picture_that_arrives_after_its_document_is_used(story_factory, tmp_path) -> None:
    story = story_factory({"a.png": 1, "b.png": 2})
    document = drop(story, "soon.json", {"image": "soon.png"})
    story.let_settle_periods_pass(2)
    assert document.exists()
    (story.inbox / "soon").mkdir()
    shutil.copyfile(story.images / "b.png", story.inbox / "soon" / "soon.png")
    story.run_until_idle()
    assert Path(answer(story, "soon.json")[1][0]["file_path"]).name == "b.png"


def test_files_in_a_document_folder_are_never_queries_of_their_own(story_factory) -> None:
    story = story_factory({"a.png": 1})
    folder = story.inbox / "album"
    folder.mkdir()
    shutil.copyfile(story.images / "a.png", folder / "x.png")
    story.service.inbox.queue_waiting()
    story.run_until_idle()
    assert (folder / "x.png").is_file() and written_into(story.cfg.output_directory) == []


def test_a_duplicates_document_gets_the_report_and_moves_into_it(story_factory, tmp_path) -> None:
    from tests.support.derived import scene

    story = story_factory({"trip/a.png": 1})
    shutil.copyfile(story.images / "trip" / "a.png", story.images / "trip" / "a-copy.png")
    picture = scene(7, (320, 240))  # photo-like: a perceptual hash is made for photographs
    (story.images / "other").mkdir()
    picture.save(story.images / "other" / "b.png")
    picture.save(story.images / "other" / "b-again.jpg", quality=70)  # the same picture saved again
    for name in ("trip/a-copy.png", "other/b.png", "other/b-again.jpg"):
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, story.images / name)
    story.run_until_idle()
    drop(story, "dupes.json", {"duplicates": True, "kind": ["copy", "near-copy"]})
    drop(story, "nowhere.json", {"duplicates": True, "folder": "no-such-folder"})
    story.run_until_idle()
    report = story.bundle("dupes.json")
    groups = [json.loads(line) for line in (report / "duplicates.jsonl").read_text().splitlines()]
    by_kind = {g["kind"]: g for g in groups}
    assert set(by_kind) == {"copy", "near-copy"}
    copy_paths = {m["file_path"] for m in by_kind["copy"]["members"]} | {
        c for m in by_kind["copy"]["members"] for c in m["copies"]}
    assert {str(story.images / "trip" / "a.png"), str(story.images / "trip" / "a-copy.png")} <= copy_paths
    assert {Path(m["file_path"]).name for m in by_kind["near-copy"]["members"]} == {"b.png", "b-again.jpg"}
    assert json.loads((report / "summary.json").read_text())["kinds"] == ["copy", "near-copy"]
    assert (story.images / "trip" / "a-copy.png").is_file()  # nothing is deleted
    assert "names no folder of source-directory" in failure(story, "nowhere.json")


def test_a_document_named_on_the_command_line_is_recorded_and_copied_into_its_result(story_factory, tmp_path,
                                                                                   capsys) -> None:
    """``search --query doc.json`` (``cli.run_searches``, over the story's runtime): the result folder
    holds the document as written and its keys as given; the document stays where it is."""
    from image_search.cli import run_searches

    story = story_factory({"2023/a.png": 1, "b.png": 2})
    document = tmp_path / "ask.json"
    written = '{"text": "a photo",\n "folder": "2023", "top-k": 5}\n'
    document.write_text(written, encoding="utf-8")
    assert run_searches(story.service.rt, files=[document]) == 0
    bundle = Path(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((bundle / "ask.json").read_text())
    assert record["query"] == {"text": "a photo", "folder": "2023", "top-k": 5}
    assert "not-yet-indexed" not in record  # the command indexes first: nothing is left waiting
    assert (bundle / "ask.query.json").read_text(encoding="utf-8") == written
    assert document.read_text(encoding="utf-8") == written
    # A folder named in bytes that are not UTF-8, given as JSON's own escape of its name: recorded as given.
    (story.images / os.fsdecode(b"caf\xe9")).mkdir()
    document.write_text(json.dumps({"text": "a photo", "folder": os.fsdecode(b"caf\xe9")}), encoding="utf-8")
    assert run_searches(story.service.rt, files=[document]) == 0
    bundle = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((bundle / "ask.json").read_text())["query"] == {"text": "a photo", "folder": "caf\udce9"}


def test_words_with_a_byte_that_is_not_utf8_fail_that_query_and_the_next_is_answered(story_factory, capsys) -> None:
    """``search --text $'caf\\xe9' --text ok`` (or those bytes typed at the prompt) reached the tokenizer,
    whose TypeError ended the whole run (crashed, exit 1, no answer to 'ok')."""
    from image_search.cli import run_searches
    from image_search.errors import ExitCode

    story = story_factory({"a.png": 1})
    with capture_logs() as logs:
        assert run_searches(story.service.rt, texts=["caf\udce9", "ok"]) == ExitCode.FAILED
    [failed] = [e for e in logs if e["event"] == "query_failed"]
    assert "not UTF-8" in failed["reason"]
    answered = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(story.cfg.output_directory))]
    assert len(answered) == 1 and Path(answered[0]).is_dir()  # 'ok' answered


def test_a_picture_or_words_given_many_times_are_read_and_embedded_once(story_factory) -> None:
    """600 copies of one large picture in a 5 KB document held the service's loop for 91 s, its watchdog
    unpinged: each term was read again. Now each picture is read once, and the query is the one the same
    terms with summed weights make."""
    import numpy as np

    from image_search.preprocess import preprocess_for
    from image_search.querydoc import parse_query_document
    from image_search.search import query_vector

    story = story_factory({"a.png": 1, "b.png": 2})
    document = story.inbox / "many.json"
    read: list[Path] = []

    def vector(doc: dict) -> np.ndarray:
        _, spec = parse_query_document(json.dumps(doc).encode(), document, source_directory=story.images)
        return query_vector(spec, cfg=story.cfg, embedder=story.service.rt.model(), links=None, query_path=document,
                            read_picture=lambda path, links: read.append(path) or preprocess_for(path, story.cfg, links))[0]

    many = vector({"image": ["a.png"] * 40 + ["b.png"], "text": ["a cat"] * 20})
    assert [p.name for p in read] == ["a.png", "b.png"]
    weighted = vector({"image": [{"image": "a.png", "weight": 40}, "b.png"], "text": {"text": "a cat", "weight": 20}})
    assert np.allclose(many, weighted, atol=1e-6)


def test_a_failed_documents_folder_that_cannot_be_moved_stays_whole_and_the_service_goes_on(story_factory,
                                                                                           monkeypatch) -> None:
    """Its document fails (a key no document takes) and moves to failed/ with its reason; its folder's move
    stops part way (copied, the original not wholly deleted). The service stopped on it, the folder doubled;
    now the folder stays whole in the inbox, one line says so, and the next query is answered."""
    from structlog.testing import capture_logs

    from tests.support.failures import a_folder_move_that_stops_part_way

    story = story_factory({"b.png": 2})
    drop(story, "bad.json", {"image": "a.png", "colour": "red"}, {"a.png": story.images / "b.png"})
    (story.inbox / "bad" / "sub").mkdir()
    (story.inbox / "bad" / "sub" / "c.png").write_bytes(b"c")
    a_folder_move_that_stops_part_way(monkeypatch, story.inbox / "bad")
    with capture_logs() as logs:
        story.run_until_idle()
    assert 'unknown key "colour"' in failure(story, "bad.json")
    assert sorted(str(p.relative_to(story.inbox)) for p in story.inbox.rglob("*")) == [
        "bad", "bad/a.png", "bad/sub", "bad/sub/c.png", "failed", "failed/bad.json", "failed/bad.json.error.txt"]
    assert [e["path"] for e in logs if e["event"] == "query_folder_not_moved"] == [story.inbox / "bad"]
    drop(story, "next.txt", "a picture")
    story.run_until_idle()
    assert answer(story, "next.txt")[1]


def test_a_document_holding_half_of_a_character_fails_with_its_reason_and_the_service_goes_on(story_factory) -> None:
    """JSON's escapes can write half of an emoji: quoted in the refusal, it could not be written to the error
    file, and the service stopped."""
    story = story_factory({"b.png": 2})
    drop(story, "emoji.json", '{"text": "x", "format": "png \\ud83d"}')
    story.run_until_idle()
    assert "half of a character (\\ud83d" in failure(story, "emoji.json")
    drop(story, "next.txt", "a picture")
    story.run_until_idle()
    assert answer(story, "next.txt")[1]


def test_a_document_of_one_picture_or_one_text_shows_it_on_the_sheet_as_a_file_query_does(story_factory) -> None:
    """A plain document (one term, no filter, no floor) had a grey "cannot be shown" placeholder in its
    sheet's first cell: the picture was read and found, but only a picture file's query had its picture
    given to the sheet."""
    from PIL import Image, ImageStat

    from image_search.sheet import PLACEHOLDER, cell_box

    story = story_factory({"a.png": 1, "b.png": 2})
    drop(story, "look.json", {"image": "p.png"}, {"p.png": story.images / "b.png"})
    drop(story, "words.json", {"text": "a red bicycle"})
    story.run_until_idle()
    cells = 1 + len(answer(story, "look.json")[1])
    with Image.open(story.bundle("look.json") / "look.sheet.jpg") as sheet:
        query, best = (ImageStat.Stat(sheet.convert("RGB").crop(cell_box(i, cells))).mean for i in (0, 1))
    assert answer(story, "look.json")[1][0]["file_path"] == str(story.images / "b.png")
    assert all(abs(q - b) <= 8 for q, b in zip(query, best))  # the query's cell is the picture, as its best hit's
    with Image.open(story.bundle("words.json") / "words.sheet.jpg") as sheet:
        left, top, _, _ = cell_box(0, 1 + len(answer(story, "words.json")[1]))
        corner = sheet.convert("RGB").getpixel((left + 3, top + 3))
    assert not all(abs(c - p) <= 6 for c, p in zip(corner, PLACEHOLDER))  # words, not the placeholder
