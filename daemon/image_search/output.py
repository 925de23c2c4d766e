"""Output: the result bundle of one search, written so it appears complete or not at all.

``output-directory/yyyymmdd-hhmmss[-N]/`` holds ``<query>.json`` (the effective config, password
redacted), ``<query>.jpg`` (the best match's processed image) and ``<query>.jsonl`` (one line per hit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import structlog

from .config import Config
from .store import Hit

log = structlog.get_logger(__name__)

SIMILARITY_DECIMALS = 6


def hit_record(hit: Hit) -> dict[str, object]:
    return {
        "rank": hit.rank,
        "similarity": round(hit.similarity, SIMILARITY_DECIMALS),
        "file_name": hit.file_name,
        "file_path": hit.file_path,
        "processed_path": hit.processed_path,
        "file_hash": hit.file_hash,
    }


def _move_out(source: Path, target: Path) -> None:
    """Move a file, by hard link and unlink where possible: a rename out of a watched folder makes
    watchdog hold back every later event of that folder for half a second, waiting for a pair."""
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or no hard links there
        shutil.move(source, target)
        return
    os.unlink(source)


def _claim_folder_name(output_dir: Path, stamp: str) -> Path:
    """The first of ``stamp``, ``stamp-2``, ``stamp-3``... that does not exist yet."""
    candidate = output_dir / stamp
    n = 2
    while candidate.exists():
        candidate = output_dir / f"{stamp}-{n}"
        n += 1
    return candidate


def write_result_bundle(output_dir: Path, query_path: Path, hits: Sequence[Hit], cfg: Config,
                        *, now: datetime | None = None, move_query: bool = False) -> Path:
    """Write the bundle for one query; return its folder. Built under a hidden temp name, then renamed.

    With ``move_query`` the query file itself moves into the bundle as ``<query>.query.<ext>`` (the
    service's inbox empties itself); if the bundle cannot be completed it is moved back.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = query_path.stem or query_path.name
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".tmp-result-"))
    moved_query: Path | None = None
    try:
        with open(tmp / f"{stem}.json", "w", encoding="utf-8") as fh:
            json.dump(cfg.to_json_dict(redact=True), fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        with open(tmp / f"{stem}.jsonl", "w", encoding="utf-8") as fh:
            for hit in hits:
                fh.write(json.dumps(hit_record(hit), ensure_ascii=False) + "\n")
        if hits:
            best = Path(hits[0].processed_path)
            try:
                shutil.copyfile(best, tmp / f"{stem}.jpg")
            except OSError as exc:
                log.warning("best_match_image_missing", path=str(best), reason=exc.strerror or str(exc))
        if move_query:
            moved_query = tmp / f"{stem}.query{query_path.suffix}"
            _move_out(query_path, moved_query)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a result is for the user to read
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        while True:
            final = _claim_folder_name(output_dir, stamp)
            try:
                # rename() onto an existing *empty* folder would replace it: mkdir first fails loudly instead.
                os.mkdir(final)
            except FileExistsError:
                continue
            os.rename(tmp, final)
            return final
    except BaseException:
        if moved_query is not None and moved_query.exists():
            shutil.move(moved_query, query_path)  # never lose what the user dropped
        shutil.rmtree(tmp, ignore_errors=True)
        raise
