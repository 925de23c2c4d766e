"""A PostgreSQL several members share, and a fleet member in a process of its own.

- ``SharedServer``: a pgserver PostgreSQL the test starts, reached through its socket directory as
  ``postgres-host``, as an external server would be (no member owns it); ``config`` writes a member's
  config for it, ``query`` looks behind the members with plain SQL.
- ``ChildMember``: ``python -m tests.support.fleet FLEET-CONFIG ITEM...`` joins the fleet through the real
  ``FleetMember.join`` (heartbeat thread and all), claims the items through the real store, prints
  one JSON line (its member id and what it got) and then does nothing until it is signalled: a
  member the test can kill with SIGKILL or freeze with SIGSTOP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2

from tests.support.db import fetch_all
from tests.support.env import child_env
from tests.support.files import write_config

REPO_ROOT = Path(__file__).resolve().parents[2]


class SharedServer:
    def __init__(self, pgdata: Path) -> None:
        import pgserver

        self.server = pgserver.get_server(pgdata, cleanup_mode="stop")
        info = self.server.get_postmaster_info()
        self.host, self.port = str(info.socket_dir), info.port or 5432

    def config(self, root: Path, model_dir: Path | None = None, **overrides: object) -> Path:
        return write_config(root, model_dir, postgres_host=self.host, postgres_port=self.port, shared_index=True,
                            **overrides)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return fetch_all(psycopg2.connect(host=self.host, port=self.port, user="postgres", dbname="postgres",
                                          connect_timeout=5), sql, params)

    def row_count(self) -> int:
        """Rows of image_embeddings; 0 before the table exists."""
        if not self.query("SELECT to_regclass('image_embeddings') IS NOT NULL")[0][0]:
            return 0
        return int(self.query("SELECT count(*) FROM image_embeddings")[0][0])

    def holds_member_lock(self, member_id: int) -> bool:
        """Whether some session still holds the member's liveness lock (its connection is open)."""
        from image_search.store import MEMBER_LOCK_SPACE

        return bool(self.query(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid "
            "AND objid = %s::oid AND objsubid = 1", (MEMBER_LOCK_SPACE, member_id))[0][0])

    def cleanup(self) -> None:
        self.server.cleanup()


class ChildMember:
    """A fleet member in a process of its own (see the module's docstring)."""

    def __init__(self, config: Path, items: list[str], *, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:  # its log lines (stderr): a file, never a pipe nobody reads
            self.popen = subprocess.Popen([sys.executable, "-m", "tests.support.fleet", str(config), *items],
                                          cwd=REPO_ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.popen.stdout.readline()  # type: ignore[union-attr]  # the one line, once it has joined
        try:
            joined = json.loads(line)
        except ValueError:
            self.close()
            raise AssertionError(f"the child member did not join: {line!r}\n{log_path.read_text()}") from None
        self.member_id: int = joined["member_id"]
        self.granted: list[str] = joined["granted"]

    def signal(self, signum: int) -> None:
        os.kill(self.popen.pid, signum)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()  # a stopped process dies of SIGKILL too
            self.popen.wait(timeout=10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def _child_main(config_path: str, items: list[str]) -> None:
    from image_search.config import load_config
    from image_search.fleet import FleetMember
    from image_search.logs import configure_logging
    from image_search.store import Database

    configure_logging("info", stream=sys.stderr)  # stdout carries the one JSON line
    cfg = load_config(Path(config_path))
    database = Database(cfg)
    member = FleetMember.join(cfg, database)
    store = database.open_store(dimension=cfg.dimension)
    granted = store.claim(member.member.id, items, cfg.member_lease_seconds)
    print(json.dumps({"member_id": member.member.id, "granted": sorted(granted)}), flush=True)
    while True:
        signal.pause()  # until killed: a member at work, heartbeat and all


if __name__ == "__main__":
    from tests.support.env import use_offline_hub

    use_offline_hub()
    _child_main(sys.argv[1], sys.argv[2:])
