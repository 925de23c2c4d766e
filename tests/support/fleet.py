"""A PostgreSQL several members share, and a fleet member in a process of its own.

- ``SharedServer``: a pgserver PostgreSQL the test starts, reached through its socket directory as
  ``postgres-host``, as an external server would be (no member owns it); ``config`` writes a member's
  config for it, ``query`` looks behind the members with plain SQL.
- ``HostInANamespace``: the same, but listening on 127.0.0.1 inside a network namespace of its own, for a
  member that connects over TCP from inside it; ``lose_network`` takes the namespace's loopback down,
  so every packet between them is lost with neither side told: a host lost without a word.
- ``ChildMember``: ``python -m tests.support.fleet FLEET-CONFIG ITEM...`` joins the fleet through the real
  ``FleetMember.join`` (heartbeat thread and all), claims the items through the real store, prints
  one JSON line (its member id and what it got) and then does nothing until it is signalled: a
  member the test can kill with SIGKILL or freeze with SIGSTOP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg2
import pytest

from tests.support.db import fetch_all
from tests.support.env import child_env
from tests.support.files import write_config
from tests.support.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


class SharedServer:
    def __init__(self, pgdata: Path) -> None:
        import pgserver

        self.server = pgserver.get_server(pgdata, cleanup_mode="stop")
        info = self.server.get_postmaster_info()
        self.host, self.port = str(info.socket_dir), info.port or 5432

    def config(self, root: Path, model_dir: Path | None = None, **overrides: object) -> Path:
        return write_config(root, model_dir, **{"postgres_host": self.host, "postgres_port": self.port,
                                                "shared_index": True, **overrides})

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return fetch_all(psycopg2.connect(host=self.host, port=self.port, user="postgres", dbname="postgres",
                                          connect_timeout=5), sql, params)

    def row_count(self) -> int:
        """Rows of image_embeddings; 0 before the table exists."""
        if not self.query("SELECT to_regclass('image_embeddings') IS NOT NULL")[0][0]:
            return 0
        return int(self.query("SELECT count(*) FROM image_embeddings")[0][0])

    def member_lock_holder(self, member_id: int) -> int | None:
        """The server process whose session holds the member's liveness lock; None when no session does."""
        from image_search.store import MEMBER_LOCK_SPACE

        rows = self.query("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid "
                          "AND objid = %s::oid AND objsubid = 1", (MEMBER_LOCK_SPACE, member_id))
        return rows[0][0] if rows else None

    def cleanup(self) -> None:
        self.server.cleanup()


class HostInANamespace(SharedServer):
    """The server of ``SharedServer``, started again inside a network namespace of its own (a process
    that sleeps holds it), listening on 127.0.0.1:5432 there and on its Unix socket as before. The
    socket is a file, so the test reaches the server from outside the namespace whatever happens to
    the namespace's network. Skips where namespaces cannot be made (not root, no CAP_SYS_ADMIN)."""

    PORT = 5432

    def __init__(self, pgdata: Path) -> None:
        missing = [tool for tool in ("unshare", "nsenter", "setpriv", "ip") if shutil.which(tool) is None]
        if os.geteuid() != 0 or missing:
            pytest.skip(f"a network namespace needs root and {', '.join(missing) or 'its tools'}")
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot make a network namespace here: {probe.stderr.strip()}")
        super().__init__(pgdata)  # initdb, and a first start outside the namespace
        self.pgdata = Path(self.server.pgdata)
        self.server.cleanup()  # stopped: started again below, inside the namespace
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        self.enter = ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]
        try:
            wait_for(lambda: os.readlink(f"/proc/{self.holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
                     "the namespace made")
            self._in_namespace(["ip", "link", "set", "lo", "up"])
            self._pg_ctl("-w", "-o", f"-h 127.0.0.1 -p {self.PORT} -k {self.pgdata}", "-l", str(self.pgdata / "log"),
                         "start")
        except BaseException:
            self.holder.kill()
            self.holder.wait()
            raise
        self.host, self.port = str(self.pgdata), self.PORT  # what the test's own looks use: the socket

    def _in_namespace(self, command: list[str]) -> None:
        subprocess.run([*self.enter, *command], check=True, capture_output=True, timeout=60)

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        # As pgserver runs it: the server refuses to run as root.
        self._in_namespace(["setpriv", "--reuid=pgserver", "--regid=pgserver", "--init-groups", "--",
                            str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), *args])

    def member_config(self, root: Path, **overrides: object) -> Path:
        """A member's config that reaches the server over TCP (from inside the namespace)."""
        return write_config(root, postgres_host="127.0.0.1", postgres_port=self.PORT, shared_index=True, **overrides)

    def lose_network(self) -> None:
        self._in_namespace(["ip", "link", "set", "lo", "down"])

    def cleanup(self) -> None:
        try:
            self._pg_ctl("-w", "-m", "immediate", "stop")
        finally:
            self.holder.kill()
            self.holder.wait()


class ChildMember:
    """A fleet member in a process of its own (see the module's docstring)."""

    def __init__(self, config: Path, items: list[str], *, log_path: Path, prefix: Sequence[str] = ()) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:  # its log lines (stderr): a file, never a pipe nobody reads
            self.popen = subprocess.Popen([*prefix, sys.executable, "-m", "tests.support.fleet", str(config), *items],
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
    from image_search.store import Database, FleetClaims

    configure_logging("info", stream=sys.stderr)  # stdout carries the one JSON line
    cfg = load_config(Path(config_path))
    database = Database(cfg)
    member = FleetMember.join(cfg, database)
    store = database.open_store(dimension=cfg.dimension)
    granted = FleetClaims(store.session).claim(member.member.id, items, cfg.member_lease_seconds)
    print(json.dumps({"member_id": member.member.id, "granted": sorted(granted)}), flush=True)
    while True:
        signal.pause()  # until killed: a member at work, heartbeat and all


if __name__ == "__main__":
    from tests.support.env import use_offline_hub

    use_offline_hub()
    _child_main(sys.argv[1], sys.argv[2:])
