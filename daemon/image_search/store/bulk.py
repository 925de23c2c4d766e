"""A bulk load: the HNSW index dropped while many rows land, built again in bulk after."""

from __future__ import annotations

import threading
import time

import psycopg2
import psycopg2.extensions
import structlog

from .connection import BULK_LOCK_KEY, TRY_LOCK, Connect
from .schema import HNSW_INDEX, hnsw_index_ddl, prepare_index_build

log = structlog.get_logger("image_search.store")

_DROP_INDEX_CONCURRENTLY = f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}"
_COUNT = "SELECT count(*) FROM image_embeddings"


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
    def begin(cls, connect: Connect, dimension: int, rows_coming: int) -> BulkLoad | None:
        conn = connect()
        conn.autocommit = True  # CREATE/DROP INDEX CONCURRENTLY run outside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(TRY_LOCK, (BULK_LOCK_KEY,))
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

    @property
    def ended(self) -> bool:
        """True once it is over: the index built (or its build failed), or the load abandoned; the bulk
        lock went with the connection, so another bulk load may begin."""
        return bool(self._conn.closed) and not self.building

    def finish(self) -> None:
        """Build the index again, then let the lock go (with the connection)."""
        started = time.monotonic()
        try:
            with self._conn.cursor() as cur:
                prepare_index_build(cur, local=False)
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
