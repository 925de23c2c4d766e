"""Query documents: a JSON file that says what to look for, what to push away and which pictures may
answer; and the same from the search command's flags. A user's story per test: a document written
into an inbox beside a source folder, and the query it is understood as, or the one line that says
what is wrong and how to put it right."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from image_search.cli import build_parser, flag_spec, main
from image_search.config import Config
from image_search.entries import FollowLinks
from image_search.errors import ExitCode, UnusableFile
from image_search.query import Filters, Term, TermKind
from image_search.querydoc import (
    MAX_QUERY_DOCUMENT_BYTES,
    MAX_TERMS,
    IncompleteQueryDocument,
    MissingPicture,
    QueryDocumentError,
    QueryFlagError,
    document_folder,
    duplicates_from_flags,
    is_query_document,
    parse_query_document,
    read_query_document,
    spec_from_flags,
)


@dataclass(frozen=True)
class Tree:
    """A source folder with two pictures (one in a sub-folder), an inbox, and a document's place in it."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def document(self) -> Path:
        return self.inbox / "q.json"

    @property
    def beside(self) -> Path:
        """The document's own folder, inbox/q/."""
        return self.inbox / "q"

    def parse(self, doc: object, follow: FollowLinks = FollowLinks.INSIDE):  # noqa: ANN201
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        return parse_query_document(data, self.document, source_directory=self.images, follow=follow)[1]

    def refused(self, doc: object, kind: type[QueryDocumentError] = QueryDocumentError,
                follow: FollowLinks = FollowLinks.INSIDE) -> str:
        """The reason the document is refused with; the error is exactly of ``kind``, names the document,
        and its reason is one line."""
        with pytest.raises(QueryDocumentError) as caught:
            self.parse(doc, follow)
        assert type(caught.value) is kind, caught.value
        assert caught.value.path == self.document
        assert "\n" not in caught.value.reason
        return caught.value.reason


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path)
    (t.images / "2023").mkdir(parents=True)
    (t.images / "cat.jpg").write_bytes(b"a cat")  # never decoded here: only found
    (t.images / "2023" / "dog.png").write_bytes(b"a dog")
    t.inbox.mkdir()
    return t


@pytest.fixture
def berlin() -> Iterator[None]:
    """This machine's local time zone is Berlin's for the test."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


# --- what a document can say -------------------------------------------------------------------------


def test_a_single_string_is_one_term_of_weight_one(tree: Tree) -> None:
    spec = tree.parse({"text": "  a red bicycle\n"})
    assert spec.terms == (Term(TermKind.TEXT, "a red bicycle"),)
    assert spec.filters == Filters() and spec.top_k is None and spec.min_similarity is None


def test_lists_weighted_entries_and_unlike_terms(tree: Tree) -> None:
    spec = tree.parse({
        "text": ["a red bicycle", {"text": "a wall", "weight": 2}],
        "image": [{"image": "cat.jpg", "weight": 0.5}, "2023/dog.png"],
        "unlike-text": {"text": "a car", "weight": 3},
        "unlike-image": "cat.jpg",
    })
    cat, dog = (tree.images / "cat.jpg").resolve(), (tree.images / "2023" / "dog.png").resolve()
    assert spec.terms == (
        Term(TermKind.TEXT, "a red bicycle", 1.0),
        Term(TermKind.TEXT, "a wall", 2.0),
        Term(TermKind.IMAGE, "cat.jpg", 0.5, path=cat),
        Term(TermKind.IMAGE, "2023/dog.png", 1.0, path=dog),
        Term(TermKind.TEXT, "a car", 3.0, unlike=True),
        Term(TermKind.IMAGE, "cat.jpg", 1.0, unlike=True, path=cat),
    )
    assert [t.signed_weight for t in spec.terms] == [1.0, 2.0, 0.5, 1.0, -3.0, -1.0]


def test_every_filter_top_k_and_floor_and_how_the_result_records_them(tree: Tree) -> None:
    for folder in ("2023/june", "2024"):
        (tree.images / folder).mkdir()
    spec = tree.parse({
        "image": "cat.jpg",
        "folder": ["2023/./june/", "/".join([str(tree.images), "2024"]), "2023/june"],
        "taken-after": "2023-05-06T07:08:09+02:00",
        "taken-before": "2024-01-01T00:00:00Z",
        "camera": " Pixel 7 ",
        "format": ["JPG", ".png", "tif", "heif", "jpeg"],
        "top-k": 25,
        "min-similarity": -0.25,
    })
    after = datetime(2023, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    before = datetime(2024, 1, 1, tzinfo=timezone.utc)
    assert spec.filters == Filters(folders=("2023/june", "2024"), taken_after=after, taken_before=before,
                                   camera="Pixel 7", formats=("jpeg", "png", "tiff", "heic"))
    assert (spec.top_k, spec.min_similarity) == (25, -0.25)
    assert spec.record() == {
        "terms": [{"kind": "image", "value": "cat.jpg", "weight": 1.0, "unlike": False}],
        "folder": ["2023/june", "2024"],
        "taken-after": "2023-05-06T07:08:09+02:00",
        "taken-before": "2024-01-01T00:00:00+00:00",
        "camera": "Pixel 7",
        "format": ["jpeg", "png", "tiff", "heic"],
        "top-k": 25,
        "min-similarity": -0.25,
    }
    json.dumps(spec.record())  # <stem>.json can hold it as it is


def test_a_date_alone_is_midnight_and_no_offset_means_this_machines_zone(tree: Tree, berlin: None) -> None:
    spec = tree.parse({"text": "snow", "taken-after": "2023-01-15", "taken-before": "2023-07-01T12:30"})
    assert spec.filters.taken_after.isoformat() == "2023-01-15T00:00:00+01:00"  # winter in Berlin
    assert spec.filters.taken_before.isoformat() == "2023-07-01T12:30:00+02:00"  # summer time


def test_a_text_query_alone_with_one_format_and_the_lowest_top_k(tree: Tree) -> None:
    spec = tree.parse({"text": "x", "format": "WEBP", "top-k": 1, "min-similarity": 1})
    assert spec.filters.formats == ("webp",) and spec.top_k == 1 and spec.min_similarity == 1.0


# --- where a document's pictures are found ----------------------------------------------------------


def test_a_picture_beside_the_document_comes_first_then_source_directory(tree: Tree) -> None:
    tree.beside.mkdir()
    (tree.beside / "cat.jpg").write_bytes(b"the cat I dropped")
    (tree.beside / "mine.png").write_bytes(b"mine")
    spec = tree.parse({"image": ["cat.jpg", "mine.png", "2023/dog.png"]})
    assert [t.path for t in spec.terms] == [(tree.beside / "cat.jpg").resolve(), (tree.beside / "mine.png").resolve(),
                                            (tree.images / "2023" / "dog.png").resolve()]
    assert document_folder(tree.document) == tree.beside
    assert document_folder(tree.inbox / "holiday.query.JSON") == tree.inbox / "holiday.query"


def test_an_absolute_path_inside_either_folder_is_read_there(tree: Tree) -> None:
    tree.beside.mkdir()
    (tree.beside / "mine.png").write_bytes(b"mine")
    spec = tree.parse({"image": [str(tree.images / "cat.jpg"), str(tree.beside / "mine.png")]})
    assert [t.path for t in spec.terms] == [(tree.images / "cat.jpg").resolve(), (tree.beside / "mine.png").resolve()]


def test_a_link_that_stays_inside_is_followed_to_its_target(tree: Tree) -> None:
    (tree.images / "favourite.jpg").symlink_to("2023/dog.png")
    tree.beside.mkdir()
    (tree.beside / "alias.png").symlink_to("../../images/cat.jpg")  # beside -> source: no, see below
    spec = tree.parse({"image": "favourite.jpg"})
    assert spec.terms[0].path == (tree.images / "2023" / "dog.png").resolve()
    assert spec.terms[0].value == "favourite.jpg"
    # A link beside the document must stay beside it too, even when it leads into source-directory.
    assert "outside the document's folder" in tree.refused({"image": "alias.png"})


def test_a_name_in_bytes_that_are_not_utf8_is_named_as_results_print_it(tree: Tree) -> None:
    odd = os.fsdecode(b"bad\xff\xfename.png")
    (tree.images / "2023" / odd).write_bytes(b"a picture named in Latin-1")
    printed = "2023/bad\\xff\\xfename.png"  # names.escape's text: how results, logs and the table show it
    spec = tree.parse({"image": printed, "folder": "2023"})
    assert spec.terms[0].path == (tree.images / "2023" / odd).resolve()
    assert spec.record()["terms"][0]["value"] == printed  # recorded once, as printed everywhere else
    # The error text shows that name once too, not doubled by JSON's own escaping.
    reason = tree.refused({"image": "2023/bad\\xff\\xfegone.png"}, MissingPicture)
    assert reason.startswith('picture "2023/bad\\xff\\xfegone.png" (\'image\') is not there: looked for ')
    assert f"{tree.images}/2023/bad\\xff\\xfegone.png;" in reason
    assert "\\\\" not in reason


def test_a_name_with_a_real_backslash_is_written_with_two_and_one_alone_still_works(tree: Tree) -> None:
    (tree.images / "a\\xff.png").write_bytes(b"spelled with a backslash")
    (tree.images / "c\\d.png").write_bytes(b"a lone backslash")
    spec = tree.parse({"image": ["a\\\\xff.png", "c\\\\d.png", "c\\d.png"]})
    assert [t.path.name for t in spec.terms] == ["a\\xff.png", "c\\d.png", "c\\d.png"]
    # "\x00" in the text form is a NUL, which no name holds
    assert "holds a NUL character" in tree.refused({"image": "a\\x00.png"})


def test_a_folder_filter_takes_the_printed_name_too(tree: Tree) -> None:
    odd = os.fsdecode(b"caf\xe9")
    (tree.images / odd / "2024").mkdir(parents=True)
    spec = tree.parse({"text": "x", "folder": "caf\\xe9/2024"})
    assert spec.filters.folders == (f"{odd}/2024",)
    assert spec.record()["folder"] == ["caf\\xe9/2024"]


def test_dot_dot_that_leaves_is_refused_before_anything_is_looked_at(tree: Tree) -> None:
    (tree.root / "secret.jpg").write_bytes(b"secret")
    reason = tree.refused({"image": "../secret.jpg"})
    assert "leaves the folders a document may name" in reason and "give a path inside source-directory" in reason
    # '..' that comes back inside is only a roundabout path
    assert tree.parse({"image": "2023/../cat.jpg"}).terms[0].path == (tree.images / "cat.jpg").resolve()


def test_an_absolute_path_elsewhere_is_refused(tree: Tree) -> None:
    (tree.root / "secret.jpg").write_bytes(b"secret")
    reason = tree.refused({"text": "x", "unlike-image": str(tree.root / "secret.jpg")})
    assert "'unlike-image'" in reason and "absolute path outside the document's folder" in reason
    assert "give a path relative to source-directory, or drop the picture into the document's folder" in reason
    assert "absolute path outside" in tree.refused({"image": "/etc/passwd"})


@pytest.mark.parametrize("follow", [FollowLinks.INSIDE, FollowLinks.ALL])
def test_a_link_pointing_out_is_refused_whatever_follow_symlinks_says(tree: Tree, follow: FollowLinks) -> None:
    (tree.root / "secret.jpg").write_bytes(b"secret")
    (tree.images / "leak.jpg").symlink_to(tree.root / "secret.jpg")
    (tree.images / "out").symlink_to(tree.root)  # a folder link on the way
    for value in ("leak.jpg", "out/secret.jpg", "out/not-yet.jpg"):
        reason = tree.refused({"image": value}, follow=follow)
        assert "outside source-directory" in reason and "through a symbolic link" in reason, reason
        assert "copy the picture there" in reason


def test_a_document_folder_that_is_a_link_elsewhere_is_refused(tree: Tree) -> None:
    (tree.root / "elsewhere").mkdir()
    (tree.root / "elsewhere" / "private.jpg").write_bytes(b"private")
    tree.beside.symlink_to(tree.root / "elsewhere")
    assert "outside the document's folder" in tree.refused({"image": "private.jpg"})


def test_follow_symlinks_none_follows_no_link_even_inside(tree: Tree) -> None:
    (tree.images / "favourite.jpg").symlink_to("cat.jpg")
    reason = tree.refused({"image": "favourite.jpg"}, follow=FollowLinks.NONE)
    assert "symbolic link" in reason and "'follow-symlinks' is 'none'" in reason
    assert tree.parse({"image": "cat.jpg"}, follow=FollowLinks.NONE).terms[0].path == (tree.images / "cat.jpg").resolve()


def test_a_folder_or_a_pipe_named_as_a_picture_is_refused_without_opening_it(tree: Tree) -> None:
    os.mkfifo(tree.images / "pipe.jpg")
    assert "is a named pipe, not a regular file" in tree.refused({"image": "pipe.jpg"})
    assert "is a folder, not a regular file" in tree.refused({"image": "2023"})


def test_a_missing_picture_is_still_arriving_and_says_where_it_was_looked_for(tree: Tree) -> None:
    reason = tree.refused({"text": "x", "image": ["cat.jpg", "beach/sunset.jpg"]}, MissingPicture)
    assert MissingPicture.still_arriving and issubclass(MissingPicture, UnusableFile)
    assert reason.startswith('picture "beach/sunset.jpg" (\'image\') is not there: looked for ')
    assert f"{tree.beside}/beach/sunset.jpg and {tree.images}/beach/sunset.jpg" in reason
    assert f"drop it into the document's folder {tree.beside}/ or correct the path" in reason
    # an absolute path was looked for in one place only
    reason = tree.refused({"image": str(tree.images / "gone.jpg")}, MissingPicture)
    assert f"looked for {tree.images}/gone.jpg;" in reason


def test_the_documents_form_is_checked_before_its_pictures_are_looked_for(tree: Tree) -> None:
    assert "'top-k'" in tree.refused({"image": "not-yet.jpg", "top-k": 0})  # not "still arriving"


# --- what a document cannot say --------------------------------------------------------------------


def test_not_json_says_where(tree: Tree) -> None:
    reason = tree.refused(b'{\n  "text": "a red bicycle",\n  "top-k": 10,,\n}')
    assert reason.startswith("not valid JSON: Expecting property name enclosed in double quotes at line 3, column 15")
    assert "correct it there" in reason


def test_json_that_stops_short_is_still_arriving(tree: Tree) -> None:
    assert "line 1, column" in tree.refused(b'{"text": "a red bic', IncompleteQueryDocument)
    tree.refused(b'{"text": "a red bicycle",', IncompleteQueryDocument)
    tree.refused(b'{"text": "a red bicycle"}}', QueryDocumentError)  # extra data is a mistake, not a cut


def test_an_empty_document_is_still_arriving_and_whitespace_is_not(tree: Tree) -> None:
    assert tree.refused(b"", IncompleteQueryDocument).startswith("empty file (0 bytes): write the query in it")
    assert "only whitespace" in tree.refused(b" \n\t ")
    assert IncompleteQueryDocument.still_arriving and not QueryDocumentError.still_arriving


@pytest.mark.parametrize(("doc", "kind"), [(b"[1, 2]", "list"), (b'"a red bicycle"', "string"), (b"null", "null"),
                                           (b"3", "number")])
def test_a_document_that_is_not_an_object(tree: Tree, doc: bytes, kind: str) -> None:
    assert tree.refused(doc) == (f"the document is a JSON {kind}, not an object: write an object of keys, e.g. "
                                 '{"text": "a red bicycle"}')


@pytest.mark.parametrize(("key", "near"), [("top_k", "top-k"), ("topK", "top-k"), ("images", "image"),
                                           ("taken_before", "taken-before"), ("minSimilarity", "min-similarity"),
                                           ("Text", "text"), ("formats", "format")])
def test_an_unknown_key_suggests_the_nearest(tree: Tree, key: str, near: str) -> None:
    reason = tree.refused({"text": "x", key: 1})
    assert reason.startswith(f"unknown key \"{key}\": did you mean '{near}'? (the keys: text, image, ")


def test_an_unknown_key_far_from_every_key(tree: Tree) -> None:
    assert 'unknown key "zzz": remove it or correct its spelling (the keys: ' in tree.refused({"text": "x", "zzz": 1})


@pytest.mark.parametrize(("doc", "expected"), [
    ({"text": 3}, "'text' must be words as a string, a list of them, or an object {\"text\": \"...\", \"weight\": 2}, got 3"),
    ({"text": ["a", None]}, "'text' entry 2 must be words as a string"),
    ({"image": True}, "'image' must be a picture's path as a string, a list of them, or an object {\"image\": "),
    ({"text": "x", "folder": 2023}, "'folder' must be a folder of source-directory, relative to it, e.g. \"2023/june\" "
                                     "(a string, or a list of them), got 2023"),
    ({"text": "x", "taken-after": 2023}, "'taken-after' must be an ISO 8601 date or date-time, e.g. \"2023-05-06\" or "
                                          "\"2023-05-06T14:30:00+02:00\", as a string, got 2023"),
    ({"text": "x", "camera": ["canon"]}, "'camera' must be a string, part of the camera's make and model"),
    ({"text": "x", "format": 1}, "'format' must be a format name (a string, or a list of them) among jpeg, png"),
    ({"text": "x", "top-k": "10"}, "'top-k' must be a whole number from 1 to 1000, got \"10\""),
    ({"text": "x", "min-similarity": "0.5"}, "'min-similarity' must be a number from -1 to 1"),
    ({"text": {"words": "x"}}, "'text': unknown key \"words\": remove it or correct its spelling (the keys: text, weight)"),
    ({"text": {"txt": "x"}}, "'text': unknown key \"txt\": did you mean 'text'?"),
    ({"text": {"weight": 2}}, "'text' has no \"text\": write {\"text\": \"...\", \"weight\": 2}"),
    ({"text": [{"image": "cat.jpg"}]}, "'text' entry 1 has \"image\", but 'text' holds words: write {\"text\": \"...\", "
                                       "\"weight\": 2}, or move it to 'image'"),
    ({"text": "x", "unlike-image": {"text": "a"}}, "but 'unlike-image' holds pictures: write {\"image\": \"...\", "
                                                   "\"weight\": 2}, or move it to 'unlike-text'"),
])
def test_a_wrong_type_names_the_key_and_the_form_it_takes(tree: Tree, doc: dict, expected: str) -> None:
    assert expected in tree.refused(doc)


@pytest.mark.parametrize("doc", [{}, {"unlike-text": "a car"}, {"unlike-image": "cat.jpg", "top-k": 5}])
def test_unlike_terms_alone_are_nothing_to_look_for(tree: Tree, doc: dict) -> None:
    assert tree.refused(doc) == ("the query has nothing to look for: give 'text' (words) or 'image' (pictures); "
                                 "'unlike-text' and 'unlike-image' only push pictures away")


@pytest.mark.parametrize(("doc", "expected"), [
    ({"text": ""}, "'text' is empty: give the words to look for"),
    ({"text": ["a", " \n"]}, "'text' entry 2 is empty: give the words to look for"),
    ({"text": []}, "'text' is an empty list: give at least one entry, or leave the key out"),
    ({"image": []}, "'image' is an empty list"),
    ({"text": "x", "format": []}, "'format' is an empty list"),
    ({"image": ""}, "'image' is empty: give the picture's path, relative to source-directory, or its name in the "
                    "document's folder"),
    ({"text": "x", "folder": ""}, "'folder' is empty: give a folder of source-directory"),
    ({"text": "x", "folder": ["2023", " "]}, "'folder' entry 2 is empty"),
    ({"text": "x", "camera": "  "}, "'camera' is empty: give part of the camera's make and model"),
])
def test_empty_values_are_refused(tree: Tree, doc: dict, expected: str) -> None:
    assert expected in tree.refused(doc)


def test_a_folder_that_leaves_source_directory(tree: Tree) -> None:
    assert "'folder' \"../other\" leaves source-directory: give a folder of source-directory" in \
        tree.refused({"text": "x", "folder": "../other"})
    assert "'folder' entry 2 \"2023/../../x\" leaves source-directory" in \
        tree.refused({"text": "x", "folder": ["2023", "2023/../../x"]})
    reason = tree.refused({"text": "x", "folder": "/home"})
    assert f"'folder' \"/home\" is outside source-directory ({tree.images}): give a folder" in reason


def test_a_folder_reached_through_a_link_is_refused_naming_the_link(tree: Tree, tmp_path: Path) -> None:
    """The walk never indexes a picture under a link's name (one inside is walked where it leads, one
    outside is not followed): filtered by it, nothing passed and the answer said complete."""
    (tree.images / "inside").symlink_to(tree.images / "2023")
    (tmp_path / "elsewhere").mkdir()
    (tree.images / "outside").symlink_to(tmp_path / "elsewhere")
    for folder in ("inside", "outside", "inside/."):
        reason = tree.refused({"text": "x", "folder": folder})
        assert "goes through the link" in reason and "name that folder" in reason, reason
    assert tree.parse({"text": "x", "folder": "2023"}).filters.folders == ("2023",)


def test_a_folder_that_is_not_there_is_refused_as_the_duplicates_report_refuses_it(tree: Tree) -> None:
    """A typo in a folder's name would otherwise answer "no picture passes the filters"."""
    assert tree.refused({"text": "x", "folder": ["2023", "2032"]}) == (
        f"'folder' entry 2 \"2032\" names no folder of source-directory ({tree.images}): give a folder that is "
        "there, relative to source-directory, e.g. \"2023/june\"")
    assert "names no folder" in tree.refused({"text": "x", "folder": "cat.jpg"})  # a file is no folder
    assert tree.parse({"text": "x", "folder": ["2023/", "."]}).filters.folders == ("2023", ".")


def test_search_refuses_a_folder_that_is_not_there_with_exit_code_2_before_indexing(
        tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    config = tree.root / "config.json"
    config.write_text(json.dumps({"source-directory": str(tree.images), "inbox-directory": str(tree.inbox),
                                  "output-directory": str(tree.root / "output"),
                                  "processed-directory": str(tree.root / "processed"),
                                  "state-directory": str(tree.root / "state")}))
    assert main(["search", "--config", str(config), "--text", "x", "--folder", "2032"]) == ExitCode.USAGE
    assert '--folder \"2032\" names no folder of source-directory' in capsys.readouterr().err


@pytest.mark.parametrize("value", ["2023/05/06", "yesterday", "2023-13-01", "06.05.2023", ""])
def test_a_date_that_is_not_iso_8601(tree: Tree, value: str) -> None:
    reason = tree.refused({"text": "x", "taken-before": value})
    assert reason == (f"'taken-before' {json.dumps(value)} is not a date: write an ISO 8601 date or date-time, e.g. "
                      "\"2023-05-06\" or \"2023-05-06T14:30:00+02:00\"")


@pytest.mark.parametrize(("after", "before"), [("2023-06-01", "2023-06-01"), ("2023-06-02", "2023-06-01"),
                                               ("2023-06-01T12:00:00+00:00", "2023-06-01T13:00:00+02:00")])
def test_an_empty_range_of_dates_is_refused(tree: Tree, after: str, before: str) -> None:
    reason = tree.refused({"text": "x", "taken-after": after, "taken-before": before})
    assert "is not before 'taken-before'" in reason and "no picture can pass" in reason
    assert "give 'taken-after' earlier than 'taken-before' ('taken-after' is inclusive, 'taken-before' exclusive)" in reason


@pytest.mark.parametrize("top_k", [0, 1001, -5, True, 10.5, 1001.0])
def test_top_k_out_of_range_or_not_a_whole_number(tree: Tree, top_k: object) -> None:
    assert tree.refused({"text": "x", "top-k": top_k}) == \
        f"'top-k' must be a whole number from 1 to 1000, got {json.dumps(top_k)}"


def test_top_k_written_as_a_whole_float_is_that_number(tree: Tree) -> None:
    """JSON has one kind of number: writers that print 10 as 10.0 mean 10."""
    assert tree.parse(b'{"text": "x", "top-k": 10.0}').top_k == 10


@pytest.mark.parametrize("floor", [1.5, -1.01, True, False])
def test_min_similarity_out_of_range_or_a_bool(tree: Tree, floor: object) -> None:
    assert tree.refused({"text": "x", "min-similarity": floor}).startswith(
        f"'min-similarity' must be a number from -1 to 1 (the cosine similarity a hit needs at least, e.g. 0.2), "
        f"got {json.dumps(floor)}")


@pytest.mark.parametrize(("raw", "shown"), [(b"NaN", None), (b"Infinity", None), (b"-Infinity", None),
                                            (b"1e999", "Infinity"), (b"0", "0"), (b"-2", "-2"), (b'"2"', '"2"'),
                                            (b"true", "true"), (b"null", "null")])
def test_a_weight_must_be_a_positive_finite_number(tree: Tree, raw: bytes, shown: str | None) -> None:
    reason = tree.refused(b'{"text": [{"text": "a", "weight": ' + raw + b"}]}")
    if shown is None:  # Python's json reads these; JSON has no such numbers
        assert reason == f"not valid JSON: {raw.decode()} is not a number JSON allows: write a finite number, e.g. 2 or 0.5"
    else:
        assert reason == (f"'text' entry 1: 'weight' must be a positive finite number, e.g. 2 or 0.5, got {shown} (to "
                          "push a term away, list it under 'unlike-text' or 'unlike-image')")


def test_nan_anywhere_is_refused(tree: Tree) -> None:
    assert "NaN is not a number JSON allows" in tree.refused(b'{"text": "x", "min-similarity": NaN}')


@pytest.mark.parametrize("value", ["jpeg2000", "raw", "jpgg"])
def test_an_unknown_format_lists_the_formats(tree: Tree, value: str) -> None:
    reason = tree.refused({"text": "x", "format": ["png", value]})
    assert reason.startswith(f"'format' entry 2 \"{value}\" is not a format the index records: ")
    assert "use one of jpeg, png, webp, gif, bmp, tiff, heic, avif (jpg, tif and heif name jpeg, tiff and heic)" in reason
    if value == "jpgg":
        assert "did you mean 'jpeg'?" in reason


def test_a_key_given_twice_is_refused(tree: Tree) -> None:
    reason = tree.refused(b'{"text": "a", "top-k": 5, "top-k": 50}')
    assert reason == 'key "top-k" appears twice in one object: give each key once (a list holds several values)'


def test_not_utf8_utf16_and_nul(tree: Tree) -> None:
    assert tree.refused('{"text": "vélo"}'.encode("latin-1")).startswith("not UTF-8 text (byte 0xe9 at offset 11")
    assert "UTF-16" in tree.refused('{"text": "a"}'.encode("utf-16"))
    assert tree.parse('\ufeff{"text": "赤い自転車"}'.encode()).terms[0].value == "赤い自転車"


@pytest.mark.parametrize("raw", [b'{"text": "x", "format": "png \\ud83d"}', b'{"text": "x", "folder": "\\ud800"}',
                                 b'{"text": "x", "\\ude00": 1}', b'{"text": ["x", {"image": "a\\udfff.png"}]}'])
def test_half_of_a_character_anywhere_is_refused_in_a_line_that_can_be_written(tree: Tree, raw: bytes) -> None:
    """JSON's escapes can write a lone surrogate (half of an emoji): quoted in a reason, it could not even be
    written to the query's error file, which stopped the service."""
    reason = tree.refused(raw)
    assert reason.startswith("a text in the document holds half of a character (\\u")
    reason.encode()  # the error file takes it


def test_nul_and_bytes_that_are_not_text_are_refused_where_no_name_is_meant(tree: Tree) -> None:
    """NUL names nothing (PostgreSQL refused the camera filter with an unexpected error); U+DC80..U+DCFF are
    a file name's bytes that are not UTF-8 (a folder may be named so), never words nor a camera's name."""
    assert "holds NUL (\\u0000)" in tree.refused(b'{"text": "x", "camera": "a\\u0000b"}')
    assert tree.refused(b'{"text": "a\\udce9"}') == "'text' holds a byte that is not UTF-8 text (\\udcXX): write the words as text"
    assert "a byte that is not UTF-8" in tree.refused(b'{"text": "x", "camera": "caf\\udce9"}')


def test_at_most_64_terms(tree: Tree) -> None:
    """Each picture term is read on the service's main thread: 600 of one large picture held it for 91 s."""
    assert len(tree.parse({"text": ["a"] * 60, "unlike-text": ["b"] * 4}).terms) == MAX_TERMS
    reason = tree.refused({"image": ["2023/a.png"] * 600})
    assert reason.startswith(f"600 terms: a query takes at most {MAX_TERMS} ")


def test_nesting_and_huge_numbers_are_refused_in_a_line(tree: Tree) -> None:
    assert "nested too deeply" in tree.refused(b"[" * 60_000)
    assert "thousands of digits" in tree.refused(b'{"text": "x", "top-k": ' + b"9" * 5000 + b"}")


def test_at_most_64_kib(tree: Tree) -> None:
    head = b'{"text": "a red bicycle"}'
    assert tree.parse(head + b" " * (MAX_QUERY_DOCUMENT_BYTES - len(head))).terms[0].value == "a red bicycle"
    reason = tree.refused(head + b" " * (MAX_QUERY_DOCUMENT_BYTES - len(head) + 1))
    assert reason.startswith("query document too large: ") and "limit of 65,536 bytes (64 KiB)" in reason


def test_long_values_are_cut_in_the_message(tree: Tree) -> None:
    reason = tree.refused({"text": "x", "format": "x" * 5000})
    assert len(reason) < 400 and 'xxxx... is not a format' in reason


# --- reading the file -----------------------------------------------------------------------------


def config(tree: Tree, follow: str = "inside") -> Config:
    return Config(source_directory=tree.images, inbox_directory=tree.inbox, follow_symlinks=follow)


def test_reading_a_document_dropped_into_the_inbox(tree: Tree) -> None:
    tree.document.write_text(json.dumps({"image": "cat.jpg", "folder": "2023"}))
    document = read_query_document(tree.document, config(tree), config(tree).inbox_links)
    assert document.given == {"image": "cat.jpg", "folder": "2023"}  # as written: a result records it so
    spec = document.asks
    assert spec.terms[0].path == (tree.images / "cat.jpg").resolve() and spec.filters.folders == ("2023",)
    assert is_query_document(tree.document) and is_query_document(Path("Q.JSON"))
    assert not is_query_document(Path("q.txt")) and not is_query_document(Path("q.json.part"))


def test_reading_refuses_what_a_text_query_refuses(tree: Tree) -> None:
    cfg = config(tree)
    os.mkfifo(tree.inbox / "pipe.json")
    (tree.root / "elsewhere.json").write_text('{"text": "x"}')
    (tree.inbox / "link.json").symlink_to(tree.root / "elsewhere.json")
    (tree.inbox / "empty.json").write_bytes(b"")
    (tree.inbox / "big.json").write_bytes(b'{"text": "x"}' + b" " * MAX_QUERY_DOCUMENT_BYTES)
    cases = {
        "pipe.json": (QueryDocumentError, "is a named pipe, not a regular file"),
        "link.json": (QueryDocumentError, "outside inbox-directory: not followed"),
        "empty.json": (IncompleteQueryDocument, "empty file (0 bytes)"),
        "big.json": (QueryDocumentError, f"{MAX_QUERY_DOCUMENT_BYTES + 13:,} bytes is above the limit"),
        "gone.json": (QueryDocumentError, "file disappeared before it could be read"),
    }
    for name, (kind, expected) in cases.items():
        with pytest.raises(QueryDocumentError) as caught:
            read_query_document(tree.inbox / name, cfg, cfg.inbox_links)
        assert type(caught.value) is kind and expected in caught.value.reason, (name, caught.value.reason)
    # A document named on the command line (no link policy) may be a link; its pictures still may not.
    assert read_query_document(tree.inbox / "link.json", cfg).asks.terms[0].value == "x"


def test_the_config_follow_symlinks_applies_to_pictures(tree: Tree) -> None:
    (tree.images / "favourite.jpg").symlink_to("cat.jpg")
    tree.document.write_text('{"image": "favourite.jpg"}')
    assert read_query_document(tree.document, config(tree)).asks.terms[0].path == (tree.images / "cat.jpg").resolve()
    with pytest.raises(QueryDocumentError, match="'follow-symlinks' is 'none'"):
        read_query_document(tree.document, config(tree, "none"))


# --- the search command's flags --------------------------------------------------------------------


def flags(*argv: str):  # noqa: ANN201
    return build_parser().parse_args(["search", "--config", "c.json", *argv])


def test_the_flags_make_the_same_query_a_document_would(tree: Tree, berlin: None) -> None:
    (tree.images / "2024").mkdir()
    args = flags("cat.jpg", "--text", "a red bicycle", "--unlike", "a car", "--folder", "2023/", "--folder",
                 str(tree.images / "2024"), "--after", "2023-01-15", "--before", "2024-01-01T00:00Z",
                 "--camera", "canon", "--format", "JPG,png", "--format", "heif", "--top-k", "20",
                 "--min-similarity", "-0.5")
    spec = flag_spec(args, config(tree), texts=args.text, files=args.files)
    assert spec.terms == (Term(TermKind.TEXT, "a red bicycle"),
                          Term(TermKind.IMAGE, "cat.jpg", path=Path("cat.jpg")),
                          Term(TermKind.TEXT, "a car", unlike=True))
    document = tree.parse({"text": "a red bicycle", "folder": ["2023", "2024"], "taken-after": "2023-01-15",
                           "taken-before": "2024-01-01T00:00Z", "camera": "canon", "format": ["jpeg", "png", "heic"],
                           "top-k": 20, "min-similarity": -0.5})
    assert (spec.filters, spec.top_k, spec.min_similarity) == (document.filters, 20, -0.5)
    assert spec.filters.taken_after.isoformat() == "2023-01-15T00:00:00+01:00"


def test_a_txt_file_on_the_command_line_is_its_words(tree: Tree) -> None:
    (tree.root / "bike.txt").write_text("  a red bicycle\n")
    spec = spec_from_flags(files=[tree.root / "bike.txt", tree.images / "cat.jpg"], source_directory=tree.images)
    assert spec.terms == (Term(TermKind.TEXT, "a red bicycle"),
                          Term(TermKind.IMAGE, str(tree.images / "cat.jpg"), path=tree.images / "cat.jpg"))
    (tree.root / "empty.txt").write_bytes(b"")
    with pytest.raises(UnusableFile, match="empty file"):  # the query's failure, as a dropped .txt's
        spec_from_flags(files=[tree.root / "empty.txt"], source_directory=tree.images)


def test_top_k_written_as_a_whole_float_is_that_number_as_a_flag_too(tree: Tree) -> None:
    """The flags follow the document's rules: its 10.0 is 10 (the flag was refused)."""
    args = flags("--text", "x", "--top-k", "10.0")
    assert flag_spec(args, config(tree), texts=args.text).top_k == 10


def test_no_query_flags_is_no_filter(tree: Tree) -> None:
    args = flags("--text", "x")
    spec = flag_spec(args, config(tree), texts=args.text)
    assert spec.filters.empty and spec.top_k is None and spec.min_similarity is None
    assert flags("--query", "a.json", "--query", "b.json").query == [Path("a.json"), Path("b.json")]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--after", "2023/05/06"], "--after \"2023/05/06\" is not a date: write an ISO 8601 date"),
    (["--after", "2023-06-01", "--before", "2023-06-01"], "--after (2023-06-01T00:00:00"),
    (["--top-k", "abc"], "--top-k must be a whole number from 1 to 1000, got \"abc\""),
    (["--top-k", "0"], "--top-k must be a whole number from 1 to 1000, got 0"),
    (["--top-k", "2.5"], "--top-k must be a whole number from 1 to 1000, got \"2.5\""),
    (["--min-similarity", "nan"], "--min-similarity must be a number from -1 to 1"),
    (["--min-similarity", "2"], "--min-similarity must be a number from -1 to 1 (the cosine similarity a hit needs "
                                "at least, e.g. 0.2), got 2.0"),
    (["--folder", "../x"], "--folder \"../x\" leaves source-directory"),
    (["--folder", "2023", "--folder", "2032"], "--folder \"2032\" names no folder of source-directory"),
    (["--format", "png,raw"], "--format \"raw\" is not a format the index records"),
    (["--format", "png,"], "--format \"\" is not a format the index records"),
    (["--camera", ""], "--camera is empty"),
    (["--unlike", " "], "--unlike is empty: give the words to look for"),
])
def test_a_bad_flag_is_a_usage_error_naming_the_flag(tree: Tree, argv: list[str], expected: str) -> None:
    args = flags("--text", "x", *argv)
    with pytest.raises(QueryFlagError) as caught:
        flag_spec(args, config(tree), texts=args.text)
    assert expected in str(caught.value) and caught.value.exit_code is ExitCode.USAGE


def test_flags_need_something_to_look_for(tree: Tree) -> None:
    with pytest.raises(QueryFlagError, match="the search has nothing to look for: give a FILE .* or --text WORDS; "
                                             "--unlike only pushes pictures away"):
        spec_from_flags(unlike=["a car"], source_directory=tree.images)
    with pytest.raises(QueryFlagError, match="--text is empty"):
        spec_from_flags(texts=[""], source_directory=tree.images)


def test_search_with_nothing_at_all_is_refused_before_the_config_is_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["search", "--config", "does-not-exist.json", "--top-k", "5"])
    assert caught.value.code == 2
    assert "search needs a FILE (a picture or a .txt file of words), --text WORDS or --query PATH" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--process-only", "search", "--text", "bike"], ["--search", "q.png", "index"]])
def test_the_original_flags_with_a_command_are_refused_not_dropped(argv: list[str],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``--process-only search --text bike`` searched nothing and exited 0; ``--search q.png index`` only
    indexed. Each is refused, saying which flag is not for a command."""
    with pytest.raises(SystemExit) as caught:
        main(["--config", "does-not-exist.json", *argv])
    assert caught.value.code == 2
    assert f"{argv[0]} is the original interface" in capsys.readouterr().err


def test_a_search_whose_every_file_is_missing_or_text_empty_fails_before_the_index_is_brought_up_to_date(
        tree: Tree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped name is said at once, not after an index run over the library and the model's load."""
    import image_search.cli as cli

    monkeypatch.setattr(cli, "open_runtime", lambda *args, **kwargs: pytest.fail("the index was brought up to date"))
    (tree.root / "config.json").write_text(json.dumps({"source-directory": str(tree.images)}))
    mistyped = tree.root / "cta.jpg"
    code = main(["search", "--config", str(tree.root / "config.json"), str(mistyped), "--query", str(tree.images)])
    assert code == ExitCode.FAILED
    err = capsys.readouterr().err
    assert err.count(f"failed {mistyped}: no such file\n") == 1
    assert err.count(f"failed {tree.images}: is a folder, not an image file\n") == 1
    assert main(["search", "--config", str(tree.root / "config.json"), "--text", "", "--text", " "]) == ExitCode.FAILED
    assert capsys.readouterr().err.count("failed --text: the text query is empty: give the words to search for\n") == 2
    # The original interface's --search FILE too: it indexed the whole library first, then emptied the table.
    assert main(["--env", str(tree.root / "config.json"), "--search", str(mistyped)]) == ExitCode.FAILED
    assert capsys.readouterr().err.count(f"failed {mistyped}: no such file\n") == 1


def test_a_file_dragged_onto_the_prompt_is_that_file_as_the_terminal_pastes_it(tmp_path: Path) -> None:
    """Terminals paste a dropped file's path quoted, with its spaces escaped, or as a file:// address; as
    typed, it named no file and was searched for as words."""
    from image_search.cli import _typed_path

    picture = tmp_path / "My Pictures" / "l'été.jpg"
    picture.parent.mkdir()
    picture.write_bytes(b"a picture")
    quoted = str(picture).replace("'", "'\\''")
    escaped = str(picture).replace(" ", "\\ ").replace("'", "\\'")
    address = "file://" + str(picture).replace(" ", "%20").replace("é", "%C3%A9")
    for pasted in (f"'{quoted}'", f'"{picture}"', escaped, address, str(picture)):
        assert _typed_path(pasted) == picture, pasted
    for words in ("a red bicycle", "it's red", "'a red bicycle'", "file:///nowhere/x.jpg",
                  "~sunset over the sea",  # a ~ of no user: was a RuntimeError that ended the session
                  "a long description of the photo " * 10):  # above a name's 255 bytes: was ENAMETOOLONG
        assert _typed_path(words) is None, words


# --- a document that asks for the duplicates report ------------------------------------------------------


def test_a_duplicates_document_asks_for_the_report(tmp_path: Path) -> None:
    from image_search.query import DuplicatesRequest

    source = tmp_path / "images"
    (source / "2023" / "june").mkdir(parents=True)
    (source / "sel\udcffects").mkdir()
    parse = lambda doc: parse_query_document(json.dumps(doc).encode(), tmp_path / "inbox" / "d.json",  # noqa: E731
                                             source_directory=source)[1]
    assert parse({"duplicates": True}) == DuplicatesRequest((), ("copy", "near-copy", "similar"))
    assert parse({"duplicates": True, "folder": "2023/june/", "kind": "similar,copy"}) == DuplicatesRequest(
        ("2023/june",), ("copy", "similar"))
    assert parse({"duplicates": True, "kind": ["near-copy"]}).kinds == ("near-copy",)
    assert parse({"duplicates": True, "folder": ["2023", "sel\\xffects", "2023/"]}).folders == ("2023", "sel\udcffects")


def test_the_duplicates_flags_take_folders_as_a_document_does(tmp_path: Path) -> None:
    """--folder repeats (any of them), and takes a name as results print it (\\xNN: a byte that is not UTF-8)."""
    from image_search.query import DuplicatesRequest

    source = tmp_path / "images"
    (source / "2023").mkdir(parents=True)
    (source / "sel\udcffects").mkdir()
    asked = duplicates_from_flags(folders=["2023", "sel\\xffects"], kind="copy", source_directory=source)
    assert asked == DuplicatesRequest(("2023", "sel\udcffects"), ("copy",))
    spec = spec_from_flags(texts=["a cat"], folders=["sel\\xffects"], source_directory=source)
    assert spec.filters.folders == ("sel\udcffects",)


@pytest.mark.parametrize(("doc", "reason"), [
    ({"duplicates": False}, "'duplicates' must be true"),
    ({"duplicates": True, "text": "cat"}, 'unknown key "text"'),
    ({"duplicates": True, "kind": "twins"}, "'kind' must be one of copy, near-copy, similar"),
    ({"duplicates": True, "folder": "1999"}, "names no folder of source-directory"),
    ({"duplicates": True, "folder": "../elsewhere"}, "leaves source-directory"),
])
def test_a_bad_duplicates_document_names_its_problem(tmp_path: Path, doc: dict, reason: str) -> None:
    source = tmp_path / "images"
    source.mkdir()
    with pytest.raises(QueryDocumentError) as caught:
        parse_query_document(json.dumps(doc).encode(), tmp_path / "d.json", source_directory=source)
    assert reason in caught.value.reason, caught.value.reason
