"""Photo-like scenes and the files a user ends up with: the same picture saved again (near-copies) and
the same scene a moment later (bursts). For the duplicate stories (tests/test_phash.py,
tests/test_duplicates.py) and the duplicates benchmark (tests/benchmarks/duplicates.py).

A scene is smooth colour regions, a sky-like gradient, a few hard-edged shapes, mid-frequency texture
and sensor noise: distinct seeds make distinct pictures with the statistics of photographs (random
noise would make every hash distance look alike, and JPEG meaningless)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ORIENTATION_TAG = 0x0112


def scene(seed: int, size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A distinct photo-like RGB picture for each seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray((rng.random((4, 6, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    mid = Image.fromarray((rng.random((max(2, h // 24), max(2, w // 24), 3)) * 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC)
    im = Image.fromarray(np.clip(np.asarray(low, dtype=np.float32) * 0.8
                                 + np.linspace(50, -20, h, dtype=np.float32)[:, None, None], 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 12, w // 3)), y0 + int(rng.integers(h // 12, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    arr = np.asarray(im, dtype=np.float32) + (np.asarray(mid, dtype=np.float32) - 127.5) * 0.3
    arr += rng.standard_normal((h, w, 3), dtype=np.float32) * 4.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def burst(seed: int, shot: int, size: tuple[int, int] = (800, 600), shift: float = 0.03) -> Image.Image:
    """Shot ``shot`` of a burst of scene ``seed``: the camera moved by a third to all of ``shift`` of the
    width (and up to ``shift`` of the height) against shot 0 (a window of a larger scene), with fresh sensor noise."""
    w, h = size
    margin_x, margin_y = max(1, round(w * shift)), max(1, round(h * shift))
    wide = scene(seed, (w + 2 * margin_x, h + 2 * margin_y))
    rng = np.random.default_rng(seed * 1000 + shot)
    # Shot 0 in the middle; each later one moved by a third to all of ``shift`` (a hand holding a camera).
    dx, dy = margin_x, margin_y
    if shot:
        dx += round(float(rng.choice((-1, 1)) * rng.uniform(1 / 3, 1)) * margin_x)
        dy += round(float(rng.choice((-1, 1)) * rng.uniform(0, 1)) * margin_y)
    arr = np.asarray(wide.crop((dx, dy, dx + w, dy + h)), dtype=np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * 3.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _encoded(im: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _turned_jpeg(im: Image.Image) -> bytes:
    """The picture stored turned (90° clockwise pixels) with orientation 8, which says "turn it back":
    upright, it is the same picture (what a camera writes when held sideways)."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 8
    return _encoded(im.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=90, exif=exif)


def _half(im: Image.Image) -> bytes:
    return _encoded(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS), "JPEG", quality=85)


def _with_exif(im: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    exif[0x0110] = "Camera model"
    return _encoded(im, "JPEG", quality=92, exif=exif)


# How a picture gets saved again: name -> (suffix, bytes of the new file). ``original`` carries EXIF;
# ``stripped`` is the same pixels with none (a new encode: metadata tools often re-encode).
DERIVATIONS: dict[str, tuple[str, Callable[[Image.Image], bytes]]] = {
    "original": (".jpg", _with_exif),
    "stripped": (".jpg", lambda im: _encoded(im, "JPEG", quality=92)),
    "quality50": (".jpg", lambda im: _encoded(im, "JPEG", quality=50)),
    "quality95": (".jpg", lambda im: _encoded(im, "JPEG", quality=95)),
    "half": (".jpg", _half),
    "png": (".png", lambda im: _encoded(im, "PNG")),
    "webp": (".webp", lambda im: _encoded(im, "WEBP", quality=80)),
    # The encoders' fast presets (x265 "ultrafast", libavif speed 8): seconds less per file, same decoders.
    "heic": (".heic", lambda im: _encoded(im, "HEIF", quality=80, enc_params={"preset": "ultrafast"})),
    "avif": (".avif", lambda im: _encoded(im, "AVIF", quality=70, speed=8)),
    "turned": (".jpg", _turned_jpeg),
}


def save_derived(folder: Path, stem: str, im: Image.Image, names: tuple[str, ...] = tuple(DERIVATIONS)) -> dict[str, Path]:
    """The picture saved in each of ``names`` ways (``DERIVATIONS``) as ``folder/<stem>-<name><suffix>``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        suffix, encode = DERIVATIONS[name]
        path = folder / f"{stem}-{name}{suffix}"
        path.write_bytes(encode(im))
        out[name] = path
    return out
