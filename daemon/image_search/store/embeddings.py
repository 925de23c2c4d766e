"""The embeddings: ``image_embeddings`` rows written (binary COPY, upsert), read, searched and relinked.

One row per content (``file_hash``); every path that holds it is a row of ``image_paths`` (``paths``),
so a copy of a stored file costs a path, not an embedding, and a hit names its other paths (``copies``).

Vectors are unit length, so the HNSW index uses inner product (``vector_ip_ops``) and cosine similarity
is ``-(a <#> b)``. Paths and names are stored as ``names.escape`` text (a file name is bytes, a TEXT
column is UTF-8): escaped here on the way in, unescaped on the way out, so everything above the store
holds the names the filesystem gave.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg2.extensions
import structlog
from pgvector.psycopg2 import register_vector

from ..hits import Hit, Ranking
from ..metadata import PictureMetadata
from ..names import escape, unescape
from ..query import Filters
from ..phash import HASH_BYTES, to_bytes
from . import metadata as meta
from . import paths, schema
from .bulk import BulkLoad
from .connection import Connect, Session, StoreError, retried_on_conflict
from .filters import like_escaped
from .ranking import SearchSettings, indexed_sql, rank
from .paths import StoredContent

log = structlog.get_logger("image_search.store")

# A bulk load pays (dropping the index, loading, building it again) once the rows coming are this many,
# and at least a quarter of those already there: per row, HNSW insertion costs about 3 ms here and a
# build about 0.4 ms of every row in the table (``tests/benchmarks/store_write.py``).
BULK_LOAD_MIN_ROWS = 1000
IDENTITY_STEP = 3  # migrations/0003_identity.py


# Rows arrive by binary COPY into a session's staging table (no float is ever formatted as text: that
# alone was 3.9 ms of a 1024-d row's 4.3 ms, measured here), then move in with one INSERT per batch.
# The staging table is the one table not created by a migration (schema.py): it is TEMP, so it belongs
# to one connection, not to the database. It is made on each new connection's first write, from the
# store's dimension, and vanishes with the session; there is nothing in it to migrate.
_STAGING_COLUMNS = ("file_path, file_name, file_hash, processed_path, source_size, source_mtime_ns, model_name, "
                    f"embedding, {meta.COLUMN_LIST}, phash")
_STAGING_SCHEMA = """
CREATE TEMP TABLE IF NOT EXISTS image_embeddings_incoming (
    file_path TEXT, file_name TEXT, file_hash TEXT, processed_path TEXT, source_size BIGINT,
    source_mtime_ns BIGINT, model_name TEXT, embedding vector({dimension}), %s, phash BYTEA
) ON COMMIT DELETE ROWS
""" % meta.STAGING_DDL
COPY_COLUMNS = _STAGING_COLUMNS  # the columns of ``copy_binary``'s rows, in order (a COPY of one's own)
_COPY_IN = f"COPY image_embeddings_incoming ({_STAGING_COLUMNS}) FROM STDIN WITH (FORMAT binary)"
_UPSERT = f"""
INSERT INTO image_embeddings ({_STAGING_COLUMNS})
SELECT {_STAGING_COLUMNS} FROM image_embeddings_incoming
ON CONFLICT (file_hash) DO UPDATE SET
    file_path = EXCLUDED.file_path, file_name = EXCLUDED.file_name, processed_path = EXCLUDED.processed_path,
    source_size = EXCLUDED.source_size, source_mtime_ns = EXCLUDED.source_mtime_ns,
    model_name = EXCLUDED.model_name, embedding = EXCLUDED.embedding, updated_at = now(), {meta.UPSERT_SET},
    phash = coalesce(EXCLUDED.phash, image_embeddings.phash)
"""
COUNT = "SELECT count(*) FROM image_embeddings"
CLEAR = "TRUNCATE image_paths, image_embeddings RESTART IDENTITY"


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
    metadata: PictureMetadata | None = None  # the original's header (``image_search.metadata``)
    folder: str | None = None  # relative to source-directory ('' at its top): ``metadata.relative_folder``
    phash: int | None = None  # ``phash.perceptual_hash`` (None: filled later, ``duplicates.fill_missing_hashes``)


def _path_entry(file_path: str, file_hash: str, file_name: str, processed_path: str, source_size: int,
                source_mtime_ns: int, folder: str | None) -> tuple:
    """A path's values as ``paths.record`` writes them (``paths.COLUMNS``), its names escaped."""
    return (escape(file_path), file_hash, escape(file_name), escape(processed_path), source_size, source_mtime_ns,
            escape(folder) if folder is not None else None)


@dataclass(frozen=True)
class PathMove:
    """A path that holds a stored content now (``EmbeddingStore.move_paths``): a file renamed onto it."""

    file_path: str
    file_hash: str
    processed_path: str
    source_size: int
    source_mtime_ns: int
    folder: str
    leaves: str | None = None  # the content's former path, gone with the rename


@dataclass(frozen=True)
class SourceRecord:
    """What the table knows about one source file: enough to skip it on a rescan, and where its processed
    copy is (a rescan makes a missing one again)."""

    file_path: str
    source_size: int
    source_mtime_ns: int
    file_hash: str
    model_name: str
    processed_path: str


def _source_record(row: tuple) -> SourceRecord:
    """A row of ``paths.SOURCES``."""
    path, size, mtime_ns, file_hash, model, processed = row
    return SourceRecord(unescape(path), size, mtime_ns, file_hash, model, unescape(processed))


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)


def copy_binary(rows: Sequence[EmbeddingRow]) -> bytes:
    """``rows`` in PostgreSQL's binary COPY format, in ``_STAGING_COLUMNS`` order; each vector as pgvector's
    binary form (its dimension, a reserved zero, then big-endian float4s: a vector that is not of the
    table's dimension is refused by PostgreSQL, the whole batch with it)."""
    out = [_COPY_HEADER]
    for r in rows:
        vector = np.asarray(r.embedding, dtype=">f4").reshape(-1)
        out.append(struct.pack("!h", 9 + len(meta.COLUMNS)))
        for text in (escape(r.file_path), escape(r.file_name), r.file_hash, escape(r.processed_path)):
            data = text.encode("utf-8")
            out.append(struct.pack("!i", len(data)) + data)
        model = r.model_name.encode("utf-8")
        out.append(struct.pack("!iqiqi", 8, r.source_size, 8, r.source_mtime_ns, len(model)) + model)
        out.append(struct.pack("!ihh", 4 + 4 * vector.size, vector.size, 0) + vector.tobytes())
        out.append(meta.copy_fields(r.metadata, r.folder))
        out.append(struct.pack("!i", -1) if r.phash is None else struct.pack("!i", HASH_BYTES) + to_bytes(r.phash))
    out.append(_COPY_TRAILER)
    return b"".join(out)


class EmbeddingStore:
    """The ``image_embeddings`` table for one dimension. It owns its connection (``session``): after the
    database went away, ``reconnect`` replaces it in place, so every holder of the store (and of its
    session: the fleet's work claims) keeps working."""

    def __init__(self, connect: Connect, *, dimension: int, ef_search: int = 100,
                 exact_search_below: int = 10_000, prepared: bool = False,
                 checkpoint: Callable[[], None] = lambda: None) -> None:
        self._connect = connect
        self._checkpoint = checkpoint  # called while a schema step waits for a table: it may raise (a stop)
        self.dimension = dimension
        self.ef_search = ef_search
        self.exact_search_below = exact_search_below
        self.session = Session(connect)
        self._staging_on: psycopg2.extensions.connection | None = None
        try:
            self.has_table = self._prepare() if not prepared else True
        except BaseException:
            self.session.close()
            raise

    def sibling(self) -> EmbeddingStore:
        """This table, on a connection of its own (the row writer's); nothing is checked again (``prepared``)."""
        return EmbeddingStore(self._connect, dimension=self.dimension, ef_search=self.ef_search,
                              exact_search_below=self.exact_search_below, prepared=True)

    @property
    def _conn(self) -> psycopg2.extensions.connection:
        return self.session.conn

    def _cursor(self) -> AbstractContextManager[psycopg2.extensions.cursor]:
        """One transaction (or the one this thread has open): committed when it ends, rolled back if it raises."""
        return self.session.transaction()

    def _prepare(self) -> bool:
        """Make sure pgvector is there, an existing table has our dimension, and the database is migrated as
        far as it can be before the model confirmed the dimension; True if the table exists. The table is
        made by ``create_table`` once it has, so a wrong 'dimension' never leaves an empty table behind."""
        schema.prepare(self._conn)
        register_vector(self._conn)
        self.session.on_connect = register_vector
        found = schema.table_dimension(self._conn)
        if found is not None and found != self.dimension:
            raise StoreError(
                f"table image_embeddings holds {found}-dimensional embeddings but config key 'dimension' is "
                f"{self.dimension}. Nothing was dropped. Set 'dimension' back to {found}, or point the "
                "service at another database, or drop the tables yourself to index again with the new model "
                "(DROP TABLE image_paths, image_embeddings)."
            )
        schema.migrate(self._conn, dimension=self.dimension, checkpoint=self._checkpoint)
        return found is not None

    def create_table(self) -> None:
        """Create the table and its indexes if missing (idempotent), through the migrations that wait for the
        confirmed dimension; a new table holds today's identity, an old one its own (``needs_identity_migration``)."""
        schema.migrate(self._conn, dimension=self.dimension, create=True, checkpoint=self._checkpoint)
        schema.ensure_index(self._conn, self.dimension, table_existed=self.has_table)
        self.has_table = True

    def begin_bulk_load(self, rows_coming: int) -> BulkLoad | None:
        """A ``BulkLoad`` for ``rows_coming`` rows when they are many (``BULK_LOAD_MIN_ROWS``, and a quarter
        of the table at least) and no other service bulk-loads; else None (rows go into the index one by one)."""
        if not self.has_table or rows_coming < BULK_LOAD_MIN_ROWS or rows_coming * 4 < self.count():
            return None
        return BulkLoad.begin(self._connect, self.dimension, rows_coming)

    def repair_index(self) -> BulkLoad | None:
        """At a start (and now and then in a running service): a ``BulkLoad`` that builds the HNSW index
        again when it is missing or invalid (a load or a build cut short by a crash, a stop, a restarted
        database), in bulk and CONCURRENTLY (the table may be live: other services write, and search
        exactly, meanwhile); None when it is valid, or another service bulk-loads (its build makes it valid)."""
        if not self.has_table or self.index_valid():
            return None
        return BulkLoad.begin(self._connect, self.dimension, self.count(), repair=True)

    def index_valid(self) -> bool:
        """Whether the HNSW index is there and usable."""
        with self._cursor() as cur:
            cur.execute(schema.INDEX_VALID)
            return bool(cur.fetchone()[0])

    @contextmanager
    def bulk_load(self, rows_coming: int) -> Iterator[bool]:
        """``begin_bulk_load`` (or ``repair_index``) around a block that writes ``rows_coming`` rows; the
        index is built again when the block ends. Yields whether the rows land without the index. If the
        block raises (a stop, a lost database), the index is left for the next start to build."""
        bulk = self.begin_bulk_load(rows_coming) or self.repair_index()
        try:
            yield bulk is not None
        except BaseException:
            if bulk is not None:
                bulk.abandon()
            raise
        if bulk is not None:
            try:
                bulk.finish()
            except BaseException:  # a stop (Ctrl-C, SIGTERM) or a lost database, said by whoever catches it
                log.info("search_index_build_stopped", detail="cut short: the next start or index builds it; "
                                                              "searches are exact until then")
                raise

    def needs_identity_migration(self) -> bool:
        """True when the table's ``file_hash`` values are not today's identity (a database written by an
        earlier version: they are MD5s of the processed JPEGs), i.e. the identity step is pending. Asked
        of the database each time: another service sharing it may have migrated it meanwhile."""
        return self.has_table and not schema.is_applied(self._conn, IDENTITY_STEP)

    def migrate_identities(self, new_hashes: dict[str, str]) -> int:
        """Supply the identity step its input (old hash -> new hash, ``sync.migrate_identities`` reads the
        files) and apply it, in one transaction under the schema lock. Returns the rows rewritten; 0
        when another service migrated first."""
        done = schema.migrate(self._conn, dimension=self.dimension, supplied={IDENTITY_STEP: new_hashes})
        return int(done.get(IDENTITY_STEP) or 0)

    def reconnect(self) -> None:
        """Replace a broken connection; raises DatabaseUnavailable while the database is still away."""
        self.session.reconnect()

    def close(self) -> None:
        self.session.close()

    # --- writing -------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[EmbeddingRow]) -> None:
        """Insert or replace rows by ``file_hash``, in one transaction; each row's path becomes a path of its
        content (its representative), instead of any other content it held."""
        if not rows:
            return
        self.prepare_writes()
        with self._cursor() as cur:
            cur.copy_expert(_COPY_IN, io.BytesIO(copy_binary(rows)))
            cur.execute(paths.LEAVE_STAGED)
            left = [row[0] for row in cur.fetchall()]
            cur.execute(_UPSERT)
            cur.execute(paths.WRITE_STAGED)
            paths.tidy(cur, left)

    def prepare_writes(self) -> None:
        """The session's staging table, once per connection, in a transaction of its own: called before a block
        of writes opens its transaction, so that a block that fails does not take the table with it."""
        if self._staging_on is not self._conn:
            with self._cursor() as cur:
                cur.execute(_STAGING_SCHEMA.format(dimension=int(self.dimension)))
            self._staging_on = self._conn

    @retried_on_conflict
    def update_source(self, file_hash: str, *, file_path: str, file_name: str, processed_path: str,
                      source_size: int, source_mtime_ns: int, folder: str | None,
                      metadata: PictureMetadata | None = None, replaces: Iterable[str] = ()) -> bool:
        """``file_path`` holds the stored content ``file_hash`` (a copy, a rename, a touch; no model work),
        instead of any other content and of ``replaces`` (its former names, gone); with ``metadata`` if
        read again. False, nothing written, when the content is gone (another service dropped it)."""
        entry = _path_entry(file_path, file_hash, file_name, processed_path, source_size, source_mtime_ns, folder)
        with self._cursor() as cur:
            if (left := paths.record(cur, entry, [escape(p) for p in replaces])) is None:
                return False
            if metadata is not None:
                cur.execute(meta.UPDATE_ALL, (*meta.metadata_values(metadata, folder), file_hash))
            paths.tidy(cur, [*left, file_hash])
            return True

    @retried_on_conflict
    def move_paths(self, moves: Sequence[PathMove]) -> None:
        """Each path of ``moves`` holds its content now, instead of the content it held and of its
        ``leaves``, all in one transaction: a content whose path another took, and that comes to a path
        of its own in the same moves (a renumbering, a swap), is never dropped for having none between
        the two. One whose content is gone meanwhile (another service dropped it) is left out."""
        with self._cursor() as cur:
            left: list[str] = []
            for move in moves:
                entry = _path_entry(move.file_path, move.file_hash, Path(move.file_path).name, move.processed_path,
                                    move.source_size, move.source_mtime_ns, move.folder)
                left += paths.record(cur, entry, [] if move.leaves is None else [escape(move.leaves)]) or []
            paths.tidy(cur, [*left, *(move.file_hash for move in moves)])

    @retried_on_conflict
    def delete_paths(self, sources: Iterable[str]) -> int:
        """Forget these paths (a row goes with its content's last); how many of them were known."""
        with self._cursor() as cur:
            return len(paths.forget(cur, paths.DELETE, ([escape(p) for p in sources],)))

    @retried_on_conflict
    def delete_under(self, folder: str) -> dict[str, str]:
        """Forget every path inside ``folder`` (a deleted or moved-out folder), as ``delete_paths``; those
        paths, each with the hash of its content (whose other paths may be links to one of them)."""
        # The stored text of a folder is a prefix of its files' (names.escape), so LIKE 'folder/%' finds them.
        pattern = like_escaped(escape(folder.rstrip("/")))
        with self._cursor() as cur:
            return {unescape(path): file_hash
                    for path, file_hash in paths.forget(cur, paths.DELETE_UNDER, (pattern + "/%",))}

    def clear(self) -> None:
        if not self.has_table:
            return
        with self._cursor() as cur:
            cur.execute(CLEAR)

    # --- reading -------------------------------------------------------------------------------

    def count(self) -> int:
        if not self.has_table:
            return 0
        with self._cursor() as cur:
            cur.execute(COUNT)
            return int(cur.fetchone()[0])

    def sources(self, at: Iterable[str] | None = None) -> dict[str, SourceRecord]:
        """Stored paths, copies included: every one (what a rescan compares the folder against), or ``at``."""
        if not self.has_table:
            return {}
        with self._cursor() as cur:
            if at is None:
                cur.execute(paths.SOURCES)
            else:
                cur.execute(paths.SOURCES_AT, ([escape(p) for p in at],))
            return {r.file_path: r for r in map(_source_record, cur.fetchall())}

    def sources_under(self, folder: str) -> dict[str, SourceRecord]:
        """The stored paths inside ``folder``, as ``sources``."""
        if not self.has_table:
            return {}
        with self._cursor() as cur:
            cur.execute(paths.SOURCES_UNDER, (like_escaped(escape(folder.rstrip("/"))) + "/%",))
            return {r.file_path: r for r in map(_source_record, cur.fetchall())}

    def contents(self, hashes: Iterable[str]) -> dict[str, StoredContent]:
        """For each stored hash among ``hashes``: its model and every path that holds it, with its size and mtime."""
        hashes = list(hashes)
        if not hashes:
            return {}
        with self._cursor() as cur:
            cur.execute(paths.CONTENTS, (hashes,))
            return {h: StoredContent(m, tuple(unescape(p) for p, _, _ in found),
                                     tuple((int(size), int(mtime)) for _, size, mtime in found))
                    for h, m, found in cur.fetchall()}

    def indexed_search_plan(self, query: np.ndarray, k: int) -> str:
        """PostgreSQL's plan for the indexed search (EXPLAIN): shows whether the HNSW index is used."""
        with self._cursor() as cur:
            cur.execute("EXPLAIN " + indexed_sql(self.dimension),
                        {"q": np.asarray(query, dtype=np.float32).reshape(-1), "k": k})
            return "\n".join(row[0] for row in cur.fetchall())

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` stored images most similar to the unit vector ``query``, best first (``ranking``'s hits)."""
        return self.ranking(query, k).hits

    def ranking(self, query: np.ndarray, k: int, *, filters: Filters = Filters(),
                min_similarity: float | None = None) -> Ranking:
        """The ``k`` stored images most similar to the unit vector ``query`` among those passing ``filters``
        and at or above ``min_similarity``, best first, and whether they are all there are
        (``store.ranking``: never short without saying so).

        Small tables (and filters matching few rows) are scanned exactly (an approximate index buys
        nothing there and can miss), and so is any table while its index is being rebuilt
        (``bulk_load``); large ones go through the HNSW index with ``hnsw.ef_search`` raised to at least
        ``k``, and exactly after all where the index found fewer than ``k``.
        """
        settings = SearchSettings(self.dimension, self.ef_search, self.exact_search_below)
        with self._cursor() as cur:
            return rank(cur, settings, query, k, filters, min_similarity)
