"""The query as understood: how terms combine into one vector, how a query is described on the contact
sheet, and what ``<stem>.json`` records about it (unit tier: no model, no database)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from image_search.query import Completeness, Filters, QueryRecord, QuerySpec, Term, TermKind, likes_nothing, single_term
from image_search.search import combine


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_one_term_is_its_own_vector():
    a = unit(3, 4, 0)
    assert np.allclose(combine([1.0], a[None]), a)


def test_weights_pull_the_vector_toward_the_heavier_term():
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    even, heavy_a = combine([1, 1], np.stack([a, b])), combine([3, 1], np.stack([a, b]))
    assert even @ a == pytest.approx(even @ b)
    assert heavy_a @ a > even @ a > heavy_a @ b
    assert np.linalg.norm(heavy_a) == pytest.approx(1.0)


def test_an_unlike_term_pushes_the_vector_away():
    a, b = unit(1, 0.2, 0), unit(0.2, 1, 0)
    liked = combine([1], a[None])
    pushed = combine([1, -1], np.stack([a, b]))
    assert pushed @ b < liked @ b  # further from what is unliked
    assert pushed @ a > 0


def test_terms_that_cancel_out_give_no_vector():
    a = unit(1, 2, 3)
    assert combine([1, -1], np.stack([a, a])) is None
    assert combine([0.5, 0.5], np.stack([a, -a])) is None


def test_a_query_that_only_pushes_away_once_its_repeated_terms_are_added_up_likes_nothing():
    cat, dog = Term(TermKind.TEXT, "cat"), Term(TermKind.TEXT, "dog")
    assert likes_nothing([cat, Term(TermKind.TEXT, "cat", weight=2, unlike=True)])  # ranked by unlikeness
    assert likes_nothing([cat, Term(TermKind.TEXT, "cat", unlike=True)])  # nothing at all
    assert not likes_nothing([cat, Term(TermKind.TEXT, "cat", weight=0.5, unlike=True)])
    assert not likes_nothing([dog, Term(TermKind.TEXT, "cat", weight=2, unlike=True)])  # another term liked
    beach = Path("/srv/images/trips/beach.jpg")
    assert likes_nothing([Term(TermKind.IMAGE, "trips/beach.jpg", path=beach),  # one picture, named two ways
                          Term(TermKind.IMAGE, "./trips/beach.jpg", weight=3, unlike=True, path=beach)])
    assert not likes_nothing([Term(TermKind.IMAGE, "beach.jpg"), Term(TermKind.TEXT, "beach.jpg", unlike=True)])


def test_the_description_lists_terms_weights_unlike_and_filters():
    spec = QuerySpec(
        terms=(Term(TermKind.TEXT, "a  red\ncar", weight=2), Term(TermKind.IMAGE, "trips/beach.jpg"),
               Term(TermKind.TEXT, "people", unlike=True)),
        filters=Filters(folders=("2023",), taken_after=datetime(2023, 6, 1, tzinfo=timezone.utc), formats=("jpeg", "heic")),
        min_similarity=0.2,
    )
    assert spec.describe() == ["“a red car” ×2", "beach.jpg", "− “people”", "folder 2023",
                               "taken-after 2023-06-01T00:00:00+00:00", "format jpeg, heic", "min-similarity 0.2"]


def test_the_record_holds_the_query_as_given_and_as_understood():
    given = {"text": [{"text": "red car", "weight": 2}], "unlike-text": "people", "folder": "2023"}
    spec = QuerySpec(terms=(Term(TermKind.TEXT, "red car", weight=2), Term(TermKind.TEXT, "people", unlike=True)),
                     filters=Filters(folders=("2023",)), top_k=5)
    record = QueryRecord(spec, Completeness(True), top_k=5, given=given).record()
    assert record == {
        "query": given,
        "understood": {"terms": [{"kind": "text", "value": "red car", "weight": 2, "unlike": False},
                                 {"kind": "text", "value": "people", "weight": 1.0, "unlike": True}],
                       "folder": ["2023"], "top-k": 5},
        "complete": True,
    }


def test_an_incomplete_ranking_says_why():
    record = QueryRecord(single_term(TermKind.TEXT, "cat"), Completeness(False, "the index is being rebuilt"), 10).record()
    assert record["complete"] is False and record["incomplete-reason"] == "the index is being rebuilt"
    assert "query" not in record  # a plain query has nothing given beyond its words


def test_a_picture_named_in_bytes_that_are_not_utf8_is_recorded_escaped():
    term = Term(TermKind.IMAGE, "caf\udce9.jpg")
    assert term.record()["value"] == "caf\\xe9.jpg"


def test_only_the_weights_ratios_matter_however_large() -> None:
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    assert np.allclose(combine([1e20, 1e20], np.stack([a, b])), combine([1, 1], np.stack([a, b])))
    assert np.allclose(combine([1e39, 1e38], np.stack([a, b])), combine([10, 1], np.stack([a, b])), atol=1e-6)


def test_the_service_says_how_many_pictures_were_not_indexed_yet_when_it_answered():
    spec = single_term(TermKind.TEXT, "cat")
    during_a_burst = QueryRecord(spec, Completeness(True), 10, not_yet_indexed=3000).record()
    assert during_a_burst["complete"] is True and during_a_burst["not-yet-indexed"] == 3000
    assert QueryRecord(spec, Completeness(True), 10, not_yet_indexed=0).record()["not-yet-indexed"] == 0
    assert "not-yet-indexed" not in QueryRecord(spec, Completeness(True), 10).record()  # a command indexes first
