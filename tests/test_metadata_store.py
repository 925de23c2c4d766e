"""The metadata stored at ingest (migration 0005), filled for an earlier version's rows from the files'
headers (0006, supplied by ``sync.migrate_metadata``), kept right by renames and moves, and carried by
every hit into ``<stem>.jsonl``."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import ExifTags, Image
from structlog.testing import capture_logs

from image_search.config import load_config
from image_search.duplicates import REPORT, Kind, write_report
from image_search.embed import Embedder
from image_search.indexer import Indexer
from image_search.output import hit_record
from image_search.query import Filters
from image_search.readiness import ReadinessTracker
from image_search.store import Database
from image_search.store.metadata import needs_metadata_migration
from image_search.sync import FolderSync, compare_folder
from image_search.watch import Change, ChangeKind, Folder
from tests.support.db import raw
from tests.support.files import write_config
from tests.support.model import TINY_DIMENSION

pytestmark = pytest.mark.integration

COLUMNS = "file_path, taken_at, taken_at_offset_minutes, camera_make, camera_model, width, height, format, folder"
PLUS_TWO = timezone(timedelta(hours=2))


@pytest.fixture(autouse=True)
def service_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/Sao_Paulo")  # UTC-3 all year
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def picture(path: Path, fmt: str, *, seed: int, date: str | None = None, offset: str | None = None,
            orientation: int = 1, model: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (60, 30), (seed * 40 % 256, 255 - seed * 30 % 256, seed * 70 % 256))
    ex = Image.Exif()
    ex[0x0112] = orientation
    if model is not None:
        ex[0x010F], ex[0x0110] = "Canon", model
    sub = ex.get_ifd(ExifTags.IFD.Exif)
    if date is not None:
        sub[0x9003] = date
    if offset is not None:
        sub[0x9011] = offset
    im.save(path, format=fmt, **({"exif": ex.tobytes()} if date or model or orientation != 1 else {}))
    return path


@pytest.fixture
def library(tmp_path: Path, tiny_model_dir: Path):
    cfg = load_config(write_config(tmp_path, tiny_model_dir))
    images = cfg.source_directory
    picture(images / "top.jpg", "JPEG", seed=1, date="2023:05:06 07:08:09", offset="+02:00", orientation=6,
            model="Canon EOS R5")
    picture(images / "trips" / "2023" / "beach.png", "PNG", seed=2, date="2021:01:02 03:04:05")
    picture(images / "trips" / "2023" / "plain.webp", "WEBP", seed=3)
    picture(images / "trips" / "phone.heic", "HEIF", seed=4, date="2020:02:29 23:59:58", offset="-05:00")
    database = Database(cfg)
    embedder = Embedder.load(cfg.model_name, device="cpu", dimension=TINY_DIMENSION)
    store = database.open_store(dimension=TINY_DIMENSION)
    indexer = Indexer(cfg, embedder, store, workers=1, jpeg_decode_device=None)
    assert indexer.index_folder(show_progress=False).embedded == 4
    yield cfg, database, store, embedder, indexer
    indexer.close()
    store.close()
    database.close()


def stored(database: Database) -> dict[str, tuple]:
    return {Path(r[0]).name: r[1:] for r in raw(database, f"SELECT {COLUMNS} FROM image_embeddings")}


EXPECTED = {
    "top.jpg": (datetime(2023, 5, 6, 5, 8, 9, tzinfo=timezone.utc), 120, "Canon", "Canon EOS R5", 30, 60, "jpeg", ""),
    # no offset: the service's local time (UTC-3), recorded as of unknown offset
    "beach.png": (datetime(2021, 1, 2, 6, 4, 5, tzinfo=timezone.utc), None, None, None, 60, 30, "png", "trips/2023"),
    "plain.webp": (None, None, None, None, 60, 30, "webp", "trips/2023"),  # no EXIF: no date taken
    "phone.heic": (datetime(2020, 3, 1, 4, 59, 58, tzinfo=timezone.utc), -300, None, None, 60, 30, "heic", "trips"),
}


def test_rows_written_at_ingest_carry_the_metadata(library) -> None:
    _, database, *_ = library
    assert stored(database) == EXPECTED


def make_earlier_version(database: Database) -> None:
    """The table as a version before 0005 left it: no metadata columns, no record of steps 5 and 6."""
    conn = database.connect()
    try:
        with conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE image_embeddings DROP COLUMN taken_at, DROP COLUMN taken_at_offset_minutes, "
                        "DROP COLUMN camera_make, DROP COLUMN camera_model, DROP COLUMN width, DROP COLUMN height, "
                        "DROP COLUMN format, DROP COLUMN folder")
            cur.execute("DELETE FROM image_search_schema WHERE number >= 5")
    finally:
        conn.close()


def test_an_earlier_database_gains_metadata_from_headers_keeping_ids_and_embeddings(library) -> None:
    cfg, database, store, *_ = library
    store.close()
    make_earlier_version(database)
    before = raw(database, "SELECT id, file_hash, embedding::text FROM image_embeddings ORDER BY id")
    (cfg.source_directory / "trips" / "2023" / "plain.webp").touch()  # changed meanwhile: rescanned, not read
    with capture_logs() as logs:
        store = database.open_store(dimension=TINY_DIMENSION)
        try:
            assert needs_metadata_migration(store)
            assert stored(database)["top.jpg"] == (None,) * 8  # columns added, waiting for the headers
            state = compare_folder(cfg, store)
            assert not needs_metadata_migration(store)
        finally:
            store.close()
    assert raw(database, "SELECT id, file_hash, embedding::text FROM image_embeddings ORDER BY id") == before
    after = stored(database)
    for name in ("top.jpg", "beach.png", "phone.heic"):
        assert after[name] == EXPECTED[name]
    assert after["plain.webp"] == (None,) * 7 + ("trips/2023",)
    assert [Path(p).name for p in state.changed] == ["plain.webp"]
    done = [e for e in logs if e["event"] == "metadata_migrated"]
    assert len(done) == 1 and done[0]["updated"] == 4 and done[0]["with_metadata"] == 3


def test_renames_and_moves_keep_the_folder_right(library) -> None:
    cfg, database, store, *_ = library
    images = cfg.source_directory
    # While nothing watched: a file moved to another folder (found again by its identity).
    (images / "elsewhere").mkdir()
    (images / "top.jpg").rename(images / "elsewhere" / "top.jpg")
    assert compare_folder(cfg, store).renamed == 1
    assert stored(database)["top.jpg"][-1] == "elsewhere"
    # Seen by the watcher: a file renamed into the top folder, then a whole folder moved.
    sync = FolderSync(cfg, store, ReadinessTracker(0.5, clock=time.monotonic))
    (images / "trips" / "phone.heic").rename(images / "phone.heic")
    sync.apply(Change(Folder.IMAGES, ChangeKind.MOVED, images / "trips" / "phone.heic", dest=images / "phone.heic"))
    (images / "trips").rename(images / "2023 trips")
    sync.apply(Change(Folder.IMAGES, ChangeKind.MOVED, images / "trips", is_directory=True, dest=images / "2023 trips"))
    after = stored(database)
    assert after["phone.heic"][-1] == ""
    assert after["beach.png"][-1] == after["plain.webp"][-1] == "2023 trips/2023"
    assert after["beach.png"][:-1] == EXPECTED["beach.png"][:-1]  # the rest of the metadata stays


def test_hits_carry_the_metadata_into_jsonl(library) -> None:
    cfg, _, store, embedder, _ = library
    hits = {Path(h.file_path).name: hit_record(h) for h in store.search(embedder.embed_texts(["a picture"])[0], 10)}
    assert set(hits) == set(EXPECTED)
    assert {k: hits["top.jpg"][k] for k in ("taken_at", "camera", "width", "height", "format")} == {
        "taken_at": "2023-05-06T07:08:09+02:00", "camera": "Canon EOS R5", "width": 30, "height": 60, "format": "jpeg"}
    assert hits["beach.png"]["taken_at"] == "2021-01-02T03:04:05"  # offset unknown: local time, no offset
    assert hits["phone.heic"]["taken_at"] == "2020-02-29T23:59:58-05:00"
    assert hits["plain.webp"]["taken_at"] is None and hits["plain.webp"]["camera"] is None
    assert list(hits["top.jpg"])[:6] == ["rank", "similarity", "file_name", "file_path", "processed_path", "file_hash"]


# --- dates taken at the ends of the calendar -----------------------------------------------------------------

UTC = timezone.utc


def hits_by_name(store, embedder, filters: Filters = Filters()) -> dict[str, dict]:
    ranking = store.ranking(embedder.embed_texts(["a picture"])[0], 10, filters=filters)
    return {Path(h.file_path).name: hit_record(h) for h in ranking.hits}


def test_dates_an_earlier_version_stored_beyond_year_9999_or_before_year_1_are_cleared_at_start(library) -> None:
    """An earlier version stored "9999:12:31 23:59:59" at -14:00 as 10000-01-01 13:59:59 UTC and
    "0001:01:01 00:00:00" at +14:00 as 1 BC: every search that met those rows failed. The next start
    makes them undated, and says so once for each."""
    _, database, store, embedder, _ = library
    store.close()
    raw(database, "UPDATE image_embeddings SET taken_at = '10000-01-01 13:59:59+00', taken_at_offset_minutes = -840 "
                  "WHERE file_name = 'top.jpg'")
    raw(database, "UPDATE image_embeddings SET taken_at = '0001-12-31 10:00:00+00 BC', taken_at_offset_minutes = 840 "
                  "WHERE file_name = 'beach.png'")
    raw(database, "DELETE FROM image_search_schema WHERE number = 10")  # as that version left it
    with capture_logs() as logs:
        store = database.open_store(dimension=TINY_DIMENSION)
    try:
        after = stored(database)
        assert after["top.jpg"] == (None, None, *EXPECTED["top.jpg"][2:])
        assert after["beach.png"] == (None, None, *EXPECTED["beach.png"][2:])
        assert after["phone.heic"] == EXPECTED["phone.heic"]
        cleared = [e for e in logs if e["event"] == "stored_date_cleared"]
        assert sorted(Path(e["path"]).name for e in cleared) == ["beach.png", "top.jpg"]
        assert all("outside years 1-9999" in e["reason"] for e in cleared)
        hits = hits_by_name(store, embedder)
        assert set(hits) == set(EXPECTED) and hits["top.jpg"]["taken_at"] is None
    finally:
        store.close()


def test_a_date_at_the_end_of_year_9999_is_read_back_whatever_the_sessions_time_zone(library, monkeypatch) -> None:
    """9999-12-31 23:59:59 UTC is a good date, and year 10000 in Kiritimati (UTC+14): a server (or PGTZ)
    set to such a zone must not fail the search, the date filter, nor the duplicates report."""
    cfg, database, store, embedder, indexer = library
    last = picture(cfg.source_directory / "last.jpg", "JPEG", seed=5, date="9999:12:31 23:59:59", offset="+00:00")
    (cfg.source_directory / "copies").mkdir()
    (cfg.source_directory / "copies" / "last.jpg").write_bytes(last.read_bytes())  # a copy: a duplicates group
    assert indexer.index_folder(show_progress=False).embedded == 1
    monkeypatch.setenv("PGTZ", "Pacific/Kiritimati")
    kiritimati = database.open_store(dimension=TINY_DIMENSION)
    try:
        assert hits_by_name(kiritimati, embedder)["last.jpg"]["taken_at"] == "9999-12-31T23:59:59+00:00"
        late = hits_by_name(kiritimati, embedder, Filters(taken_after=datetime(9999, 1, 1, tzinfo=UTC)))
        assert [(name, hit["taken_at"]) for name, hit in late.items()] == [("last.jpg", "9999-12-31T23:59:59+00:00")]
        report = write_report(cfg, kiritimati, kinds=[Kind.COPY])
    finally:
        kiritimati.close()
    [group] = [json.loads(line) for line in (report / REPORT).read_text().splitlines()]
    assert [m["taken_at"] for m in group["members"]] == ["9999-12-31T23:59:59+00:00"] * 2


def test_a_row_whose_date_no_datetime_holds_costs_no_search(library) -> None:
    """Written after the start (an earlier version still running on the same database): the search
    answers, that hit without a date, and one line names its file; a date its own offset would carry past
    year 9999 is given in UTC."""
    _, database, store, embedder, _ = library
    raw(database, "UPDATE image_embeddings SET taken_at = '10000-01-01 13:59:59+00' WHERE file_name = 'top.jpg'")
    raw(database, "UPDATE image_embeddings SET taken_at = '9999-12-31 23:00:00+00', taken_at_offset_minutes = 120 "
                  "WHERE file_name = 'phone.heic'")
    with capture_logs() as logs:
        hits = hits_by_name(store, embedder)
    assert set(hits) == set(EXPECTED)
    assert hits["top.jpg"]["taken_at"] is None and hits["top.jpg"]["camera"] == "Canon EOS R5"
    assert hits["phone.heic"]["taken_at"] == "9999-12-31T23:00:00+00:00"
    assert hits["beach.png"]["taken_at"] == "2021-01-02T03:04:05"
    unreadable = [e for e in logs if e["event"] == "stored_date_unreadable"]
    assert [Path(e["path"]).name for e in unreadable] == ["top.jpg"]
