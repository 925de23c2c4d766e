"""End-to-end stories through the real ``image-search`` console script and the real embedded PostgreSQL.

Each CLI start costs several seconds (torch import, model load, server start), so the stories share
trees: ``indexed_tree`` runs index -> rerun -> touch/change -> search -> bad query -> legacy
``--process-only`` (cleanup) -> interactive prompt + SIGTERM, and the tests read what it recorded.
Nothing here mocks the database: rows are read back through ``image_search.store.Database``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from image_search.config import load_config
from image_search.output import write_result_bundle
from image_search.hits import Hit
from tests.support import warm
from tests.support.db import stopped_server_rows
from tests.support.env import child_env
from tests.support.files import read_jsonl, save_picture, write_config, written_into
from tests.support.model import TINY_DIMENSION, save_tiny_clip

pytestmark = pytest.mark.e2e

CLI = Path(sys.executable).parent / "image-search"
PASSWORD = "pw-Sekrit-7731"
TOP_K = 3
JSONL_KEYS = {"rank", "similarity", "file_name", "file_path", "processed_path", "file_hash", "taken_at", "camera", "width",
              "height", "format", "copies"}
BUNDLE_NAME = re.compile(r"^\d{8}-\d{6}(-\d+)?$")
SUMMARY = re.compile(r"^indexed: (\d+) embedded, (\d+) relinked without model work, (\d+) unchanged, "
                     r"(\d+) cop(?:y|ies), (\d+) removed, (\d+) skipped$", re.M)


# --- helpers ------------------------------------------------------------------------------------------


def run_cli(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return warm.run([str(CLI), *map(str, args)], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_parallel(commands: dict[str, tuple[list[object], Path]], timeout: float = 180) -> dict[str, subprocess.CompletedProcess[str]]:
    """Independent CLI runs at once (each is mostly a torch import): name -> (args, cwd)."""
    procs = {
        name: (warm.popen([str(CLI), *map(str, args)], cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True), args)
        for name, (args, cwd) in commands.items()
    }
    out = {}
    for name, (proc, args) in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        out[name] = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    return out


def summary_counts(stdout: str) -> dict[str, int]:
    match = SUMMARY.search(stdout)
    assert match, f"no index summary in its output:\n{stdout}"
    keys = ("embedded", "relinked", "unchanged", "copies", "removed", "skipped")
    return dict(zip(keys, map(int, match.groups())))


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


# What the CLI stories compare between runs: ids and timestamps show whether a row was rewritten.
CLI_ROW_COLUMNS = ("id", "created_at", "updated_at", "file_path", "file_name", "file_hash", "processed_path",
                   "source_size", "source_mtime_ns", "model_name", "vector_dims(embedding)")


def table_rows(config_path: Path) -> list[dict[str, object]] | None:
    """Every row of image_embeddings (sorted by path), read through the same embedded server the CLI
    uses; None when the table does not exist. Must not run while a CLI process holds the server."""
    return stopped_server_rows(config_path, CLI_ROW_COLUMNS)


def bundle_files(bundle: Path) -> set[str]:
    return {p.name for p in bundle.iterdir()}


def all_output_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


# --- the indexed tree story ---------------------------------------------------------------------------


GOOD = ["a.png", "b.jpg", "c.webp", "sub/d.png", "apple.png", "apple.webp", "e.bmp"]
BAD = {"zero.png": "empty file", "truncated.png": "truncated", "notimage.jpg": "not a supported image"}


@dataclass
class Story:
    root: Path
    config: Path
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    rows: dict[str, list[dict[str, object]] | None] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)


def _interactive_sigterm(story: Story, query: Path) -> None:
    """``image-search --env C`` with stdin a pipe kept open: one search at the prompt, then SIGTERM."""
    proc = warm.popen([str(CLI), "--env", str(story.config)], cwd=story.root, env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: dict[str, bytearray] = {"out": bytearray(), "err": bytearray()}

    def pump(stream, key: str) -> None:
        while data := stream.read1(4096):
            chunks[key].extend(data)

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()

    def wait_for_prompts(n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while chunks["out"].count(b"query> ") < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no prompt #{n} (rc={proc.poll()}):\n{chunks['out'].decode()}\n{chunks['err'].decode()}")
            time.sleep(0.05)

    try:
        wait_for_prompts(1)
        proc.stdin.write(f"{query}\n".encode())
        proc.stdin.flush()
        wait_for_prompts(2)
        proc.send_signal(signal.SIGTERM)  # stdin stays open: the prompt is blocked in input()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(timeout=10)
    proc.stdin.close()
    story.runs["interactive"] = subprocess.CompletedProcess(proc.args, rc, chunks["out"].decode(), chunks["err"].decode())


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Story:
    root = tmp_path_factory.mktemp("indexed")
    config = write_config(root, tiny_model_dir, postgres_password=PASSWORD, top_k=TOP_K)
    s = Story(root, config)
    images = root / "images"
    for seed, name in enumerate(GOOD):
        save_picture(images / name, seed=100 + seed, size=(96 + 8 * seed, 72))
    (images / "zero.png").write_bytes(b"")
    whole = save_picture(root / "whole.png", seed=999).read_bytes()
    (images / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (images / "notimage.jpg").write_text("this is not a picture\n")
    queries = root / "queries"
    queries.mkdir()
    shutil.copyfile(images / "a.png", queries / "q.png")
    (queries / "broken.png").write_text("not a png either\n")

    s.runs["first"] = run_cli("index", "--config", config, "--no-cleanup", cwd=root)
    s.rows["first"] = table_rows(config)
    s.runs["rerun"] = run_cli("index", "--config", config, "--no-cleanup", cwd=root)
    s.rows["rerun"] = table_rows(config)

    # b.jpg: same bytes, new mtime. c.webp: new content.
    st = (images / "b.jpg").stat()
    os.utime(images / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    save_picture(images / "c.webp", seed=4242, size=(110, 72))
    s.runs["changed"] = run_cli("index", "--config", config, "--no-cleanup", cwd=root)
    s.rows["changed"] = table_rows(config)

    s.runs["search"] = run_cli("search", "--config", config, "--no-cleanup", queries / "q.png", cwd=root)
    s.rows["search"] = table_rows(config)
    s.runs["bad_query"] = run_cli("search", "--config", config, "--no-cleanup", queries / "broken.png",
                                  queries / "missing.png", queries, cwd=root)
    s.notes["bundles_after_bad_query"] = [p.name for p in written_into(root / "output")]
    s.runs["text"] = run_cli("search", "--config", config, "--no-cleanup", "--text", "a red bicycle",
                             "--text", "赤い自転車", "--text", "   ", cwd=root)

    # The original interface, default cleanup: the table is emptied at exit.
    s.runs["process_only"] = run_cli("--env", config, "--process-only", cwd=root)
    s.rows["process_only"] = table_rows(config)

    _interactive_sigterm(s, queries / "q.png")
    s.rows["interactive"] = table_rows(config)
    return s


def test_first_index_embeds_good_files_and_lists_each_skipped(story: Story) -> None:
    run = story.runs["first"]
    assert run.returncode == 0, run.stderr
    assert_no_traceback(run)
    counts = summary_counts(run.stdout)
    assert counts["embedded"] == len(GOOD)
    assert counts["skipped"] == len(BAD)
    images = story.root / "images"
    for name, reason in BAD.items():
        lines = [line for line in run.stdout.splitlines() if line.strip().startswith(f"skipped {images / name}:")]
        assert len(lines) == 1, run.stdout
        assert reason in lines[0].lower(), lines[0]
    rows = story.rows["first"]
    assert rows is not None
    assert sorted(r["file_path"] for r in rows) == sorted(str(images / n) for n in GOOD)
    assert all(r["vector_dims"] == TINY_DIMENSION for r in rows)
    assert len({r["file_hash"] for r in rows}) == len(GOOD)


def test_name_collision_keeps_both_processed_files(story: Story) -> None:
    rows = {r["file_name"]: r for r in story.rows["first"] if r["file_name"].startswith("apple.")}
    assert set(rows) == {"apple.png", "apple.webp"}
    png, webp = Path(rows["apple.png"]["processed_path"]), Path(rows["apple.webp"]["processed_path"])
    assert png != webp
    assert png.is_file() and webp.is_file()
    assert png.read_bytes() != webp.read_bytes()
    assert rows["apple.png"]["file_hash"] != rows["apple.webp"]["file_hash"]
    processed = story.root / "processed"
    assert png.is_relative_to(processed) and webp.is_relative_to(processed)
    # Sub-folders are mirrored.
    d = next(r for r in story.rows["first"] if r["file_name"] == "d.png")
    assert Path(d["processed_path"]).parent == processed / "sub"


def test_rerun_on_unchanged_folder_does_no_work(story: Story) -> None:
    run = story.runs["rerun"]
    assert run.returncode == 0, run.stderr
    counts = summary_counts(run.stdout)
    assert counts["embedded"] == 0
    assert counts["relinked"] == 0
    assert counts["unchanged"] == len(GOOD)
    assert counts["removed"] == 0
    assert story.rows["rerun"] == story.rows["first"]  # same ids, same updated_at: nothing written


def test_touch_relinks_and_changed_content_reembeds(story: Story) -> None:
    run = story.runs["changed"]
    assert run.returncode == 0, run.stderr
    counts = summary_counts(run.stdout)
    assert counts["embedded"] == 1, run.stdout  # c.webp only
    assert counts["relinked"] == 1, run.stdout  # b.jpg: touched, same content, no model work
    assert counts["unchanged"] == len(GOOD) - 2
    before = {r["file_name"]: r for r in story.rows["rerun"]}
    after_rows = story.rows["changed"]
    assert len(after_rows) == len(GOOD)
    assert len({r["file_path"] for r in after_rows}) == len(after_rows)  # one row per path
    after = {r["file_name"]: r for r in after_rows}
    # touched: same row and embedding identity, new mtime recorded
    assert after["b.jpg"]["id"] == before["b.jpg"]["id"]
    assert after["b.jpg"]["file_hash"] == before["b.jpg"]["file_hash"]
    assert after["b.jpg"]["source_mtime_ns"] == before["b.jpg"]["source_mtime_ns"] + 5_000_000_000
    # changed: new hash, the old one is gone
    assert after["c.webp"]["file_hash"] != before["c.webp"]["file_hash"]
    assert before["c.webp"]["file_hash"] not in {r["file_hash"] for r in after_rows}
    # everything else untouched
    for name in set(before) - {"b.jpg", "c.webp"}:
        assert after[name] == before[name], name


def test_search_exact_copy_ranks_first_and_bundle_layout(story: Story) -> None:
    run = story.runs["search"]
    assert run.returncode == 0, run.stderr
    assert_no_traceback(run)
    assert summary_counts(run.stderr)["embedded"] == 0  # what indexing did goes with the log
    printed = run.stdout.splitlines()
    assert len(printed) == 1, run.stdout  # stdout holds the result folder only: `search ... | head -1`
    bundle = Path(printed[0])
    output = story.root / "output"
    assert bundle.parent == output
    assert BUNDLE_NAME.match(bundle.name), bundle.name
    assert bundle_files(bundle) == {"q.json", "q.jpg", "q.jsonl", "q.sheet.jpg"}

    hits = read_jsonl(bundle / "q.jsonl")
    assert len(hits) == TOP_K
    assert all(set(h) == JSONL_KEYS for h in hits)
    assert [h["rank"] for h in hits] == list(range(1, TOP_K + 1))
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)
    best = hits[0]
    images = story.root / "images"
    assert best["file_path"] == str(images / "a.png")
    assert best["file_name"] == "a.png"
    assert best["similarity"] >= 0.999
    row = next(r for r in story.rows["search"] if r["file_path"] == str(images / "a.png"))
    assert best["file_hash"] == row["file_hash"]
    assert best["processed_path"] == row["processed_path"]
    assert best["format"] == "png" and best["width"] > 0 and best["height"] > 0  # the original's metadata
    assert (bundle / "q.jpg").read_bytes() == Path(row["processed_path"]).read_bytes()
    for h in hits:
        assert Path(h["processed_path"]).is_file()
        assert Path(h["file_path"]).is_file()

    effective = json.loads((bundle / "q.json").read_text())
    assert effective["postgres-password"] == "***"
    assert effective["top-k"] == TOP_K
    assert effective["source-directory"] == str(images)
    assert effective["model-name"] == str(load_config(story.config).model_name)
    # no half-built folder left behind
    assert not [p for p in written_into(output) if p.name.startswith(".")]


def test_password_appears_in_no_output_and_no_log(story: Story) -> None:
    assert PASSWORD in story.config.read_text()  # the fixture really set it
    assert PASSWORD not in all_output_text(story.root / "output")
    for name, run in story.runs.items():
        assert PASSWORD not in run.stderr, name
        assert PASSWORD not in run.stdout, name


def test_bad_query_file_is_a_clear_error(story: Story) -> None:
    run = story.runs["bad_query"]
    assert run.returncode != 0
    assert_no_traceback(run)
    queries = story.root / "queries"
    for name in ("broken.png", "missing.png"):
        lines = [line for line in run.stderr.splitlines() if str(queries / name) in line and "failed" in line]
        assert lines, run.stderr
    broken = next(line for line in run.stderr.splitlines() if line.startswith(f"failed {queries / 'broken.png'}"))
    assert "not a supported image" in broken
    missing = [line for line in run.stderr.splitlines() if line.startswith(f"failed {queries / 'missing.png'}")]
    assert len(missing) == 1 and "no such file" in missing[0].lower(), missing  # said once, before the index run
    assert f"failed {queries}: is a folder" in run.stderr
    # no bundle for a failed query: only the one good search's folder exists
    assert len(story.notes["bundles_after_bad_query"]) == 1


def test_text_queries_each_get_a_result_folder_and_an_empty_one_fails(story: Story) -> None:
    run = story.runs["text"]
    assert run.returncode == 1, run.stderr  # the blank --text failed; the other two were answered
    assert_no_traceback(run)
    bundles = [Path(line) for line in run.stdout.splitlines() if "/output/" in line]
    assert len(bundles) == 2, run.stdout
    for bundle, stem, words in zip(bundles, ("a-red-bicycle", "赤い自転車"), ("a red bicycle", "赤い自転車")):
        assert {f"{stem}.json", f"{stem}.jsonl", f"{stem}.jpg", f"{stem}.sheet.jpg", f"{stem}.query.txt"} <= {
            p.name for p in bundle.iterdir()}
        assert json.loads((bundle / f"{stem}.json").read_text(encoding="utf-8"))["query-text"] == words
        assert len(read_jsonl(bundle / f"{stem}.jsonl")) == TOP_K
    assert "failed --text: the text query is empty" in run.stderr


def test_legacy_process_only_cleans_up_at_exit(story: Story) -> None:
    run = story.runs["process_only"]
    assert run.returncode == 0, run.stderr
    assert_no_traceback(run)
    assert summary_counts(run.stdout)["unchanged"] == len(GOOD)
    assert "table_emptied" in run.stderr
    assert story.rows["process_only"] == []
    # the processed images stay (only the table is emptied)
    assert all(Path(r["processed_path"]).is_file() for r in story.rows["changed"])


def test_interactive_prompt_search_then_sigterm_empties_table(story: Story) -> None:
    run = story.runs["interactive"]
    assert run.returncode != 0  # killed by a signal: 128 + SIGTERM
    assert run.returncode in (128 + signal.SIGTERM, -signal.SIGTERM)
    assert_no_traceback(run)
    # the table was full again during the prompt (re-indexed after the last cleanup)...
    assert summary_counts(run.stdout)["embedded"] == len(GOOD)
    bundles = [line.removeprefix("query> ") for line in run.stdout.splitlines() if "/output/" in line]
    assert len(bundles) == 1, run.stdout
    hits = read_jsonl(Path(bundles[0]) / "q.jsonl")
    assert hits[0]["file_name"] == "a.png" and hits[0]["similarity"] >= 0.999
    # ...and SIGTERM unwound through the cleanup
    assert "table_emptied" in run.stderr
    assert story.rows["interactive"] == []


# --- cleanup-on-exit false, the legacy --search flag, a table of another dimension --------------------


def test_cleanup_on_exit_false_legacy_search_and_dimension_mismatch(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, cleanup_on_exit=False)
    save_picture(tmp_path / "images" / "one.png", seed=1)
    save_picture(tmp_path / "images" / "two.jpg", seed=2)
    shutil.copyfile(tmp_path / "images" / "two.jpg", tmp_path / "query.jpg")

    run = run_cli("--env", config, "--search", tmp_path / "query.jpg", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert_no_traceback(run)
    assert summary_counts(run.stderr)["embedded"] == 2
    [bundle] = map(Path, run.stdout.splitlines())  # stdout: the result folder alone
    assert bundle_files(bundle) == {"query.json", "query.jpg", "query.jsonl", "query.sheet.jpg"}
    hits = read_jsonl(bundle / "query.jsonl")
    assert [h["file_name"] for h in hits][0] == "two.jpg" and hits[0]["similarity"] >= 0.999
    assert len(hits) == 2
    assert "table_emptied" not in run.stderr
    rows = table_rows(config)
    assert rows is not None and len(rows) == 2

    # Same state-directory, a model of projection 16: a clear error, and the table is kept as it was.
    model16 = save_tiny_clip(tmp_path / "clip16", projection_dim=16)
    config16 = write_config(tmp_path, model16, cleanup_on_exit=False, dimension=16)
    run16 = run_cli("index", "--config", config16, "--no-cleanup", cwd=tmp_path)
    assert run16.returncode != 0
    assert_no_traceback(run16)
    errors = [line for line in run16.stderr.splitlines() if "level='error'" in line]
    assert len(errors) == 1, run16.stderr
    assert "'dimension'" in errors[0] and "32" in errors[0] and "16" in errors[0]
    assert "Nothing was dropped" in errors[0]
    assert table_rows(config) == rows


# --- startup errors -----------------------------------------------------------------------------------


def test_startup_errors_are_one_clear_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    trees = {name: tmp_path / name for name in ("unknown", "nodir", "hub", "dimension")}
    configs = {
        "unknown": write_config(trees["unknown"], tiny_model_dir, colour_depth=8),
        "nodir": write_config(trees["nodir"], tmp_path / "no-such-model"),
        "hub": write_config(trees["hub"], None, model_name="example-org/no-such-clip-model"),
        "dimension": write_config(trees["dimension"], tiny_model_dir, dimension=64),
    }
    runs = run_parallel({name: (["index", "--config", cfg, "--no-cleanup"], trees[name]) for name, cfg in configs.items()})
    for name, run in runs.items():
        assert run.returncode != 0, name
        assert_no_traceback(run)
        assert run.stdout == "", (name, run.stdout)

    unknown = runs["unknown"]
    assert unknown.returncode == 2
    lines = [line for line in unknown.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, unknown.stderr
    assert "'colour-depth'" in lines[0]

    for name, model in (("nodir", str(tmp_path / "no-such-model")), ("hub", "example-org/no-such-clip-model")):
        errors = [line for line in runs[name].stderr.splitlines() if "level='error'" in line]
        assert len(errors) == 1, runs[name].stderr
        assert model in errors[0], errors[0]
        assert runs[name].returncode == 3  # ExitCode.MODEL
    assert "does not exist" in runs["nodir"].stderr
    assert "HF_HUB_OFFLINE" in runs["hub"].stderr and "'model-name'" in runs["hub"].stderr

    errors = [line for line in runs["dimension"].stderr.splitlines() if "level='error'" in line]
    assert len(errors) == 1, runs["dimension"].stderr
    assert "'dimension'" in errors[0] and "64" in errors[0] and str(TINY_DIMENSION) in errors[0]
    # a model/dimension error happens before any database exists
    assert table_rows(configs["dimension"]) is None


def test_serve_over_an_unmounted_source_or_processed_folder_fails_its_start_and_keeps_the_index(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The restart after ``watch_lost`` (a disk unmounted, a share gone): one line naming the folder, exit
    code 8 for systemd to try again, no folder created, every row and processed copy kept. So for the
    processed folder's disk."""
    config = write_config(tmp_path, tiny_model_dir, cleanup_on_exit=False)
    for name, seed in (("a.png", 1), ("sub/b.png", 2)):
        save_picture(tmp_path / "images" / name, seed=seed)
    assert run_cli("index", "--config", config, cwd=tmp_path).returncode == 0
    rows = table_rows(config)
    processed = sorted(p for p in (tmp_path / "processed").rglob("*") if p.is_file())
    (tmp_path / "images").rename(tmp_path / "images-aside")
    run = run_cli("serve", "--config", config, cwd=tmp_path, timeout=60)  # without the check it would serve on
    assert run.returncode == 8, run.stderr
    assert_no_traceback(run)
    errors = [line for line in run.stderr.splitlines() if "level='error'" in line]
    assert len(errors) == 1 and "source_missing" in errors[0] and str(tmp_path / "images") in errors[0], run.stderr
    assert not (tmp_path / "images").exists()
    assert table_rows(config) == rows
    assert sorted(p for p in (tmp_path / "processed").rglob("*") if p.is_file()) == processed

    (tmp_path / "images-aside").rename(tmp_path / "images")
    (tmp_path / "processed").rename(tmp_path / "processed-disk")  # gone with its disk, not even a mount point
    run = run_cli("serve", "--config", config, cwd=tmp_path, timeout=60)
    assert run.returncode == 8, run.stderr
    assert_no_traceback(run)
    errors = [line for line in run.stderr.splitlines() if "level='error'" in line]
    assert len(errors) == 1 and "processed_missing" in errors[0], run.stderr
    assert f"processed-directory {tmp_path / 'processed'} does not exist" in errors[0], run.stderr
    assert not (tmp_path / "processed").exists()  # not made on the disk under it
    assert table_rows(config) == rows


def test_another_source_folder_over_the_same_processed_folder_is_refused(tmp_path: Path,
                                                                         tiny_model_dir: Path) -> None:
    """source-directory pointed at another folder, processed-directory and the index kept: its a.png would
    overwrite the first folder's processed a.png.jpg, and the first's row would show the wrong picture. One
    config_error line, exit code 2, nothing written; a processed folder of an earlier version (no record of
    its source) adopts the source it is started with, and the same source starts as before."""
    config = write_config(tmp_path, tiny_model_dir, cleanup_on_exit=False)
    save_picture(tmp_path / "images" / "a.png", seed=1)
    assert run_cli("index", "--config", config, cwd=tmp_path).returncode == 0
    (tmp_path / "processed" / ".source-directory").unlink(missing_ok=True)  # as an earlier version left it
    assert run_cli("index", "--config", config, cwd=tmp_path).returncode == 0  # adopts its source
    rows = table_rows(config)
    processed = {p: p.read_bytes() for p in (tmp_path / "processed").rglob("*") if p.is_file()}
    save_picture(tmp_path / "other" / "a.png", seed=2)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(config.read_text()), "source-directory": str(tmp_path / "other")}))
    run = run_cli("index", "--config", other, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert_no_traceback(run)
    errors = [line for line in run.stderr.splitlines() if "level='error'" in line]
    assert len(errors) == 1 and "config_error" in errors[0], run.stderr
    assert f"holds the processed copies of source-directory {tmp_path / 'images'}, not of {tmp_path / 'other'}" \
        in errors[0]
    assert {p: p.read_bytes() for p in (tmp_path / "processed").rglob("*") if p.is_file()} == processed
    assert table_rows(config) == rows
    assert run_cli("index", "--config", config, cwd=tmp_path).returncode == 0


# --- an empty index -----------------------------------------------------------------------------------


def test_search_on_empty_index(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    query = save_picture(tmp_path / "q.png", seed=5)
    run = run_cli("search", "--config", config, query, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert_no_traceback(run)
    assert summary_counts(run.stderr)["embedded"] == 0
    [bundle] = map(Path, run.stdout.splitlines())  # stdout: the result folder alone
    assert bundle.parent == tmp_path / "output"
    assert bundle_files(bundle) == {"q.json", "q.jsonl", "q.sheet.jpg"}
    assert (bundle / "q.jsonl").read_text() == ""
    assert "index holds no images" in run.stderr


def test_search_flags_and_a_query_document(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, top_k=TOP_K)
    for name, seed in (("2023/a.png", 1), ("2023/june/b.png", 2), ("2023-old/c.png", 3), ("d.png", 4)):
        save_picture(tmp_path / "images" / name, seed=seed)
    bad = run_cli("search", "--config", config, "--text", "a photo", "--top-k", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "--top-k" in bad.stderr, bad.stderr
    assert "indexed:" not in bad.stdout  # refused before the index is brought up to date
    assert_no_traceback(bad)
    flagged = run_cli("search", "--config", config, "--text", "a photo", "--unlike", "people", "--folder", "2023",
                      "--top-k", "5", cwd=tmp_path)
    assert flagged.returncode == 0, flagged.stderr
    bundle = Path(flagged.stdout.strip().splitlines()[-1])
    hits = read_jsonl(bundle / "a-photo.jsonl")
    assert sorted(Path(h["file_path"]).relative_to(tmp_path / "images").as_posix() for h in hits) == [
        "2023/a.png", "2023/june/b.png"]
    record = json.loads((bundle / "a-photo.json").read_text())
    assert record["query"] == {"--unlike": ["people"], "--folder": ["2023"], "--top-k": "5"}
    assert record["complete"] is True and [t["unlike"] for t in record["understood"]["terms"]] == [False, True]
    document = tmp_path / "doc.json"
    document.write_text(json.dumps({"image": "d.png", "format": "png", "top-k": 1}))
    both = run_cli("search", "--config", config, "--query", document, "--folder", "2023", cwd=tmp_path)
    assert both.returncode == 2 and "carries its own filters" in both.stderr, both.stderr  # never silently ignored
    (tmp_path / "doc").mkdir()  # its pictures' folder beside it, read wherever a document named here is
    shutil.copyfile(tmp_path / "images" / "d.png", tmp_path / "doc" / "like-d.png")
    document.write_text(json.dumps({"image": ["like-d.png", "2023/a.png"], "format": "png", "top-k": 1,
                                    "unlike-text": "people"}))
    asked = run_cli("search", "--config", config, "--query", document, cwd=tmp_path)
    assert asked.returncode == 0, asked.stderr
    bundle = Path(asked.stdout.strip().splitlines()[-1])
    assert len(read_jsonl(bundle / "doc.jsonl")) == 1
    assert document.is_file()  # a document named on the command line stays where it is


def test_duplicates_reports_copies_and_refuses_a_folder_that_names_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    original = save_picture(tmp_path / "images" / "2023" / "a.png", seed=1)
    shutil.copyfile(original, tmp_path / "images" / "2023" / "a copy.png")
    save_picture(tmp_path / "images" / "b.png", seed=2)
    for flags, reason in ((["--folder", "1999"], "names no folder"), (["--kind", "twins"], "--kind")):
        refused = run_cli("duplicates", "--config", config, *flags, cwd=tmp_path)
        assert refused.returncode == 2 and reason in refused.stderr, refused.stderr
        assert_no_traceback(refused)
    run = run_cli("duplicates", "--config", config, "--folder", "2023", "--kind", "copy", "--kind", "near-copy",
                  cwd=tmp_path)  # repeated, as --folder is: both kinds asked (the last alone was kept)
    assert run.returncode == 0, run.stderr
    report = Path(run.stdout.strip().splitlines()[-1])
    assert json.loads((report / "summary.json").read_text())["kinds"] == ["copy", "near-copy"]
    (group,) = read_jsonl(report / "duplicates.jsonl")
    assert group["kind"] == "copy"
    paths = {group["keep"]} | {p for m in group["members"] for p in (m["file_path"], *m["copies"])}
    assert {str(original), str(tmp_path / "images" / "2023" / "a copy.png")} <= paths
    assert json.loads((report / "summary.json").read_text())["folder"] == "2023"
    assert (tmp_path / "images" / "2023" / "a copy.png").is_file()


# --- the bundle writer directly ----------------------------------------------------------------------


def test_same_second_bundles_get_distinct_folders(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, tmp_path / "model", postgres_password=PASSWORD))
    processed = save_picture(tmp_path / "processed" / "x.png.jpg", seed=3, fmt="JPEG")
    hits = [Hit(rank=1, similarity=0.987654321, file_name="x.png", file_path=str(tmp_path / "images" / "x.png"),
                processed_path=str(processed), file_hash="abc")]
    now = datetime(2024, 1, 2, 3, 4, 5)
    query = tmp_path / "query.png"
    folders = [write_result_bundle(cfg.output_directory, query, hits, cfg, now=now) for _ in range(3)]
    assert [f.name for f in folders] == ["20240102-030405", "20240102-030405-2", "20240102-030405-3"]
    assert [p.name for p in written_into(cfg.output_directory)] == [f.name for f in folders]  # no temp left
    for folder in folders:
        assert bundle_files(folder) == {"query.json", "query.jpg", "query.jsonl", "query.sheet.jpg"}
        assert (folder / "query.jpg").read_bytes() == processed.read_bytes()
        (record,) = read_jsonl(folder / "query.jsonl")
        assert set(record) == JSONL_KEYS
        assert record["similarity"] == pytest.approx(0.987654, abs=1e-6)
        assert json.loads((folder / "query.json").read_text())["postgres-password"] == "***"
        assert PASSWORD not in all_output_text(folder)
    # an empty ranking: empty jsonl, no jpg
    empty = write_result_bundle(cfg.output_directory, query, [], cfg, now=now)
    assert empty.name == "20240102-030405-4"
    assert bundle_files(empty) == {"query.json", "query.jsonl", "query.sheet.jpg"}
    assert (empty / "query.jsonl").read_text() == ""
