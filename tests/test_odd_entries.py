"""One odd entry must never take the service down: names in bytes that are not UTF-8, names at the
255-byte limit, pipes, sockets, devices and links, in images/ and in the inbox.

The service runs in-process (``story_factory``: the real loop, the real embedded PostgreSQL, the tiny
model, a fake clock); the indexer over a random tree of odd entries runs in-process too. The process
boundary (the real CLI, SIGTERM during a read that never returns) is in test_odd_entries_cli.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from image_search.discover import scan_folder
from image_search.indexer import Indexer
from image_search.names import NAME_MAX, escape, name_bytes
from image_search.preprocess import processed_path_for, thumbnail_path_for
from image_search.watch import ChangeKind, Folder
from tests.support.files import save_picture
from tests.support.odd_entries import fs_name, make_odd_tree, random_name, snapshot
from tests.support.story import Story

pytestmark = pytest.mark.integration

BAD = fs_name(b"bad\xff\xfename.png")  # bytes FF FE: not UTF-8
LONG = "L" * 250 + ".png"  # 254 bytes


def bundles(story: Story) -> list[Path]:
    return sorted(p for p in story.cfg.output_directory.iterdir() if not p.name.startswith("."))


def only_bundle_holding(story: Story, query_bytes: bytes) -> Path:
    """The one result folder whose moved-in query has exactly ``query_bytes``."""
    found = [b for b in bundles(story) for f in b.iterdir() if ".query." in f.name and f.read_bytes() == query_bytes]
    assert len(found) == 1, [list(b.iterdir()) for b in bundles(story)]
    return found[0]


def ranking(bundle: Path) -> list[dict[str, object]]:
    (jsonl,) = bundle.glob("*.jsonl")
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def test_a_name_in_bytes_that_are_not_utf8_is_indexed_found_renamed_and_deleted(story_factory) -> None:
    story = story_factory({"a.png": 1})
    bad = save_picture(story.images / BAD, seed=2, size=(120, 90))
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, bad)
    story.run_until_idle()
    row = story.rows()[escape(bad)]  # the table holds the name's text, which leads back to its bytes
    assert row["file_name"] == "bad\\xff\\xfename.png" and Path(row["processed_path"]).name.startswith("bad\\xff")
    processed = processed_path_for(bad, story.images, story.cfg.processed_directory)
    assert processed.is_file() and thumbnail_path_for(processed).is_file()

    query = fs_name(b"query \xe9t\xe9.png")  # Latin-1 bytes, as an old Windows share writes them
    shutil.copyfile(bad, story.inbox / query)
    story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / query)
    story.run_until_idle()
    bundle = only_bundle_holding(story, bad.read_bytes())
    best = ranking(bundle)[0]
    assert best["file_path"] == escape(bad) and best["file_name"] == "bad\\xff\\xfename.png"
    assert (bundle / fs_name(b"query \xe9t\xe9.sheet.jpg")).is_file()
    config = json.loads((bundle / fs_name(b"query \xe9t\xe9.json")).read_text(encoding="utf-8"))
    assert config["source-directory"] == escape(story.images)

    renamed = story.images / fs_name(b"renamed \xfe.png")
    os.rename(bad, renamed)
    story.notice(Folder.IMAGES, ChangeKind.MOVED, bad, dest=renamed)
    with capture_logs() as logs:
        story.run_until_idle()
    rows = story.rows()
    assert escape(bad) not in rows and rows[escape(renamed)]["file_hash"] == row["file_hash"]
    assert [e["event"] for e in logs if e.get("path") == renamed] == ["image_renamed"]  # no model work

    renamed.unlink()
    story.notice(Folder.IMAGES, ChangeKind.DELETED, renamed)
    story.run_until_idle()
    assert set(story.rows()) == {str(story.images / "a.png")}
    assert not processed_path_for(renamed, story.images, story.cfg.processed_directory).exists()


def test_a_folder_named_as_the_processed_copy_of_a_file_beside_it_is_indexed_with_the_file(story_factory) -> None:
    """``a.png`` and the folder ``a.png.jpg/``: one of the two could not be written before (the copy of
    ``a.png`` is ``processed/a.png.jpg``), and moving the copy away did not help."""
    story = story_factory({"a.png": 1, "a.png.jpg/b.png": 2})
    folder_picture = save_picture(story.images / "a.png.jpg" / "c.png", seed=3, size=(100, 75))
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, folder_picture)
    story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(story.images / n) for n in ("a.png", "a.png.jpg/b.png", "a.png.jpg/c.png")}
    for row in rows.values():
        processed = Path(row["processed_path"])
        assert processed.is_file() and thumbnail_path_for(processed).is_file(), row
    assert story.ask("q.png", folder_picture)[0] == str(folder_picture)


def test_a_folder_renamed_to_the_name_of_a_files_processed_copy_takes_its_copies_along(story_factory) -> None:
    story = story_factory({"a.png": 1, "trip/b.png": 2, "trip/c.png": 3})
    before = story.rows()
    os.rename(story.images / "trip", story.images / "a.png.jpg")
    with capture_logs() as logs:
        story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "trip", dest=story.images / "a.png.jpg",
                     is_directory=True)
        story.run_until_idle()
    rows = story.rows()
    assert set(rows) == {str(story.images / n) for n in ("a.png", "a.png.jpg/b.png", "a.png.jpg/c.png")}
    assert {row["file_hash"] for row in rows.values()} == {row["file_hash"] for row in before.values()}
    assert not [e for e in logs if e["event"] in ("image_skipped", "images_indexed") and e.get("embedded")]
    copies = {p for p in story.cfg.processed_directory.rglob("*") if p.is_file() and not p.name.startswith(".source")}
    wanted = {Path(row["processed_path"]) for row in rows.values()}
    assert copies == wanted | {thumbnail_path_for(p) for p in wanted}  # each moved along, none left behind


def test_a_254_byte_name_is_indexed_and_asked_about(story_factory) -> None:
    story = story_factory({"a.png": 1})
    long = save_picture(story.images / LONG, seed=3, size=(120, 90))
    story.notice(Folder.IMAGES, ChangeKind.CLOSED, long)
    story.run_until_idle()
    row = story.rows()[str(long)]
    processed = Path(row["processed_path"])
    assert processed.is_file() and thumbnail_path_for(processed).is_file()
    assert name_bytes(thumbnail_path_for(processed).name) <= NAME_MAX

    shutil.copyfile(long, story.inbox / LONG)  # a query with the longest name: its result files still fit
    story.notice(Folder.INBOX, ChangeKind.CLOSED, story.inbox / LONG)
    story.run_until_idle()
    bundle = only_bundle_holding(story, long.read_bytes())
    assert ranking(bundle)[0]["file_path"] == str(long)
    names = sorted(p.name for p in bundle.iterdir())
    assert all(name_bytes(n) <= NAME_MAX for n in names) and len(names) == 5, names
    assert [n for n in names if n.endswith(".query.png")], names


def test_pipes_devices_and_links_out_in_images_are_one_line_each_and_the_loop_goes_on(story_factory, tmp_path) -> None:
    story = story_factory({"a.png": 1})
    secret = save_picture(tmp_path / "private" / "secret.png", seed=4)
    os.mkfifo(story.images / "fifo.jpg")
    (story.images / "zero.jpg").symlink_to("/dev/zero")
    (story.images / "shadow.jpg").symlink_to(secret)
    save_picture(story.images / "after.png", seed=5)
    for name in ("fifo.jpg", "zero.jpg", "shadow.jpg", "after.png"):
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / name)
    with capture_logs() as logs:
        story.run_until_idle()
        story.service.sync.rescan()  # the next rescan finds them again and says nothing new
    lines = {e["path"].name: e["reason"] for e in logs if e["event"] == "image_skipped"}
    assert [e["path"].name for e in logs if e["event"] == "image_skipped"].count("fifo.jpg") == 1
    assert lines["fifo.jpg"].startswith("is a named pipe")
    assert lines["zero.jpg"].startswith("symbolic link to /dev/zero, outside source-directory")
    assert lines["shadow.jpg"].startswith(f"symbolic link to {secret}, outside source-directory")
    assert set(story.rows()) == {str(story.images / "a.png"), str(story.images / "after.png")}
    assert not list(story.cfg.processed_directory.glob("shadow*")), "nothing of a refused link is written"


def test_the_inbox_follows_the_same_rules(story_factory, tmp_path) -> None:
    story = story_factory({"a.png": 1})
    elsewhere = save_picture(tmp_path / "elsewhere" / "private.png", seed=6)
    os.mkfifo(story.inbox / "fifo.png")
    (story.inbox / "link-out.png").symlink_to(elsewhere)
    long_unsupported = story.inbox / ("D" * 251 + ".doc")  # 255 bytes: its error file needs a shorter name
    long_unsupported.write_bytes(b"a document\n")
    for path in (story.inbox / "fifo.png", story.inbox / "link-out.png", long_unsupported):
        story.notice(Folder.INBOX, ChangeKind.CLOSED, path)
    story.run_until_idle()
    failed = story.inbox / "failed"
    errors = {p.name: p.read_text(encoding="utf-8") for p in failed.glob("*.error.txt")}
    assert "named pipe" in errors["fifo.png.error.txt"]
    assert "outside inbox-directory: not followed" in errors["link-out.png.error.txt"]
    assert (failed / "fifo.png").is_fifo() and (failed / "link-out.png").is_symlink()  # moved, never opened
    (long_error,) = [text for name, text in errors.items() if name.startswith("DDDD")]
    assert long_error.startswith(long_unsupported.name + ": not a supported query type")
    assert all(name_bytes(p.name) <= NAME_MAX for p in failed.iterdir())
    assert bundles(story) == [] and list(story.inbox.iterdir()) == [failed]


def test_bad_links_made_while_running_are_one_line_each_as_at_start(story_factory, tmp_path) -> None:
    """Links that lead nowhere or to a folder, made while the service runs, are each named once with the
    reason the start-up scan gives, however many events they bring and however often the folder is rescanned."""
    story = story_factory({"a.png": 1, "sub/b.png": 2})
    explore_root = tmp_path / "explore-root"
    explore_root.mkdir()
    made = {"dangling.png": "nonexistent.png", "loop1.png": "loop2.png", "loop2.png": "loop1.png",
            "self.png": "self.png", "sub/up": "..", "sub/rootlink": str(explore_root)}
    for name, target in made.items():
        (story.images / name).symlink_to(target)
    with capture_logs() as logs:
        for name in made:
            for kind in (ChangeKind.TOUCHED, ChangeKind.TOUCHED, ChangeKind.CLOSED):  # created, attrib, ...
                story.notice(Folder.IMAGES, kind, story.images / name)
        story.run_until_idle()
    lines = [(e["path"], e["reason"]) for e in logs if e["event"] == "image_skipped"]
    with capture_logs() as later:
        story.service.sync.rescan()
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "dangling.png")
        story.run_until_idle()
    assert [e for e in later if e["event"] == "image_skipped"] == []
    assert sorted(path.relative_to(story.images).as_posix() for path, _ in lines) == sorted(made), lines
    assert set(lines) == {(e.path, e.reason) for e in scan_folder(story.images, story.cfg.source_links).skipped}
    reasons = {path.relative_to(story.images).as_posix(): reason for path, reason in lines}
    assert reasons["dangling.png"] == "broken symbolic link: its target nonexistent.png does not exist"
    assert reasons["self.png"] == "broken symbolic link: its target self.png cannot be reached (Too many levels of symbolic links)"
    assert reasons["sub/up"].endswith("inside source-directory: not walked twice (its pictures are found under their own path)")
    assert reasons["sub/rootlink"].startswith(f"symbolic link to the folder {explore_root}, outside source-directory: not followed")
    assert set(story.rows()) == {str(story.images / "a.png"), str(story.images / "sub" / "b.png")}


def test_a_link_to_the_folder_above_does_not_feed_the_index_its_own_copies(story_factory) -> None:
    """``follow-symlinks: all`` and ``images/above -> ..``: the folder above holds processed/, output/,
    inbox/ and state/. Walked, every rescan indexed the processed copies of the last one's processed
    copies (``above/processed/above/processed/.../a.png.jpg.jpg``). Refused at start, once, and so is a
    link onto processed/ made while the service runs; the index holds the one picture."""
    story = story_factory({"a.png": 1}, start=False, follow_symlinks="all")
    tree = story.images.parent
    (story.images / "above").symlink_to("..", target_is_directory=True)
    with capture_logs() as logs:
        story.service.start()
        story.run_until_idle()
        for _ in range(3):
            story.service.sync.rescan()
            story.run_until_idle()
        (story.images / "copies").symlink_to("../processed", target_is_directory=True)
        story.notice(Folder.IMAGES, ChangeKind.TOUCHED, story.images / "copies")
        story.run_until_idle()
    assert set(story.rows()) == {str(story.images / "a.png")}
    copy = processed_path_for(story.images / "a.png", story.images, story.cfg.processed_directory)
    assert story.copies_in_processed() == {copy, thumbnail_path_for(copy)}
    skipped = [(e["path"].name, e["reason"].split(": never followed")[0]) for e in logs if e["event"] == "image_skipped"]
    assert skipped == [("above", f"symbolic link to the folder {tree}, which holds inbox-directory ({tree / 'inbox'})"),
                       ("copies", f"symbolic link to the folder {tree / 'processed'}, which is processed-directory")]


def test_a_broken_link_in_the_inbox_fails_with_its_reason_at_start_and_while_running(story_factory) -> None:
    """A link to nothing (or to itself) moves, as the link it is, into inbox/failed/ beside its reason:
    it was counted as a waiting query at every start and never explained."""
    story = story_factory({"a.png": 1})
    (story.inbox / "qdangling.png").symlink_to("nothere.png")
    with capture_logs() as logs:
        story = story_factory(after=story)
    assert [e["pending_queries"] for e in logs if e["event"] == "service_ready"] == [1]
    failed = story.inbox / "failed"
    # Moved as the link it is, never deleted, still leading where it led (named from the root: from
    # failed/, "nothere.png" would lead elsewhere).
    assert os.readlink(failed / "qdangling.png") == str(story.inbox / "nothere.png")
    assert (failed / "qdangling.png.error.txt").read_text(encoding="utf-8") == (
        "qdangling.png: broken symbolic link: its target nothere.png does not exist\n")
    assert [e["reason"] for e in logs if e["event"] == "query_failed"] == [
        "broken symbolic link: its target nothere.png does not exist"]

    (story.inbox / "loop.png").symlink_to("loop.png")
    story.notice(Folder.INBOX, ChangeKind.TOUCHED, story.inbox / "loop.png")
    story.run_until_idle()
    assert os.readlink(failed / "loop.png") == str(story.inbox / "loop.png")
    assert (failed / "loop.png.error.txt").read_text(encoding="utf-8").startswith(
        "loop.png: broken symbolic link: its target loop.png cannot be reached")
    assert list(story.inbox.iterdir()) == [failed]


def test_a_folder_in_the_inbox_without_its_query_document_is_one_line_and_stays(story_factory) -> None:
    """``inbox/holiday/`` (pictures dropped in the wrong folder) and ``inbox/q/`` whose ``q.json`` never
    came are named once each, at start or when they appear, and left where they are; a document's folder
    with its document is answered with it, no line."""
    story = story_factory({"a.png": 1})
    holiday = save_picture(story.inbox / "holiday" / "beach.png", seed=2).parent
    with capture_logs() as logs:
        story = story_factory(after=story)
    ignored = [e for e in logs if e["event"] == "inbox_folder_ignored"]
    assert [e["path"] for e in ignored] == [holiday] and "holiday.json" in ignored[0]["reason"]
    assert [e["pending_queries"] for e in logs if e["event"] == "service_ready"] == [0]

    trip = save_picture(story.inbox / "trip" / "like-a.png", seed=1, size=(100, 72)).parent
    (story.inbox / "trip.json").write_text(json.dumps({"image": "like-a.png"}), encoding="utf-8")
    lone = save_picture(story.inbox / "q" / "x.png", seed=3).parent
    with capture_logs() as logs:
        for path in (trip, lone, holiday, story.inbox / "trip.json"):
            story.notice(Folder.INBOX, ChangeKind.TOUCHED, path, is_directory=path.is_dir())
        story.let_settle_periods_pass(3)
        # The pictures first, then the document, as the README says: no line while its document may come.
        assert not [e for e in logs if e["event"] == "inbox_folder_ignored"]
        story.clock.advance(story.service.inbox.incomplete_grace)
        story.run_until_idle()
        story.notice(Folder.INBOX, ChangeKind.TOUCHED, lone, is_directory=True)  # e.g. its mode changed
        story.run_until_idle()
    assert [e["path"] for e in logs if e["event"] == "inbox_folder_ignored"] == [lone]
    assert (story.bundle("trip.json") / "trip.query" / "like-a.png").is_file()
    assert sorted(p.name for p in story.inbox.iterdir()) == ["holiday", "q"]
    assert (holiday / "beach.png").is_file() and (lone / "x.png").is_file()


@pytest.fixture(scope="module")
def odd_library(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """A tree of random odd entries, indexed once by the in-process indexer over the real store."""
    from image_search.config import load_config
    from image_search.embed import Embedder
    from image_search.store import Database
    from tests.support.files import write_config
    from tests.support.model import TINY_DIMENSION

    root = tmp_path_factory.mktemp("odd")
    cfg = load_config(write_config(root, tiny_model_dir))
    tree = make_odd_tree(cfg.source_directory, random.Random(20261206), entries=160)
    before = snapshot(cfg.source_directory)
    database = Database(cfg)
    store = database.open_store(dimension=TINY_DIMENSION)
    indexer = Indexer(cfg, Embedder.load(cfg.model_name, device="cpu", dimension=TINY_DIMENSION), store, workers=2)
    try:
        yield cfg, tree, before, store, indexer
    finally:
        indexer.close()
        store.close()
        database.close()
        tree.close()


def test_random_names_and_entry_types_crash_nothing_lose_nothing_and_change_nothing(odd_library) -> None:
    cfg, tree, before, store, indexer = odd_library
    assert len(tree.pictures) > 40 and len(tree.refused) > 40  # the generator made a real mix
    summary = indexer.index_folder(show_progress=False)
    assert summary.embedded == len(tree.pictures)
    assert set(store.sources()) == {str(p) for p in tree.pictures}, "every picture is a row, under its exact name"
    assert {p for p, _ in summary.skipped} == tree.refused, "every odd entry is one skipped line"
    for path in tree.pictures:
        assert processed_path_for(path, cfg.source_directory, cfg.processed_directory).is_file()
    assert snapshot(cfg.source_directory) == before, "nothing in the user's folder was touched"


def test_random_renames_and_deletions_of_odd_names_are_followed(odd_library) -> None:
    cfg, tree, _, store, indexer = odd_library
    indexer.index_folder(show_progress=False)
    rng = random.Random(7)
    pictures = sorted(tree.pictures, key=os.fsencode)
    hashes = {p: r.file_hash for p, r in store.sources().items()}
    renamed = {}
    for path in pictures[::3]:
        new = path.parent / fs_name(random_name(rng, suffix=b".png", longest=200))
        if not os.path.lexists(new):
            os.rename(path, new)
            renamed[new] = path
    deleted = [p for p in pictures[1::3] if p not in renamed.values()]
    for path in deleted:
        path.unlink()
    summary = indexer.index_folder(show_progress=False)
    rows = store.sources()
    assert summary.embedded == 0 and summary.relinked == len(renamed)  # renames cost no model work
    for new, old in renamed.items():
        assert rows[str(new)].file_hash == hashes[str(old)] and str(old) not in rows
    assert not {str(p) for p in deleted} & set(rows)


def test_fleet_claims_and_folder_removal_keep_odd_names_exact(story_factory) -> None:
    """What ``serve`` died of in the fleet's claim: work items named by paths in any bytes. Two members
    claim the same odd paths; each is granted to one, released, and a folder named in odd bytes is
    removed with every row under it (the stored text of a folder is a prefix of its files')."""
    from image_search.fleet import ClaimKind, FleetMember, WorkClaims

    story = story_factory({})
    odd_folder = story.images / fs_name(b"old \xff\\ 100%_done")
    files = [save_picture(odd_folder / fs_name(name), seed=60 + i)
             for i, name in enumerate((b"bad\xff\xfe.png", b"new\nline.png", b"back\\slash.png", b"x" * 250 + b".png"))]
    twin = save_picture(story.images / fs_name(b"old \xff\\ 100%_donE") / "kept.png", seed=70)  # a near-twin folder
    one, two = (WorkClaims(story.service.rt.store, FleetMember.join(story.cfg, story.database)) for _ in range(2))
    try:
        first = one.take(ClaimKind.IMAGE, files, story.service.images)
        second = two.take(ClaimKind.IMAGE, files, story.service.images)
        assert first == files and second == [], "each odd path is one exact item, held by one member"
        one.release(ClaimKind.IMAGE, first)
        assert two.take(ClaimKind.IMAGE, files, story.service.images) == files
        two.release(ClaimKind.IMAGE, files)
    finally:
        for claims in (one, two):
            assert claims.member is not None
            claims.member.leave(empty_table=False)
    for path in [*files, twin]:
        story.notice(Folder.IMAGES, ChangeKind.CLOSED, path)
    story.run_until_idle()
    assert set(story.rows()) == {escape(p) for p in [*files, twin]}
    shutil.rmtree(odd_folder)
    story.notice(Folder.IMAGES, ChangeKind.DELETED, odd_folder, is_directory=True)
    story.run_until_idle()
    assert set(story.rows()) == {escape(twin)}


def test_names_an_earlier_version_stored_raw_are_escaped_once_and_found_again(story_factory) -> None:
    """Before names were escaped, a name with a newline or a backslash was stored as it is. The first
    start of this version rewrites those rows, so a rescan finds them and a deletion removes them."""
    from tests.support.db import raw

    story = story_factory({"new\nline.png": 1, "back\\slash.png": 2, "plain.png": 3})
    conn = story.database.connect()
    with conn, conn.cursor() as cur:  # what an earlier version left: raw names, no 'names' marker
        cur.execute("UPDATE image_embeddings SET file_path = replace(replace(file_path, '\\x0a', E'\\n'), '\\\\', '\\'),"
                    " file_name = replace(replace(file_name, '\\x0a', E'\\n'), '\\\\', '\\')")
        cur.execute("DELETE FROM image_search_meta WHERE key = 'names'")
        cur.execute("DELETE FROM image_search_schema")  # an earlier version kept no record of the steps
    conn.close()
    assert {r[0] for r in raw(story.database, "SELECT file_name FROM image_embeddings")} == {
        "new\nline.png", "back\\slash.png", "plain.png"}
    with capture_logs() as logs:
        story.database.open_store(dimension=story.cfg.dimension).close()
    assert [e["rows"] for e in logs if e["event"] == "names_escaped"] == [2]
    assert set(story.rows()) == {escape(story.images / n) for n in ("new\nline.png", "back\\slash.png", "plain.png")}
    (story.images / "new\nline.png").unlink()
    story.service.sync.rescan()
    assert set(story.rows()) == {escape(story.images / n) for n in ("back\\slash.png", "plain.png")}


def test_a_path_longer_than_the_index_takes_is_skipped_with_its_reason_and_the_rest_goes_on(story_factory) -> None:
    """14 folders of 80 CJK characters: a legal path (3,400 bytes, each name 240), but longer than a B-tree
    entry of PostgreSQL holds. Its batch's write failed as if the database were away, and was tried again for
    ever, with the pictures batched beside it. Now it is skipped with its reason, whether found at the start
    or moved deep by a folder's rename, and every other picture is indexed."""
    from image_search.discover import MAX_PATH_BYTES

    # Characters that do not repeat: PostgreSQL compresses an index entry, and a path that compresses well fits.
    deep = "/".join("".join(chr(0x4E00 + 80 * level + i) for i in range(80)) for level in range(14))
    with capture_logs() as logs:
        story = story_factory({f"{deep}/far.png": 1, "near.png": 2, "album/x.png": 3})
    far = story.images / deep / "far.png"
    assert len(str(far).encode()) > MAX_PATH_BYTES
    assert sorted(story.rows()) == [str(story.images / "album" / "x.png"), str(story.images / "near.png")]
    (skipped,) = [e for e in logs if e["event"] == "image_skipped"]
    assert skipped["path"] == far and skipped["reason"].startswith(f"its path is {len(str(far).encode()):,} bytes")

    deeper = story.images / "/".join("".join(chr(0x5E00 + 80 * level + i) for i in range(80)) for level in range(11))
    deeper = deeper / "album"
    deeper.parent.mkdir(parents=True)
    os.rename(story.images / "album", deeper)
    with capture_logs() as logs:
        story.notice(Folder.IMAGES, ChangeKind.MOVED, story.images / "album", dest=deeper, is_directory=True)
        story.run_until_idle()
    assert [e["path"] for e in logs if e["event"] == "image_skipped"] == [deeper / "x.png"]
    assert not [e for e in logs if e["event"] in ("database_unavailable", "service_failed")]
    assert sorted(story.rows()) == [str(story.images / "near.png")]
