"""Several real ``image-search serve`` processes, one PostgreSQL, the same folders: they share the work.

The shared server is a pgserver PostgreSQL started by the test and reached through its socket
directory as ``postgres-host``, as an external server would be. Every service gets the same config
(the same images/, inbox/ and output/). The lease is short so a killed member's claims are taken over
within seconds; nothing asserts a duration.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.support.db import fetch_all
from tests.support.env import child_env
from tests.support.files import find_bundle, inbox_files, save_picture, write_config
from tests.support.notify import NotifyListener
from tests.support.service import ServiceProcess
from tests.support.waiting import wait_for

from image_search.config import ConfigError, load_config

pytestmark = pytest.mark.e2e

LEASE_S = 5.0
INGEST_TIMEOUT = 240.0
IMAGES = 300
QUERIES = 20


@pytest.fixture
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("shared") / "pg", cleanup_mode="stop")
    yield server
    server.cleanup()


def fleet_config(root: Path, model_dir: Path, server: object, **overrides: object) -> Path:
    info = server.get_postmaster_info()
    return write_config(root, model_dir, postgres_host=str(info.socket_dir), postgres_port=info.port or 5432,
                        shared_index=True, member_lease_seconds=LEASE_S, top_k=3, **overrides)


def query(server: object, sql: str, params: tuple = ()) -> list[tuple]:
    info = server.get_postmaster_info()
    return fetch_all(psycopg2.connect(host=str(info.socket_dir), port=info.port or 5432, user="postgres",
                                      dbname="postgres", connect_timeout=5), sql, params)


def row_counts(server: object) -> tuple[int, int]:
    """(rows, distinct source paths) of image_embeddings; (0, 0) before the table exists."""
    if not query(server, "SELECT to_regclass('image_embeddings') IS NOT NULL")[0][0]:
        return 0, 0
    rows, paths = query(server, "SELECT count(*), count(DISTINCT file_path) FROM image_embeddings")[0]
    return int(rows), int(paths)


def stage_pictures(folder: Path, count: int) -> list[Path]:
    """Small distinct PNGs written outside the watched folder, to be moved in all at once."""
    return [save_picture(folder / f"img-{i:03d}.png", seed=10_000 + i, size=(64, 48)) for i in range(count)]


def drop_all(files: list[Path], images: Path) -> None:
    for f in files:
        os.rename(f, images / f.name)  # a rename into place: complete when it appears


def start_member(root: Path, config: Path, *flags: str, tag: str = "", env: dict[str, str] | None = None) -> ServiceProcess:
    """One member of the fleet: ``image-search serve`` on ``config``, logging to ``root/service<tag>.log``."""
    return ServiceProcess(config, *flags, log_path=root / f"service{tag}.log", env=env)


def embedded_total(procs: list[ServiceProcess]) -> int:
    return sum(e.get("embedded", 0) for p in procs for e in p.events("images_indexed"))


def bundles_with(output: Path, stem: str) -> list[Path]:
    return [b for b in output.iterdir() if b.is_dir() and not b.name.startswith(".")
            and any(f.name.startswith(f"{stem}.query.") for f in b.iterdir())]


def start_fleet(root: Path, config: Path, count: int, *flags: str, env: dict[str, str] | None = None) -> list[ServiceProcess]:
    procs = [start_member(root, config, *flags, tag=f"-{i}", env=env if i == 0 else None) for i in range(count)]
    for p in procs:
        p.wait_ready()
    return procs


def test_three_services_share_ingest_and_queries_and_the_last_one_empties_the_table(
        tmp_path: Path, tiny_model_dir: Path, shared_server) -> None:
    root = tmp_path
    config = fleet_config(root, tiny_model_dir, shared_server)
    staged = stage_pictures(root / "staging", IMAGES)
    notify = NotifyListener(root / "notify.sock", root / "output")
    procs: list[ServiceProcess] = []
    try:
        procs = start_fleet(root, config, 3, env=child_env(NOTIFY_SOCKET=str(notify.path)))
        # Joins are serialised by the fleet lock: each saw those before it.
        assert sorted(p.events("fleet_joined")[0]["members"] for p in procs) == [1, 2, 3]
        wait_for(lambda: any("3 members" in m for _, m in notify.messages if m.startswith("STATUS=")),
                 "a STATUS line showing the three members", proc=procs[0])

        drop_all(staged, root / "images")
        wait_for(lambda: row_counts(shared_server) == (IMAGES, IMAGES), f"{IMAGES} rows", timeout=INGEST_TIMEOUT,
                 proc=procs[0])
        assert {p.name for p in (root / "images").iterdir()} == {f.name for f in staged}

        sources = sorted((root / "images").iterdir())[:QUERIES]
        for i, source in enumerate(sources):
            shutil.copyfile(source, root / "inbox" / f".q{i:02d}.png.part")
        for i in range(QUERIES):  # all at once: renamed into place
            os.rename(root / "inbox" / f".q{i:02d}.png.part", root / "inbox" / f"q{i:02d}.png")
        wait_for(lambda: all(find_bundle(root / "output", f"q{i:02d}.png") for i in range(QUERIES)),
                 f"{QUERIES} result folders", proc=procs[0])
        wait_for(lambda: inbox_files(root / "inbox") == [], "the inbox empty", proc=procs[0])
        for i in range(QUERIES):
            assert len(bundles_with(root / "output", f"q{i:02d}")) == 1, f"q{i:02d} answered more than once"
        assert len([b for b in (root / "output").iterdir() if not b.name.startswith(".")]) == QUERIES
        # Each answer is logged just after its bundle is in place: the last may still be on its way.
        wait_for(lambda: sum(len(p.events("search_answered")) for p in procs) >= QUERIES,
                 "every answer logged", proc=procs[0])
        assert sum(len(p.events("search_answered")) for p in procs) == QUERIES
        assert not (root / "inbox" / "failed").exists()

        # cleanup-on-exit is on (the default): the first two keep the table for the others.
        for expected_members, proc in zip((2, 1), procs[:2]):
            assert proc.signal(signal.SIGTERM) == 0, proc.log_text()[-4000:]
            kept = proc.events("table_kept")
            assert [e["members"] for e in kept] == [expected_members], proc.log_text()[-3000:]
            assert "table_emptied" not in proc.log_text()
            assert row_counts(shared_server) == (IMAGES, IMAGES)
        assert procs[2].signal(signal.SIGTERM) == 0, procs[2].log_text()[-4000:]
        assert procs[2].events("table_emptied"), procs[2].log_text()[-3000:]
        assert row_counts(shared_server) == (0, 0)
        assert query(shared_server, "SELECT count(*) FROM image_search_members") == [(0,)]
        assert query(shared_server, "SELECT count(*) FROM image_search_claims") == [(0,)]

        # Each file embedded once over the whole fleet (counted after every service stopped).
        assert embedded_total(procs) == IMAGES
        assert sum(1 for p in procs if any(e.get("embedded") for e in p.events("images_indexed"))) >= 2, \
            "the work was not shared"
        for p in procs:
            assert "Traceback" not in p.log_text(), p.log_text()[-4000:]
    finally:
        for p in procs:
            p.close()
        notify.close()


def test_kill_9_mid_ingest_loses_nothing_and_a_dead_members_query_is_answered(
        tmp_path: Path, tiny_model_dir: Path, shared_server) -> None:
    root = tmp_path
    config = fleet_config(root, tiny_model_dir, shared_server)
    staged = stage_pictures(root / "staging", IMAGES)
    procs: list[ServiceProcess] = []
    try:
        procs = start_fleet(root, config, 2)
        survivor, victim = procs
        victim_id = victim.events("fleet_joined")[0]["member_id"]
        # The survivor waits while the victim starts the ingest alone: however fast this machine, the
        # victim dies holding claims on files not indexed yet (with both running, 300 small files could
        # all be in before the kill).
        survivor.pause()
        try:
            drop_all(staged, root / "images")
            wait_for(lambda: row_counts(shared_server)[0] > 0, "the victim's first rows", timeout=INGEST_TIMEOUT,
                     proc=victim)
            victim.kill9()
        finally:
            survivor.resume()
        rows_at_kill = row_counts(shared_server)[0]
        assert rows_at_kill < IMAGES, "the ingest was over before the kill: nothing was tested"

        wait_for(lambda: row_counts(shared_server) == (IMAGES, IMAGES), f"all {IMAGES} rows after the kill",
                 timeout=INGEST_TIMEOUT, proc=survivor)

        # A query the dead member had claimed just before it died: taken over once its lease runs out.
        # (Dropped once every row is in: a query answered during the ingest ranks what is in by then.)
        orphan = root / "inbox" / "orphan.png"
        query(shared_server, "INSERT INTO image_search_claims (item, member_id) VALUES (%s, %s)",
              (f"query:{orphan}", victim_id))
        shutil.copyfile(root / "images" / staged[0].name, orphan)
        bundle = wait_for(lambda: find_bundle(root / "output", "orphan.png"), "the orphaned query answered",
                          timeout=INGEST_TIMEOUT, proc=survivor)
        assert len(bundles_with(root / "output", "orphan")) == 1
        assert (bundle / "orphan.jsonl").read_text().count('"rank"') == 3
        assert inbox_files(root / "inbox") == []

        # A service with another dimension refuses to join while the survivor runs: one line, both named.
        other = write_config(root / "other", tiny_model_dir, postgres_host=str(shared_server.get_postmaster_info().socket_dir),
                             postgres_port=shared_server.get_postmaster_info().port or 5432, dimension=64,
                             member_lease_seconds=LEASE_S)
        refused = start_member(root / "other", other, tag="-refused")
        procs.append(refused)
        assert refused.popen.wait(timeout=120) == 4, refused.log_text()[-3000:]  # ExitCode.DATABASE
        lines = [line for line in refused.log_text().splitlines() if "never mix" in line]
        assert len(lines) == 1, refused.log_text()[-3000:]
        assert "startup_failed" in lines[0] and "dimension 64" in lines[0] and "dimension 32" in lines[0]
        assert query(shared_server, "SELECT dimension FROM image_search_members ORDER BY id") == [(32,), (32,)]

        # The dead member is not live any more: the survivor is the last, and cleanup-on-exit empties the table.
        assert survivor.signal(signal.SIGTERM) == 0, survivor.log_text()[-4000:]
        assert survivor.events("table_emptied"), survivor.log_text()[-3000:]
        assert "Traceback" not in survivor.log_text()
    finally:
        for p in procs:
            p.close()


def test_shared_index_without_a_server_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, shared_index=True)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert "'shared-index'" in message and "'postgres-host'" in message and "docker-compose.yml" in message
    assert load_config(write_config(tmp_path, shared_index=True, postgres_host="db.example")).shared_index


def test_member_lease_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="member-lease-seconds"):
        load_config(write_config(tmp_path, member_lease_seconds=0))
