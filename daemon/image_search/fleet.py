"""Several services, one index: membership, heartbeat and work claims over the shared PostgreSQL.

Every service registers itself as a member when it starts (``FleetMember.join``), renews a heartbeat
from a thread of its own while it runs, and leaves at exit; the last live member to leave is the only
one that may empty the table (cleanup-on-exit). Before a service reads a batch of images or answers a
query it claims them (``WorkClaims.take``); what another live member holds is looked at again after a
lease, when the other's row (or result) is there and costs nothing. A member whose database session
ends (kill -9, OOM kill, host lost once TCP keepalives give up) is no longer live at once; one that stops
renewing with its session open (hung, paused) after the lease. Either way its claims are taken over, and
the heartbeat, which counts the live members every few seconds, tells the loops to look again at once at
what it held.

The SQL lives in the store's fleet room (``store/fleet.py``); this module holds the threads, the timing and the log lines.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Collection, Sequence
from enum import Enum
from pathlib import Path

import psycopg2
import structlog

from .config import Config
from .readiness import ReadinessTracker
from .store import Database, DatabaseUnavailable, EmbeddingStore, FleetClaims, FleetRegistry, LeaveResult, MemberInfo

log = structlog.get_logger(__name__)

HEARTBEATS_PER_LEASE = 3  # a member is taken for dead only after missing about three renewals
# The heartbeat also counts the live members: it runs at least this often, so the others notice a dead
# member (whose session the database has ended) within seconds whatever the lease.
LOOK_EVERY_S = 2.0
# A path another live member holds is looked at again this much later (or a lease, if that is shorter):
# a batch takes seconds. After a lease, as it was, a burst shared by two members sat a lease behind its
# last rows: the index built, the queries found at start answered and `queued` back at 0 30 s late.
HELD_LOOK_AGAIN_S = 2.0


class FleetMember:
    """This process as a member of the database's fleet, from ``join`` to ``leave``."""

    def __init__(self, registry: FleetRegistry, member: MemberInfo, *, lease_s: float, live_members: int) -> None:
        self.registry = registry
        self.member = member
        self.lease_s = lease_s
        self.live_members = live_members  # refreshed by every heartbeat; read by the STATUS line
        self.departures = 0  # how many times a heartbeat saw fewer live members than the one before
        # Why the last heartbeat failed, until one works again (None meanwhile): the service acts on it
        # (``Service._check_database``) rather than wait for its own next statement, a minute away when idle.
        self.heartbeat_failure: str | None = None
        self._stop = threading.Event()
        self._left = False
        self._thread = threading.Thread(target=self._beat, name="fleet-heartbeat", daemon=True)

    @classmethod
    def join(cls, cfg: Config, database: Database) -> FleetMember:
        """Register (raising ``FleetMismatch`` if live members use another model or dimension), log the
        fleet's size, and start the heartbeat."""
        registry = FleetRegistry(database.connect)
        try:
            joined = registry.join(host=socket.gethostname(), pid=os.getpid(), model_name=cfg.model_name,
                                   dimension=cfg.dimension, lease_s=cfg.member_lease_seconds)
        except BaseException:
            registry.close()
            raise
        member = cls(registry, joined.member, lease_s=cfg.member_lease_seconds, live_members=joined.live_members)
        log.info("fleet_joined", members=joined.live_members, member_id=joined.member.id,
                 shared_index=cfg.shared_index, lease_s=cfg.member_lease_seconds)
        # On the embedded server the others are this machine's own processes (the service and a command
        # run beside it), which share the work by themselves: "shared-index" is for several hosts only.
        if joined.live_members > 1 and not cfg.shared_index and not cfg.embedded_database:
            log.warning("fleet_not_declared", members=joined.live_members,
                        reason="other services use this database; they share the work, but say so with "
                               "\"shared-index\": true")
        member.start_heartbeat()
        return member

    def start_heartbeat(self) -> None:
        self._thread.start()

    def status_text(self) -> str:
        """For the STATUS line: how many services are attached to this database (this one included)."""
        return f"{self.live_members} member{'s' if self.live_members != 1 else ''}"

    def _beat(self) -> None:
        """Renew every lease/3 seconds (every LOOK_EVERY_S at most) until ``leave``. A failure is logged
        once, then retried quietly (reconnecting) until it works again."""
        failing = False
        while not self._stop.wait(min(self.lease_s / HEARTBEATS_PER_LEASE, LOOK_EVERY_S)):
            try:
                if failing:
                    self.registry.reconnect()
                live = self.registry.renew(self.member, self.lease_s)
                if live < self.live_members:
                    self.departures += 1  # read by the main thread: one int, written here only
                self.live_members = live
            # A server that crashed mid-query breaks the renew with a bare psycopg2 error, not wrapped
            # as DatabaseUnavailable: the same outage, and this thread must not end in a traceback.
            except (DatabaseUnavailable, psycopg2.Error) as exc:
                self.heartbeat_failure = " ".join(str(exc).split())
                if not failing:
                    log.warning("fleet_heartbeat_failed", reason=self.heartbeat_failure,
                                action="retrying; others take over this member's claims once the database has ended "
                                       f"its session, or after {self.lease_s:g} s")
                failing = True
                continue
            if failing:
                log.info("fleet_heartbeat_restored", members=self.live_members)
                failing = False
                self.heartbeat_failure = None

    def leave(self, *, empty_table: bool) -> LeaveResult | None:
        """Stop the heartbeat, drop this member and its claims, and empty the table if ``empty_table`` and
        no other member is live. Idempotent; never raises (a dead database must not hide the exit's cause)."""
        if self._left:
            return None
        self._left = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.lease_s)
        try:
            try:
                result = self.registry.leave(self.member.id, self.lease_s, empty_table=empty_table)
            except DatabaseUnavailable:
                self.registry.reconnect()  # the heartbeat's connection may have broken meanwhile: once more
                result = self.registry.leave(self.member.id, self.lease_s, empty_table=empty_table)
        except Exception as exc:
            # A warning: the exit's cause, when there is one, is the error line; this is its consequence.
            log.warning("fleet_leave_failed", reason=" ".join(str(exc).split()),
                      consequence="the member row expires after the lease; the table was not emptied")
            return None
        finally:
            self.registry.close()
        log.info("fleet_left", members=result.live_members, member_id=self.member.id)
        if result.emptied:
            log.info("table_emptied", reason="cleanup-on-exit, and no other member is attached (keep the index "
                                             "with --no-cleanup or \"cleanup-on-exit\": false)")
        elif empty_table:
            log.info("table_kept", members=result.live_members,
                     reason=f"cleanup-on-exit, but {result.live_members} other member(s) still attached; "
                            "the last one to stop empties it")
        return result


class ClaimKind(Enum):
    """What a claim is for; the value prefixes the claimed path."""

    IMAGE = "image"
    QUERY = "query"


class WorkClaims:
    """Claims for this member's work through the store's connection (so an outage is the loop's
    ``DatabaseUnavailable`` like any other). With no fleet member (tests that build a ``Runtime`` by
    hand) every path is granted."""

    def __init__(self, store: EmbeddingStore, member: FleetMember | None) -> None:
        self.store = store
        self.claims = FleetClaims(store.session)
        self.member = member
        self._unreleased: list[str] = []  # releases that failed: retried with the next one
        self._departures_seen = 0
        self._next_forget = 0.0  # when this member's old records of reads go next (once a lease)
        self._records: set[str] = set()  # items held whose claim took over the record of another's read

    def someone_left(self) -> bool:
        """True once after the heartbeat saw the fleet shrink: a member left or died, so what it held is
        free now and the paths waiting on it are worth a look at once."""
        if self.member is None or self.member.departures == self._departures_seen:
            return False
        self._departures_seen = self.member.departures
        return True

    @staticmethod
    def _item(kind: ClaimKind, path: Path) -> str:
        return f"{kind.value}:{path}"

    def take(self, kind: ClaimKind, paths: Sequence[Path], pending: ReadinessTracker) -> list[Path]:
        """The paths of ``paths`` this member now holds, in order. Each path held by another live member
        goes back into ``pending`` to be looked at again ``HELD_LOOK_AGAIN_S`` later (by then the other has
        usually written its row or moved its query away), or at once when a member leaves or dies
        (``someone_left``). A path granted after another member read it since this one saw it written is
        not read again (``ReadinessTracker.read_elsewhere``). During an outage every path goes back into
        ``pending`` and ``DatabaseUnavailable`` is raised."""
        if self.member is None or not paths:
            return list(paths)
        try:
            granted = self.claims.claim(self.member.member.id, (self._item(kind, p) for p in paths),
                                        self.member.lease_s)
        except DatabaseUnavailable:
            for path in paths:
                pending.note(path)
            raise
        mine: list[Path] = []
        held = 0
        look_again = min(HELD_LOOK_AGAIN_S, self.member.lease_s)
        for path in paths:
            item = self._item(kind, path)
            if item not in granted:
                pending.note(path, retry_after=look_again)
                held += 1
            elif os.path.lexists(path):  # a broken link is there too: the one who takes it fails it
                if (ago := granted[item]) is not None:
                    pending.read_elsewhere(path, ago)
                    self._records.add(item)  # handed on when let go, read or not
                mine.append(path)
            else:
                # Its holder finished and released it between our look and our claim (a query moved
                # into its result folder): nothing left to do, and nothing to hold.
                self._unreleased.append(self._item(kind, path))
        if held:
            log.debug("claims_held_elsewhere", kind=kind.value, count=held, retry_in_s=look_again)
        return mine

    def release(self, kind: ClaimKind, paths: Sequence[Path], *, read: Collection[Path] = ()) -> None:
        """Give the claims back once the work is written (or given up: the paths pending again). ``read``:
        the paths among them whose file was read and whose row is committed, kept a lease as the record
        of when this member began reading them (``take`` tells the others). A failure is not the work's
        failure: the release is retried with the next one, and leaving drops every claim anyway."""
        if self.member is None:
            return
        released = [self._item(kind, p) for p in paths]
        read_items = [item for p, item in zip(paths, released) if p in read or item in self._records]
        items = self._unreleased + [item for p, item in zip(paths, released) if not (p in read or item in self._records)]
        self._records.difference_update(released)
        if not items and not read_items:
            return
        now = time.monotonic()
        forget = now >= self._next_forget
        try:
            self.claims.release(self.member.member.id, items, read=read_items,
                                forget_older_than_s=self.member.lease_s if forget else None)
            self._unreleased = []
            if forget:
                self._next_forget = now + self.member.lease_s
        except DatabaseUnavailable as exc:
            self._unreleased = items + read_items  # the record is only a hint: plainly let go with the next one
            log.warning("claims_not_released", count=len(self._unreleased), reason=str(exc),
                        action="retried with the next release")
