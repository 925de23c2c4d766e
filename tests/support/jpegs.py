"""Photo-like JPEGs for the batched decoder's stories (tests/test_gpudecode.py on the CPU, tests/test_gpu.py on
CUDA), and the model input specs they are decoded for."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from image_search.gpudecode import BatchedJpegDecoder, read_plain_jpeg
from image_search.pixels import PixelSpec
from image_search.preprocess import PreparedImage
from tests.support.jina import JINA_CLIP_V2_PREPROCESSOR_CONFIG

LIMIT = 178_956_970  # max-image-pixels, Pillow's default
BOX = (512, 512)
CLIP_224 = PixelSpec.from_processor_config({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
                                            "crop_size": {"height": 224, "width": 224}})
JINA_512 = PixelSpec.from_processor_config(JINA_CLIP_V2_PREPROCESSOR_CONFIG)


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth structure plus mild noise, like a photograph (pure noise would make JPEG meaningless)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (seed + 3) // 7) % 256, (y // 3 + seed * 40) % 256, ((x + 2 * y) // 9) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def save_jpeg(path: Path, size=(900, 600), *, seed: int = 0, orientation: int = 1, **options) -> Path:
    im = photo(size, seed)
    exif = im.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", quality=90, exif=exif, **options)
    return path


def pixels_of(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def decode_one(path: Path, spec: PixelSpec = CLIP_224, box=BOX, *, device: str = "cpu") -> PreparedImage | None:
    """One file through the batched decoder on ``device``."""
    source = read_plain_jpeg(path, max_pixels=LIMIT)
    assert source is not None, f"{path.name} should be taken by the batched decoder"
    [result] = BatchedJpegDecoder(device, max_size=box, spec=spec).prepare([source])
    return result
