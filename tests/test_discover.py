"""Discovery through real folders: what is indexed, what is never ours, and in which order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from image_search.discover import (
    IMAGE_EXTENSIONS,
    SUPPORTED_FORMATS,
    discover_images,
    is_ignored_name,
    is_ignored_path,
    is_image_candidate,
    iter_images,
)
from tests.support.privileges import give_to_unprivileged, reachable_dir, unprivileged


def touch(root: Path, *relatives: str) -> list[Path]:
    """Create files (content is irrelevant to discovery) and return their paths."""
    out = []
    for rel in relatives:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        out.append(path)
    return out


def found(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in discover_images(root)]


def test_finds_images_recursively(tmp_path):
    touch(tmp_path, "top.jpg", "a/one.png", "a/b/two.webp", "a/b/c/d/e/deep.gif", "x/y/z.bmp", "t/scan.tiff",
          "t/scan2.tif", "j/photo.jpeg")
    assert sorted(found(tmp_path)) == sorted([
        "top.jpg", "a/one.png", "a/b/two.webp", "a/b/c/d/e/deep.gif", "x/y/z.bmp", "t/scan.tiff", "t/scan2.tif",
        "j/photo.jpeg",
    ])


def test_results_are_absolute_when_the_root_is(tmp_path):
    touch(tmp_path, "a/b.jpg")
    assert discover_images(tmp_path) == [tmp_path / "a" / "b.jpg"]


@pytest.mark.parametrize("name", [
    "a.jpg", "a.JPG", "a.Jpg", "a.jpeg", "a.JPEG", "a.jpe", "a.png", "a.PNG", "a.pNg", "a.webp", "a.WEBP", "a.gif",
    "a.GIF", "a.bmp", "a.BMP", "a.tif", "a.TIF", "a.tiff", "a.TIFF", "a.TiFf",
])
def test_extensions_are_case_insensitive(tmp_path, name):
    touch(tmp_path, f"sub/{name}")
    assert found(tmp_path) == [f"sub/{name}"]


@pytest.mark.parametrize("name", [
    "notes.txt", "doc.pdf", "layers.psd", "vector.eps", "clip.mp4", "raw.cr2", "raw.nef", "README", "jpg",
    "archive.jpg.zip", "photo.jpg.bak", "photo.jpgx", "photo.pngx", "photo.svg", "icon.ico", "image.jxl",
])
def test_other_extensions_are_not_indexed(tmp_path, name):
    touch(tmp_path, name)
    assert found(tmp_path) == []


def test_a_folder_named_like_an_image_is_not_a_file_to_index(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    touch(tmp_path, "album.jpg/inside.png")
    assert found(tmp_path) == ["album.jpg/inside.png"]


def test_every_extension_maps_to_formats_we_decode():
    assert set(IMAGE_EXTENSIONS) >= {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    for ext, formats in IMAGE_EXTENSIONS.items():
        assert ext == ext.lower() and ext.startswith(".")
        assert set(formats) <= set(SUPPORTED_FORMATS)
    for risky in ("PSD", "EPS", "PDF", "FITS", "DDS", "SGI", "ICNS"):
        assert risky not in SUPPORTED_FORMATS


# --------------------------------------------------------------------------------------------------
# Names that are never ours
# --------------------------------------------------------------------------------------------------

IGNORED_FILES = [
    ".hidden.jpg",  # dotfile
    "._photo.jpg",  # macOS AppleDouble resource fork
    "._PHOTO.JPG",
    ".DS_Store",
    ".ds_store",
    "Thumbs.db",
    "thumbs.db",
    "THUMBS.DB",
    "desktop.ini",
    "Desktop.ini",
    "photo.jpg.part",  # Firefox / wget partial downloads
    "photo.jpg.PART",
    "photo.jpg.tmp",
    "photo.JPG.TMP",
    "photo.jpg.crdownload",  # Chrome
    "photo.jpg.Crdownload",
    "photo.jpg~",  # editor backups
    "photo~",
    "~$photo.jpg",  # Office lock files
    "~$report.png",
    ".photo.jpg.Xy12ab",  # rsync's temporary name
]


@pytest.mark.parametrize("name", IGNORED_FILES)
def test_hidden_temporary_and_system_files_are_ignored(tmp_path, name):
    assert is_ignored_name(name)
    touch(tmp_path, name, f"sub/{name}", "keep.jpg")
    assert found(tmp_path) == ["keep.jpg"]


IGNORED_FOLDERS = [".git", ".thumbnails", ".cache", ".Trash-1000", "@eaDir", "@EADIR", "#recycle", "#Recycle",
                   "#snapshot", "$RECYCLE.BIN"]


@pytest.mark.parametrize("folder", IGNORED_FOLDERS)
def test_hidden_and_system_folders_are_ignored_at_any_depth(tmp_path, folder):
    touch(tmp_path, f"{folder}/a.jpg", f"{folder}/deeper/b.png", f"album/{folder}/c.jpg",
          f"album/2024/{folder}/SYNOFILE_THUMB_XL.jpg", "album/keep.jpg")
    assert found(tmp_path) == ["album/keep.jpg"]
    assert is_ignored_path(tmp_path / folder / "a.jpg", tmp_path)
    assert is_ignored_path(tmp_path / "album" / folder / "c.jpg", tmp_path)
    assert not is_image_candidate(tmp_path / "album" / folder / "c.jpg", tmp_path)


@pytest.mark.parametrize("name", ["photo.jpg", "my.photo.jpg", "photo_v2.png", "café au lait.jpeg", "写真.webp",
                                  "photo (1).JPG", "a~b.jpg", "tmp.jpg", "part.png", "photo.tmp.jpg", "$money.jpg",
                                  "#1.png", "@home.gif", "-dash.bmp", " space.tif"])
def test_ordinary_names_are_not_ignored(tmp_path, name):
    assert not is_ignored_name(name)
    touch(tmp_path, name)
    assert found(tmp_path) == [name]


@pytest.mark.parametrize("folder", ["eaDir", "recycle", "tmp", "part", "Thumbs", "photos.part", "@home", "#1"])
def test_ordinary_folders_are_not_ignored(tmp_path, folder):
    touch(tmp_path, f"{folder}/a.jpg")
    assert found(tmp_path) == [f"{folder}/a.jpg"]


def test_a_hidden_root_folder_itself_is_fine(tmp_path):
    """Only folders below the root count: a source folder that happens to be hidden is still indexed."""
    root = tmp_path / ".photos"
    touch(root, "a.jpg", "sub/b.png")
    assert found(root) == ["a.jpg", "sub/b.png"]
    root2 = tmp_path / "@eaDir"
    touch(root2, "c.jpg")
    assert found(root2) == ["c.jpg"]


def test_is_image_candidate(tmp_path):
    root = tmp_path / "src"
    assert is_image_candidate(root / "a" / "b.JPG", root)
    assert not is_image_candidate(root / "a" / "b.txt", root)
    assert not is_image_candidate(root / ".a" / "b.jpg", root)
    assert not is_image_candidate(root / "a" / "b.jpg.part", root)
    assert not is_image_candidate(tmp_path / "elsewhere" / "b.jpg", root), "outside the root"
    assert not is_image_candidate(root, root)


def test_temporary_name_becomes_a_candidate_once_renamed(tmp_path):
    """A download lands as photo.jpg.part and is renamed when complete: only the final name is indexed."""
    (partial,) = touch(tmp_path, "photo.jpg.part")
    assert found(tmp_path) == []
    partial.rename(tmp_path / "photo.jpg")
    assert found(tmp_path) == ["photo.jpg"]


# --------------------------------------------------------------------------------------------------
# Order, links, odd roots
# --------------------------------------------------------------------------------------------------

TREE = [
    "b.jpg", "a.png", "C.jpg", "z/1.jpg", "z/0.png", "m/n/o.jpg", "m/a.jpg", "A/x.jpg", "apple.webp", "apple.png",
]


def test_stable_sorted_order(tmp_path):
    touch(tmp_path, *TREE)
    first = found(tmp_path)
    # each folder's files in sorted order, then its sub-folders in sorted order (depth first)
    assert first == ["C.jpg", "a.png", "apple.png", "apple.webp", "b.jpg", "A/x.jpg", "m/a.jpg", "m/n/o.jpg",
                     "z/0.png", "z/1.jpg"]
    assert found(tmp_path) == first
    assert [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path)] == first


def test_order_does_not_depend_on_creation_order(tmp_path):
    listings = []
    for seed in range(3):
        root = tmp_path / f"run{seed}"
        names = list(TREE)
        random.Random(seed).shuffle(names)
        touch(root, *names)
        listings.append(found(root))
    assert listings[0] == listings[1] == listings[2]


def test_same_name_different_extension_both_found(tmp_path):
    touch(tmp_path, "fruit/apple.png", "fruit/apple.webp", "fruit/apple.JPG")
    assert found(tmp_path) == ["fruit/apple.JPG", "fruit/apple.png", "fruit/apple.webp"]


def test_iter_images_is_lazy_and_discover_images_a_list(tmp_path):
    touch(tmp_path, "a.jpg")
    iterator = iter_images(tmp_path)
    assert iter(iterator) is iterator
    assert isinstance(discover_images(tmp_path), list)


def test_empty_and_missing_roots_give_nothing(tmp_path):
    assert discover_images(tmp_path) == []
    assert discover_images(tmp_path / "does-not-exist") == []


def test_root_given_as_a_string(tmp_path):
    touch(tmp_path, "a.jpg")
    assert discover_images(str(tmp_path)) == [tmp_path / "a.jpg"]  # type: ignore[arg-type]


def test_links_to_files_and_folders_outside_are_followed_when_no_policy_narrows_it(tmp_path):
    """With every link allowed (follow-symlinks: all), a linked folder outside is walked under the link's
    name; a loop back into the folder is not walked again (tests/test_odd_names.py has each policy)."""
    root = tmp_path / "src"
    outside = tmp_path / "outside"
    touch(outside, "linked.jpg", "folder/inside.jpg")
    touch(root, "real.jpg")
    (root / "link.jpg").symlink_to(outside / "linked.jpg")
    (root / "linked-folder").symlink_to(outside / "folder", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a loop must not hang discovery
    assert found(root) == ["link.jpg", "real.jpg", "linked-folder/inside.jpg"]


def test_unreadable_sub_folder_is_skipped_not_fatal():
    """Run as a user who cannot read the folder (root reads any: as root this runs as nobody)."""
    with reachable_dir() as root:
        touch(root, "ok/a.jpg", "locked/b.jpg", "z.jpg")
        for folder in (root / "ok", root / "locked"):
            give_to_unprivileged(folder)
        (root / "locked").chmod(0)
        with unprivileged():
            with pytest.raises(PermissionError):
                os.listdir(root / "locked")  # the story holds: this user cannot look inside
            assert found(root) == ["z.jpg", "ok/a.jpg"]
