"""The duplicates report's groups from stored pictures (no database): which pictures form a group of each
kind, which one is suggested to keep, what a line of ``duplicates.jsonl`` says, and how the contact
sheets lay the groups out. The report written from a real index: tests/test_duplicates_report.py."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone

import numpy as np
import pytest

from image_search import phash
from image_search.config import Config
from image_search.duplicates import (
    ALL_KINDS,
    Kind,
    Thresholds,
    find_groups,
    parse_kinds,
    group_record,
    sheet_pages,
    similar_threshold,
)
from image_search.sheet import MAX_COLUMNS, render_tiles
from image_search.store.duplicates import StoredPicture

THRESHOLDS = Thresholds(near_copy_max_distance=10, similar_min_similarity=0.9, burst_seconds=30.0)
BASE = int.from_bytes(np.random.default_rng(0).bytes(32), "big") >> 1


def when(seconds: float) -> datetime:
    return datetime.fromtimestamp(1_717_243_200 + seconds, timezone.utc)  # from 2024-06-01 12:00 UTC


def picture(name: str, *, paths: tuple[str, ...] = (), bits: int | None = 0, size=(400, 300), nbytes=1000,
            taken: float | None = None) -> StoredPicture:
    """A stored picture whose hash is BASE with ``bits`` low bits flipped (None: no hash yet)."""
    return StoredPicture(file_hash=f"h-{name}", paths=paths or (f"/photos/{name}.jpg",),
                         processed_path=f"/processed/{name}.jpg",
                         phash=None if bits is None else BASE ^ ((1 << bits) - 1), width=size[0], height=size[1],
                         bytes=nbytes, format="jpeg", taken_at=None if taken is None else when(taken),
                         taken_at_offset_minutes=None)


def unit(*rows: list[float]) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def names(group) -> list[str]:
    return [m.file_path.rsplit("/", 1)[-1] for m in group.members]


def test_the_same_bytes_under_two_paths_is_a_copy_group_whose_members_are_the_paths():
    both = picture("a", paths=("/photos/b/a.jpg", "/photos/a/a.jpg"), bits=None)
    [group] = find_groups([both, picture("c", bits=None)], None, [Kind.COPY], THRESHOLDS)
    assert group.kind is Kind.COPY
    assert [m.file_path for m in group.members] == ["/photos/a/a.jpg", "/photos/b/a.jpg"]  # tie: the path
    assert [m.copies for m in group.members] == [["/photos/b/a.jpg"], ["/photos/a/a.jpg"]]
    assert [m.similarity for m in group.members] == [1.0, 1.0]


def test_links_to_a_file_are_no_copies_of_it_and_never_the_one_to_keep(tmp_path):
    """A symbolic link sorts first by name: kept, with its target suggested as the copy to delete, it would
    lead nowhere. A hard link is the same file. Neither is a copy; a real copy beside them is."""
    photo = tmp_path / "solo" / "holiday.png"
    photo.parent.mkdir()
    photo.write_bytes(b"pixels")
    links = tmp_path / "0links"
    links.mkdir()
    (links / "holiday.png").symlink_to(photo)
    os.link(photo, links / "hard.png")
    paths = tuple(str(p) for p in (links / "holiday.png", links / "hard.png", photo))
    assert find_groups([picture("holiday", paths=paths, bits=None)], None, [Kind.COPY], THRESHOLDS) == []
    shutil.copyfile(photo, tmp_path / "copy.png")
    [group] = find_groups([picture("holiday", paths=(*paths, str(tmp_path / "copy.png")), bits=None)], None,
                          [Kind.COPY], THRESHOLDS)
    # Kept: the file the link leads to (a hard link's name of it), not the copy, which the link would outlive.
    assert [m.file_path for m in group.members] == [str(links / "hard.png"), str(tmp_path / "copy.png")]
    assert str(links / "holiday.png") in group.keep.copies  # still named among the paths of those bytes
    # A link to the copy (and none to the photo among the paths): the copy is kept, though it sorts after.
    shutil.copyfile(photo, tmp_path / "zz-copy.png")
    (tmp_path / "0-link.png").symlink_to(tmp_path / "zz-copy.png")
    [group] = find_groups([picture("holiday", paths=(str(photo), str(tmp_path / "0-link.png"),
                                                     str(tmp_path / "zz-copy.png")), bits=None)],
                          None, [Kind.COPY], THRESHOLDS)
    assert [m.file_path for m in group.members] == [str(tmp_path / "zz-copy.png"), str(photo)]


def test_near_copies_group_by_hash_and_the_largest_earliest_is_kept():
    pictures = [picture("small", bits=3, size=(200, 150)), picture("big", bits=0, size=(800, 600), taken=50),
                picture("big-earlier", bits=5, size=(800, 600), taken=10), picture("other", bits=120),
                picture("unhashed", bits=None)]
    [group] = find_groups(pictures, None, [Kind.NEAR_COPY], THRESHOLDS)
    assert names(group) == ["big-earlier.jpg", "big.jpg", "small.jpg"]
    assert [m.similarity for m in group.members] == [1.0, 1 - 5 / phash.HASH_BITS, 1 - 2 / phash.HASH_BITS]


def test_the_larger_file_is_kept_between_two_of_one_size():
    pictures = [picture("jpeg", bits=0, nbytes=900), picture("png", bits=2, nbytes=5000)]
    [group] = find_groups(pictures, None, [Kind.NEAR_COPY], THRESHOLDS)
    assert group.keep.file_path == "/photos/png.jpg"


def test_near_copies_never_chain():
    """a~b (8 bits) and b~c (8 bits) but a and c 16 bits apart: no group of three."""
    a, b, c = BASE, BASE ^ 0xFF, BASE ^ 0xFFFF
    pictures = [picture(n, bits=0) for n in "abc"]
    pictures = [StoredPicture(**{**p.__dict__, "phash": h}) for p, h in zip(pictures, (a, b, c))]
    groups = find_groups(pictures, None, [Kind.NEAR_COPY], THRESHOLDS)
    assert [len(g.members) for g in groups] == [2]


def test_similar_pictures_group_only_when_taken_close_in_time():
    pictures = [picture("shot1", taken=0), picture("shot2", taken=5), picture("much-later", taken=3600),
                picture("undated"), picture("unlike", taken=2)]
    vectors = unit([1, 0.1, 0], [1, 0.12, 0], [1, 0.11, 0], [1, 0.09, 0.01], [0, 1, 0])
    [group] = find_groups(pictures, vectors, [Kind.SIMILAR], THRESHOLDS)
    assert sorted(names(group)) == ["shot1.jpg", "shot2.jpg", "undated.jpg"]
    assert group.keep.file_path == "/photos/shot1.jpg"  # same size and bytes: the earliest taken
    assert all(0.9 <= m.similarity <= 1.0 for m in group.members)


def test_each_kind_has_its_own_groups_and_the_kinds_come_in_order():
    pictures = [picture("a", paths=("/p/a1.jpg", "/p/a2.jpg"), bits=0), picture("b", bits=1)]
    vectors = unit([1, 0], [1, 0.01])
    groups = find_groups(pictures, vectors, ALL_KINDS, THRESHOLDS)
    assert [g.kind for g in groups] == [Kind.COPY, Kind.NEAR_COPY, Kind.SIMILAR]
    assert find_groups(pictures, vectors, [Kind.SIMILAR, Kind.COPY], THRESHOLDS) == [groups[0], groups[2]]


def test_a_group_line_names_every_member_and_the_one_to_keep():
    pictures = [picture("a", paths=("/p/a.jpg", "/p/copy of a.jpg"), bits=0, taken=0), picture("b", bits=2)]
    [group] = find_groups(pictures, None, [Kind.NEAR_COPY], THRESHOLDS)
    record = group_record(7, group)
    assert record["group"] == 7 and record["kind"] == "near-copy" and record["keep"] == "/p/a.jpg"
    first, second = record["members"]
    assert first == {"file_path": "/p/a.jpg", "copies": ["/p/copy of a.jpg"], "file_hash": "h-a", "width": 400,
                     "height": 300, "bytes": 1000, "format": "jpeg", "taken_at": first["taken_at"], "similarity": 1.0}
    assert first["taken_at"].startswith("2024-06-01")
    assert second["file_path"] == "/photos/b.jpg" and second["copies"] == [] and second["taken_at"] is None


def test_sheets_show_each_group_on_one_page_with_the_kept_one_marked(tmp_path):
    big = [picture(f"burst{i}", bits=0) for i in range(14)]
    small = [picture(f"pair{i}", bits=0, paths=(f"/p/x{i}.jpg", f"/p/y{i}.jpg")) for i in range(12)]
    groups = find_groups(big, None, [Kind.NEAR_COPY], THRESHOLDS) + find_groups(small, None, [Kind.COPY], THRESHOLDS)
    pages = sheet_pages(groups)
    rows_of_big = pages[0][:2]
    assert [len(row) for row in rows_of_big] == [MAX_COLUMNS, MAX_COLUMNS]  # 9 pictures, then "5 more"
    assert rows_of_big[0][0].marked and not any(t.marked for t in rows_of_big[0][1:])
    assert rows_of_big[1][-1].first_line == "#1 · 5 more"
    assert all(len(page) <= 10 for page in pages) and len(pages) == 2  # 2 rows + 8 pairs, then 4 pairs
    assert sum(tile.marked for page in pages for row in page for tile in row) == len(groups)
    sheet = render_tiles(pages[1], heading="page 2")
    assert sheet.width > 0 and sheet.height > 0


def test_copies_made_with_cp_share_a_name_and_their_tiles_say_which_folder_each_is_in():
    copies = picture("zz", paths=("/photos/2023/zz.png", "/photos/nc/zz.png", "/photos/a/x/y.png", "/photos/b/x/y.png"),
                     bits=None)
    [group] = find_groups([copies], None, [Kind.COPY], THRESHOLDS)
    [[row]] = sheet_pages([group])
    assert [tile.second_line for tile in row] == ["2023/zz.png", "a/x/y.png", "b/x/y.png", "nc/zz.png"]
    [group] = find_groups([picture("y", paths=("/b/y.png", "/a/b/y.png"), bits=None)], None, [Kind.COPY], THRESHOLDS)
    assert [tile.second_line for tile in sheet_pages([group])[0][0]] == ["a/b/y.png", "b/y.png"]
    near = find_groups([picture("one", bits=0), picture("two", bits=1)], None, [Kind.NEAR_COPY], THRESHOLDS)
    assert [tile.second_line for tile in sheet_pages(near)[0][0]] == ["one.jpg", "two.jpg"]  # names alone tell them
    # Names that are not UTF-8 are shown escaped, as a search's sheet shows them: two copies named in bytes
    # that no font draws (both were the same missing-glyph box) are told apart.
    odd = picture("odd", paths=(os.fsdecode(b"/p/caf\xe9.jpg"), os.fsdecode(b"/p/caf\xe8.jpg")), bits=None)
    [group] = find_groups([odd], None, [Kind.COPY], THRESHOLDS)
    assert sorted(tile.second_line for tile in sheet_pages([group])[0][0]) == ["caf\\xe8.jpg", "caf\\xe9.jpg"]


def test_similar_defaults_follow_the_model_family():
    assert similar_threshold("jinaai/jina-clip-v2") == 0.90
    assert similar_threshold("openai/clip-vit-large-patch14") == 0.92
    assert similar_threshold("google/siglip-so400m-patch14-384") == 0.90
    assert Thresholds.of(Config(model_name="openai/clip-vit-base-patch32")).similar_min_similarity == 0.92
    assert Thresholds.of(Config(similar_min_similarity=0.8)).similar_min_similarity == 0.8


def test_kinds_are_read_from_a_comma_list():
    assert parse_kinds("similar, copy") == (Kind.COPY, Kind.SIMILAR)
    assert parse_kinds("copy,near-copy,similar") == ALL_KINDS
    for wrong in ("duplicate", "", "copy,nearcopy"):
        with pytest.raises(ValueError, match="the kinds are copy, near-copy, similar"):
            parse_kinds(wrong)
