"""Any name Linux allows, as text and within the limits (names.py), and what a folder holds besides
files (entries.py, discover.scan_folder): unit tests on real files, no database, no model."""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from image_search import entries
from image_search.config import load_config
from image_search.discover import FolderScan, scan_entry, scan_folder
from image_search.entries import EntryRefused, FollowLinks, LinkPolicy, check_regular, read_regular
from image_search.names import NAME_MAX, escape, fit_name, fits_path, name_bytes, unescape
from image_search.preprocess import (
    IncompleteFile,
    PreprocessError,
    preprocess_image,
    processed_path_for,
    thumbnail_path_for,
)
from tests.support.files import save_picture, write_config
from tests.support.logs import logging_to
from tests.support.odd_entries import fs_name, random_name

BOX = (64, 64)
LIMIT = 178_956_970


def finishes_within(seconds: float, action: Callable[[], object]) -> object:
    """``action()``'s result, or a failure if it has not returned after ``seconds`` (a read that blocks on
    a pipe would otherwise hang the test run: the thread is left behind, the assertion names the hang)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(action())
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


# --- names as text ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "text"), [
    (b"bad\xff\xfename.png", "bad\\xff\\xfename.png"),
    (b"new\nline.png", "new\\x0aline.png"),
    (b"back\\slash.png", "back\\\\slash.png"),
    (b"literally \\xff.png", "literally \\\\xff.png"),  # spelled with a backslash: not the byte FF
    ("赤い自転車.jpg".encode(), "赤い自転車.jpg"),
    (b"caf\xc3\xa9.jpg", "café.jpg"),  # valid UTF-8 stays as it is
    (b"half \xc3.jpg", "half \\xc3.jpg"),  # the first byte of a character, alone
    (b"tab\tdel\x7f.png", "tab\\x09del\\x7f.png"),
])
def test_a_name_is_shown_escaped_and_read_back_to_its_exact_bytes(raw: bytes, text: str) -> None:
    name = os.fsdecode(raw)
    assert escape(name) == text
    assert os.fsencode(unescape(escape(name))) == raw


def test_random_byte_names_round_trip_and_no_two_share_a_text() -> None:
    rng = random.Random(19)
    names = {os.fsdecode(random_name(rng)) for _ in range(3000)}
    texts = {escape(name): name for name in names}
    assert len(texts) == len(names), "two names were given the same text"
    for text, name in texts.items():
        assert unescape(text) == name
        text.encode("utf-8")  # valid UTF-8: PostgreSQL, JSON and terminals take it
        assert "\n" not in text and "\x00" not in text


def test_a_folders_text_is_a_prefix_of_its_files_text() -> None:
    folder = os.fsdecode(b"/photos/\xff\xfe old\\ones")
    assert escape(f"{folder}/a.jpg").startswith(escape(folder) + "/")


def test_text_written_before_escaping_reads_as_itself() -> None:
    """A row stored before names were escaped holds a literal backslash: one that starts no escape stays."""
    assert unescape("C:\\photos\\a.jpg") == "C:\\photos\\a.jpg"


# --- names within 255 bytes ---------------------------------------------------------------------------


def test_a_short_name_is_kept_and_a_long_one_cut_with_a_hash_and_its_suffix() -> None:
    assert fit_name("apple.png.jpg", keep_suffix=".png.jpg") == "apple.png.jpg"
    long_a, long_b = "a" * 250 + "1.png.jpg", "a" * 250 + "2.png.jpg"
    fitted_a, fitted_b = (fit_name(n, keep_suffix=".png.jpg", reserve=11) for n in (long_a, long_b))
    assert name_bytes(fitted_a) <= NAME_MAX - 11 and name_bytes(fitted_b) <= NAME_MAX - 11
    assert fitted_a.endswith(".png.jpg") and fitted_a.startswith("a" * 100)
    assert fitted_a != fitted_b, "two long names that share their start must stay apart"


def test_a_long_name_in_a_script_of_three_byte_characters_is_cut_between_characters() -> None:
    fitted = fit_name("写" * 90 + ".jpg", keep_suffix=".jpg")  # 274 bytes
    assert name_bytes(fitted) <= NAME_MAX
    fitted.encode("utf-8")  # no half character left at the cut


def test_processed_copy_and_thumbnail_of_a_254_byte_name_fit(tmp_path: Path) -> None:
    source_root, processed_root = tmp_path / "images", tmp_path / "processed"
    a = source_root / ("x" * 250 + ".png")  # 254 bytes: legal on ext4, btrfs, xfs
    b = source_root / ("x" * 250 + ".jpg")
    paths = [processed_path_for(p, source_root, processed_root) for p in (a, b)]
    for processed in paths:
        assert fits_path(processed) and fits_path(thumbnail_path_for(processed))
        processed.parent.mkdir(parents=True, exist_ok=True)
        processed.write_bytes(b"ok")  # the filesystem takes it
        thumbnail_path_for(processed).write_bytes(b"ok")
    assert paths[0] != paths[1] and paths[0].name.endswith(".png.jpg")


def test_a_processed_path_past_the_path_limit_goes_to_a_hashed_name(tmp_path: Path) -> None:
    source_root = Path("/s")
    processed_root = Path("/p" + "/q" * 1000)  # a deep processed folder: 2,002 bytes
    deep = source_root / "/".join(["d" * 200] * 12) / "a.jpg"  # 2,420 bytes: together past 4,096
    processed = processed_path_for(deep, source_root, processed_root)
    assert fits_path(thumbnail_path_for(processed))
    assert processed.parent == processed_root / ".long-paths" and processed.name.endswith(".jpg.jpg")


# --- only regular files are opened ----------------------------------------------------------------------


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(EntryRefused, match="is a named pipe, not a regular file"):
        finishes_within(5, lambda: read_regular(fifo))
    with pytest.raises(PreprocessError, match="named pipe"):
        finishes_within(5, lambda: preprocess_image(fifo, max_size=BOX, max_pixels=LIMIT))


def test_a_socket_and_a_device_are_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock.png"))
        with pytest.raises(EntryRefused, match="is a socket"):
            read_regular(tmp_path / "sock.png")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with pytest.raises(EntryRefused, match="is a character device"):
        finishes_within(5, lambda: read_regular(tmp_path / "zero.jpg"))


def between_look_and_open(monkeypatch: pytest.MonkeyPatch, meddle: Callable[[Path], None]) -> None:
    """``meddle(path)`` runs after entries' look at a name (stat) and before its open: what another
    process can do in between."""
    checked = entries.check_regular

    def check_then_meddle(path: Path, links: LinkPolicy | None = None) -> os.stat_result:
        st = checked(path, links)
        meddle(path)
        return st

    monkeypatch.setattr(entries, "check_regular", check_then_meddle)


def replace_by_a_pipe(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def append_past_the_margin(path: Path) -> None:
    with open(path, "ab") as writer:
        writer.write(b"\0" * (entries.GROWTH_MARGIN_BYTES + 4096))


def test_a_name_replaced_by_a_pipe_after_the_check_is_refused_on_the_open_descriptor(tmp_path, monkeypatch) -> None:
    path = save_picture(tmp_path / "swapped.jpg", seed=1)
    between_look_and_open(monkeypatch, replace_by_a_pipe)
    with pytest.raises(EntryRefused, match="named pipe"):
        finishes_within(5, lambda: read_regular(path))


def test_a_file_that_keeps_growing_is_still_being_written_not_read_forever(tmp_path, monkeypatch) -> None:
    path = save_picture(tmp_path / "growing.png", seed=2)
    between_look_and_open(monkeypatch, append_past_the_margin)
    with pytest.raises(EntryRefused, match="still being written") as refused:
        read_regular(path)
    assert refused.value.growing
    with pytest.raises(IncompleteFile, match="still being written"):  # the service waits for it
        preprocess_image(path, max_size=BOX, max_pixels=LIMIT)


@pytest.mark.parametrize(("modified", "waited_for"), [(-10, True), (-40, False), (+3, True), (+9 * 3600, False)])
def test_a_truncated_file_is_waited_for_only_while_a_writer_may_be_at_it(tmp_path, modified, waited_for) -> None:
    """Half a picture modified 10 s ago may still be arriving (waited for, up to 30 s); 40 s ago it is
    truncated. Nine hours ahead of now (a card's local time read as UTC, kept by ``cp -p`` east of Greenwich)
    no writer stamped it: it was waited for, read again at every settle period, for hours."""
    from image_search.readiness import still_being_written

    path = save_picture(tmp_path / "half.png", seed=2)
    path.write_bytes(path.read_bytes()[:200])
    os.utime(path, (1_700_000_000 + modified, 1_700_000_000 + modified))
    with pytest.raises(IncompleteFile) as incomplete:
        preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    assert still_being_written(path, incomplete.value, 30.0, wall_clock=lambda: 1_700_000_000) is waited_for


# --- links, by policy ---------------------------------------------------------------------------------


@pytest.fixture
def linked_tree(tmp_path: Path) -> Path:
    """images/ with links of every kind, and a private picture outside it."""
    root = tmp_path / "images"
    save_picture(tmp_path / "private" / "secret.png", seed=3)
    save_picture(root / "real.png", seed=4)
    save_picture(root / "sub" / "inner.png", seed=5)
    save_picture(tmp_path / "elsewhere" / "far.png", seed=6)
    (root / "to-secret.png").symlink_to(tmp_path / "private" / "secret.png")
    (root / "to-real.png").symlink_to("real.png")
    (root / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (root / "sub" / "loop").symlink_to("..", target_is_directory=True)
    (root / "far-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "out-loop").symlink_to(tmp_path, target_is_directory=True)  # contains images/ itself
    return root


def _found(root: Path, follow: FollowLinks) -> tuple[list[str], dict[str, str]]:
    scan = scan_folder(root, LinkPolicy(follow, root))
    return ([p.relative_to(root).as_posix() for p in scan.images],
            {e.path.relative_to(root).as_posix(): e.reason for e in scan.skipped})


def test_inside_follows_only_links_that_stay_in_the_folder(linked_tree: Path) -> None:
    images, skipped = _found(linked_tree, FollowLinks.INSIDE)
    assert images == ["real.png", "to-real.png", "sub/inner.png"]
    assert "outside source-directory: not followed" in skipped["to-secret.png"]
    assert str(linked_tree.parent / "private" / "secret.png") in skipped["to-secret.png"], "names its target"
    assert "does not exist" in skipped["dangling.png"]
    assert "not walked twice" in skipped["sub/loop"]
    assert "outside source-directory" in skipped["far-folder"] and "outside" in skipped["out-loop"]
    with pytest.raises(EntryRefused, match="outside source-directory"):  # and reading refuses it alike
        read_regular(linked_tree / "to-secret.png", LinkPolicy(FollowLinks.INSIDE, linked_tree))


def test_all_follows_every_link_and_walks_a_folder_once(linked_tree: Path) -> None:
    images, skipped = _found(linked_tree, FollowLinks.ALL)
    # out-loop leads to the folder above images/: its elsewhere/ was walked as far-folder already, and
    # images/ inside it is this folder: neither is walked again.
    assert images == ["real.png", "to-real.png", "to-secret.png", "far-folder/far.png", "out-loop/private/secret.png",
                      "sub/inner.png"]
    assert "out-loop" not in skipped and "far-folder" not in skipped
    assert read_regular(linked_tree / "to-secret.png", LinkPolicy(FollowLinks.ALL, linked_tree))


def test_none_follows_no_link(linked_tree: Path) -> None:
    images, skipped = _found(linked_tree, FollowLinks.NONE)
    assert images == ["real.png", "sub/inner.png"]
    assert "'follow-symlinks' is 'none'" in skipped["to-real.png"]
    with pytest.raises(EntryRefused, match="'none'"):
        read_regular(linked_tree / "to-real.png", LinkPolicy(FollowLinks.NONE, linked_tree))


@pytest.mark.parametrize("follow", list(FollowLinks))
def test_one_entry_the_watcher_saw_is_decided_as_the_folders_scan_decides_it(linked_tree: Path,
                                                                             follow: FollowLinks) -> None:
    """A link made while the service runs (``scan_entry``): the same pictures and the same reasons as
    the scan at start, so its line is the start's line, logged when it appears."""
    policy = LinkPolicy(follow, linked_tree)
    whole = scan_folder(linked_tree, policy)
    links = [p for p in [*linked_tree.iterdir(), *(linked_tree / "sub").iterdir()] if p.is_symlink()]
    for link in links:
        one = scan_entry(link, policy)
        assert one.skipped == [e for e in whole.skipped if e.path == link], link
        if link.name != "out-loop":  # alone, it also walks elsewhere/, which the whole scan took as far-folder
            assert one.images == [p for p in whole.images if p == link or p.is_relative_to(link)], link
    # never the folder itself again, through a link to the folder above it
    assert not [p for p in scan_entry(linked_tree / "out-loop", policy).images if "images" in p.parts[-3:-1]]
    assert scan_entry(linked_tree / "gone.png", policy) == scan_entry(linked_tree.parent / "x.png", policy) == FolderScan()


@pytest.fixture
def linked_service_tree(tmp_path: Path) -> Path:
    """A service's folders side by side, each holding what the service or a user put there, and links in
    images/ onto each of them, into them and to the folder above them all (the tester's ``above -> ..``)."""
    tree = tmp_path / "tree"
    load_config(write_config(tree, fresh_pgdata=True))  # the folders, as a service has them
    save_picture(tree / "images" / "a.png", seed=1)
    save_picture(tree / "processed" / "a.png.jpg", seed=1)
    save_picture(tree / "output" / "20250101-000000 q" / "q.query.png", seed=2)
    save_picture(tree / "inbox" / "q.png", seed=2)
    (tree / "state" / "pgdata").mkdir()
    images = tree / "images"
    (images / "above").symlink_to("..", target_is_directory=True)
    (images / "copies").symlink_to("../processed", target_is_directory=True)
    (images / "results").symlink_to("../output/20250101-000000 q", target_is_directory=True)
    (images / "database").symlink_to(tree / "state" / "pgdata", target_is_directory=True)
    (images / "waiting.png").symlink_to("../inbox/q.png")
    return tree


@pytest.mark.parametrize("follow", list(FollowLinks))
def test_a_link_to_the_services_own_folders_is_never_followed(linked_service_tree: Path, follow: FollowLinks) -> None:
    """Under any policy a link onto, into or above processed/, output/, inbox/ or state/ is refused with
    one reason naming the link's target and the folder it reaches: walked, it fed the index its own
    processed copies (then their copies, at every rescan), the results and the waiting queries."""
    tree = linked_service_tree
    cfg = load_config(write_config(tree, fresh_pgdata=True, follow_symlinks=follow.value))
    scan = scan_folder(cfg.source_directory, cfg.source_links)
    assert scan.images == [tree / "images" / "a.png"]
    never = "never followed, whatever 'follow-symlinks' says"
    assert {e.path.name: e.reason for e in scan.skipped} == {
        "above": f"symbolic link to the folder {tree}, which holds inbox-directory ({tree / 'inbox'}): {never}"
                 " (the service's own folders are never read as pictures)",
        "copies": f"symbolic link to the folder {tree / 'processed'}, which is processed-directory: {never}"
                  " (the service's own folders are never read as pictures)",
        "results": f"symbolic link to the folder {tree / 'output' / '20250101-000000 q'}, inside output-directory "
                   f"({tree / 'output'}): {never} (the service's own folders are never read as pictures)",
        "database": f"symbolic link to the folder {tree / 'state' / 'pgdata'}, inside state-directory "
                    f"({tree / 'state'}): {never} (the service's own folders are never read as pictures)",
        "waiting.png": f"symbolic link to {tree / 'inbox' / 'q.png'}, inside inbox-directory ({tree / 'inbox'}): "
                       f"{never} (the service's own folders are never read as pictures)",
    }
    with pytest.raises(EntryRefused, match="inside inbox-directory"):  # and reading refuses it alike
        read_regular(tree / "images" / "waiting.png", cfg.source_links)
    for link in [p for p in (tree / "images").iterdir() if p.is_symlink()]:  # made while the service runs
        one = scan_entry(link, cfg.source_links)
        assert (one.images, one.skipped) == ([], [e for e in scan.skipped if e.path == link]), link


def test_pipes_sockets_and_odd_names_in_a_scan(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_picture(root / fs_name(b"bad\xff\xfename.png"), seed=7)
    save_picture(root / ("L" * 250 + ".png"), seed=8)
    os.mkfifo(root / "fifo.jpg")
    (root / "dir.jpg").mkdir()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "sock.png"))
        scan = finishes_within(10, lambda: scan_folder(root, LinkPolicy(FollowLinks.INSIDE, root)))
    assert sorted(p.name for p in scan.images) == sorted([fs_name(b"bad\xff\xfename.png"), "L" * 250 + ".png"])
    assert {e.path.name: e.reason.split(",")[0] for e in scan.skipped} == {
        "fifo.jpg": "is a named pipe", "sock.png": "is a socket"}


def test_a_path_is_logged_escaped_on_one_line(tmp_path: Path) -> None:
    import io

    import structlog

    with logging_to(io.StringIO()) as stream:
        structlog.get_logger().warning("image_skipped", path=Path(fs_name(b"/x/bad\xff\nname.png")))
    (line,) = stream.getvalue().splitlines()
    assert "bad\\\\xff\\\\x0aname.png" in line  # escape()'s text, as the key=value renderer quotes it


def test_check_regular_does_not_open(tmp_path: Path) -> None:
    """The look before the open never opens: a pipe with no writer would block it."""
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    with pytest.raises(EntryRefused):
        finishes_within(5, lambda: check_regular(fifo))
