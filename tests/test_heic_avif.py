"""HEIC/HEIF (pillow-heif) and AVIF (Pillow's own plugin) through the same rules as every other format.

The files are made here, by the same encoders a user's phone output would be decoded with: a picture
whose layout shows any flip or turn, tagged with an EXIF orientation, with transparency, too large,
truncated, or not an image at all.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from image_search.discover import IMAGE_EXTENSIONS, discover_images, supported_formats_for_people
from image_search.preprocess import PreparedImage, PreprocessError, preprocess_image

BOX = (256, 256)
BIG_LIMIT = 178_956_970
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
# Both lossy codecs keep flat colours to within a few levels; 30 still tells red from blue from white.
TOLERANCE = 30
FORMATS = [("photo.heic", "HEIF"), ("photo.HEIF", "HEIF"), ("photo.hif", "HEIF"), ("photo.avif", "AVIF"),
           ("photo.AVIF", "AVIF")]


def prep(path: Path, max_pixels: int = BIG_LIMIT) -> PreparedImage:
    return preprocess_image(path, max_size=BOX, max_pixels=max_pixels)


def assert_colour(actual: tuple[int, ...], expected: tuple[int, int, int]) -> None:
    assert all(abs(int(a) - e) <= TOLERANCE for a, e in zip(actual, expected, strict=True)), \
        f"got {actual}, expected about {expected}"


def quadrants(size: tuple[int, int] = (200, 100)) -> Image.Image:
    """Blue, with a red top-left quadrant as stored: every flip and turn moves the red corner."""
    im = Image.new("RGB", size, BLUE)
    ImageDraw.Draw(im).rectangle([0, 0, size[0] // 2 - 1, size[1] // 2 - 1], fill=RED)
    return im


def save(im: Image.Image, path: Path, fmt: str, orientation: int | None = None) -> Path:
    options: dict[str, object] = {"quality": 90}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    im.save(path, format=fmt, **options)
    return path


def red_corner(prepared: PreparedImage) -> str:
    w, h = prepared.width, prepared.height
    corners = {"top-left": (w // 8, h // 8), "top-right": (w - 1 - w // 8, h // 8),
               "bottom-left": (w // 8, h - 1 - h // 8), "bottom-right": (w - 1 - w // 8, h - 1 - h // 8)}
    red = [name for name, xy in corners.items()
           if all(abs(int(a) - e) <= TOLERANCE for a, e in zip(prepared.image.getpixel(xy), RED, strict=True))]
    assert len(red) == 1, f"red corners: {red}"
    return red[0]


def test_the_extensions_and_the_message_name_the_phone_formats() -> None:
    for ext in (".heic", ".heif", ".avif"):
        assert ext in IMAGE_EXTENSIONS
    assert supported_formats_for_people() == "JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF"


@pytest.mark.parametrize(("name", "fmt"), FORMATS)
def test_heic_and_avif_are_decoded_with_the_right_pixels(tmp_path: Path, name: str, fmt: str) -> None:
    path = save(quadrants(), tmp_path / name, fmt)
    with Image.open(path) as check:  # the fixture really is that format
        assert check.format == fmt
    prepared = prep(path)
    assert (prepared.width, prepared.height) == (200, 100)
    assert prepared.image.mode == "RGB"
    assert red_corner(prepared) == "top-left"
    assert_colour(prepared.image.getpixel((150, 75)), BLUE)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize(("orientation", "size", "corner"), [
    (3, (200, 100), "bottom-right"),
    (6, (100, 200), "top-right"),  # shown turned 90 degrees clockwise, as for a JPEG
    (8, (100, 200), "bottom-left"),
])
def test_exif_orientation_is_applied_once(tmp_path: Path, fmt: str, orientation: int, size, corner: str) -> None:
    # HEIF carries the turn as a container transform (libheif applies it); AVIF keeps the EXIF tag (we apply it).
    path = save(quadrants(), tmp_path / f"turned-{orientation}.{fmt.lower()}", fmt, orientation=orientation)
    prepared = prep(path)
    assert (prepared.width, prepared.height) == size
    assert red_corner(prepared) == corner
    with Image.open(io.BytesIO(prepared.jpeg_bytes)) as processed:  # the turn is in the pixels, not a tag
        assert processed.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_transparency_is_composited_onto_white(tmp_path: Path, fmt: str) -> None:
    im = Image.new("RGBA", (64, 48), (255, 0, 0, 0))  # transparent, hiding red
    ImageDraw.Draw(im).rectangle([32, 0, 63, 47], fill=(0, 0, 255, 255))
    path = tmp_path / f"alpha.{fmt.lower()}"
    im.save(path, format=fmt, quality=90)
    prepared = prep(path)
    assert_colour(prepared.image.getpixel((8, 24)), WHITE)
    assert_colour(prepared.image.getpixel((56, 24)), BLUE)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_an_image_above_the_pixel_limit_is_refused_naming_the_config_key(tmp_path: Path, fmt: str) -> None:
    path = save(quadrants((300, 200)), tmp_path / f"big.{fmt.lower()}", fmt)
    with pytest.raises(PreprocessError) as refused:
        prep(path, max_pixels=59_999)
    assert "300x200" in refused.value.reason and "max-image-pixels" in refused.value.reason
    assert prep(path, max_pixels=60_000).width == 256  # exactly at the limit is fine


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("kept", ["half", "header only"])
def test_a_truncated_file_is_named_truncated_so_a_slow_writer_is_waited_for(tmp_path: Path, fmt: str, kept: str) -> None:
    whole = save(quadrants(), tmp_path / f"whole.{fmt.lower()}", fmt).read_bytes()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(whole[: len(whole) // 2] if kept == "half" else whole[:48])
    with pytest.raises(PreprocessError) as refused:
        prep(path)
    assert refused.value.path == path
    # the service's "still being written" rule keys on this wording
    assert refused.value.reason.startswith("truncated or incomplete image"), refused.value.reason


def test_a_text_file_named_heic_is_not_a_supported_image_and_the_message_lists_the_formats(tmp_path: Path) -> None:
    path = tmp_path / "notes.heic"
    path.write_text("not a picture\n" * 20)
    with pytest.raises(PreprocessError) as refused:
        prep(path)
    assert refused.value.reason == f"not a supported image (content is not {supported_formats_for_people()})"
    assert "HEIC/HEIF" in refused.value.reason and "AVIF" in refused.value.reason


def test_a_heic_renamed_jpg_still_works(tmp_path: Path) -> None:
    path = save(quadrants(), tmp_path / "really-heic.jpg", "HEIF")
    assert red_corner(prep(path)) == "top-left"


def test_discovery_finds_heic_and_avif_in_any_case(tmp_path: Path) -> None:
    for name, fmt in [("a.heic", "HEIF"), ("b.AVIF", "AVIF"), ("sub/c.HEIF", "HEIF")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        save(quadrants(), tmp_path / name, fmt)
    assert [p.relative_to(tmp_path).as_posix() for p in discover_images(tmp_path)] == ["a.heic", "b.AVIF", "sub/c.HEIF"]


def test_a_ten_bit_heic_comes_out_as_8_bit_rgb_with_its_full_range(tmp_path: Path) -> None:
    """iPhones write 10-bit HEIC: its levels must be scaled to 8 bits, not clipped or cut to the low byte."""
    import numpy as np
    import pillow_heif

    ramp = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)
    pillow_heif.from_bytes(mode="RGB;16", size=(64, 48), data=np.stack([ramp] * 3, -1).tobytes()).save(
        tmp_path / "hdr.heic", quality=-1)
    with Image.open(tmp_path / "hdr.heic") as check:
        assert check.info["bit_depth"] == 10
    prepared = prep(tmp_path / "hdr.heic")
    assert prepared.image.mode == "RGB"
    assert_colour(prepared.image.getpixel((0, 24)), (0, 0, 0))
    assert_colour(prepared.image.getpixel((32, 24)), (130, 130, 130))
    assert_colour(prepared.image.getpixel((63, 24)), WHITE)
