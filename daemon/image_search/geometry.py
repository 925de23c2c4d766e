"""Where a picture's pixels go: orientation, fit, thumbnail and the model's input, for both decode paths.

One source picture becomes three: the processed picture (turned upright as its EXIF orientation says,
then fitted inside the configured box, aspect kept, never enlarged), its contact-sheet thumbnail
(fitted inside ``THUMBNAIL_SIZE``), and the model's input (resized and centre-cropped as the model's
processor does: ``pixels.PixelSpec``). The CPU path (``preprocess``, with Pillow) and the batched JPEG
decoder (``gpudecode``, with torch kernels of its own) both take every size, every turn, every filter
and every JPEG quality from here, so the two cannot drift apart. Torch-free: the CPU workers import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from .pixels import PixelSpec

# The processed JPEG and the thumbnail beside it. A thumbnail this size is stored beside each processed
# JPEG, so a contact sheet decodes ten small files instead of ten 1024 px ones (about 5 ms instead of 50).
JPEG_QUALITY = 95
THUMBNAIL_SIZE = 256
THUMBNAIL_QUALITY = 85

# Bicubic, as Pillow's thumbnail(): its downscaling is antialiased like Lanczos, at about 60% of the cost
# (30 vs 50 ms for 2000x1500 -> 1024x768 here), and it is visible only in pixel peeping; the model sees a
# 224-512 px version of the picture anyway. The reducing gaps are Pillow's (the GPU resizes in one step).
FIT_RESAMPLE = Image.Resampling.BICUBIC
FIT_REDUCING_GAP = 3.0
THUMBNAIL_RESAMPLE = Image.Resampling.BICUBIC
THUMBNAIL_REDUCING_GAP = 2.0

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the one turn or mirror that makes the picture upright (what Pillow's
# ``ImageOps.exif_transpose`` does). 1, and any value outside 1-8, leaves the picture as stored.
ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPPING = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                       Image.Transpose.ROTATE_270})


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened picture, 1-8; 1 when it has none, a value outside 1-8, or an
    EXIF block that cannot be read (a broken EXIF block must not cost the picture). 1 for a TIFF: Pillow
    (13, as locked) turns a TIFF upright itself, its size already upright when opened, while its tag
    still reads as stored until it is loaded; turning it again would turn it twice."""
    if im.format == "TIFF":
        return 1
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if value in range(1, 9) else 1


def upright_transpose(orientation: int) -> Image.Transpose | None:
    """The turn or mirror that makes a picture with this EXIF orientation upright; None for none."""
    return ORIENTATION_TRANSPOSE.get(orientation)


def swaps_sides(orientation: int) -> bool:
    """True when turning the picture upright swaps its width and height (orientations 5 to 8)."""
    return ORIENTATION_TRANSPOSE.get(orientation) in _SWAPPING


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of a stored picture of ``size`` once turned upright."""
    return (size[1], size[0]) if swaps_sides(orientation) else size


def fit_inside(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The size of ``size`` scaled to fit inside ``box``, aspect kept, never enlarged."""
    w, h = size
    scale = min(box[0] / w, box[1] / h, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def decode_box(orientation: int, max_size: tuple[int, int]) -> tuple[int, int]:
    """The box the stored (not yet upright) picture must still cover after a reduced decode (JPEG draft)."""
    return (max_size[1], max_size[0]) if swaps_sides(orientation) else max_size


def processed_size(upright: tuple[int, int], max_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the processed picture made from an upright picture of size ``upright``."""
    return fit_inside(upright, max_size)


def thumbnail_size(processed: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the contact sheet's thumbnail of a processed picture of size ``processed``."""
    return fit_inside(processed, (THUMBNAIL_SIZE, THUMBNAIL_SIZE))


def model_resize(processed: tuple[int, int], spec: PixelSpec) -> tuple[int, int]:
    """(width, height) the processed picture is resized to before the model's centre crop."""
    if spec.shortest_edge is None:
        assert spec.exact_size is not None
        return spec.exact_size
    width, height = processed
    # Both libraries truncate the long side: int(short_target * long / short).
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def model_crop(resized: tuple[int, int], spec: PixelSpec) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the model's centre crop of a resized picture, or None (no crop)."""
    if spec.crop is None:
        return None
    crop_width, crop_height = spec.crop  # never larger than the picture (checked in PixelSpec)
    left = _centre_offset(resized[0], crop_width, spec.crop_rounding.value)
    top = _centre_offset(resized[1], crop_height, spec.crop_rounding.value)
    return left, top, left + crop_width, top + crop_height


def _centre_offset(size: int, crop: int, rounding: str) -> int:
    if rounding == "floor":  # transformers' center_crop
        return (size - crop) // 2
    return int(round((size - crop) / 2.0))  # torchvision's CenterCrop: half to even
