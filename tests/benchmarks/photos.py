"""Photo-like JPEGs for the benchmark, generated once into the cache and reused by later runs."""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

from tests.benchmarks.common import say

GEN_VERSION = 1  # bump when the generators change: the cache folder name follows it


def _base_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB picture: smooth colour regions, a sky-like gradient, mid-frequency texture
    and per-pixel sensor noise (so the JPEG is as hard to decode as a real photo's)."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    mid = Image.fromarray((rng.random((max(2, h // 12), max(2, w // 12), 3)) * 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(low, dtype=np.float32) * 0.7
    arr += np.linspace(60, -20, h, dtype=np.float32)[:, None, None]
    arr += (np.asarray(mid, dtype=np.float32) - 127.5) * 0.35
    arr += rng.standard_normal((h, w, 3), dtype=np.float32) * 5.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _noise_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 13, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _variant(base: Image.Image, noise: Image.Image, seed: int) -> Image.Image:
    """A cheap, unique variation of a base picture: shifted, maybe mirrored, colour-graded, fresh noise."""
    rng = np.random.default_rng(seed)
    w, h = base.size
    im = ImageChops.offset(base, int(rng.integers(0, w)), int(rng.integers(0, h)))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lut: list[int] = []
    for _ in range(3):
        gain, shift = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
        lut.extend(int(min(255, max(0, round(v * gain + shift)))) for v in range(256))
    im = im.point(lut)
    n = ImageChops.offset(noise, int(rng.integers(0, w)), int(rng.integers(0, h)))
    return ImageChops.add(im, n, scale=1.0, offset=-6)


def _save_atomic_jpeg(im: Image.Image, path: Path, quality: int = 90) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    im.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def ensure_jpegs(folder: Path, prefix: str, count: int, size: tuple[int, int], *, seed: int, bases: int) -> list[Path]:
    """``count`` JPEGs ``<prefix>_<i>.jpg`` in ``folder``; file i is always the same picture, so a
    quick run reuses a full run's cache and the reverse. Only missing files are generated."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}_{i:05d}.jpg" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if not missing:
        return paths
    started = time.monotonic()
    base_images = [_base_image(seed * 1000 + b, size) for b in range(bases)]
    noise = _noise_image(seed * 1000 + 999, size)

    def make(i: int) -> None:
        _save_atomic_jpeg(_variant(base_images[i % bases], noise, seed * 1_000_000 + i), paths[i])

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(make, missing))
    say(f"generated {len(missing)} {size[0]}x{size[1]} JPEGs in {folder.name}/ ({prefix}) "
        f"in {time.monotonic() - started:.1f} s")
    return paths
