"""Colour profiles: a picture whose embedded ICC profile is not sRGB (an iPhone's Display P3, an Adobe RGB
camera file) has its pixels converted to sRGB, the space every processed copy, thumbnail and model input is
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


def in_srgb(rgb: Image.Image, icc: bytes | None) -> Image.Image:
    """``rgb`` (8-bit RGB, in the space of the profile ``icc``) in sRGB."""
    transform = _transform(bytes(icc)) if icc else None
    return rgb if transform is None else ImageCms.applyTransform(rgb, transform)
