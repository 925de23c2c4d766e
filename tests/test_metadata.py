"""The metadata read at ingest (``image_search.metadata``): date taken, camera, the original's size and
format, in every format, from real files written by Pillow (and pillow-heif), through both decode paths."""

from __future__ import annotations

import io
import os
import struct
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import ExifTags, Image, TiffImagePlugin
from structlog.testing import capture_logs

from image_search.gpudecode import read_plain_jpeg
from image_search.metadata import PictureMetadata, camera_name, metadata_of_bytes
from image_search.preprocess import preprocess_image

BOX = (64, 64)
LIMIT = 178_956_970
DATE = "2023:05:06 07:08:09"
EXIF_FORMATS = [("a.jpg", "JPEG", "jpeg"), ("a.png", "PNG", "png"), ("a.webp", "WEBP", "webp"),
                ("a.tiff", "TIFF", "tiff"), ("a.heic", "HEIF", "heic"), ("a.avif", "AVIF", "avif")]
ALL_FORMATS = [*EXIF_FORMATS, ("a.gif", "GIF", "gif"), ("a.bmp", "BMP", "bmp")]


@pytest.fixture(autouse=True)
def service_zone(monkeypatch):
    """The service runs in a zone of its own (UTC-3, no daylight saving): local time is visible."""
    monkeypatch.setenv("TZ", "America/Sao_Paulo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def exif(*, date: str | None = DATE, offset: str | None = None, orientation: int = 1,
         make: str | None = "Canon", model: str | None = "Canon EOS R5") -> Image.Exif:
    ex = Image.Exif()
    if make is not None:
        ex[0x010F] = make
    if model is not None:
        ex[0x0110] = model
    ex[0x0112] = orientation
    sub = ex.get_ifd(ExifTags.IFD.Exif)
    if date is not None:
        sub[0x9003] = date
    if offset is not None:
        sub[0x9011] = offset
    return ex


def write(path: Path, fmt: str, ex: Image.Exif | None, size: tuple[int, int] = (40, 20)) -> Path:
    im = Image.new("RGB", size, (200, 30, 30))
    kwargs: dict[str, object] = {}
    if ex is not None and fmt == "TIFF":  # Pillow writes a TIFF's Exif IFD only from tiffinfo
        info = TiffImagePlugin.ImageFileDirectory_v2()
        for tag, value in ex.items():
            if tag != ExifTags.IFD.Exif:
                info[tag] = value
        info[ExifTags.IFD.Exif] = dict(ex.get_ifd(ExifTags.IFD.Exif))
        kwargs["tiffinfo"] = info
    elif ex is not None:
        kwargs["exif"] = ex.tobytes()  # pillow-heif takes the orientation from the bytes, not from an Exif
    im.save(path, format=fmt, **kwargs)
    return path


def read(path: Path) -> PictureMetadata:
    prepared = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    assert prepared.metadata is not None
    assert prepared.metadata == metadata_of_bytes(path.read_bytes(), path)  # the migration reads the same
    return prepared.metadata


@pytest.mark.parametrize(("name", "fmt", "stored"), EXIF_FORMATS)
def test_date_with_offset(tmp_path, name, fmt, stored):
    meta = read(write(tmp_path / name, fmt, exif(offset="+02:00")))
    assert meta.taken_at == datetime(2023, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    assert meta.taken_at.utcoffset() == timedelta(hours=2)
    assert meta.offset_known is True and meta.offset_minutes == 120
    assert (meta.camera_make, meta.camera_model) == ("Canon", "Canon EOS R5")
    assert (meta.width, meta.height, meta.format) == (40, 20, stored)


@pytest.mark.parametrize(("name", "fmt", "stored"), EXIF_FORMATS)
def test_date_without_offset_is_local_time(tmp_path, name, fmt, stored):
    meta = read(write(tmp_path / name, fmt, exif(offset=None)))
    assert meta.taken_at is not None and meta.offset_known is False and meta.offset_minutes is None
    assert meta.taken_at.replace(tzinfo=None) == datetime(2023, 5, 6, 7, 8, 9)
    assert meta.taken_at.utcoffset() == timedelta(hours=-3)  # the service's zone
    assert meta.format == stored


@pytest.mark.parametrize(("name", "fmt", "stored"), ALL_FORMATS)
def test_without_exif_no_date(tmp_path, name, fmt, stored):
    meta = read(write(tmp_path / name, fmt, None))
    assert meta == PictureMetadata(width=40, height=20, format=stored)


def test_negative_offset_and_half_hours(tmp_path):
    meta = read(write(tmp_path / "a.jpg", "JPEG", exif(offset="-09:30")))
    assert meta.offset_minutes == -570
    assert meta.taken_at.astimezone(timezone.utc) == datetime(2023, 5, 6, 16, 38, 9, tzinfo=timezone.utc)


@pytest.mark.parametrize("offset", ["+25:99", "+23:59", "-13:00", "+14:01", "+05:60"])
def test_an_offset_no_zone_has_is_read_as_the_local_time(tmp_path, offset):
    """Zones run from -12:00 to +14:00: "+23:59" is a broken field, and the date is kept in local time."""
    meta = read(write(tmp_path / "a.jpg", "JPEG", exif(offset=offset)))
    assert meta.offset_known is False and meta.offset_minutes is None
    assert meta.taken_at.utcoffset() == timedelta(hours=-3)  # the service's zone


@pytest.mark.parametrize(("offset", "minutes"), [("-12:00", -720), ("+14:00", 840), ("+05:45", 345)])
def test_the_furthest_zones_are_kept(tmp_path, offset, minutes):
    assert read(write(tmp_path / "a.jpg", "JPEG", exif(offset=offset))).offset_minutes == minutes


def test_date_in_ifd0_of_a_tiff(tmp_path):
    """Some TIFF writers put DateTimeOriginal in IFD0: it is read there too."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[0x9003] = DATE
    info[0x9011] = "+01:00"
    path = tmp_path / "a.tif"
    Image.new("RGB", (40, 20)).save(path, format="TIFF", tiffinfo=info)
    assert read(path).offset_minutes == 60


@pytest.mark.parametrize("date", ["0000:00:00 00:00:00", "garbage", "2023:13:45 99:00:00", "    "])
def test_malformed_date_is_no_date(tmp_path, date):
    meta = read(write(tmp_path / "a.jpg", "JPEG", exif(date=date, offset="+25:99")))
    assert meta.taken_at is None and meta.offset_known is None
    assert meta.camera_make == "Canon"  # the rest of the block is still read


@pytest.mark.parametrize(("date", "offset"), [
    ("9999:12:31 23:59:59", "-12:00"),  # 10000-01-01 11:59:59 in UTC
    ("0001:01:01 00:00:00", "+14:00"),  # 1 BC in UTC
    ("9999:12:31 22:00:00", None),  # the service's local time, UTC-3: 10000-01-01 01:00 in UTC
])
def test_a_date_outside_years_1_to_9999_in_utc_is_no_date(tmp_path, date, offset):
    """PostgreSQL would store such a date, and no search could read its row back."""
    path = write(tmp_path / "a.jpg", "JPEG", exif(date=date, offset=offset))
    meta = read(path)
    assert meta.taken_at is None and meta.offset_known is None
    assert meta.camera_make == "Canon"  # the picture and the rest of its metadata stay
    with capture_logs() as logs:
        metadata_of_bytes(path.read_bytes(), path)
    assert [(e["event"], e["log_level"], e["path"], e["date"]) for e in logs] == [
        ("exif_date_out_of_range", "info", path, date)]
    assert "outside years 1-9999" in logs[0]["reason"]


@pytest.mark.parametrize(("date", "offset"), [("9999:12:31 23:59:59", "+00:00"), ("0001:01:01 00:00:00", "-12:00"),
                                              ("0001:01:02 12:00:00", None)])
def test_an_extreme_date_that_utc_can_hold_stays(tmp_path, date, offset):
    meta = read(write(tmp_path / "a.jpg", "JPEG", exif(date=date, offset=offset)))
    assert meta.taken_at is not None
    assert meta.taken_at.replace(tzinfo=None) == datetime.strptime(date, "%Y:%m:%d %H:%M:%S")


def test_broken_exif_block_never_fails_the_picture(tmp_path):
    """An APP1 EXIF segment whose TIFF header is garbage: the picture is prepared, with no date."""
    plain = io.BytesIO()
    Image.new("RGB", (40, 20)).save(plain, format="JPEG")
    data = plain.getvalue()
    payload = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x13" * 40
    broken = data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    path = tmp_path / "broken.jpg"
    path.write_bytes(broken)
    meta = read(path)
    assert meta == PictureMetadata(width=40, height=20, format="jpeg")


@pytest.mark.parametrize(("name", "fmt"), [("a.jpg", "JPEG"), ("a.tiff", "TIFF"), ("a.webp", "WEBP"),
                                           ("a.png", "PNG"), ("a.avif", "AVIF"), ("a.heic", "HEIF")])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_original_size_is_upright_whatever_the_orientation(tmp_path, name, fmt, orientation):
    """A 40x20 picture tagged to be turned a quarter is 20x40 as shown, in every format; and the
    processed picture has the same shape."""
    prepared = preprocess_image(write(tmp_path / name, fmt, exif(orientation=orientation)), max_size=BOX,
                                max_pixels=LIMIT)
    expected = (20, 40) if orientation in (6, 8) else (40, 20)
    assert (prepared.metadata.width, prepared.metadata.height) == expected
    assert (prepared.width, prepared.height) == expected


def test_batched_jpeg_path_reads_the_same_metadata(tmp_path):
    path = write(tmp_path / "a.jpg", "JPEG", exif(offset="+05:45", orientation=6))
    plain = read_plain_jpeg(path, max_pixels=LIMIT)
    assert plain is not None and plain.metadata is not None
    assert plain.metadata == read(path)
    assert (plain.metadata.width, plain.metadata.height) == (20, 40)


def test_camera_name():
    assert camera_name("Canon", "Canon EOS R5") == "Canon EOS R5"
    assert camera_name("Apple", "iPhone 15") == "Apple iPhone 15"
    assert camera_name(None, "X100V") == "X100V"
    assert camera_name(None, None) is None


def test_camera_text_cleaned(tmp_path):
    meta = read(write(tmp_path / "a.jpg", "JPEG", exif(make="NIKON CORPORATION\x00\x00 ", model="\x01\x02")))
    assert meta.camera_make == "NIKON CORPORATION" and meta.camera_model is None


def test_not_an_image():
    assert metadata_of_bytes(b"not a picture") is None
    assert os.environ["TZ"] == "America/Sao_Paulo"
