"""A member is live while its database session is: a process killed with ``kill -9`` is dead to the
others at once, not a lease later; one that hangs with its connection open still has its lease.

Every member here is a real process on one shared PostgreSQL (``tests.support.fleet``): a child that
joins through ``FleetMember.join`` and claims through the store, or a real ``image-search serve``. The
lease of the kill tests is 300 s, so only the closed session can explain a member seen dead within
their waits; each wait is generous and still a fraction of that lease. Nothing asserts a duration.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg2
import pytest
from structlog.testing import capture_logs

from tests.support.fleet import ChildMember, HostInANamespace, SharedServer
from tests.support.files import find_bundle, inbox_files, save_picture
from tests.support.service import ServiceProcess
from tests.support.waiting import wait_for

from image_search.config import load_config
from image_search.fleet import FleetMember
from image_search.store import Database, EmbeddingRow, EmbeddingStore, FleetClaims, FleetRegistry

pytestmark = pytest.mark.e2e

LONG_LEASE_S = 300.0  # only the session can end a member's life within a test's waits
SEEN_DEAD_TIMEOUT_S = 60.0  # a fifth of the lease: a lease-only liveness never gets there
ITEMS = ["image:/photos/a.png", "image:/photos/b.png", "query:/inbox/q.png"]


@pytest.fixture
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServer]:
    server = SharedServer(tmp_path_factory.mktemp("shared") / "pg")
    yield server
    server.cleanup()


def live_ids(observer: FleetRegistry, lease_s: float) -> list[int]:
    return [m.id for m in observer.live_members(lease_s)]


def one_row(store: EmbeddingStore, dimension: int) -> None:
    vector = np.zeros(dimension, dtype=np.float32)
    vector[0] = 1.0
    store.upsert([EmbeddingRow(file_path="/photos/a.png", file_name="a.png", file_hash="ha", processed_path="/p/a.jpg",
                               source_size=1, source_mtime_ns=1, model_name="m", embedding=vector)])


def test_a_member_killed_with_kill_9_is_dead_at_once_its_claims_are_taken_over_and_the_last_leave_empties_the_table(
        tmp_path: Path, shared: SharedServer) -> None:
    config = shared.config(tmp_path, member_lease_seconds=LONG_LEASE_S)
    cfg = load_config(config)
    database = Database(cfg)  # the shared server: nothing is started here
    me = FleetMember.join(cfg, database)
    store = database.open_store(dimension=cfg.dimension)
    fleet_claims = FleetClaims(store.session)
    observer = FleetRegistry(database.connect)  # a look of its own: the heartbeat owns me.registry's connection
    child = ChildMember(config, ITEMS, log_path=tmp_path / "child.log")
    try:
        assert child.granted == sorted(ITEMS)
        one_row(store, cfg.dimension)
        assert live_ids(observer, LONG_LEASE_S) == [me.member.id, child.member_id]
        assert set(fleet_claims.claim(me.member.id, ITEMS, LONG_LEASE_S)) == set()  # a live member holds them
        wait_for(lambda: me.live_members == 2, "this member's heartbeat counting two members",
                 timeout=SEEN_DEAD_TIMEOUT_S)

        child.kill9()
        killed_at = time.monotonic()
        wait_for(lambda: live_ids(observer, LONG_LEASE_S) == [me.member.id], "the killed member seen dead",
                 timeout=SEEN_DEAD_TIMEOUT_S)
        seen_dead_s = time.monotonic() - killed_at
        # Its row is still there, its heartbeat within the lease: the closed session alone says it is dead.
        assert shared.query("SELECT count(*) FROM image_search_members WHERE id = %s AND heartbeat_at > "
                            "now() - make_interval(secs => %s)", (child.member_id, LONG_LEASE_S)) == [(1,)]
        assert shared.member_lock_holder(child.member_id) is None
        # This member's heartbeat sees the fleet shrink too (it counts every few seconds).
        wait_for(lambda: me.live_members == 1 and me.departures == 1, "the heartbeat counting one member",
                 timeout=SEEN_DEAD_TIMEOUT_S)
        heartbeat_saw_s = time.monotonic() - killed_at
        print(f"killed member seen dead after {seen_dead_s:.2f} s; by the heartbeat after {heartbeat_saw_s:.2f} s")

        assert set(fleet_claims.claim(me.member.id, ITEMS, LONG_LEASE_S)) == set(ITEMS)  # taken over now, not a lease later
        assert dict(shared.query("SELECT item, member_id FROM image_search_claims")) == {i: me.member.id for i in ITEMS}

        left = me.leave(empty_table=True)
        assert left is not None and (left.live_members, left.emptied) == (0, True)
        assert store.count() == 0
        assert shared.query("SELECT count(*) FROM image_search_claims") == [(0,)]
    finally:
        child.close()
        me.leave(empty_table=False)
        observer.close()
        store.close()


def test_a_member_that_hangs_with_its_connection_open_stays_live_until_its_lease_runs_out(
        tmp_path: Path, shared: SharedServer) -> None:
    lease_s = 10.0  # short: here the lease is what ends the member's life
    config = shared.config(tmp_path, member_lease_seconds=lease_s)
    cfg = load_config(config)
    database = Database(cfg)
    me = FleetMember.join(cfg, database)
    store = database.open_store(dimension=cfg.dimension)
    fleet_claims = FleetClaims(store.session)
    observer = FleetRegistry(database.connect)
    child = ChildMember(config, ITEMS, log_path=tmp_path / "child.log")
    try:
        child.signal(signal.SIGSTOP)  # hung: no heartbeat, its connection open
        assert live_ids(observer, lease_s) == [me.member.id, child.member_id]
        assert set(fleet_claims.claim(me.member.id, ITEMS, lease_s)) == set()
        (age,), = shared.query("SELECT extract(epoch FROM now() - heartbeat_at)::float FROM image_search_members "
                               "WHERE id = %s", (child.member_id,))
        assert age < lease_s, "this machine was too slow to look within the lease: the looks above prove nothing"

        wait_for(lambda: live_ids(observer, lease_s) == [me.member.id], "the hung member's lease running out",
                 timeout=lease_s * 6)
        assert shared.member_lock_holder(child.member_id) is not None  # its session is open: the lease decided
        assert set(fleet_claims.claim(me.member.id, ITEMS, lease_s)) == set(ITEMS)

        child.signal(signal.SIGCONT)  # back: its heartbeat makes it live again
        wait_for(lambda: live_ids(observer, lease_s) == [me.member.id, child.member_id], "the member live again",
                 timeout=lease_s * 3)
        left = me.leave(empty_table=True)
        assert left is not None and (left.live_members, left.emptied) == (1, False)
    finally:
        child.close()
        me.leave(empty_table=False)
        observer.close()
        store.close()


def test_three_services_one_killed_with_kill_9_the_last_one_stopped_empties_the_table(
        tmp_path: Path, tiny_model_dir: Path, shared: SharedServer) -> None:
    """The issue's story: three services on one PostgreSQL; one is killed with ``kill -9`` while it holds a
    query the others have already seen held; the query is answered long before the lease would run
    out, and the other two, stopped with SIGTERM and cleanup-on-exit on, leave an empty table."""
    root = tmp_path
    config = shared.config(root, tiny_model_dir, member_lease_seconds=LONG_LEASE_S, top_k=3)
    staged = [save_picture(root / "staging" / f"img-{i:02d}.png", seed=20_000 + i, size=(64, 48)) for i in range(12)]
    procs = [ServiceProcess(config, "--log-level", "debug", log_path=root / f"service-{i}.log") for i in range(3)]
    try:
        for p in procs:
            p.wait_ready()
        first, last, victim = procs
        victim_id = victim.events("fleet_joined")[0]["member_id"]
        for f in staged:
            os.rename(f, root / "images" / f.name)
        wait_for(lambda: shared.row_count() == len(staged), f"{len(staged)} rows", timeout=240, proc=first)

        # The victim hangs holding a query (as if it had claimed it a moment before): the others see it
        # held by a live member, which would send it back to them only a lease (300 s) later.
        os.kill(victim.popen.pid, signal.SIGSTOP)
        query_path = root / "inbox" / "q.png"
        shared.query("INSERT INTO image_search_claims (item, member_id) VALUES (%s, %s)",
                     (f"query:{query_path}", victim_id))
        marks = [p.mark() for p in (first, last)]
        shutil.copyfile(root / "images" / staged[0].name, root / "inbox" / ".q.png.part")
        os.rename(root / "inbox" / ".q.png.part", query_path)
        for p, mark in zip((first, last), marks):
            p.wait_event("claims_held_elsewhere", since=mark, where=lambda e: e.get("kind") == "query")

        victim.kill9()
        killed_at = time.monotonic()
        bundle = wait_for(lambda: find_bundle(root / "output", "q.png"), "the dead member's query answered",
                          timeout=SEEN_DEAD_TIMEOUT_S * 2, proc=first)
        print(f"the dead member's query answered {time.monotonic() - killed_at:.2f} s after the kill")
        assert (bundle / "q.jsonl").read_text().count('"rank"') == 3
        assert inbox_files(root / "inbox") == []
        # Logged just after the bundle is in place: it may still be on its way.
        wait_for(lambda: sum(len(p.events("search_answered")) for p in (first, last)) >= 1, "the answer logged",
                 proc=first)
        assert sum(len(p.events("search_answered")) for p in (first, last)) == 1

        assert first.signal(signal.SIGTERM) == 0, first.log_text()[-4000:]
        assert [e["members"] for e in first.events("table_kept")] == [1], first.log_text()[-3000:]
        assert shared.row_count() == len(staged)
        assert last.signal(signal.SIGTERM) == 0, last.log_text()[-4000:]
        assert last.events("table_emptied"), last.log_text()[-3000:]
        assert shared.row_count() == 0
        assert shared.query("SELECT count(*) FROM image_search_claims") == [(0,)]
        for p in procs:
            assert "Traceback" not in p.log_text(), p.log_text()[-4000:]
    finally:
        for p in procs:
            p.close()


def test_a_member_whose_session_the_database_ended_takes_its_lock_again_on_the_new_connection(
        tmp_path: Path, shared: SharedServer) -> None:
    """An administrator's pg_terminate_backend (or a network blip) ends the heartbeat's session: the member
    is dead to the others at once, and live again once its heartbeat has reconnected."""
    config = shared.config(tmp_path, member_lease_seconds=LONG_LEASE_S)
    cfg = load_config(config)
    database = Database(cfg)
    me = FleetMember.join(cfg, database)
    observer = FleetRegistry(database.connect)
    try:
        assert live_ids(observer, LONG_LEASE_S) == [me.member.id]
        holder = shared.member_lock_holder(me.member.id)
        assert shared.query("SELECT pg_terminate_backend(%s)", (holder,)) == [(True,)]
        wait_for(lambda: live_ids(observer, LONG_LEASE_S) == [], "the member dead with its session",
                 timeout=SEEN_DEAD_TIMEOUT_S)
        wait_for(lambda: live_ids(observer, LONG_LEASE_S) == [me.member.id], "the member live again",
                 timeout=SEEN_DEAD_TIMEOUT_S)
        assert shared.member_lock_holder(me.member.id) not in (None, holder)  # a new session holds it
    finally:
        me.leave(empty_table=False)
        observer.close()


def test_a_member_whose_host_is_lost_without_a_word_is_dead_once_tcp_keepalives_give_up(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The member reaches the server over TCP from inside a network namespace; the namespace's network
    goes down, so no FIN or RST ever reaches the server: only its keepalives can end the session."""
    host = HostInANamespace(tmp_path_factory.mktemp("netns") / "pg")
    observer = FleetRegistry(lambda: psycopg2.connect(host=host.host, port=host.port, user="postgres",
                                                      dbname="postgres", connect_timeout=5))
    child = None
    try:
        config = host.member_config(tmp_path, member_lease_seconds=LONG_LEASE_S)
        child = ChildMember(config, ITEMS, log_path=tmp_path / "child.log", prefix=host.enter)
        assert live_ids(observer, LONG_LEASE_S) == [child.member_id]
        assert host.query("SELECT count(*) FROM pg_stat_activity WHERE client_addr = '127.0.0.1'")[0][0] >= 1

        host.lose_network()
        lost_at = time.monotonic()
        wait_for(lambda: live_ids(observer, LONG_LEASE_S) == [], "the lost host's member seen dead",
                 timeout=SEEN_DEAD_TIMEOUT_S)
        print(f"a lost host's member seen dead {time.monotonic() - lost_at:.2f} s after its network went down")
        assert host.member_lock_holder(child.member_id) is None
        assert child.popen.poll() is None  # the process runs on: the session ended, not the process
    finally:
        if child is not None:
            child.close()
        observer.close()
        host.cleanup()


def test_several_members_without_shared_index_are_warned_of_only_on_a_database_of_their_own(
        tmp_path: Path, shared: SharedServer) -> None:
    """On a PostgreSQL of its own ("postgres-host") a second member means another host: say "shared-index".
    On the embedded server the others are this machine's own processes (a command run beside the service),
    and "shared-index" would be refused there: no warning."""
    cfg = load_config(shared.config(tmp_path, shared_index=False))  # undeclared
    database = Database(cfg)
    first = FleetMember.join(cfg, database)
    try:
        for embedded, warned in ((False, True), (True, False)):
            joining = dataclasses.replace(cfg, postgres_host="") if embedded else cfg  # the rule reads the config
            with capture_logs() as logs:
                second = FleetMember.join(joining, database)
            second.leave(empty_table=False)
            assert [e["event"] for e in logs if e["event"] == "fleet_not_declared"] == (
                ["fleet_not_declared"] if warned else [])
    finally:
        first.leave(empty_table=False)
