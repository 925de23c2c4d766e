"""Connections: connect (with TCP keepalives), one transaction at a time, reconnect in place; the store's
errors; and every advisory lock key the store takes, in one place so no two collide."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import structlog

from ..config import Config
from ..errors import DatabaseFailure

Connect = Callable[[], psycopg2.extensions.connection]


class StoreError(DatabaseFailure):
    """A database problem the user must fix (unreachable, wrong schema, missing extension)."""


class DatabaseUnavailable(StoreError):
    """The database could not be reached or the connection broke: worth retrying later."""


log = structlog.get_logger("image_search.store")
T = TypeVar("T")

# A transaction PostgreSQL rolled back because it conflicted with another (a deadlock, a serialization
# failure: SQLSTATE class 40) runs again as it was, this many more times: nothing of it was kept, and the
# connection is fine. Two services recording copies of one picture at the same moment meet this.
CONFLICT_RETRIES = 3

# Transaction-scoped advisory locks (released at commit): one serialises schema changes (creation and
# migrations), the other joining and leaving, so a service that joins while the last one leaves either
# counts it as a live member (the table is kept) or starts after the table was emptied, never in between.
SCHEMA_LOCK_KEY = int.from_bytes(b"imgschem", "big")
FLEET_LOCK_KEY = int.from_bytes(b"imgfleet", "big")
# Held (session-level, on a connection of its own) for the whole of a bulk load: one at a time, and no
# start-up rebuilds the index under it. The holder's death releases it with its connection.
BULK_LOCK_KEY = int.from_bytes(b"imgbulkl", "big")
# The space of the members' liveness locks (fleet.py): shared with no other lock here.
MEMBER_LOCK_SPACE = int.from_bytes(b"imgm", "big")
XACT_LOCK = "SELECT pg_advisory_xact_lock(%s)"
TRY_XACT_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"

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
CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": KEEPALIVE_IDLE_S,
                     "keepalives_interval": KEEPALIVE_INTERVAL_S, "keepalives_count": KEEPALIVE_COUNT,
                     "tcp_user_timeout": USER_TIMEOUT_MS}
_SESSION_KEEPALIVES = """
SELECT set_config('tcp_keepalives_idle', %s, false), set_config('tcp_keepalives_interval', %s, false),
       set_config('tcp_keepalives_count', %s, false), set_config('tcp_user_timeout', %s, false)
"""

# A statement outlives its client: killed mid-way, a process leaves its index build (minutes on a large
# library) or its search running on the server, holding the table: the last member's cleanup-on-exit
# then waited out its lock timeout and left the table full. With this (PostgreSQL 14 and later), the
# server looks every 2 s, while a statement runs, whether its client is still there, and cancels it if not.
_CHECK_CLIENT = "SELECT set_config('client_connection_check_interval', '2s', false)"
CHECK_CLIENT_SINCE = 140000


def connect(cfg: Config, uri: str | None) -> psycopg2.extensions.connection:
    """A new connection to the embedded server at ``uri``, or to the configured one when ``uri`` is None."""
    try:
        if uri is not None:
            conn = psycopg2.connect(uri, connect_timeout=10, **CLIENT_KEEPALIVES)
        else:
            conn = psycopg2.connect(
                host=cfg.postgres_host, port=cfg.postgres_port, user=cfg.postgres_user,
                password=cfg.postgres_password, dbname=cfg.postgres_database, connect_timeout=10,
                application_name="image-search", **CLIENT_KEEPALIVES,
            )
        with conn, conn.cursor() as cur:
            cur.execute(_SESSION_KEEPALIVES, (str(KEEPALIVE_IDLE_S), str(KEEPALIVE_INTERVAL_S), str(KEEPALIVE_COUNT),
                                              str(USER_TIMEOUT_MS)))
        if conn.server_version >= CHECK_CLIENT_SINCE:
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(_CHECK_CLIENT)
            except psycopg2.errors.InvalidParameterValue:  # a server whose system cannot tell (Windows)
                pass
        return conn
    except psycopg2.OperationalError as exc:
        where = "the embedded PostgreSQL" if uri else (
            f"PostgreSQL at {cfg.postgres_host}:{cfg.postgres_port} as '{cfg.postgres_user}', "
            f"database '{cfg.postgres_database}'"
        )
        reason = " ".join(str(exc).split())
        raise DatabaseUnavailable(f"cannot connect to {where}: {reason}. Check the postgres-* config keys.") from None


@contextmanager
def transaction(conn: psycopg2.extensions.connection) -> Iterator[psycopg2.extensions.cursor]:
    """One transaction on ``conn``: committed when the block ends, rolled back if it raises."""
    with unavailable_when_lost(conn), conn, conn.cursor() as cur:
        yield cur


@contextmanager
def unavailable_when_lost(conn: psycopg2.extensions.connection) -> Iterator[None]:
    """Statements on ``conn`` (in a transaction or autocommit) whose error, when it means the connection is
    gone (server restarted, network, the session ended), is raised as ``DatabaseUnavailable``: the caller
    may reconnect and retry. A server that dies mid-statement can surface as a bare DatabaseError; the
    closed connection tells."""
    try:
        yield
    except psycopg2.Error as exc:
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) or conn.closed:
            raise DatabaseUnavailable(f"database error: {' '.join(str(exc).split())}") from exc
        raise


def replace_connection(old: psycopg2.extensions.connection, connect: Connect) -> psycopg2.extensions.connection:
    """Close a broken connection and open a new one (raises DatabaseUnavailable while the database is away)."""
    try:
        old.close()
    except Exception:  # already broken: that is why we are here
        pass
    return connect()


class Session:
    """One connection that ``reconnect`` replaces in place, so every holder (the embeddings, the work
    claims) keeps working after the database came back. ``on_connect`` runs on each new connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self.conn = connect()
        self.on_connect: Callable[[psycopg2.extensions.connection], None] | None = None
        self._open: tuple[int, psycopg2.extensions.cursor] | None = None  # the thread whose transaction is open

    def transaction(self) -> AbstractContextManager[psycopg2.extensions.cursor]:
        """One transaction on the current connection (``transaction``). Asked again by the thread whose
        transaction is open, the same one: the writes of a block commit (or fail) together."""
        open_here = self._open_here()
        return nullcontext(open_here) if open_here is not None else self._outermost()

    def _open_here(self) -> psycopg2.extensions.cursor | None:
        """The cursor of the transaction this thread has open, if it has one."""
        return self._open[1] if self._open is not None and self._open[0] == threading.get_ident() else None

    @contextmanager
    def _outermost(self) -> Iterator[psycopg2.extensions.cursor]:
        with transaction(self.conn) as cur:
            self._open = (threading.get_ident(), cur)
            try:
                yield cur
            finally:
                self._open = None

    def retrying(self, work: Callable[[], T]) -> T:
        """``work`` (its own transaction on this session), run as ``with_conflict_retries`` runs it; once
        only inside a transaction this thread has open, whose outermost block decides."""
        return with_conflict_retries(work, retries=0 if self._open_here() is not None else CONFLICT_RETRIES)

    def reconnect(self) -> None:
        """Replace a broken connection; raises DatabaseUnavailable while the database is still away."""
        self.conn = replace_connection(self.conn, self._connect)
        if self.on_connect is not None:
            self.on_connect(self.conn)

    def close(self) -> None:
        self.conn.close()


def with_conflict_retries(work: Callable[[], T], *, retries: int = CONFLICT_RETRIES) -> T:
    """``work`` (one transaction, through ``transaction``), run again while PostgreSQL rolls it back for a
    conflict (SQLSTATE class 40: a deadlock's loser, a serialization failure), ``retries`` times at most."""
    for attempt in range(1, retries + 1):
        try:
            return work()
        except DatabaseUnavailable as exc:
            if not isinstance(exc.__cause__, psycopg2.extensions.TransactionRollbackError):
                raise
            log.info("transaction_retried", attempt=attempt, reason=" ".join(str(exc.__cause__).split()))
    return work()  # the last try: whatever it raises is the caller's


def retried_on_conflict(method: Callable[..., T]) -> Callable[..., T]:
    """A method of a holder of ``session`` whose transaction runs again when rolled back for a conflict
    (``Session.retrying``), with the same arguments: a one-pass iterator among them (a generator of paths)
    is read into a list first, so that the second try is given what the first was."""
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> T:
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        kwargs = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
        return self.session.retrying(lambda: method(self, *args, **kwargs))
    return run
