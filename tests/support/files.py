"""Files the tests make and read: pictures, config files, result bundles, the inbox."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from image_search.output import OUTPUT_MARKER
from tests.support import pgdata
from tests.support.model import TINY_DIMENSION

TREE_FOLDERS = ("images", "inbox", "output", "processed", "state")


def save_picture(path: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str | None = None) -> Path:
    """A distinct picture per seed: blocks of random colours (not noise, so JPEG keeps it recognisable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def save_photo(path: Path, seed: int, *, taken: str | None = None, offset: str | None = None,
               camera: tuple[str, str] | None = None, size: tuple[int, int] = (96, 72)) -> Path:
    """``save_picture`` as a JPEG with EXIF: the date taken (``"2023:06:01 12:00:00"``), its offset
    (``"+02:00"``), the camera's make and model."""
    from PIL import ExifTags, Image

    save_picture(path, seed, size, fmt="JPEG")
    exif = Image.Exif()
    if camera is not None:
        exif[0x010F], exif[0x0110] = camera
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    if taken is not None:
        sub[0x9003] = taken
    if offset is not None:
        sub[0x9011] = offset
    with Image.open(path) as im:
        im.load()
    im.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


@contextmanager
def immutable(*entries: Path) -> Iterator[None]:
    """``entries`` (folders, files) refuse every write, root's too (``chattr +i``: EPERM), as a folder another
    user made refuses this one's (EACCES); as they were after."""
    subprocess.run(["chattr", "+i", *map(str, entries)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, entries)], check=True)


def emptied_on_purpose(processed: Path) -> Path:
    """``processed`` (made if missing) holding an empty record of its source folder, as a user leaves a processed
    folder emptied to have every copy made again (README): otherwise a folder claimed before, found without its
    record, is taken for its disk unmounted, and no copy is written there."""
    from image_search.preprocess import SOURCE_MARKER

    processed.mkdir(parents=True, exist_ok=True)
    (processed / SOURCE_MARKER).touch()
    return processed


def claimed_folders(source: Path, processed: Path):
    """The workers' ``ProcessedFolders`` for ``source`` and ``processed``, the latter ``emptied_on_purpose``."""
    from image_search.workers import ProcessedFolders

    return ProcessedFolders(source, emptied_on_purpose(processed))


def write_config(root: Path, model_dir: Path | None = None, *, fresh_pgdata: bool = False, **overrides: object) -> Path:
    """A config for a tree under ``root`` (images/, inbox/, output/, processed/, state/); keys as in JSON.
    A tree on the embedded PostgreSQL gets the session's initialised pgdata (tests/support/pgdata.py)
    unless ``fresh_pgdata``: its first start then runs initdb, as a user's very first start does."""
    for name in TREE_FOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
    if not fresh_pgdata and "postgres_host" not in overrides:
        pgdata.seed(root / "state")
    cfg: dict[str, object] = {
        "source-directory": str(root / "images"),
        "inbox-directory": str(root / "inbox"),
        "output-directory": str(root / "output"),
        "processed-directory": str(root / "processed"),
        "state-directory": str(root / "state"),
        "device": "cpu",
        "dimension": TINY_DIMENSION,
        "resize-width": 256,
        "resize-height": 256,
        "batch-size": 8,
        "settle-seconds": 0.3,
    }
    if model_dir is not None:
        cfg["model-name"] = str(model_dir)
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items()})
    path = root / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def written_into(output: Path) -> list[Path]:
    """What runs wrote into ``output``, sorted: result and report folders, and whatever a failed one left
    behind; not the folder's own marker (``OUTPUT_MARKER``, written with its first result)."""
    return sorted(p for p in output.iterdir() if p.name != OUTPUT_MARKER) if output.is_dir() else []


def find_bundle(output: Path, query_name: str) -> Path | None:
    """The result folder holding ``<stem>.query.<ext>`` for the query ``query_name``."""
    stem, ext = os.path.splitext(query_name)
    for bundle in output.iterdir() if output.is_dir() else ():
        if bundle.is_dir() and not bundle.name.startswith(".") and (bundle / f"{stem}.query{ext}").is_file():
            return bundle
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def inbox_files(inbox: Path) -> list[str]:
    """The names of the files waiting in ``inbox`` (not inbox/failed/)."""
    return sorted(p.name for p in inbox.iterdir() if p.is_file())


def display_p3_profile() -> bytes:
    """An ICC profile of Display P3 (an iPhone's photos): P3's primaries adapted to D50, sRGB's tone curve,
    as a matrix-shaper v2 profile; LittleCMS reads it as Apple's own."""
    import struct

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (i / 1023 for i in range(1024))]
    curve = b"curv" + bytes(4) + struct.pack(">I", 1024) + b"".join(struct.pack(">H", round(v * 65535)) for v in linear)
    name = b"Display P3\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(8) + bytes(3) + bytes(67)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
            (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)), (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12)
              + b"acspAPPL" + bytes(24) + s15(0.9642) + s15(1.0) + s15(0.8249) + b"lcms" + bytes(44))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data
