"""A process that dies inside the batched JPEG decoder, as one does when nvJPEG faults on a file (a
signal, no Python exception): the first half of the story the quarantine is for.

``python -m tests.support.gpu_crash [--device cuda] STATE_DIR FILE...`` opens the batched reader (on
torchvision's CPU decoder unless ``--device`` says otherwise; chunks of two files) with STATE_DIR as its state directory and decodes the files; the decode
of any chunk holding a file with CRASH_MARKER in its bytes kills the process with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CRASH_MARKER = b"this file kills the GPU decoder"
CHUNK = 2


def main(state_directory: Path, paths: list[Path], device: str = "cpu") -> None:
    from image_search import gpudecode
    from image_search.pixels import PixelSpec
    from image_search.workers import PreprocessPool

    real_decode = gpudecode.decode_jpeg

    def decode_or_die(encoded, **options):
        if any(CRASH_MARKER in bytes(t.numpy()) for t in encoded):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_decode(encoded, **options)

    gpudecode.decode_jpeg = decode_or_die
    gpudecode.DECODE_CHUNK = CHUNK
    spec = PixelSpec.from_processor_config({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
                                            "crop_size": {"height": 224, "width": 224}})
    with PreprocessPool(max_size=(512, 512), max_pixels=178_956_970, workers=0) as pool:
        reader = gpudecode.open_gpu_reader(pool, device, spec=spec, threads=1, state_directory=state_directory)
        assert reader is not None
        reader.submit(paths).results()
        reader.close()


@dataclass
class Restart:
    """What the indexer's run after the crash did: the rows' names, its summary, the files decoded by the
    batched decoder, and its log."""

    names: list[str]
    summary: Any
    on_device: int
    logs: list[dict[str, Any]]


def crash_then_restart(cfg: Any, embedder: Any, device: str, *, timeout: float = 120) -> tuple[list[Path], Restart]:
    """The whole story on ``device``: six JPEGs (the third marked), a child that decodes them in chunks of
    two and dies in the marked chunk, then the indexer over the same state directory and the real
    embedded PostgreSQL. Returns the files and what the restart did."""
    import subprocess

    from structlog.testing import capture_logs

    from image_search.gpudecode import IN_FLIGHT_PREFIX
    from image_search.indexer import Indexer
    from image_search.store import Database
    from tests.support.db import database_rows
    from tests.support.jpegs import save_jpeg

    paths = [save_jpeg(cfg.source_directory / f"p{i}.jpg", size=(400, 300), seed=i,
                       **({"comment": CRASH_MARKER} if i == 2 else {})) for i in range(6)]
    child = subprocess.run([sys.executable, "-m", "tests.support.gpu_crash", "--device", device,
                            str(cfg.state_directory), *map(str, paths)],
                           cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=timeout)
    assert child.returncode == -signal.SIGKILL, child.stdout[-2000:] + child.stderr[-2000:]
    left = sorted(cfg.state_directory.glob(f"{IN_FLIGHT_PREFIX}.*"))
    in_flight = [line.split("\t")[1] for f in left for line in f.read_text().splitlines()]
    assert in_flight == [str(paths[2]), str(paths[3])], in_flight  # chunks of two: p2 and p3 were being decoded

    database = Database(cfg)
    try:
        store = database.open_store(dimension=embedder.dimension)
        with capture_logs() as logs:
            indexer = Indexer(cfg, embedder, store, workers=1, jpeg_decode_device=device)
            try:
                summary = indexer.index_folder(show_progress=False)
                on_device = indexer.decoded_on_device
            finally:
                indexer.close()
                store.close()
        names = sorted(r["file_name"] for r in database_rows(database, ("file_name",)) or [])
    finally:
        database.close()
    return paths, Restart(names, summary, on_device, logs)


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = "cpu"
    if args[0] == "--device":
        chosen, args = args[1], args[2:]
    main(Path(args[0]), [Path(p) for p in args[1:]], chosen)
