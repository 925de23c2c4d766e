"""Membership and claims in the store, in-process, against a real embedded PostgreSQL.

Time is the database's: a member is made stale by moving its ``heartbeat_at`` back with plain SQL,
not by sleeping, so no assertion depends on how fast this machine is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.support.db import deadlock_once, empty_store, raw
from tests.support.files import write_config
from tests.support.waiting import wait_for

from image_search.config import load_config
from image_search.fleet import HELD_LOOK_AGAIN_S, ClaimKind, FleetMember, WorkClaims
from image_search.store import (
    FLEET_LOCK_KEY,
    FORGET_AFTER_LEASES,
    SCHEMA_LOCK_KEY,
    Database,
    DatabaseUnavailable,
    EmbeddingRow,
    EmbeddingStore,
    FleetClaims,
    FleetMismatch,
    FleetRegistry,
    LeaveResult,
    MemberInfo,
)
from image_search.readiness import ReadinessTracker

pytestmark = pytest.mark.integration

DIM = 8
MODEL = "test-model"
LEASE = 30.0  # long: nothing here goes stale by itself; staleness is set by hand


@pytest.fixture
def registries(database: Database) -> Iterator[list[FleetRegistry]]:
    """Fresh registries (one connection each, as each service has), over emptied fleet tables."""
    made: list[FleetRegistry] = []
    first = FleetRegistry(database.connect)
    first.join(host="setup", pid=0, model_name=MODEL, dimension=DIM, lease_s=LEASE)  # creates the tables
    raw(database, "TRUNCATE image_search_members, image_search_claims")
    first.close()
    try:
        yield made
    finally:
        for r in made:
            r.close()
        raw(database, "TRUNCATE image_search_members, image_search_claims")


@pytest.fixture
def store(database: Database) -> Iterator[EmbeddingStore]:
    with empty_store(database, DIM) as s:
        yield s


def join(database: Database, made: list[FleetRegistry], *, model: str = MODEL, dim: int = DIM,
         host: str = "host-a", pid: int = 1) -> MemberInfo:
    registry = FleetRegistry(database.connect)
    made.append(registry)
    return registry.join(host=host, pid=pid, model_name=model, dimension=dim, lease_s=LEASE).member


def make_stale(database: Database, member_id: int, leases: float = 2.0) -> None:
    """The member stopped renewing ``leases`` leases ago (killed, host lost)."""
    raw(database, "UPDATE image_search_members SET heartbeat_at = now() - make_interval(secs => %s) WHERE id = %s",
        (LEASE * leases, member_id))


def test_join_counts_live_members_and_forgets_only_the_long_dead(database: Database, registries) -> None:
    a = join(database, registries, pid=1)
    b = join(database, registries, pid=2)
    assert [m.id for m in registries[0].live_members(LEASE)] == [a.id, b.id]
    make_stale(database, a.id, leases=2)  # dead for a while, not long: kept (a paused process may come back)
    make_stale(database, b.id, leases=FORGET_AFTER_LEASES + 1)  # long dead: forgotten by the next join
    raw(database, "INSERT INTO image_search_claims (item, member_id) VALUES ('image:/x', %s), ('image:/y', %s)",
        (a.id, b.id))
    registry = FleetRegistry(database.connect)
    registries.append(registry)
    joined = registry.join(host="host-c", pid=3, model_name=MODEL, dimension=DIM, lease_s=LEASE)
    assert joined.live_members == 1  # a is not live, b is gone
    assert sorted(r[0] for r in raw(database, "SELECT id FROM image_search_members")) == sorted([a.id, joined.member.id])
    assert raw(database, "SELECT item FROM image_search_claims") == [("image:/x",)]  # b's claim went with it


@pytest.mark.parametrize(("model", "dim"), [("other-model", DIM), (MODEL, DIM * 2)], ids=["model", "dimension"])
def test_a_live_member_with_another_model_or_dimension_refuses_the_join(database: Database, registries,
                                                                         model: str, dim: int) -> None:
    join(database, registries, host="gpu-1", pid=4242)
    with pytest.raises(FleetMismatch) as info:
        join(database, registries, model=model, dim=dim)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{model}' (dimension {dim})" in message  # this service's
    assert f"'{MODEL}' (dimension {DIM}) on host gpu-1, pid 4242" in message  # the member's
    assert "never mix" in message
    assert len(raw(database, "SELECT id FROM image_search_members")) == 1  # not registered


def test_a_dead_member_with_another_model_does_not_block_a_join(database: Database, registries) -> None:
    old = join(database, registries, model="old-model")
    make_stale(database, old.id)
    assert join(database, registries).id != old.id


def test_claims_one_holder_per_item_reclaim_release(database: Database, registries, store: EmbeddingStore) -> None:
    fleet_claims = FleetClaims(store.session)
    a = join(database, registries, pid=1)
    b = join(database, registries, pid=2)
    assert set(fleet_claims.claim(a.id, ["image:/1", "image:/2", "image:/2"], LEASE)) == {"image:/1", "image:/2"}
    assert set(fleet_claims.claim(b.id, ["image:/2", "image:/3"], LEASE)) == {"image:/3"}  # /2 is a's, a is live
    assert set(fleet_claims.claim(a.id, ["image:/1"], LEASE)) == {"image:/1"}  # holding it already: still ours
    assert set(fleet_claims.claim(a.id, [], LEASE)) == set()
    fleet_claims.claim(a.id, ["image:/5"], LEASE)
    fleet_claims.release(a.id, ["image:/3"], read=["image:/2"])  # /3 is b's: not a's to release
    # /2 was read: it stays a lease as a's record of when it began reading it, free, under no live member's id
    assert dict(raw(database, "SELECT item, member_id FROM image_search_claims")) == {"image:/1": a.id,
                                                                                      "image:/2": -a.id,
                                                                                      "image:/3": b.id,
                                                                                      "image:/5": a.id}
    fleet_claims.release(a.id, ["image:/5"])  # given up (its write failed): no record
    granted = fleet_claims.claim(b.id, ["image:/2", "image:/4", "image:/5"], LEASE)  # released: free for anyone
    assert set(granted) == {"image:/2", "image:/4", "image:/5"}
    assert 0 <= granted["image:/2"] < LEASE and granted["image:/4"] is None and granted["image:/5"] is None
    fleet_claims.release(b.id, [], read=["image:/2"])
    raw(database, "UPDATE image_search_claims SET claimed_at = now() - interval '1 hour' WHERE item = 'image:/2'")
    fleet_claims.release(b.id, [], forget_older_than_s=LEASE)  # b's records older than a lease go
    assert raw(database, "SELECT item FROM image_search_claims WHERE member_id < 0") == []


def test_a_claim_and_a_release_rolled_back_for_a_deadlock_run_again(database: Database, registries,
                                                                    store: EmbeddingStore) -> None:
    """PostgreSQL rolls back a claim, then a release, as the loser of a deadlock (with a joining member's
    sweep of orphan claims, say). Each runs again on the same items (given as a one-pass iterator, as a
    caller may) and does what it was asked, without the outage a lost database would be."""
    fleet_claims = FleetClaims(store.session)
    a = join(database, registries, pid=1)
    with deadlock_once(database, "image_search_claims", "INSERT"), capture_logs() as logs:
        assert set(fleet_claims.claim(a.id, iter(["image:/1", "image:/2"]), LEASE)) == {"image:/1", "image:/2"}
    assert [e["attempt"] for e in logs if e["event"] == "transaction_retried"] == [1]
    with deadlock_once(database, "image_search_claims", "DELETE"):
        fleet_claims.release(a.id, iter(["image:/1"]))
    assert raw(database, "SELECT item FROM image_search_claims") == [("image:/2",)]


def test_a_join_and_a_leave_rolled_back_for_a_deadlock_run_again(database: Database, registries) -> None:
    """A join's sweep of orphaned claims, and a leave's drop of its own, can lose a deadlock to a member
    claiming those items. The join or the leave runs again, instead of failing the start or leaving a
    member behind that still counts as live."""
    with deadlock_once(database, "image_search_claims", "DELETE"), capture_logs() as logs:
        member = join(database, registries, pid=1)
    assert [e["attempt"] for e in logs if e["event"] == "transaction_retried"] == [1]
    assert raw(database, "SELECT id FROM image_search_members") == [(member.id,)]
    with deadlock_once(database, "image_search_claims", "DELETE"):
        assert registries[0].leave(member.id, LEASE, empty_table=False) == LeaveResult(live_members=0, emptied=False)
    assert raw(database, "SELECT count(*) FROM image_search_members") == [(0,)]


def test_a_claim_whose_holder_stopped_renewing_is_taken_over(database: Database, registries,
                                                             store: EmbeddingStore) -> None:
    fleet_claims = FleetClaims(store.session)
    a = join(database, registries, pid=1)
    b = join(database, registries, pid=2)
    assert set(fleet_claims.claim(a.id, ["query:/inbox/q.png"], LEASE)) == {"query:/inbox/q.png"}
    assert set(fleet_claims.claim(b.id, ["query:/inbox/q.png"], LEASE)) == set()
    registries[0].renew(a, LEASE)  # renewed: still a's
    assert set(fleet_claims.claim(b.id, ["query:/inbox/q.png"], LEASE)) == set()
    make_stale(database, a.id, leases=1.5)  # a stopped renewing a lease and a half ago
    assert set(fleet_claims.claim(b.id, ["query:/inbox/q.png"], LEASE)) == {"query:/inbox/q.png"}
    assert raw(database, "SELECT member_id FROM image_search_claims") == [(b.id,)]


def test_claims_of_a_member_that_no_longer_exists_are_free(database: Database, registries,
                                                           store: EmbeddingStore) -> None:
    fleet_claims = FleetClaims(store.session)
    b = join(database, registries, pid=2)
    raw(database, "INSERT INTO image_search_claims (item, member_id) VALUES ('image:/orphan', 999999)")
    assert set(fleet_claims.claim(b.id, ["image:/orphan"], LEASE)) == {"image:/orphan"}


def test_renew_keeps_a_member_live_and_brings_back_a_forgotten_one(database: Database, registries) -> None:
    a = join(database, registries, pid=1)
    make_stale(database, a.id, leases=2)
    assert registries[0].live_members(LEASE) == []
    assert registries[0].renew(a, LEASE) == 1
    assert [m.id for m in registries[0].live_members(LEASE)] == [a.id]
    raw(database, "DELETE FROM image_search_members")  # forgotten by someone's join while it was cut off
    assert registries[0].renew(a, LEASE) == 1
    assert raw(database, "SELECT id, host, pid, model_name, dimension FROM image_search_members") == [
        (a.id, "host-a", 1, MODEL, DIM)]


def _one_row(store: EmbeddingStore) -> None:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0] = 1.0
    store.upsert([EmbeddingRow(file_path="/img/a.png", file_name="a.png", file_hash="ha", processed_path="/p/a.jpg",
                               source_size=1, source_mtime_ns=1, model_name=MODEL, embedding=vector)])


def test_leave_drops_member_and_claims_and_empties_only_when_last(database: Database, registries,
                                                                  store: EmbeddingStore) -> None:
    fleet_claims = FleetClaims(store.session)
    _one_row(store)
    a = join(database, registries, pid=1)
    b = join(database, registries, pid=2)
    dead = join(database, registries, pid=3)
    registries[2].close()  # killed: its session ended with it, and it does not keep the table
    fleet_claims.claim(a.id, ["image:/a"], LEASE)
    fleet_claims.claim(b.id, ["image:/b"], LEASE)

    first = registries[0].leave(a.id, LEASE, empty_table=True)
    assert (first.live_members, first.emptied) == (1, False)
    assert store.count() == 1
    assert raw(database, "SELECT item FROM image_search_claims") == [("image:/b",)]

    last = registries[1].leave(b.id, LEASE, empty_table=True)
    assert (last.live_members, last.emptied) == (0, True)
    assert store.count() == 0
    assert raw(database, "SELECT item FROM image_search_claims") == []
    assert [r[0] for r in raw(database, "SELECT id FROM image_search_members")] == [dead.id]


def test_a_member_joining_after_a_server_crash_never_gets_a_live_members_id(database: Database, registries) -> None:
    """A crash empties the unlogged members table, and its own sequence counted from the start again: the
    member that lived through it came back under its id, and the next to join got that id too (its start
    failed on the key, or two processes shared one member). Ids come from a logged sequence now."""
    a = join(database, registries, pid=1)
    # What crash recovery does to an unlogged table and its sequence: emptied, counting from the start again.
    raw(database, "TRUNCATE image_search_members")
    raw(database, f"ALTER SEQUENCE image_search_members_id_seq RESTART WITH {a.id}")
    assert registries[0].renew(a, LEASE) == 1  # back under its own id
    b = join(database, registries, pid=2)
    assert b.id > a.id
    assert [m.id for m in registries[0].live_members(LEASE)] == [a.id, b.id]


def test_the_last_live_member_keeps_the_table_while_another_members_session_is_open(
        database: Database, registries, store: EmbeddingStore) -> None:
    """Each member judges heartbeats by its own lease. One started with a shorter lease than the others (or
    any, while another stalls for longer than its lease) took a live service for dead, and its leave emptied
    the table under it. A session still open keeps the table; the index is the safe side."""
    _one_row(store)
    a = join(database, registries, pid=1)
    stalled = join(database, registries, pid=2)
    make_stale(database, stalled.id)
    assert registries[0].leave(a.id, LEASE, empty_table=True) == LeaveResult(live_members=0, emptied=False)
    assert store.count() == 1
    registries[1].close()  # its session ends: gone for good
    last = join(database, registries, pid=3)
    assert registries[2].leave(last.id, LEASE, empty_table=True) == LeaveResult(live_members=0, emptied=True)
    assert store.count() == 0


def test_leave_without_cleanup_keeps_the_table(database: Database, registries, store: EmbeddingStore) -> None:
    _one_row(store)
    a = join(database, registries)
    assert registries[0].leave(a.id, LEASE, empty_table=False).emptied is False
    assert store.count() == 1


def test_work_claims_send_what_others_hold_back_for_a_lease(database: Database, registries,
                                                            store: EmbeddingStore, tmp_path: Path) -> None:
    """``WorkClaims.take``: granted paths come back in order; a path another live member holds waits a
    lease in the tracker; a path gone by the time it is granted is dropped."""
    fleet_claims = FleetClaims(store.session)
    a = join(database, registries, pid=1)
    b = join(database, registries, pid=2)
    paths = [tmp_path / f"{n}.png" for n in "abc"]
    for p in paths:
        p.write_bytes(b"x")
    fleet_claims.claim(a.id, [f"image:{paths[1]}"], LEASE)
    now = [100.0]
    tracker = ReadinessTracker(0.5, clock=lambda: now[0])
    member = FleetMember(registries[1], b, lease_s=LEASE, live_members=2)
    claims = WorkClaims(store, member)
    paths[2].unlink()
    assert claims.take(ClaimKind.IMAGE, paths, tracker) == [paths[0]]
    assert paths[1] in tracker and tracker.next_due() == 100.0 + HELD_LOOK_AGAIN_S  # a batch, not a lease
    now[0] += HELD_LOOK_AGAIN_S - 1
    assert tracker.pop_ready(10) == []
    now[0] += 1
    assert tracker.pop_ready(10) == [paths[1]]
    claims.release(ClaimKind.IMAGE, [paths[0]], read={paths[0]})
    assert dict(raw(database, "SELECT item, member_id FROM image_search_claims")) == {
        f"image:{paths[1]}": a.id, f"image:{paths[0]}": -b.id}  # c, gone when granted: let go, no record
    # the same path as a query is another item
    assert claims.take(ClaimKind.QUERY, [paths[1]], tracker) == [paths[1]]


def test_the_record_of_a_read_survives_a_member_that_took_the_file_and_read_nothing(
        database: Database, registries, store: EmbeddingStore, tmp_path: Path) -> None:
    """Three members saw a burst written. a read a file and let it go; b was granted it and read nothing
    (a's read came after the write b saw). b's plain release wiped a's record, and c read the file again."""
    a, b, c = (join(database, registries, pid=n) for n in (1, 2, 3))
    path = tmp_path / "p0016.png"
    path.write_bytes(b"x")
    now = [100.0]
    trackers = {m.id: ReadinessTracker(0.5, clock=lambda: now[0]) for m in (a, b, c)}
    for tracker in trackers.values():
        tracker.note(path, closed=True, reread=True)  # each saw the write at 100.0
    now[0] += 1.0  # a's read begins a second after the write
    claims = {m.id: WorkClaims(store, FleetMember(registries[0], m, lease_s=LEASE, live_members=3)) for m in (a, b, c)}
    assert claims[a.id].take(ClaimKind.IMAGE, [path], trackers[a.id]) == [path]
    claims[a.id].release(ClaimKind.IMAGE, [path], read={path})
    for member in (b, c):
        assert claims[member.id].take(ClaimKind.IMAGE, [path], trackers[member.id]) == [path]
        assert not trackers[member.id].seen_written(path)  # a's read saw that write: nothing to read
        claims[member.id].release(ClaimKind.IMAGE, [path])  # read nothing, and hands a's record on
    assert [m for (m,) in raw(database, "SELECT member_id FROM image_search_claims")] == [-c.id]


def test_a_claim_that_waited_for_another_members_release_sees_the_record_it_made(
        database: Database, registries, store: EmbeddingStore) -> None:
    """b claims a file as a lets it go after reading it, the two statements overlapping: b's claim waits for
    a's release, then must learn of a's read (a look from the statement's start saw a live claim)."""
    import threading

    from image_search.store import fleet as store_fleet

    a = join(database, registries, pid=1)
    b = join(database, registries, pid=2)
    FleetClaims(store.session).claim(a.id, ["image:/1"], LEASE)
    releasing = database.connect()
    try:
        with releasing.cursor() as cur:
            cur.execute(store_fleet._RELEASE_READ, (a.id, ["image:/1"]))  # a's release, not committed yet
        granted: dict = {}
        claiming = threading.Thread(target=lambda: granted.update(FleetClaims(store.session).claim(b.id, ["image:/1"], LEASE)))
        claiming.start()
        wait_for(lambda: raw(database, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0] > 0,
                 "b's claim waiting for a's release", timeout=10)
        releasing.commit()
        claiming.join(timeout=10)
    finally:
        releasing.close()
    assert set(granted) == {"image:/1"} and granted["image:/1"] is not None  # a began reading that long ago


def test_work_claims_grant_a_broken_link_as_an_entry_that_is_there(database: Database, registries,
                                                                 store: EmbeddingStore, tmp_path: Path) -> None:
    """A link to nothing dropped into the inbox is an entry to fail with its reason, not a query that
    another member has answered and moved away meanwhile."""
    info = join(database, registries, pid=1)
    member = FleetMember(registries[0], info, lease_s=LEASE, live_members=1)
    dangling = tmp_path / "qdangling.png"
    dangling.symlink_to("nothere.png")
    tracker = ReadinessTracker(0.5, clock=lambda: 0.0)
    claims = WorkClaims(store, member)
    assert claims.take(ClaimKind.QUERY, [dangling], tracker) == [dangling]
    claims.release(ClaimKind.QUERY, [dangling])


def test_work_claims_without_a_member_grant_everything(store: EmbeddingStore, tmp_path: Path) -> None:
    tracker = ReadinessTracker(0.5, clock=lambda: 0.0)
    paths = [tmp_path / "gone.png"]  # not even checked: no fleet, no claims
    assert WorkClaims(store, None).take(ClaimKind.IMAGE, paths, tracker) == paths
    assert len(tracker) == 0


def waiting_for_lock(database: Database, key: int) -> int:
    """How many sessions wait for the transaction-level advisory lock ``key`` now."""
    [(count,)] = raw(database, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                               "AND ((classid::bigint << 32) | objid::bigint) = %s", (key,))
    return int(count)


def test_concurrent_joins_and_table_creation_do_not_collide(tmp_path: Path) -> None:
    """Two services starting at once against a fresh database: the schema lock serialises the
    CREATE ... IF NOT EXISTS statements that would otherwise collide in the catalogue.

    The collision is made certain, not left to timing: the test holds the schema lock and the fleet lock
    while four starts begin, sees all four wait for each lock in turn (so they did run at once, and
    the schema lock, under which every table is created, is taken before the CREATEs; the join then
    waits for the fleet lock), and then lets them go."""
    import threading

    db = Database(load_config(write_config(tmp_path)))
    errors: list[BaseException] = []

    def start() -> None:
        try:
            registry = FleetRegistry(db.connect)
            registry.join(host="h", pid=1, model_name=MODEL, dimension=DIM, lease_s=LEASE)
            registry.close()
            db.open_store(dimension=DIM).close()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    gates = {SCHEMA_LOCK_KEY: db.connect(), FLEET_LOCK_KEY: db.connect()}
    threads = [threading.Thread(target=start) for _ in range(4)]
    try:
        for key, gate in gates.items():
            gate.cursor().execute("SELECT pg_advisory_xact_lock(%s)", (key,))  # held until the commit
        for t in threads:
            t.start()
        for key, what in ((SCHEMA_LOCK_KEY, "the schema lock"), (FLEET_LOCK_KEY, "the fleet lock")):
            wait_for(lambda: waiting_for_lock(db, key) == 4, f"all four starts waiting for {what}")
            gates[key].commit()
        for t in threads:
            t.join()
        assert errors == []
        assert raw(db, "SELECT count(*) FROM image_search_members") == [(4,)]
    finally:
        for gate in gates.values():
            gate.close()  # releases a lock still held if the test failed, so the threads can end
        for t in threads:
            t.join(timeout=30)
        db.close()


class FlakyRegistry:
    """A real registry whose first renewals fail as if the database had gone away."""

    def __init__(self, real: FleetRegistry, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.renewals = 0
        self.reconnects = 0
        self.left: list[bool] = []

    def renew(self, member: MemberInfo, lease_s: float) -> int:
        self.renewals += 1
        if self.renewals <= self.failures:
            raise DatabaseUnavailable("database error: server closed the connection unexpectedly")
        return self.real.renew(member, lease_s)

    def reconnect(self) -> None:
        self.reconnects += 1
        self.real.reconnect()

    def leave(self, member_id: int, lease_s: float, *, empty_table: bool) -> LeaveResult:
        self.left.append(empty_table)
        return self.real.leave(member_id, lease_s, empty_table=empty_table)

    def close(self) -> None:
        self.real.close()


def test_heartbeat_logs_a_failure_once_keeps_trying_and_says_when_it_is_back(database: Database, registries) -> None:
    """Renewals through the real registry after three failures; another member stays live throughout (its
    heartbeat set ahead by hand, since this member's lease is 30 ms), so the leave keeps the table."""
    other = join(database, registries, host="host-b", pid=2)
    raw(database, "UPDATE image_search_members SET heartbeat_at = now() + interval '1 hour' WHERE id = %s", (other.id,))
    real = FleetRegistry(database.connect)
    registries.append(real)
    me = real.join(host="host-a", pid=1, model_name=MODEL, dimension=DIM, lease_s=LEASE).member
    registry = FlakyRegistry(real, failures=3)
    member = FleetMember(registry, me, lease_s=0.03, live_members=1)  # type: ignore[arg-type]
    with capture_logs() as logs:
        member.start_heartbeat()
        wait_for(lambda: member.live_members == 2, "the heartbeat back after three failures")
        result = member.leave(empty_table=True)
        assert member.leave(empty_table=True) is None  # idempotent: the second call does nothing
    events = [e["event"] for e in logs]
    assert events.count("fleet_heartbeat_failed") == 1
    assert events.count("fleet_heartbeat_restored") == 1
    assert registry.reconnects == 3  # each retry after a failure starts from a fresh connection
    assert registry.left == [True]
    assert result == LeaveResult(1, False)  # the database's answer: the other member is still live
    assert raw(database, "SELECT id FROM image_search_members") == [(other.id,)]
    kept = [e for e in logs if e["event"] == "table_kept"]
    assert [e["members"] for e in kept] == [1] and "table_emptied" not in events


def test_status_text_counts_the_members() -> None:
    member = FleetMember(None, MemberInfo(1, "h", 1, MODEL, DIM),  # type: ignore[arg-type]  # never asked
                         lease_s=LEASE, live_members=1)
    assert member.status_text() == "1 member"
    member.live_members = 3
    assert member.status_text() == "3 members"


def test_a_path_waiting_a_lease_does_not_hold_back_files_noted_after_it(tmp_path: Path) -> None:
    now = [0.0]
    tracker = ReadinessTracker(0.5, clock=lambda: now[0])
    held, fresh = tmp_path / "held-by-another.png", tmp_path / "fresh.png"
    held.write_bytes(b"a")
    fresh.write_bytes(b"b")
    tracker.note(held, retry_after=LEASE)
    tracker.note(fresh)
    now[0] = 0.6
    assert tracker.pop_ready(10) == [fresh]
    assert held in tracker and len(tracker) == 1
    now[0] = LEASE + 0.1
    assert tracker.pop_ready(10) == [held]
    with pytest.raises(ValueError):
        tracker.note(held, retry_after=LEASE / 2)  # one length per tracker keeps that queue in due order
