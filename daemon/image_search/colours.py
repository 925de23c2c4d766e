"""Colour profiles: a picture whose embedded ICC profile is not sRGB (an iPhone's Display P3, an Adobe RGB
camera file), or a PNG whose gAMA chunk is not sRGB's 1/2.2 (a linear 1.0, an old Mac's 1/1.8), has its
pixels converted to sRGB, the space every processed copy, thumbnail and model input is
in. Read as they are, its colours were duller than any viewer shows them, and its sRGB export was not
found as a near-copy of it (12-24 bits apart, measured on twelve scenes).

Torch-free: the CPU workers import it. Each process builds a profile's transform once (``_transform``)."""

from __future__ import annotations

import io
from functools import lru_cache

from PIL import Image, ImageCms

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _named_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """sRGB by name ("sRGB IEC61966-2.1", "sRGB built-in", "sRGB v4 ICC preference"...): converting would
    change nothing but the time it takes."""
    return "srgb" in (profile.profile.profile_description or "").lower()


@lru_cache(maxsize=16)
def _transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """The RGB profile ``icc`` to sRGB; None for sRGB itself, a profile of another colour space (CMYK,
    grey: converted as they always were) and one that cannot be read (its pixels are taken as they are)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB" or _named_srgb(profile):
            return None
        return ImageCms.buildTransform(profile, _SRGB, "RGB", "RGB",
                                       renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def needs_conversion(icc: bytes | None) -> bool:
    """The picture's embedded profile (``im.info["icc_profile"]``) makes its RGB pixels other colours than
    sRGB's."""
    return bool(icc) and _transform(bytes(icc)) is not None


def in_srgb(rgb: Image.Image, icc: bytes | None, *, gamma: float | None = None) -> Image.Image:
    """``rgb`` (8-bit RGB, in the space of the profile ``icc``, or else encoded with ``gamma``: a PNG's
    gAMA, which only a PNG without a profile or an sRGB chunk has a say by) in sRGB."""
    transform = _transform(bytes(icc)) if icc else None
    if transform is not None:
        return ImageCms.applyTransform(rgb, transform)
    table = _gamma_table(round(gamma, 5)) if gamma else None
    return rgb if table is None else rgb.point(table)


# The display gamma a PNG's gAMA is corrected to, as browsers do; a file gamma within this of 1/2.2 (the
# usual 0.45455) changes no level by more than one: left as it is.
_DISPLAY_GAMMA = 2.2
_SAME_GAMMA = 0.01


@lru_cache(maxsize=16)
def _gamma_table(file_gamma: float) -> list[int] | None:
    """The 8-bit levels of a PNG written with ``file_gamma`` (sample = light ** file_gamma) as a display of
    gamma 2.2 shows them, for ``Image.point`` on three bands; None where nothing would change."""
    exponent = 1.0 / (file_gamma * _DISPLAY_GAMMA)
    if abs(exponent - 1.0) < _SAME_GAMMA or not 0.0 < file_gamma < 10.0:
        return None
    return [round(255 * (level / 255) ** exponent) for level in range(256)] * 3
