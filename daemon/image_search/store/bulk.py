"""A bulk load: the HNSW index dropped while many rows land, built again in bulk after."""

from __future__ import annotations

import threading
import time

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import structlog

from .connection import BULK_LOCK_KEY, TRY_LOCK, Connect, DatabaseUnavailable, unavailable_when_lost
from .schema import HNSW_INDEX, INDEX_VALID, build_index

log = structlog.get_logger("image_search.store")

_DROP_INDEX_CONCURRENTLY = f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}"
_COUNT = "SELECT count(*) FROM image_embeddings"
# How a stop cancels a build in progress: a cancel every _CANCEL_EVERY_S until the build's thread ends,
# for _CANCEL_FOR_S at most (then the stop goes on; the daemon thread dies with the process).
_CANCEL_EVERY_S = 0.2
_CANCEL_FOR_S = 30.0
# The longest the drop that begins a bulk load may take: it waits for every open transaction of other
# sessions on the table, a reader's too, one after another. It runs on the service's loop, which pings
# systemd's watchdog every 30 s: a backup's hour-long transaction must cost the bulk load, not the service.
DROP_WAIT_S = 10.0
_SET_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', %s, false)"
_RESET_STATEMENT_TIMEOUT = "RESET statement_timeout"  # back to the role's or the database's own


def _drop_index_within(cur: psycopg2.extensions.cursor, seconds: float) -> bool:
    """DROP INDEX CONCURRENTLY, cancelled after ``seconds`` (False). Cut short, the index is left as it
    was, or invalid (still kept up by writes, no longer used by searches); ``finish`` drops it then."""
    cur.execute(_SET_STATEMENT_TIMEOUT, (f"{round(seconds * 1000)}ms",))
    try:
        cur.execute(_DROP_INDEX_CONCURRENTLY)
    except psycopg2.errors.QueryCanceled:
        return False
    finally:
        if not cur.connection.closed:
            cur.execute(_RESET_STATEMENT_TIMEOUT)  # the build waits as long as it must (beside the loop)
    return True


class BulkLoad:
    """One bulk load: the HNSW index dropped, rows landing without per-row index insertion, the index
    built again in bulk (CONCURRENTLY: the table stays live) at ``finish``. Meanwhile ``search`` is exact,
    so no committed row is ever missed. Its own connection holds the bulk lock from ``begin`` to the end,
    so one runs at a time and no start builds the index under it; a holder that dies releases it."""

    def __init__(self, conn: psycopg2.extensions.connection, dimension: int) -> None:
        self._conn = conn
        self._dimension = dimension
        self._thread: threading.Thread | None = None
        self._abandoning = False  # a stop or a lost database is cancelling the build: its error is no failure

    @classmethod
    def begin(cls, connect: Connect, dimension: int, rows_coming: int, *, repair: bool = False) -> BulkLoad | None:
        """Take the bulk lock and drop the index (CONCURRENTLY: searches and writes go on; left to ``finish``
        when other sessions' transactions keep it past ``DROP_WAIT_S``); None if another service holds the
        lock (its build takes our rows in too). ``repair``: only if the index is missing
        or invalid once the lock is held (a start after a load or a build cut short; another service may
        have built it meanwhile). A lost connection raises ``DatabaseUnavailable``, as every statement does."""
        conn = connect()
        conn.autocommit = True  # CREATE/DROP INDEX CONCURRENTLY run outside a transaction
        try:
            with unavailable_when_lost(conn), conn.cursor() as cur:
                cur.execute(TRY_LOCK, (BULK_LOCK_KEY,))
                held = cur.fetchone()[0]
                if held and repair:
                    cur.execute(INDEX_VALID)
                    held = not cur.fetchone()[0]
                if not held:
                    conn.close()
                    return None
                if not _drop_index_within(cur, DROP_WAIT_S):
                    log.warning("bulk_load_index_kept", rows=rows_coming,
                                reason=f"another session's transaction held the table for over {DROP_WAIT_S:g} s "
                                       "(a backup, a long report)",
                                consequence="rows go into the search index one by one, and it is built again "
                                            "once they are in; searches stay complete")
        except BaseException:
            conn.close()
            raise
        if repair:
            log.info("search_index_repair_started", rows=rows_coming,
                     reason="the search index is missing or invalid: a bulk load or its build was cut short",
                     detail="it is built again once the files waiting are in; searches are exact meanwhile")
        else:
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
        """Build the index again, then let the lock go (with the connection). Raises if the build failed
        (``DatabaseUnavailable`` for a lost connection or a stop's cancel)."""
        started = time.monotonic()
        try:
            with unavailable_when_lost(self._conn), self._conn.cursor() as cur:
                build_index(cur, self._dimension, concurrently=True)
                cur.execute(INDEX_VALID)
                if not cur.fetchone()[0]:  # IF NOT EXISTS kept an invalid one (the drop at begin cut short)
                    cur.execute(_DROP_INDEX_CONCURRENTLY)
                    build_index(cur, self._dimension, concurrently=True)
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
            except (psycopg2.Error, DatabaseUnavailable) as exc:
                if self._abandoning:  # the stop's own cancel: nothing failed
                    log.info("search_index_build_stopped", detail="cut short by the stop; the next start builds it")
                    return
                log.warning("search_index_build_failed", reason=" ".join(str(exc).split()),
                            action="searches stay exact; the next start builds the index")
        self._thread = threading.Thread(target=build, name="search-index-build", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        """Stop here (a stop, a lost database): a build in progress is cancelled, and the index is left for
        the next start to build."""
        self._abandoning = True
        if self._thread is None and not self._conn.closed:  # the rows were still coming: no build begun
            log.info("bulk_load_stopped", detail="the search index is built at the next start; searches are "
                                                 "exact until then")
        deadline = time.monotonic() + _CANCEL_FOR_S
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            # Again and again: a cancel that reaches the server between two of the build's statements is
            # dropped, and the next statement (the build itself) would run to its end.
            if self._conn.closed:  # the build is over, its thread only logging
                self._thread.join(timeout=_CANCEL_EVERY_S)
                continue
            self._conn.cancel()
            self._thread.join(timeout=_CANCEL_EVERY_S)
        if not self._conn.closed and not self.building:  # closing under a running statement waits for it
            self._conn.close()
