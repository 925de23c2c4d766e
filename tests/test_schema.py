"""The schema's numbered migrations against the real embedded PostgreSQL: a fresh database gets every step
and the version; a database as each earlier version left it (built here with that version's SQL) is
brought to the current version once, at start, keeping its rows, ids and embeddings; services starting
at once migrate once (the schema lock); a second start applies nothing.

Each test has a database of its own on one shared server (``CREATE DATABASE``), so nothing leaks."""

from __future__ import annotations

import itertools
import threading
import time
import types
from collections.abc import Callable, Iterator

import psycopg2
import psycopg2.extensions
import pytest
from structlog.testing import capture_logs

from tests.support.db import embedded_database, fetch_all
from tests.support.waiting import wait_for

from image_search.names import escape
from image_search.store import IDENTITY, NAMES, SCHEMA_LOCK_KEY, Database, EmbeddingStore, FleetRegistry
from image_search.store import migrations, schema
from image_search.store.metadata import METADATA_STEP, MetadataUpdate, migrate_metadata, needs_metadata_migration
from image_search.store.paths import PATHS_STEP

pytestmark = pytest.mark.integration

DIM = 8
MODEL = "test-model"
STEPS = {step.number: step.name for step in migrations.discover()}
LATEST = max(STEPS)
# The steps a start applies before the model confirms the dimension (the fleet's tables, first of all).
WITHOUT_DIMENSION = {step.number: step.name for step in migrations.discover() if not step.needs_dimension}
_names = itertools.count()

# What the versions before the schema table wrote, as they wrote it.
OLD_EMBEDDINGS = f"""
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE image_embeddings (
    id BIGSERIAL PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    file_path TEXT NOT NULL,
    file_name TEXT NOT NULL,
    file_hash TEXT UNIQUE NOT NULL,
    processed_path TEXT NOT NULL,
    source_size BIGINT NOT NULL,
    source_mtime_ns BIGINT NOT NULL,
    model_name TEXT NOT NULL,
    embedding vector({DIM}) NOT NULL
);
CREATE INDEX image_embeddings_file_path_idx ON image_embeddings (file_path);
"""
OLD_META = "CREATE TABLE image_search_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
# Three rows: two with names an earlier version stored raw (a newline, a backslash), one plain.
RAW_NAMES = ["/photos/new\nline.png", "/photos/back\\slash.png", "/photos/plain.png"]
COLUMNS = "id, file_path, file_name, file_hash, embedding::text"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    with embedded_database(tmp_path_factory.mktemp("schema")) as db:
        yield db


@pytest.fixture
def connect(server: Database) -> Callable[[], psycopg2.extensions.connection]:
    """Connections to a database of this test's own on the shared server."""
    assert server.embedded is not None
    name = f"schema_{next(_names)}"
    admin = psycopg2.connect(server.embedded.uri)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    dsn = psycopg2.extensions.make_dsn(server.embedded.uri, dbname=name)
    return lambda: psycopg2.connect(dsn)


def sql(connect: Callable[[], psycopg2.extensions.connection], statement: str, params: tuple = ()) -> list[tuple]:
    return fetch_all(connect(), statement, params)


def recorded(connect) -> dict[int, str]:
    if not sql(connect, "SELECT to_regclass('image_search_schema') IS NOT NULL")[0][0]:
        return {}
    return dict(sql(connect, "SELECT number, name FROM image_search_schema"))


def version(connect) -> int:
    conn = connect()
    try:
        with conn, conn.cursor() as cur:
            return schema.version(cur)
    finally:
        conn.close()


def meta(connect) -> dict[str, str]:
    return dict(sql(connect, "SELECT key, value FROM image_search_meta"))


def rows(connect) -> list[tuple]:
    return sql(connect, f"SELECT {COLUMNS} FROM image_embeddings ORDER BY id")


def start(connect) -> EmbeddingStore:
    """A service's start: join, open the store while the model loads, create the table once it confirmed."""
    registry = FleetRegistry(connect)
    registry.join(host="h", pid=1, model_name=MODEL, dimension=DIM, lease_s=30.0)
    registry.close()
    store = EmbeddingStore(connect, dimension=DIM)
    if not store.has_table:
        store.create_table()
    return store


def build_earlier_version(connect, version_name: str) -> None:
    """A database as an earlier version left it: its table and rows (old hashes: MD5s of the processed
    JPEGs), and its markers: none ("v0"), the identity only ("v1"), or both ("v2", whose names are
    stored escaped already)."""
    sql(connect, OLD_EMBEDDINGS)
    for i, path in enumerate(RAW_NAMES):
        stored = escape(path) if version_name == "v2" else path
        sql(connect, "INSERT INTO image_embeddings (file_path, file_name, file_hash, processed_path, source_size, "
                     "source_mtime_ns, model_name, embedding) VALUES (%s, %s, %s, %s, 1, 1, %s, %s::vector)",
            (stored, stored.rsplit("/", 1)[1], f"old{i}", f"/processed/{i}.jpg", MODEL,
             str([float(i == j) for j in range(DIM)])))
    if version_name != "v0":
        sql(connect, OLD_META)
        sql(connect, "INSERT INTO image_search_meta VALUES ('identity', %s)", (IDENTITY,))
    if version_name == "v2":
        sql(connect, "INSERT INTO image_search_meta VALUES ('names', %s)", (NAMES,))


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def test_a_fresh_database_gets_every_step_and_the_version(connect) -> None:
    with capture_logs() as logs:
        store = start(connect)
    try:
        assert recorded(connect) == STEPS
        assert version(connect) == LATEST
        assert [e["step"] for e in events(logs, "schema_migrated")] == [
            *sorted(WITHOUT_DIMENSION), *sorted(STEPS.keys() - WITHOUT_DIMENSION.keys())]
        assert meta(connect) == {"identity": IDENTITY, "names": NAMES}
        assert not store.needs_identity_migration()
        tables = {r[0] for r in sql(connect, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {"image_embeddings", "image_paths", "image_search_meta", "image_search_members",
                          "image_search_claims", "image_search_schema"}
    finally:
        store.close()


def test_tables_dropped_by_hand_to_index_again_are_made_again_with_the_new_dimension(connect) -> None:
    """The error of a changed 'dimension' says to drop the tables to index again. The steps that made them
    stayed recorded: the next start found nothing to apply, and failed on the missing table at every
    restart. They are applied again now, with the table of the new dimension."""
    start(connect).close()
    sql(connect, "DROP TABLE image_paths, image_embeddings")
    with capture_logs() as logs:
        registry = FleetRegistry(connect)
        registry.join(host="h", pid=1, model_name=MODEL, dimension=2 * DIM, lease_s=30.0)
        registry.close()
        store = EmbeddingStore(connect, dimension=2 * DIM)
        try:
            assert not store.has_table
            store.create_table()
            assert store.count() == 0
        finally:
            store.close()
    (dropped,) = events(logs, "schema_table_dropped")
    assert dropped["steps"] == sorted(STEPS.keys() - WITHOUT_DIMENSION.keys())
    assert recorded(connect) == STEPS
    assert sql(connect, "SELECT to_regclass('image_paths') IS NOT NULL") == [(True,)]
    assert schema.table_dimension(connect()) == 2 * DIM


def test_steps_that_need_the_dimension_wait_for_the_table(connect) -> None:
    """A start whose model has not confirmed the dimension yet creates no table of vectors."""
    store = EmbeddingStore(connect, dimension=DIM)
    try:
        assert recorded(connect) == WITHOUT_DIMENSION
        assert version(connect) == 1
        assert sql(connect, "SELECT to_regclass('image_embeddings')") == [(None,)]
        store.create_table()
        assert recorded(connect) == STEPS
    finally:
        store.close()


@pytest.mark.parametrize("earlier", ["v0", "v1", "v2"])
def test_a_database_of_each_earlier_version_is_migrated_once_keeping_rows(connect, earlier: str) -> None:
    build_earlier_version(connect, earlier)
    before = rows(connect)
    with capture_logs() as logs:
        store = start(connect)
    try:
        escaped = [escape(p) for p in RAW_NAMES]
        after = rows(connect)
        # Same rows, ids and embeddings; names as names.escape writes them.
        assert [(r[0], r[3], r[4]) for r in after] == [(r[0], r[3], r[4]) for r in before]
        assert [r[1] for r in after] == escaped
        # Each row's path is the one path of its content (0008), whatever the steps still waiting.
        assert sql(connect, "SELECT file_path, file_hash FROM image_paths ORDER BY file_path") == sorted(
            (r[1], r[3]) for r in after)
        assert [e["rows"] for e in events(logs, "names_escaped")] == ([] if earlier == "v2" else [2])
        # The metadata waits for the files' headers, which sync reads (and so, for v0, does the identity).
        assert needs_metadata_migration(store)
        if earlier == "v0":  # the identity waits for the files' hashes, which sync reads
            assert recorded(connect) == {n: s for n, s in STEPS.items() if n not in (3, METADATA_STEP)}
            assert version(connect) == 2
            assert store.needs_identity_migration()
            assert store.migrate_identities({"old0": "new0", "old2": "new2"}) == 2
            assert [r[3] for r in rows(connect)] == ["new0", "old1", "new2"]
            assert [r[0] for r in rows(connect)] == [r[0] for r in before]
        assert recorded(connect) == {n: s for n, s in STEPS.items() if n != METADATA_STEP}
        first_hash = rows(connect)[0][3]
        assert migrate_metadata(store, {first_hash: MetadataUpdate(folder="a/b", metadata=None)}) == 1
        assert sql(connect, "SELECT folder FROM image_embeddings WHERE file_hash = %s", (first_hash,)) == [("a/b",)]
        # ... and its path's, which the folder filter reads (0008 found no folder to copy).
        assert sql(connect, "SELECT folder FROM image_paths WHERE file_hash = %s", (first_hash,)) == [("a/b",)]
        assert not needs_metadata_migration(store)
        assert migrate_metadata(store, {first_hash: MetadataUpdate(folder="c", metadata=None)}) == 0  # once only
        assert recorded(connect) == STEPS
        assert version(connect) == LATEST
        assert not store.needs_identity_migration()
        assert meta(connect) == {"identity": IDENTITY, "names": NAMES}
        assert store.migrate_identities({"new0": "newer0"}) == 0  # once only
        migrated = rows(connect)
    finally:
        store.close()
    with capture_logs() as logs:  # the next start: nothing left to do
        start(connect).close()
    assert events(logs, "schema_migrated") == [] and events(logs, "names_escaped") == []
    assert rows(connect) == migrated


def test_a_database_of_the_version_before_paths_gets_each_rows_path(connect) -> None:
    """What the version before 0008 left: steps 1-7 applied, one path per row (its copies were dropped);
    two rows naming one path can only be a content that changed there, so the newer row keeps it."""
    start(connect).close()
    sql(connect, "DROP TABLE image_paths")
    sql(connect, "DELETE FROM image_search_schema WHERE number = %s", (PATHS_STEP,))
    insert = ("INSERT INTO image_embeddings (file_path, file_name, file_hash, processed_path, source_size, "
              "source_mtime_ns, model_name, embedding, folder, updated_at) "
              "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::vector, %s, now() - %s::interval)")
    for i, (path, file_hash, folder, age) in enumerate([("/photos/a.png", "stale", "", "1 day"),
                                                        ("/photos/a.png", "ha", "", "0 s"),
                                                        ("/photos/sub/b.png", "hb", "sub", "0 s")]):
        sql(connect, insert, (path, path.rsplit("/", 1)[1], file_hash, f"/processed{path}.jpg", 100 + i, 200 + i,
                              MODEL, str([float(i == j) for j in range(DIM)]), folder, age))
    before = sql(connect, f"SELECT {COLUMNS} FROM image_embeddings WHERE file_hash <> 'stale' ORDER BY id")
    with capture_logs() as logs:
        store = start(connect)
    try:
        assert [e["step"] for e in events(logs, "schema_migrated")] == [PATHS_STEP]
        assert recorded(connect) == STEPS and version(connect) == LATEST
        assert rows(connect) == before  # same ids, hashes and embeddings; the stale row is gone
        assert sql(connect, "SELECT file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns, "
                            "folder FROM image_paths ORDER BY file_path") == [
            ("/photos/a.png", "ha", "a.png", "/processed/photos/a.png.jpg", 101, 201, ""),
            ("/photos/sub/b.png", "hb", "b.png", "/processed/photos/sub/b.png.jpg", 102, 202, "sub")]
        assert set(store.sources()) == {"/photos/a.png", "/photos/sub/b.png"}
    finally:
        store.close()


def rows_and_paths(connect, pictures: list[tuple[str, str | None]], *, path_folder: str,
                   copy: tuple[str, str]) -> None:
    """A row for each of ``pictures`` (path, folder; hashes h0, h1, ...) with its path in image_paths, whose
    folder is the SQL ``path_folder`` ('folder': the row's; 'NULL'), and a copy of h0 (path, folder)."""
    insert = ("INSERT INTO image_embeddings (file_path, file_name, file_hash, processed_path, source_size, "
              "source_mtime_ns, model_name, embedding, folder) VALUES (%s, %s, %s, %s, 1, 1, %s, %s::vector, %s)")
    for i, (path, folder) in enumerate(pictures):
        sql(connect, insert, (path, path.rsplit("/", 1)[1], f"h{i}", f"/processed{path}.jpg", MODEL,
                              str([float(i == j) for j in range(DIM)]), folder))
    sql(connect, "INSERT INTO image_paths (file_path, file_hash, file_name, processed_path, source_size, "
                 f"source_mtime_ns, folder) SELECT file_path, file_hash, file_name, processed_path, 1, 1, {path_folder} "
                 "FROM image_embeddings")
    path, folder = copy
    sql(connect, "INSERT INTO image_paths (file_path, file_hash, file_name, processed_path, source_size, "
                 "source_mtime_ns, folder) VALUES (%s, 'h0', %s, %s, 1, 1, %s)",
        (path, path.rsplit("/", 1)[1], f"/processed{path}.jpg", folder))


def test_paths_that_0008_left_without_a_folder_get_their_rows_and_an_index(connect) -> None:
    """What a database whose headers were read after 0008 left: each representative's path without the
    folder its row has. 0011 fills it (the folder filter reads the paths' folders) and indexes the column."""
    start(connect).close()
    sql(connect, "DROP INDEX IF EXISTS image_paths_folder_idx")  # 0012 dropped it: 0011 makes it again
    sql(connect, "DELETE FROM image_search_schema WHERE number = 11")
    rows_and_paths(connect, [("/photos/sub/a.png", "sub"), ("/photos/b.png", None)], path_folder="NULL",
                   copy=("/photos/x/a.png", "x"))
    with capture_logs() as logs:
        start(connect).close()
    assert [e["step"] for e in events(logs, "schema_migrated")] == [11]
    assert sql(connect, "SELECT file_path, folder FROM image_paths ORDER BY file_path") == [
        ("/photos/b.png", None), ("/photos/sub/a.png", "sub"), ("/photos/x/a.png", "x")]
    assert sql(connect, "SELECT indexdef FROM pg_indexes WHERE indexname = 'image_paths_folder_idx'") == [
        ("CREATE INDEX image_paths_folder_idx ON public.image_paths USING btree (folder text_pattern_ops)",)]


def test_paths_of_the_version_before_copies_were_marked_are_marked(connect) -> None:
    """What the version before 0012 left: paths without ``copy``, and 0011's index of every path's folder.
    0012 marks each path that is not its row's a copy, indexes the copies' folders alone, drops the index
    no search reads, and makes TRUE the default: a writer that does not know leaves a copy found."""
    start(connect).close()
    sql(connect, "DROP INDEX image_paths_copy_folder_idx")
    sql(connect, "ALTER TABLE image_paths DROP COLUMN copy")
    sql(connect, "CREATE INDEX image_paths_folder_idx ON image_paths (folder text_pattern_ops)")
    sql(connect, "DELETE FROM image_search_schema WHERE number = 12")
    rows_and_paths(connect, [("/photos/a/x.png", "a"), ("/photos/b.png", "")], path_folder="folder",
                   copy=("/photos/c/x.png", "c"))
    with capture_logs() as logs:
        start(connect).close()
    assert [e["step"] for e in events(logs, "schema_migrated")] == [12]
    assert sql(connect, "SELECT file_path, copy FROM image_paths ORDER BY file_path") == [
        ("/photos/a/x.png", False), ("/photos/b.png", False), ("/photos/c/x.png", True)]
    assert sql(connect, "SELECT indexname, indexdef FROM pg_indexes WHERE indexname IN "
                            "('image_paths_copy_folder_idx', 'image_paths_folder_idx')") == [
        ("image_paths_copy_folder_idx",
         "CREATE INDEX image_paths_copy_folder_idx ON public.image_paths USING btree (folder text_pattern_ops) WHERE copy")]
    sql(connect, "INSERT INTO image_paths (file_path, file_hash, file_name, processed_path, source_size, "
                 "source_mtime_ns) VALUES ('/photos/d/x.png', 'h0', 'x.png', '/processed/d/x.png.jpg', 1, 1)")
    assert sql(connect, "SELECT copy FROM image_paths WHERE file_path = '/photos/d/x.png'") == [(True,)]


def copies_step_behind_a_backup(connect, monkeypatch: pytest.MonkeyPatch) -> tuple[psycopg2.extensions.connection, int]:
    """A database one step behind (12, whose ALTER TABLE needs image_paths alone), and a session that
    read image_paths in a transaction it keeps open, as a backup does: that session and its pid."""
    start(connect).close()
    sql(connect, "DROP INDEX image_paths_copy_folder_idx")
    sql(connect, "ALTER TABLE image_paths DROP COLUMN copy")
    sql(connect, "DELETE FROM image_search_schema WHERE number = 12")
    monkeypatch.setattr(schema, "MIGRATION_RETRY_S", 0.3, raising=False)
    backup = connect()
    cur = backup.cursor()
    cur.execute("SELECT pg_backend_pid(), count(*) FROM image_paths")
    return backup, cur.fetchone()[0]


def test_a_step_waits_for_a_table_held_in_tries_saying_who_holds_it_and_others_go_on(
        connect, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 12's ALTER TABLE while another session reads image_paths in a long transaction (a backup):
    each try gives way after a few seconds and the waiting start says who holds the table, so a third
    session's reads go on meanwhile; they queued behind the ALTER until the backup ended, and the start
    logged nothing."""
    backup, backup_pid = copies_step_behind_a_backup(connect, monkeypatch)
    migrated: list[EmbeddingStore] = []
    try:
        with capture_logs() as logs:
            starting = threading.Thread(target=lambda: migrated.append(start(connect)), daemon=True)
            starting.start()
            wait_for(lambda: events(logs, "schema_migration_waiting"), timeout=30, what="the start saying it waits")
            reader = connect()
            try:
                with reader, reader.cursor() as cur:
                    cur.execute("SET LOCAL statement_timeout = '10s'")  # behind a queued ALTER: cancelled
                    cur.execute("SELECT count(*) FROM image_paths")
            finally:
                reader.close()
            assert not migrated and starting.is_alive()
            backup.rollback()
            starting.join(timeout=30)
        assert migrated, "the step was applied once the table was free"
        migrated[0].close()
    finally:
        backup.close()
    [waiting] = events(logs, "schema_migration_waiting")
    assert any(holder.startswith(f"pid {backup_pid} ") for holder in waiting["holders"]), waiting
    assert [e["step"] for e in events(logs, "schema_migrated")] == [12]  # said once, as applied once
    assert 12 in recorded(connect)


def test_a_stop_while_a_step_waits_for_a_table_ends_the_wait_with_nothing_applied(connect, monkeypatch) -> None:
    """The service's stop, asked for while step 12 waits for a backup (its checkpoint raises): the start
    ends at once. It waited, deaf to the stop, until the backup ended."""
    backup, _ = copies_step_behind_a_backup(connect, monkeypatch)

    class Stopped(Exception):
        pass

    asked: list[float] = []

    def checkpoint() -> None:
        asked.append(time.monotonic())
        if len(asked) == 2:
            raise Stopped

    try:
        with pytest.raises(Stopped):
            EmbeddingStore(connect, dimension=DIM, checkpoint=checkpoint)
    finally:
        backup.close()
    assert 12 not in recorded(connect)
    start(connect).close()  # the next start applies it
    assert 12 in recorded(connect)


def test_a_second_start_applies_nothing(connect) -> None:
    start(connect).close()
    first = sql(connect, "SELECT number, applied_at FROM image_search_schema ORDER BY number")
    with capture_logs() as logs:
        start(connect).close()
    assert events(logs, "schema_migrated") == []
    assert sql(connect, "SELECT number, applied_at FROM image_search_schema ORDER BY number") == first


def waiting_for_schema_lock(connect) -> int:
    [(count,)] = sql(connect, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                              "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                              "AND ((classid::bigint << 32) | objid::bigint) = %s", (SCHEMA_LOCK_KEY,))
    return int(count)


def test_services_starting_at_once_migrate_once(connect) -> None:
    """Four migrations of one earlier-version database at once: the test holds the schema lock until all
    four wait for it (so they did run at once), then lets them go; each step is applied once."""
    build_earlier_version(connect, "v1")
    errors: list[BaseException] = []

    def migrate() -> None:
        conn = connect()
        try:
            schema.migrate(conn, dimension=DIM, create=True)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)
        finally:
            conn.close()

    gate = connect()
    threads = [threading.Thread(target=migrate) for _ in range(4)]
    try:
        with capture_logs() as logs:
            gate.cursor().execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))  # held until commit
            for t in threads:
                t.start()
            wait_for(lambda: waiting_for_schema_lock(connect) == 4, "all four migrations waiting for the schema lock")
            gate.commit()
            for t in threads:
                t.join(timeout=60)
    finally:
        gate.close()
    assert errors == []
    waiting = {METADATA_STEP}  # rows of an earlier version wait for their files' headers (sync reads them)
    assert sorted(e["step"] for e in events(logs, "schema_migrated")) == sorted(set(STEPS) - waiting)
    assert [e["rows"] for e in events(logs, "names_escaped")] == [2]
    assert recorded(connect) == {n: s for n, s in STEPS.items() if n not in waiting}


def test_a_new_step_is_a_new_module_applied_once_to_old_and_new_databases(connect, monkeypatch) -> None:
    """What the migrations' docstring promises: adding a column is one more step, and nothing else."""
    start(connect).close()
    column = types.ModuleType("0005_captured_at")
    column.NEEDS_DIMENSION = True  # type: ignore[attr-defined]
    column.apply = lambda context: context.cur.execute(  # type: ignore[attr-defined]
        "ALTER TABLE image_embeddings ADD COLUMN captured_at TIMESTAMPTZ") or True
    steps = (*migrations.discover(), migrations.Migration(LATEST + 1, "captured_at", column))
    monkeypatch.setattr(migrations, "discover", lambda: steps)
    with capture_logs() as logs:
        start(connect).close()
        start(connect).close()  # ADD COLUMN without IF NOT EXISTS: a second run would fail
    assert [e["step"] for e in events(logs, "schema_migrated")] == [LATEST + 1]
    assert sql(connect, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'image_embeddings' "
                        "AND column_name = 'captured_at'") == [(1,)]
    assert version(connect) == LATEST + 1
