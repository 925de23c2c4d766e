"""The fleet: several services, one index. Membership and heartbeat (``FleetRegistry``, on a connection
of its own) and work claims (``FleetClaims``, on the store's session) together; the tables are created
by the migrations (0001)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg2.extensions
import structlog

from ..names import escape, unescape
from . import schema
from .connection import FLEET_LOCK_KEY, MEMBER_LOCK_SPACE, XACT_LOCK, Connect, Session, StoreError, \
    replace_connection, retried_on_conflict, transaction, with_conflict_retries
from .embeddings import CLEAR

log = structlog.get_logger("image_search.store")

# A member is live while two things hold. Its session: each member's registry connection (the heartbeat's,
# open as long as the process) holds a session-level advisory lock keyed by its id, and PostgreSQL drops
# that lock the moment the connection ends, so a process killed with kill -9 (or by the OOM killer) is
# dead to the others at once, and a host lost without a word once TCP keepalives give up (connection.py).
# And its heartbeat, within the lease: a process that hangs with its connection open holds its lock for
# ever. The lock is the one-key form pg_advisory_lock(bigint) with the key (space << 32 | id's low 32
# bits), which pg_locks shows as classid = space, objid = the id's low 32 bits, objsubid = 1; advisory
# locks are per database, hence the database column. The space ("imgm") is shared with no other lock here.
_MEMBER_LOCK_KEY = f"(({MEMBER_LOCK_SPACE}::bigint << 32) | (%(member)s::bigint & 4294967295))"
# One uncorrelated subquery (hashed once per statement), so a claim of many items reads pg_locks once.
_MEMBER_SESSION_OPEN = f"""(m.id & 4294967295)::oid IN (
        SELECT l.objid FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {MEMBER_LOCK_SPACE}::oid AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"""
_MEMBER_IS_LIVE = f"(m.heartbeat_at > now() - make_interval(secs => %(lease)s) AND {_MEMBER_SESSION_OPEN})"
_LIVE_MEMBERS = f"""
SELECT id, host, pid, model_name, dimension FROM image_search_members m
WHERE {_MEMBER_IS_LIVE} ORDER BY id
"""
_COUNT_LIVE_MEMBERS = f"SELECT count(*) FROM image_search_members m WHERE {_MEMBER_IS_LIVE}"
# Before the last member to leave empties the table: any member whose session is still open, whatever its
# heartbeat's age. Each member judges heartbeats by its own lease, and one started with a shorter lease
# than the others (or any member, while the others stall for longer than its lease) took live services for
# dead and emptied the table under them. A member hung with its session open keeps the index: the safe side.
_COUNT_OPEN_MEMBERS = f"SELECT count(*) FROM image_search_members m WHERE {_MEMBER_SESSION_OPEN}"
# Housekeeping, not liveness: a dead member's row is inert (never counted, its claims free), so rows
# are dropped only once their heartbeat is long gone, as a paused process may still come back.
_FORGET_DEAD_MEMBERS = "DELETE FROM image_search_members WHERE heartbeat_at <= now() - make_interval(secs => %s)"
# Taken right after joining, and again after a reconnect (a new session holds no lock). ``try``: after a
# reconnect the old session may live on in the server until keepalives end it; it keeps the member
# live meanwhile, and the next heartbeat tries again.
_HOLD_MEMBER_LOCK = f"SELECT pg_try_advisory_lock({_MEMBER_LOCK_KEY})"
_FORGET_ORPHAN_CLAIMS = """
DELETE FROM image_search_claims c
WHERE NOT EXISTS (SELECT 1 FROM image_search_members m WHERE m.id = abs(c.member_id))
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
# member gets each item. Each granted item comes with how long ago a member began the last read of its
# file that a released claim records (``_RELEASE_READ``), or NULL. Taking over such a record keeps its
# moment, and the claim hands it on when let go (``FleetClaims.release``): a member granted the item and
# reading nothing (the other's read saw the write) otherwise wiped the record, and a third member read
# the file again.
#   The moment is read from the claimed row itself, as the update left it: a claim that waited for another
#   member's release of the item (the two statements overlapping) sees the record that release made, which
#   a look at the table from the statement's start would have missed.
_CLAIM = f"""
INSERT INTO image_search_claims AS c (item, member_id, claimed_at)
SELECT item, %(member)s, now() FROM unnest(%(items)s::text[]) AS wanted(item)
ON CONFLICT (item) DO UPDATE SET member_id = EXCLUDED.member_id,
    claimed_at = CASE WHEN c.member_id < 0 THEN c.claimed_at ELSE now() END
WHERE c.member_id = EXCLUDED.member_id OR c.member_id NOT IN (
    SELECT m.id FROM image_search_members m WHERE {_MEMBER_IS_LIVE}
)
RETURNING item, CASE WHEN c.claimed_at < now() THEN extract(epoch FROM now() - c.claimed_at)::float8 END
"""
_RELEASE = "DELETE FROM image_search_claims WHERE member_id = %s AND item = ANY(%s)"
# A claim released once its file was read and its row committed (or one that took over such a record)
# stays as the record of when that read began (the member's id negated, which no live member has: the item
# is free): a member granted the item later reads no file again that was read after the write it saw
# (``ReadinessTracker.read_elsewhere``). A member forgets its own records older than a lease now and then.
_RELEASE_READ = "UPDATE image_search_claims SET member_id = -member_id WHERE member_id = %s AND item = ANY(%s)"
_FORGET_READ = """
DELETE FROM image_search_claims WHERE member_id = -%(member)s AND claimed_at < now() - make_interval(secs => %(lease)s)
"""
_LEAVE_CLAIMS = "DELETE FROM image_search_claims WHERE member_id IN (%(member)s, -%(member)s)"
_LEAVE = "DELETE FROM image_search_members WHERE id = %s"
# The leave must never hang on a lock held by a stuck (paused, not dead) process while it holds the
# fleet lock that every start-up waits for.
_LEAVE_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"
# Members whose heartbeat is older than this many leases are forgotten when someone joins.
FORGET_AFTER_LEASES = 10


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


class FleetRegistry:
    """The members table on a connection of its own: joined and left by the main thread, renewed by
    the heartbeat thread in between (never both at once), so a long forward pass on the main thread
    never makes a live member look dead."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._conn = connect()
        self._holds_lock = False  # this connection holds the member's liveness lock

    def reconnect(self) -> None:
        self._holds_lock = False  # a new session: the lock went with the old one
        self._conn = replace_connection(self._conn, self._connect)

    def _hold_lock(self, cur: psycopg2.extensions.cursor, member_id: int) -> None:
        if not self._holds_lock:
            cur.execute(_HOLD_MEMBER_LOCK, {"member": member_id})
            self._holds_lock = bool(cur.fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def join(self, *, host: str, pid: int, model_name: str, dimension: int, lease_s: float) -> JoinResult:
        """Register this service, or raise ``FleetMismatch`` naming both models if a live member embeds
        with another model or dimension. Long-dead members and their claims are forgotten."""
        schema.migrate(self._conn)  # the fleet's tables (the steps that need no dimension)
        # Again if PostgreSQL rolls it back for a conflict: its sweep of orphaned claims can deadlock with a
        # member claiming those items.
        return with_conflict_retries(lambda: self._join(host=host, pid=pid, model_name=model_name,
                                                        dimension=dimension, lease_s=lease_s))

    def _join(self, *, host: str, pid: int, model_name: str, dimension: int, lease_s: float) -> JoinResult:
        with transaction(self._conn) as cur:
            cur.execute(XACT_LOCK, (FLEET_LOCK_KEY,))
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
        with transaction(self._conn) as cur:
            cur.execute(_RENEW, (member.id,))
            if cur.rowcount == 0:
                log.warning("fleet_member_restored", member_id=member.id,
                            reason="this member was taken for dead and forgotten; registered again")
                cur.execute(_REJOIN, (member.id, member.host, member.pid, member.model_name, member.dimension))
            self._hold_lock(cur, member.id)
            cur.execute(_COUNT_LIVE_MEMBERS, {"lease": lease_s})
            return int(cur.fetchone()[0])

    def live_members(self, lease_s: float) -> list[MemberInfo]:
        with transaction(self._conn) as cur:
            cur.execute(_LIVE_MEMBERS, {"lease": lease_s})
            return [MemberInfo(*row) for row in cur.fetchall()]

    def leave(self, member_id: int, lease_s: float, *, empty_table: bool, lock_timeout_s: float = 10.0) -> LeaveResult:
        """Drop this member and its claims; empty ``image_embeddings`` if ``empty_table`` and no other
        member is live, all in one transaction under the fleet lock (again if rolled back for a conflict)."""
        return with_conflict_retries(lambda: self._leave(member_id, lease_s, empty_table=empty_table,
                                                         lock_timeout_s=lock_timeout_s))

    def _leave(self, member_id: int, lease_s: float, *, empty_table: bool, lock_timeout_s: float) -> LeaveResult:
        with transaction(self._conn) as cur:
            cur.execute(XACT_LOCK, (FLEET_LOCK_KEY,))
            cur.execute(_LEAVE_LOCK_TIMEOUT, (f"{int(lock_timeout_s * 1000)}ms",))
            cur.execute(_LEAVE_CLAIMS, {"member": member_id})
            cur.execute(_LEAVE, (member_id,))
            cur.execute(_COUNT_LIVE_MEMBERS, {"lease": lease_s})
            remaining = int(cur.fetchone()[0])
            emptied = False
            if empty_table and remaining == 0 and self._no_open_members(cur):
                cur.execute(schema.TABLE_EXISTS)
                if cur.fetchone()[0]:
                    cur.execute(CLEAR)
                    emptied = True
        return LeaveResult(remaining, emptied)


    @staticmethod
    def _no_open_members(cur: psycopg2.extensions.cursor) -> bool:
        cur.execute(_COUNT_OPEN_MEMBERS)
        return int(cur.fetchone()[0]) == 0


class FleetClaims:
    """Work claims through the store's session (``EmbeddingStore.session``), so an outage is the loop's
    ``DatabaseUnavailable`` like any other and the store's reconnect serves the claims too. A claim or a
    release that PostgreSQL rolls back for a conflict (a deadlock with a joining member's sweep of orphan
    claims, say) runs again (``retried_on_conflict``): both say the same thing when repeated."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @retried_on_conflict
    def claim(self, member_id: int, items: Iterable[str], lease_s: float) -> dict[str, float | None]:
        """Claim ``items`` for ``member_id`` in one statement; returns those it got, each with how many
        seconds ago the read that a released claim of it records began (None: no record).
        Items are claimed in sorted order, so two members claiming overlapping sets cannot deadlock."""
        wanted = sorted({escape(item) for item in items})
        if not wanted:
            return {}
        with self.session.transaction() as cur:
            cur.execute(_CLAIM, {"member": member_id, "items": wanted, "lease": lease_s})
            return {unescape(item): ago for item, ago in cur.fetchall()}

    @retried_on_conflict
    def release(self, member_id: int, items: Iterable[str], *, read: Iterable[str] = (),
                forget_older_than_s: float | None = None) -> None:
        """Let ``items`` go, and ``read``: items whose file was read and its row committed, or whose claim took
        over the record of such a read, kept as a record (``_RELEASE_READ``). ``forget_older_than_s``: the
        member's records older than that go too."""
        items, read = [escape(item) for item in items], [escape(item) for item in read]
        with self.session.transaction() as cur:
            if items:
                cur.execute(_RELEASE, (member_id, items))
            if read:
                cur.execute(_RELEASE_READ, (member_id, read))
            if forget_older_than_s is not None:
                cur.execute(_FORGET_READ, {"member": member_id, "lease": forget_older_than_s})
