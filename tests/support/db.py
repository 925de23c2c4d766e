"""Reading ``image_embeddings`` rows in tests, from a running or a stopped embedded PostgreSQL.

- While a service runs, rows are read through a plain psycopg2 connection to the socket named in
  the pgdata's ``postmaster.pid`` (``live_rows``, ``running_server_rows``), not through
  ``image_search.store.Database``: a ``Database`` in the test process would register the test's pid
  as a pgserver handle, and while it is listed the service's own shutdown does not stop the
  embedded server (and the test's cached server handle goes stale across service restarts).
- With no service running, rows are read through a ``Database`` (``stopped_server_rows``), which
  starts the embedded server for the read and stops it after; ``database_rows`` reads through a
  ``Database`` the test already holds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from image_search.config import load_config
from image_search.store import Database, EmbeddingStore
from tests.support.waiting import wait_for

Row = dict[str, Any]
ROW_COLUMNS: tuple[str, ...] = ("id", "file_path", "file_name", "file_hash", "processed_path", "source_size",
                                "source_mtime_ns", "model_name")


def read_rows(conn: psycopg2.extensions.connection, columns: Sequence[str] = ROW_COLUMNS) -> list[Row] | None:
    """Every row of image_embeddings, ordered by file_path and id, as column -> value; None when the
    table does not exist. ``columns`` are SQL expressions (``"vector_dims(embedding)"`` is fine)."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('image_embeddings') IS NOT NULL")
        if not cur.fetchone()[0]:
            return None
        cur.execute(f"SELECT {', '.join(columns)} FROM image_embeddings ORDER BY file_path, id")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def rows_by_path(rows: list[Row] | None) -> dict[str, Row]:
    """file_path -> row; a missing table reads as no rows."""
    return {row["file_path"]: row for row in rows or ()}


# --- a server some other process runs -----------------------------------------------------------


@dataclass(frozen=True)
class Postmaster:
    """What a running server wrote into its pgdata's postmaster.pid."""

    pid: int
    port: str
    socket_dir: str

    @classmethod
    def of(cls, pgdata: Path) -> Postmaster | None:
        """The server running on ``pgdata``; None when there is none (no pid file, or its pid is gone)."""
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
            postmaster = cls(int(lines[0]), lines[3].strip(), lines[4].strip())
        except (OSError, IndexError, ValueError):
            return None
        return postmaster if _alive(postmaster.pid) else None

    def connect(self) -> psycopg2.extensions.connection | None:
        """A connection over its Unix socket; None when it does not answer (starting, stopping)."""
        try:
            return psycopg2.connect(host=self.socket_dir, port=self.port, user="postgres", dbname="postgres",
                                    connect_timeout=5)
        except psycopg2.OperationalError:
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def service_pgdata(state_dir: Path) -> Path:
    """Where the service keeps its embedded server's data, under its state directory."""
    return state_dir / "pgdata"


def connect_running(pgdata: Path) -> psycopg2.extensions.connection | None:
    postmaster = Postmaster.of(pgdata)
    return postmaster.connect() if postmaster is not None else None


def running_server_rows(pgdata: Path) -> list[Row] | None:
    """The rows of the server running on ``pgdata`` (a missing table reads as no rows); None when no
    server runs there or it does not answer."""
    conn = connect_running(pgdata)
    if conn is None:
        return None
    try:
        return read_rows(conn) or []
    finally:
        conn.close()


def live_rows(state_dir: Path) -> dict[str, Row]:
    """file_path -> row, read from the embedded server the running service of ``state_dir`` uses
    (waiting until it answers)."""
    conn = wait_for(lambda: connect_running(service_pgdata(state_dir)), "a connection to the embedded PostgreSQL")
    try:
        return rows_by_path(read_rows(conn))
    finally:
        conn.close()


def postgres_running(state_dir: Path) -> bool:
    conn = connect_running(service_pgdata(state_dir))
    if conn is None:
        return False
    conn.close()
    return True


def stop_leftover_postgres(state_dir: Path) -> None:
    """Teardown only: never leave a server running behind the tests."""
    # Only the pid line: a server killed while starting may not have written the others.
    try:
        pid = int((service_pgdata(state_dir) / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return
    if _alive(pid):
        os.kill(pid, signal.SIGINT)  # fast shutdown
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


# --- a server this process starts ---------------------------------------------------------------


def database_rows(database: Database, columns: Sequence[str] = ROW_COLUMNS) -> list[Row] | None:
    """The rows, read through the embedded server of a ``Database`` this process holds open."""
    assert database.embedded is not None
    conn = psycopg2.connect(database.embedded.uri)
    try:
        return read_rows(conn, columns)
    finally:
        conn.close()


def stopped_server_rows(config_path: Path, columns: Sequence[str] = ROW_COLUMNS) -> list[Row] | None:
    """The rows with no service running: starts the embedded server for the read, stops it after.
    None when the table does not exist."""
    database = Database(load_config(config_path))
    try:
        return database_rows(database, columns)
    finally:
        database.close()


@contextmanager
def embedded_database(root: Path, **config: object) -> Iterator[Database]:
    """A ``Database`` on an embedded server of its own under ``root`` (config keys as in JSON), stopped
    after the block: what a module of store tests shares."""
    from tests.support.files import write_config

    database = Database(load_config(write_config(root, **config)))
    assert database.embedded is not None
    try:
        yield database
    finally:
        database.close()


@contextmanager
def empty_store(database: Database, dimension: int) -> Iterator[EmbeddingStore]:
    """A store on ``database`` with its table empty before and after the block (for store-level tests)."""
    store = database.open_store(dimension=dimension)
    store.clear()
    try:
        yield store
    finally:
        store.clear()
        store.close()


def fetch_all(conn: psycopg2.extensions.connection, sql: str, params: tuple = ()) -> list[tuple]:
    """Run one statement in its own transaction on ``conn`` (closed after); its rows, if any."""
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def raw(database: Database, sql: str, params: tuple = ()) -> list[tuple]:
    """One statement on a fresh connection to ``database`` (a test's look behind the store)."""
    return fetch_all(database.connect(), sql, params)


def make_legacy_identity(database: Database) -> dict[str, str]:
    """Turn the table into what an earlier version left: no identity marker, each ``file_hash`` the MD5
    of the row's processed JPEG. Returns file_path -> that old hash."""
    conn = database.connect()
    try:
        with conn, conn.cursor() as cur:
            # What an earlier version left: no identity marker, and no record of the schema steps (the
            # table of them came later): the next look recognises the old identity from that.
            cur.execute("DELETE FROM image_search_meta")
            cur.execute("DELETE FROM image_search_schema")
            cur.execute("SELECT file_path, processed_path FROM image_embeddings")
            old = {path: hashlib.md5(Path(processed).read_bytes()).hexdigest() for path, processed in cur.fetchall()}
            # Through names no hash has first: an old hash may be another row's hash of today.
            cur.execute("UPDATE image_embeddings SET file_hash = 'legacy:' || id")
            for path, file_hash in old.items():
                cur.execute("UPDATE image_embeddings SET file_hash = %s WHERE file_path = %s", (file_hash, path))
    finally:
        conn.close()
    return old


def slow_row_writes(monkeypatch, seconds: float) -> None:
    """Every ``EmbeddingStore.upsert`` (the row writer's) takes ``seconds`` longer: a slow database, so that
    a story can act while a batch's rows are still on their way."""
    import time

    upsert = EmbeddingStore.upsert

    def slow_upsert(self: EmbeddingStore, rows) -> None:
        time.sleep(seconds)
        upsert(self, rows)

    monkeypatch.setattr(EmbeddingStore, "upsert", slow_upsert)


@contextmanager
def deadlock_once(database: Database, table: str, event: str) -> Iterator[None]:
    """The first ``event`` statement (INSERT, UPDATE, DELETE) on ``table`` inside the block fails as the
    loser of a deadlock does (SQLSTATE 40P01, its transaction rolled back); later ones run. The count is
    a sequence, which the rollback does not undo."""
    raw(database, f"""
        CREATE SEQUENCE test_deadlock_trips;
        CREATE FUNCTION test_deadlock_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('test_deadlock_trips') = 1 THEN
                RAISE EXCEPTION 'deadlock detected (test)' USING ERRCODE = 'deadlock_detected';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_deadlock_once BEFORE {event} ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION test_deadlock_once();""")
    try:
        yield
        (tripped,), = raw(database, "SELECT is_called FROM test_deadlock_trips")  # nextval ran at least once
        assert tripped, f"no {event} on {table} ran inside the block"
    finally:
        raw(database, f"""DROP TRIGGER test_deadlock_once ON {table};
                          DROP FUNCTION test_deadlock_once(); DROP SEQUENCE test_deadlock_trips""")
