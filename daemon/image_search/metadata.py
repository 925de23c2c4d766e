"""What a picture says about itself, read from the original file's header: the date taken (EXIF
``DateTimeOriginal`` with ``OffsetTimeOriginal``), the camera (make, model), the original's size and
format. Pure and cheap: it reads an image Pillow has opened (headers only, nothing decoded), so both
decode paths (``preprocess``, ``gpudecode``) and the metadata migration (``sync.migrate_metadata``)
take it from here.

A picture without EXIF, or without ``DateTimeOriginal``, has no date taken. A date without an offset is
taken as the local time of the service's time zone, and recorded as such (``offset_known`` False). A
malformed EXIF block never costs the picture: no date (or no camera), one debug line. A date whose time
in UTC falls outside years 1-9999 (what Python's datetime holds) is no date either, one info line.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import structlog
from PIL import ExifTags, Image

from .discover import SUPPORTED_FORMATS  # opened as preprocess opens them (it registers the HEIF opener)
from .entries import open_regular
from .geometry import exif_orientation, upright_size

log = structlog.get_logger(__name__)

MAKE_TAG = 0x010F
MODEL_TAG = 0x0110
DATE_TIME_ORIGINAL_TAG = 0x9003
OFFSET_TIME_ORIGINAL_TAG = 0x9011

# Pillow's format names -> the names stored and shown (``format`` in a hit; later, the format filter).
FORMAT_NAMES: dict[str, str] = {
    "JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "DIB": "bmp",
    "TIFF": "tiff", "HEIF": "heic", "AVIF": "avif",
}
_EXIF_DATE = re.compile(r"^\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"^\s*([+-])(\d{2}):(\d{2})\s*$")
# The zones in use run from UTC-12:00 (Baker Island) to UTC+14:00 (Kiribati's Line Islands).
_EARLIEST_OFFSET, _LATEST_OFFSET = timedelta(hours=-12), timedelta(hours=14)
_MAX_TEXT = 200  # a make or model longer than this is garbage, not a camera's name


@dataclass(frozen=True)
class PictureMetadata:
    """``taken_at``: when the picture was taken, time-zone aware (the EXIF offset where the file gives
    one, else the service's local zone: ``offset_known`` False); None without EXIF or without a date.
    ``width``, ``height``: the original's size, upright (as it is shown), whatever its EXIF orientation."""

    width: int
    height: int
    format: str
    taken_at: datetime | None = None
    offset_known: bool | None = None
    camera_make: str | None = None
    camera_model: str | None = None

    @property
    def offset_minutes(self) -> int | None:
        """The EXIF offset in minutes east of UTC, or None when the file gave none (or no date)."""
        if self.taken_at is None or not self.offset_known:
            return None
        offset = self.taken_at.utcoffset()
        return None if offset is None else int(offset.total_seconds() // 60)


def picture_metadata(im: Image.Image, path: Path | str | None = None) -> PictureMetadata:
    """The metadata of a picture Pillow has opened (not necessarily loaded). Never raises."""
    fmt = FORMAT_NAMES.get(im.format or "", (im.format or "").lower())
    # Pillow turns a TIFF upright as it opens it and libheif a HEIC: exif_orientation says 1 for both.
    size = upright_size(im.size, exif_orientation(im))
    try:
        exif = im.getexif()
    except Exception as exc:  # a broken EXIF block: the picture is still good
        log.debug("exif_unreadable", path=path, error=f"{type(exc).__name__}: {exc}")
        return PictureMetadata(width=size[0], height=size[1], format=fmt)
    taken_at, offset_known = _date_taken(exif, path)
    return PictureMetadata(width=size[0], height=size[1], format=fmt, taken_at=taken_at, offset_known=offset_known,
                           camera_make=_text(exif.get(MAKE_TAG)), camera_model=_text(exif.get(MODEL_TAG)))


def metadata_of_bytes(data: bytes, path: Path | str | None = None) -> PictureMetadata | None:
    """``picture_metadata`` of a file's bytes (headers only); None when Pillow cannot open them."""
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as im:
            return picture_metadata(im, path)
    except Exception as exc:
        log.debug("metadata_unreadable", path=path, error=f"{type(exc).__name__}: {exc}")
        return None


def metadata_of_file(path: Path, expected: tuple[int, int]) -> PictureMetadata | None:
    """``picture_metadata`` of the file at ``path``, reading its header only (Pillow opens the file
    lazily; nothing is decoded); None when it cannot be read or opened, or its (size, mtime_ns) is not
    ``expected`` (rewritten meanwhile: the rescan reads it again). Never raises."""
    try:
        with open_regular(path) as (handle, _), Image.open(handle, formats=SUPPORTED_FORMATS) as im:
            metadata = picture_metadata(im, path)
            st = os.fstat(handle.fileno())
    except Exception as exc:  # OSError, EntryRefused, anything Pillow does not like
        log.debug("metadata_unreadable", path=path, error=f"{type(exc).__name__}: {exc}")
        return None
    return metadata if (st.st_size, st.st_mtime_ns) == expected else None


def relative_folder(path: Path | str, root: Path | str) -> str | None:
    """The folder of ``path`` relative to ``root`` (source-directory), '' at its top; None outside it."""
    try:
        folder = Path(path).parent.relative_to(root)
    except ValueError:
        return None
    return "" if folder == Path(".") else folder.as_posix()


def camera_name(make: str | None, model: str | None) -> str | None:
    """Make and model as one name ("Canon EOS R5"), the make once when the model repeats it."""
    if make and model and model.casefold().startswith(make.casefold()):
        return model
    joined = " ".join(part for part in (make, model) if part)
    return joined or None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", "").strip()
    return text if text and len(text) <= _MAX_TEXT and text.isprintable() else None


def _date_taken(exif: Image.Exif, path: Path | str | None) -> tuple[datetime | None, bool | None]:
    """(aware date taken, offset known) from ``DateTimeOriginal`` and ``OffsetTimeOriginal``, read in the
    Exif IFD or, as some TIFF writers leave them, in IFD0; (None, None) when absent or malformed."""
    try:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        raw = sub.get(DATE_TIME_ORIGINAL_TAG, exif.get(DATE_TIME_ORIGINAL_TAG))
        raw_offset = sub.get(OFFSET_TIME_ORIGINAL_TAG, exif.get(OFFSET_TIME_ORIGINAL_TAG))
    except Exception as exc:
        log.debug("exif_date_unreadable", path=path, error=f"{type(exc).__name__}: {exc}")
        return None, None
    if raw is None:
        return None, None
    text = _text(raw)
    matched = _EXIF_DATE.match(text) if text else None
    try:
        if matched is None:
            raise ValueError(f"not an EXIF date: {raw!r}")
        naive = datetime(*(int(part) for part in matched.groups()))  # type: ignore[misc]
    except (ValueError, OverflowError) as exc:  # "0000:00:00 00:00:00" is what some cameras write
        log.debug("exif_date_malformed", path=path, error=str(exc))
        return None, None
    offset = _offset(raw_offset)
    try:
        # Without an offset: the service's local time zone.
        taken_at = naive.replace(tzinfo=offset) if offset is not None else naive.astimezone()
        # PostgreSQL stores the instant in UTC, where "9999:12:31 23:59:59" at -12:00 is 10000-01-01:
        # a row no search could turn back into a datetime. Such a date is no date.
        taken_at.astimezone(timezone.utc)
    except (ValueError, OverflowError, OSError):
        log.info("exif_date_out_of_range", path=path, date=text, offset=_text(raw_offset),
                 reason="outside years 1-9999 (in UTC or local time): stored without a date")
        return None, None
    return taken_at, offset is not None


def _offset(raw: object) -> timezone | None:
    text = _text(raw)
    matched = _EXIF_OFFSET.match(text) if text else None
    if matched is None:
        return None
    sign, hours, minutes = matched.groups()
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    offset = -delta if sign == "-" else delta
    if int(minutes) >= 60 or not _EARLIEST_OFFSET <= offset <= _LATEST_OFFSET:
        return None  # no zone on Earth: the date is read as the service's local time, like one without
    return timezone(offset)
