"""A query's filters as SQL (``store.filters``): the condition and its parameters, without a database.
What the rows it selects are is ``test_filtered_search.py``'s story; here, that every value the user
gave travels as a parameter, escaped for LIKE where it lands in a pattern."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from image_search.query import Filters
from image_search.store.filters import MATCH_ALL, filter_sql, folder_text, like_escaped


def test_no_filter_is_no_condition() -> None:
    sql = filter_sql(Filters(), copies=[])
    assert (sql.where, sql.params, sql.filtered) == (MATCH_ALL, {}, False)


def test_a_folder_matches_itself_and_what_is_under_it_at_a_boundary() -> None:
    sql = filter_sql(Filters(folders=("2023",)), copies=[])
    assert sql.where == "(folder = %(folder_0)s OR folder LIKE %(folder_0_under)s)"
    assert sql.params == {"folder_0": "2023", "folder_0_under": "2023/%"}
    assert sql.filtered


def test_a_picture_with_a_copy_in_the_folder_passes_by_its_hash() -> None:
    """The copies' hashes, read first (``copies_in``), as one list: its length known to the planner, a row
    tested against it by a hash (a subquery's array was searched from its start for each row)."""
    sql = filter_sql(Filters(folders=("2023",), formats=("PNG",)), copies=["h1", "h2"])
    assert sql.where == ("(folder = %(folder_0)s OR folder LIKE %(folder_0_under)s OR file_hash = ANY(%(copies)s)) "
                         "AND (format = ANY(%(formats)s))")
    assert sql.params["copies"] == ["h1", "h2"]


def test_folder_spellings_mean_the_same_folder() -> None:
    for spelling in ("trips/2023", "trips/2023/", "./trips/2023", "/trips//2023"):
        assert folder_text(spelling) == "trips/2023", spelling
    assert folder_text("") is None and folder_text(".") is None and folder_text("./") is None


def test_the_whole_source_among_the_folders_is_no_condition() -> None:
    assert filter_sql(Filters(folders=("2023", ".")), copies=[]).where == MATCH_ALL
    assert filter_sql(Filters(folders=("",)), copies=[]).where == MATCH_ALL


def test_several_folders_are_alternatives_and_twins_count_once() -> None:
    sql = filter_sql(Filters(folders=("a", "b/c", "a/")), copies=[])
    assert sql.where == ("(folder = %(folder_0)s OR folder LIKE %(folder_0_under)s OR "
                         "folder = %(folder_1)s OR folder LIKE %(folder_1_under)s)")
    assert sql.params == {"folder_0": "a", "folder_0_under": "a/%", "folder_1": "b/c", "folder_1_under": "b/c/%"}


def test_like_wildcards_and_odd_bytes_in_a_folder_name_are_literal() -> None:
    sql = filter_sql(Filters(folders=("20_3 100%",)), copies=[])
    assert sql.params == {"folder_0": "20_3 100%", "folder_0_under": "20\\_3 100\\%/%"}
    # A name that is not UTF-8 (byte FF) and one with a backslash, as the table stores them (names.escape).
    odd = filter_sql(Filters(folders=("bad\udcff", "back\\slash")), copies=[])
    assert odd.params["folder_0"] == "bad\\xff" and odd.params["folder_0_under"] == "bad\\\\xff/%"
    assert odd.params["folder_1"] == "back\\\\slash" and odd.params["folder_1_under"] == "back\\\\\\\\slash/%"
    assert like_escaped("a\\b%c_d") == "a\\\\b\\%c\\_d"


def test_dates_inclusive_after_exclusive_before() -> None:
    after = datetime(2023, 1, 1, tzinfo=timezone.utc)
    before = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    sql = filter_sql(Filters(taken_after=after, taken_before=before), copies=[])
    assert sql.where == "(taken_at >= %(taken_after)s) AND (taken_at < %(taken_before)s)"
    assert sql.params == {"taken_after": after, "taken_before": before}


def test_camera_is_a_case_insensitive_substring_of_make_and_model() -> None:
    sql = filter_sql(Filters(camera="EOS_R5 100%"), copies=[])
    assert sql.where == "((coalesce(camera_make, '') || ' ' || coalesce(camera_model, '')) ILIKE %(camera)s)"
    assert sql.params == {"camera": "%EOS\\_R5 100\\%%"}


def test_formats_lower_case_any_of_them() -> None:
    sql = filter_sql(Filters(formats=("PNG", "jpeg", "png")), copies=[])
    assert sql.where == "(format = ANY(%(formats)s))"
    assert sql.params == {"formats": ["jpeg", "png"]}


def test_no_value_is_ever_written_into_the_statement() -> None:
    hostile = "x'); DROP TABLE image_embeddings; --"
    sql = filter_sql(Filters(folders=(hostile,), camera=hostile, formats=(hostile,),
                             taken_after=datetime(2020, 1, 1, tzinfo=timezone.utc)), copies=[])
    assert "DROP" not in sql.where and "2020" not in sql.where
    placeholders = re.findall(r"%\((\w+)\)s", sql.where)
    assert sorted(placeholders) == sorted(sql.params)  # each value once, by name
    assert "%" not in re.sub(r"%\(\w+\)s", "", sql.where)  # and nothing else for the driver to read
