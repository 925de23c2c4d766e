"""Odd entries through the real ``image-search`` processes: each case of the issue that took the CLI
down (a name in bytes that are not UTF-8, a 254-byte name, a pipe, links to /dev/zero and to a private
file), and SIGTERM while a worker is stuck in a read that never returns (``tests/support/stuck_read``:
what a network mount whose server is gone does), for ``index`` and for ``serve``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from image_search.names import NAME_MAX, escape, name_bytes, unescape
from image_search.preprocess import PreprocessError
from image_search.workers import PreprocessPool
from tests.support import warm
from tests.support.db import postgres_running, rows_by_path, stop_leftover_postgres, stopped_server_rows
from tests.support.env import child_env
from tests.support.files import save_picture, write_config
from tests.support.odd_entries import fs_name
from tests.support.service import SERVICE_CLI, ServiceProcess
from tests.support.held_reads import held_reads_env, hold_reads
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

BAD = fs_name(b"bad\xff\xfename.png")
LONG = "L" * 250 + ".png"
# The unit's TimeoutStopSec is 60: a stop must end well inside it, on a loaded 2-core machine too.
STOP_WITHIN_S = 30


def cli(*args: object, cwd: Path, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return warm.run([str(SERVICE_CLI), *map(str, args)], cwd=cwd, env=env or child_env(), capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def no_temporary_files(*folders: Path) -> list[str]:
    """Half-written files (our temp names) anywhere under ``folders``."""
    return [str(p) for folder in folders for p in folder.rglob(".tmp-*")]


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """Every case of the issue in one images/ folder, indexed once by the real CLI."""
    root = tmp_path_factory.mktemp("odd-cli")
    config = write_config(root, tiny_model_dir, cleanup_on_exit=False)
    images = root / "images"
    save_picture(images / "ok.png", seed=1)
    save_picture(images / BAD, seed=2)
    save_picture(images / LONG, seed=3)
    save_picture(images / "sub" / "inner.png", seed=4)
    save_picture(root / "private" / "secret.png", seed=5)
    os.mkfifo(images / "fifo.jpg")
    (images / "zero.jpg").symlink_to("/dev/zero")
    (images / "shadow.jpg").symlink_to(root / "private" / "secret.png")
    (images / "dangling.jpg").symlink_to(root / "nothing.jpg")
    (images / "dir.jpg").mkdir()
    (images / "sub" / "loop").symlink_to("..", target_is_directory=True)
    save_picture(images / "new\nline.png", seed=6)
    run = cli("index", "--config", config, cwd=root, timeout=180)
    yield root, config, run
    stop_leftover_postgres(root / "state")


def test_index_goes_through_every_odd_entry(odd_tree) -> None:
    root, config, run = odd_tree
    out = run.stdout.decode("utf-8")  # what it prints is valid UTF-8: names are escaped
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    assert "indexed: 5 embedded" in out and "5 skipped" in out, out
    images = root / "images"
    skipped = {line.split(": ", 1)[0].removeprefix("  skipped "): line.split(": ", 1)[1]
               for line in out.splitlines() if line.startswith("  skipped ")}
    assert skipped[f"{images}/fifo.jpg"].startswith("is a named pipe")
    assert skipped[f"{images}/zero.jpg"].startswith("symbolic link to /dev/zero, outside source-directory")
    assert skipped[f"{images}/shadow.jpg"].startswith(f"symbolic link to {root}/private/secret.png, outside")
    assert skipped[f"{images}/dangling.jpg"].startswith("broken symbolic link")
    assert skipped[f"{images}/sub/loop"].startswith("symbolic link to the folder")
    rows = rows_by_path(stopped_server_rows(config))
    assert set(rows) == {escape(images / n) for n in ("ok.png", BAD, LONG, "sub/inner.png", "new\nline.png")}
    for row in rows.values():  # the stored text leads back to the processed copy's exact name
        assert Path(unescape(row["processed_path"])).is_file(), row["processed_path"]
    assert not list((root / "processed").glob("shadow*")) and not list((root / "processed").glob("zero*"))


def test_index_again_relinks_a_renamed_odd_name_without_model_work(odd_tree) -> None:
    root, config, _ = odd_tree
    images = root / "images"
    os.rename(images / BAD, images / fs_name(b"still \xfe bad.png"))
    run = cli("index", "--config", config, cwd=root)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    assert b"indexed: 0 embedded, 1 relinked without model work" in run.stdout
    rows = rows_by_path(stopped_server_rows(config))
    assert escape(images / fs_name(b"still \xfe bad.png")) in rows and escape(images / BAD) not in rows


def test_search_with_a_query_named_in_odd_bytes_writes_a_bundle_whose_names_fit(odd_tree, tmp_path) -> None:
    root, config, _ = odd_tree
    query = tmp_path / fs_name(b"Q" * 240 + b"\xff.png")
    query.write_bytes((root / "images" / "ok.png").read_bytes())
    run = cli("search", "--config", config, query, cwd=root)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    bundle = Path(run.stdout.decode("utf-8").strip().splitlines()[-1])
    names = [p.name for p in bundle.iterdir()]
    assert len(names) == 4 and all(name_bytes(n) <= NAME_MAX for n in names), names
    (jsonl,) = bundle.glob("*.jsonl")
    assert escape(root / "images" / "ok.png") in jsonl.read_text(encoding="utf-8").splitlines()[0]


def test_sigterm_while_index_waits_on_a_read_that_never_returns(tmp_path, tiny_model_dir) -> None:
    config = write_config(tmp_path, tiny_model_dir, cleanup_on_exit=False)
    for i in range(3):
        save_picture(tmp_path / "images" / f"p{i}.png", seed=10 + i)
    save_picture(tmp_path / "images" / "stuck.png", seed=20)
    mark = tmp_path / "stuck-now"
    proc = warm.popen([str(SERVICE_CLI), "index", "--config", str(config)], cwd=tmp_path,
                            env=held_reads_env(mark), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(mark.exists, timeout=120, what="a worker stuck in its read")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_WITHIN_S)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop_leftover_postgres(tmp_path / "state")
    assert proc.returncode == 128 + signal.SIGTERM, err.decode(errors="replace")[-3000:]
    assert took < STOP_WITHIN_S
    assert not postgres_running(tmp_path / "state"), "the embedded PostgreSQL outlived the command"
    assert _processes_of_session(proc.pid) == [], "a worker outlived the command"
    assert no_temporary_files(tmp_path / "processed", tmp_path / "output") == []


@pytest.mark.parametrize("where", ["images", "inbox"])
def test_sigterm_while_serve_waits_on_a_read_that_never_returns(tmp_path, tiny_model_dir, where: str) -> None:
    """A picture whose read never returns (a dead network mount), in images/ (an ingest worker reads it) or
    as a query (the query's worker reads it: the stop waited for it, 60 s a picture, past the unit's
    TimeoutStopSec): the stop ends at once, a query left in the inbox for the next start."""
    config = write_config(tmp_path, tiny_model_dir, cleanup_on_exit=False)
    save_picture(tmp_path / "images" / "p0.png", seed=30)
    if where == "images":
        save_picture(tmp_path / "images" / "stuck.png", seed=31)
    mark = tmp_path / "stuck-now"
    service = ServiceProcess(config, log_path=tmp_path / "serve.log", env=held_reads_env(mark))
    try:
        if where == "inbox":
            service.wait_ready()
            save_picture(tmp_path / "inbox" / "stuck.png", seed=31)
        wait_for(mark.exists, timeout=120, what="a worker stuck in its read")
        started = time.monotonic()
        code = service.signal(signal.SIGTERM, timeout=STOP_WITHIN_S)
        took = time.monotonic() - started
    finally:
        service.close()
        stop_leftover_postgres(tmp_path / "state")
    assert code == 0, service.log_text()[-3000:]
    assert took < STOP_WITHIN_S
    assert [e["event"] for e in service.events("service_stopping")] == ["service_stopping"]
    assert not postgres_running(tmp_path / "state"), "the embedded PostgreSQL outlived the service"
    assert _processes_of_session(service.popen.pid) == []
    assert no_temporary_files(tmp_path / "processed", tmp_path / "output") == []
    if where == "inbox":
        assert (tmp_path / "inbox" / "stuck.png").is_file() and not (tmp_path / "inbox" / "failed").exists()
        assert not service.events("query_failed")


def test_a_file_whose_read_never_returns_costs_that_file_not_the_pool(tmp_path, monkeypatch) -> None:
    """The per-file limit, lowered to 2 s here: the stuck worker is killed, its file is skipped with the
    reason, and the files after it are prepared as usual."""
    import image_search.workers as workers

    monkeypatch.setattr(workers, "FILE_SECONDS_LIMIT", 2.0)
    hold_reads(monkeypatch, tmp_path / "stuck-now")
    paths = [save_picture(tmp_path / name, seed=40 + i) for i, name in enumerate(("a.png", "stuck.png", "b.png"))]
    with PreprocessPool(max_size=(64, 64), max_pixels=10**8, workers=1) as pool:
        outcomes = pool.submit(paths).results(timeout=60)
    assert not isinstance(outcomes[0], PreprocessError) and not isinstance(outcomes[2], PreprocessError)
    assert isinstance(outcomes[1], PreprocessError) and "took longer than 2 s" in outcomes[1].reason


def _processes_of_session(sid: int) -> list[str]:
    """Processes still in the session ``sid`` (the command and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return found
