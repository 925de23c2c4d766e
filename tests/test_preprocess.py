"""Preprocessing through real files: every format and mode, EXIF rotation, resizing, identity, bad inputs.

Each test is a small user story: "I drop this kind of file in my photo folder; what comes out?"
Pixels are checked on ``prepared.image`` (the exact RGB pixels before JPEG encoding) and, where it
matters, on the decoded processed JPEG too.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path
from stat import S_IMODE

import numpy as np
import pytest
from PIL import Image, ImageDraw, PngImagePlugin, features

from image_search.preprocess import (
    PreparedImage,
    PreprocessError,
    preprocess_image,
    processed_path_for,
    thumbnail_path_for,
    save_processed,
    write_atomically,
    source_identity,
)

BOX = (256, 256)
BIG_LIMIT = 178_956_970

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def prep(path: Path, box: tuple[int, int] = BOX, max_pixels: int = BIG_LIMIT) -> PreparedImage:
    return preprocess_image(path, max_size=box, max_pixels=max_pixels)


def px(prepared: PreparedImage, x: int, y: int) -> tuple[int, int, int]:
    return prepared.image.getpixel((x, y))


def close(actual, expected, tol: int = 12) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


def assert_colour(actual, expected, tol: int = 12) -> None:
    assert close(actual, expected, tol), f"got {actual}, expected about {expected} (tolerance {tol})"


def decoded(prepared: PreparedImage) -> Image.Image:
    im = Image.open(io.BytesIO(prepared.jpeg_bytes))
    assert im.format == "JPEG"
    return im.convert("RGB")


def assert_well_formed(prepared: PreparedImage) -> None:
    """The invariants every successful result must hold."""
    assert prepared.image.mode == "RGB"
    assert prepared.image.size == (prepared.width, prepared.height)
    assert len(prepared.file_hash) == 32 and set(prepared.file_hash) <= set("0123456789abcdef")  # an MD5
    assert decoded(prepared).size == prepared.image.size


def two_colour(size: tuple[int, int] = (64, 48), left=RED, right=GREEN) -> Image.Image:
    """Left half one colour, right half another: enough to catch flips, channel swaps and crops."""
    im = Image.new("RGB", size, right)
    ImageDraw.Draw(im).rectangle([0, 0, size[0] // 2 - 1, size[1] - 1], fill=left)
    return im


def check_two_colour(prepared: PreparedImage, size=(64, 48), left=RED, right=GREEN, tol=12) -> None:
    assert_well_formed(prepared)
    assert (prepared.width, prepared.height) == size
    assert (prepared.source_width, prepared.source_height) == size
    assert_colour(px(prepared, 4, size[1] // 2), left, tol)
    assert_colour(px(prepared, size[0] - 5, size[1] // 2), right, tol)
    # and the decoded processed JPEG shows the same picture
    dec = decoded(prepared)
    assert_colour(dec.getpixel((4, size[1] // 2)), left, tol + 8)
    assert_colour(dec.getpixel((size[0] - 5, size[1] // 2)), right, tol + 8)


# --------------------------------------------------------------------------------------------------
# Every listed format, any extension case
# --------------------------------------------------------------------------------------------------

FORMAT_CASES = [
    ("photo.jpg", "JPEG", {"quality": 95}),
    ("photo.jpeg", "JPEG", {"quality": 95}),
    ("photo.jpe", "JPEG", {"quality": 95}),
    ("photo.JPG", "JPEG", {"quality": 95}),
    ("photo.JPEG", "JPEG", {"quality": 95}),
    ("photo.Jpg", "JPEG", {"quality": 95}),
    ("photo.png", "PNG", {}),
    ("photo.PNG", "PNG", {}),
    ("photo.webp", "WEBP", {"lossless": True}),
    ("photo.WEBP", "WEBP", {"quality": 90}),
    ("photo.gif", "GIF", {}),
    ("photo.GIF", "GIF", {}),
    ("photo.bmp", "BMP", {}),
    ("photo.BMP", "BMP", {}),
    ("photo.tiff", "TIFF", {}),
    ("photo.tif", "TIFF", {}),
    ("photo.TIFF", "TIFF", {}),
    ("photo.TIF", "TIFF", {"compression": "tiff_lzw"}),
]


@pytest.mark.parametrize(("name", "fmt", "options"), FORMAT_CASES, ids=[c[0] + "-" + str(c[2]) for c in FORMAT_CASES])
def test_every_listed_format_and_extension_case_is_decoded_with_the_right_pixels(tmp_path, name, fmt, options):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / name
    two_colour().save(path, format=fmt, **options)
    check_two_colour(prep(path))


def test_animated_gif_uses_the_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    first = two_colour(left=RED, right=GREEN)
    second = two_colour(left=BLUE, right=BLUE)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(path) as check:  # the fixture really is a two-frame animation
        assert check.n_frames == 2
        check.seek(1)
        assert_colour(check.convert("RGB").getpixel((4, 20)), BLUE)
    check_two_colour(prep(path), left=RED, right=GREEN)


def test_animated_gif_whose_second_frame_differs_everywhere_gives_first_frame_colour(tmp_path):
    path = tmp_path / "blink.gif"
    Image.new("RGB", (40, 40), RED).save(path, save_all=True, append_images=[Image.new("RGB", (40, 40), BLUE)],
                                         duration=50, loop=0)
    prepared = prep(path)
    arr = np.asarray(prepared.image)
    assert_colour(arr.reshape(-1, 3).min(axis=0), RED, 8)
    assert_colour(arr.reshape(-1, 3).max(axis=0), RED, 8)


def test_png_file_that_is_really_a_jpeg_still_works(tmp_path):
    path = tmp_path / "misnamed.png"
    two_colour().save(path, format="JPEG", quality=95)
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"
    check_two_colour(prep(path))


def test_jpg_file_that_is_really_a_png_still_works(tmp_path):
    path = tmp_path / "misnamed.jpg"
    two_colour().save(path, format="PNG")
    check_two_colour(prep(path))


# --------------------------------------------------------------------------------------------------
# Every mode to 8-bit RGB, transparency onto white
# --------------------------------------------------------------------------------------------------


def palette_image(transparent_index: int | None = None) -> Image.Image:
    """A P image: index 0 = black (the 'hidden' colour), 1 = red, 2 = green; left third 0, middle 1, right 2."""
    im = Image.new("P", (60, 30), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0, 0, 0] * 253)
    draw = ImageDraw.Draw(im)
    draw.rectangle([20, 0, 39, 29], fill=1)
    draw.rectangle([40, 0, 59, 29], fill=2)
    if transparent_index is not None:
        im.info["transparency"] = transparent_index
    return im


def test_palette_png_without_transparency(tmp_path):
    path = tmp_path / "palette.png"
    palette_image().save(path)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" not in check.info
    prepared = prep(path)
    assert_well_formed(prepared)
    assert px(prepared, 5, 15) == BLACK
    assert px(prepared, 30, 15) == RED
    assert px(prepared, 50, 15) == GREEN


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_index_becomes_white_not_the_hidden_palette_colour(tmp_path, fmt):
    path = tmp_path / f"palette-transparent.{fmt.lower()}"
    palette_image(transparent_index=0).save(path, format=fmt, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info.get("transparency") == 0
    prepared = prep(path)
    assert_well_formed(prepared)
    assert px(prepared, 5, 15) == WHITE  # transparent: white, not the palette's black
    assert px(prepared, 30, 15) == RED
    assert px(prepared, 50, 15) == GREEN


def test_palette_png_with_partial_alpha_table(tmp_path):
    """A tRNS chunk with one alpha per palette entry (bytes), including a half-transparent red."""
    path = tmp_path / "palette-alpha.png"
    palette_image().save(path, transparency=bytes([0, 128, 255]))
    prepared = prep(path)
    assert px(prepared, 5, 15) == WHITE
    assert_colour(px(prepared, 30, 15), (255, 127, 127), 3)  # half red over white
    assert px(prepared, 50, 15) == GREEN


def test_pa_mode_composited_onto_white(tmp_path):
    path = tmp_path / "pa.tiff"
    pa = Image.new("PA", (40, 20))
    pa.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    # left half: palette index 0 (black) fully transparent; right half: index 1 (blue) opaque
    pa.putdata([(0, 0) if x < 20 else (1, 255) for y in range(20) for x in range(40)])
    pa.save(path)
    with Image.open(path) as check:
        assert check.mode == "PA"
    prepared = prep(path)
    assert_well_formed(prepared)
    assert px(prepared, 5, 10) == WHITE
    assert px(prepared, 35, 10) == BLUE


def test_la_mode_composited_onto_white(tmp_path):
    path = tmp_path / "la.png"
    la = Image.new("LA", (30, 10))
    # left: black but fully transparent; middle: black opaque; right: black half transparent
    la.putdata([(0, 0) if x < 10 else (0, 255) if x < 20 else (0, 128) for y in range(10) for x in range(30)])
    la.save(path)
    with Image.open(path) as check:
        assert check.mode == "LA"
    prepared = prep(path)
    assert_well_formed(prepared)
    assert px(prepared, 5, 5) == WHITE
    assert px(prepared, 15, 5) == BLACK
    assert_colour(px(prepared, 25, 5), (127, 127, 127), 2)


def test_rgba_hidden_colour_under_fully_transparent_pixels_comes_out_white(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = Image.new("RGBA", (30, 10))
    rgba.putdata([
        (255, 0, 0, 0) if x < 10 else (0, 255, 0, 255) if x < 20 else (0, 0, 255, 128)
        for y in range(10) for x in range(30)
    ])
    rgba.save(path)
    with Image.open(path) as check:  # the hidden red really is stored in the file
        assert check.mode == "RGBA" and check.getpixel((0, 0)) == (255, 0, 0, 0)
    prepared = prep(path)
    assert_well_formed(prepared)
    assert px(prepared, 5, 5) == WHITE, "the hidden colour under alpha 0 must not show"
    assert px(prepared, 15, 5) == GREEN
    assert_colour(px(prepared, 25, 5), (127, 127, 255), 2)
    assert_colour(decoded(prepared).getpixel((2, 5)), WHITE, 6)


def test_rgba_webp_transparent_pixels_come_out_white(tmp_path):
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / "rgba.webp"
    rgba = Image.new("RGBA", (32, 16), (255, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle([16, 0, 31, 15], fill=(0, 0, 255, 255))
    rgba.save(path, lossless=True, exact=True)
    prepared = prep(path)
    assert px(prepared, 4, 8) == WHITE
    assert px(prepared, 28, 8) == BLUE


@pytest.mark.parametrize(("name", "fmt"), [("cmyk.jpg", "JPEG"), ("cmyk.tiff", "TIFF")])
def test_cmyk_files_come_out_as_rgb_with_the_right_colours(tmp_path, name, fmt):
    path = tmp_path / name
    cmyk = Image.new("CMYK", (64, 48), (0, 0, 0, 0))  # white
    draw = ImageDraw.Draw(cmyk)
    draw.rectangle([0, 0, 31, 47], fill=(0, 255, 255, 0))  # red
    draw.rectangle([32, 0, 63, 23], fill=(255, 255, 0, 0))  # blue
    draw.rectangle([32, 24, 63, 47], fill=(0, 0, 0, 255))  # black
    cmyk.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    prepared = prep(path)
    assert_well_formed(prepared)
    assert_colour(px(prepared, 10, 24), RED, 20)
    assert_colour(px(prepared, 50, 10), BLUE, 20)
    assert_colour(px(prepared, 50, 40), BLACK, 20)


@pytest.mark.parametrize(("mode", "key", "other"), [("RGB", RED, GREEN), ("L", 0, 200)])
def test_colour_key_transparency_in_rgb_and_l_pngs_becomes_white(tmp_path, mode, key, other):
    """A tRNS colour key (one colour or grey level that means 'transparent') without an alpha channel."""
    path = tmp_path / f"colour-key-{mode}.png"
    im = Image.new(mode, (40, 20), other)
    ImageDraw.Draw(im).rectangle([0, 0, 19, 19], fill=key)
    im.save(path, transparency=key)
    with Image.open(path) as check:
        assert check.mode == mode and "transparency" in check.info
    prepared = prep(path)
    assert px(prepared, 5, 10) == WHITE
    expected = other if mode == "RGB" else (other, other, other)
    assert px(prepared, 35, 10) == expected


def test_one_bit_png(tmp_path):
    path = tmp_path / "bilevel.png"
    im = Image.new("1", (40, 20), 0)
    ImageDraw.Draw(im).rectangle([20, 0, 39, 19], fill=1)
    im.save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    prepared = prep(path)
    assert_well_formed(prepared)
    assert px(prepared, 5, 10) == BLACK
    assert px(prepared, 35, 10) == WHITE


def test_one_bit_tiff(tmp_path):
    path = tmp_path / "fax.tif"
    im = Image.new("1", (40, 20), 1)
    ImageDraw.Draw(im).rectangle([0, 0, 19, 19], fill=0)
    im.save(path, compression="group4")
    prepared = prep(path)
    assert px(prepared, 5, 10) == BLACK
    assert px(prepared, 35, 10) == WHITE


def test_greyscale_l_png_keeps_its_grey_levels(tmp_path):
    path = tmp_path / "grey.png"
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    Image.fromarray(ramp, mode="L").save(path)
    prepared = prep(path, box=(512, 512))
    assert_well_formed(prepared)
    arr = np.asarray(prepared.image)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert (arr[0, :, 0] == np.arange(256)).all()


def _assert_gradient(prepared: PreparedImage, width: int) -> None:
    assert_well_formed(prepared)
    arr = np.asarray(prepared.image)
    assert arr.shape == (arr.shape[0], width, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all(), "grey stays grey"
    row = arr[0, :, 0]
    assert len(np.unique(row)) > 200, f"only {len(np.unique(row))} grey levels survived"
    assert row[0] == 0
    assert row[-1] == 255
    assert (np.diff(row.astype(int)) >= 0).all(), "a gradient stays monotonic"


def _png16(path: Path, pixels: np.ndarray, key: tuple[int, ...]) -> Path:
    """A 16-bit PNG (grey: (h, w); RGB: (h, w, 3)) with a tRNS colour key, written chunk by chunk (Pillow
    writes no 16-bit RGB)."""
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                     + chunk(b"tRNS", b"".join(struct.pack(">H", v) for v in key))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_colour_key_transparency_in_sixteen_bit_pngs_becomes_white(tmp_path, channels):
    """The key is in 16-bit values: the grey one was never looked at, and the RGB one compared with Pillow's
    8-bit pixels, so the hidden colour showed (black here) where the picture is clear."""
    key = (1000,) * channels if channels == 1 else (1000, 2000, 3000)
    pixels = np.full((20, 40, channels), 40000, dtype=np.uint16)
    pixels[:, 20:] = key
    prepared = prep(_png16(tmp_path / "key16.png", pixels.squeeze(), key))
    assert px(prepared, 30, 10) == WHITE
    assert_colour(px(prepared, 5, 10), (156, 156, 156), 2)


def test_sixteen_bit_png_gradient_keeps_many_grey_levels_and_maps_65535_to_255(tmp_path):
    path = tmp_path / "depth16.png"
    width = 1024
    ramp = np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I;16") or check.mode == "I"
        assert np.asarray(check).max() == 65535
    prepared = prep(path, box=(2048, 2048))
    _assert_gradient(prepared, width)
    # mid-grey 32768 -> about 128
    mid = np.asarray(prepared.image)[0, width // 2, 0]
    assert 120 <= mid <= 136


def test_sixteen_bit_tiff_gradient(tmp_path):
    path = tmp_path / "depth16.tiff"
    ramp = np.tile(np.linspace(0, 65535, 512).round().astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(path)
    _assert_gradient(prep(path, box=(1024, 1024)), 512)


def test_thirty_two_bit_integer_tiff_gradient(tmp_path):
    path = tmp_path / "int32.tiff"
    ramp = np.tile(np.linspace(0, 65535, 512).round().astype(np.int32), (4, 1))
    Image.fromarray(ramp, mode="I").save(path)
    with Image.open(path) as check:
        assert check.mode == "I"
    _assert_gradient(prep(path, box=(1024, 1024)), 512)


def test_thirty_two_bit_integer_tiff_on_its_full_range_is_scaled_not_clipped_to_white(tmp_path):
    path = tmp_path / "int32-full.tiff"
    ramp = np.tile(np.linspace(0, 2**31 - 1, 512).round().astype(np.int32), (4, 1))
    Image.fromarray(ramp, mode="I").save(path)
    _assert_gradient(prep(path, box=(1024, 1024)), 512)


def test_thirty_two_bit_integer_tiff_with_8_bit_range_is_kept_as_is(tmp_path):
    path = tmp_path / "int32-small.tiff"
    ramp = np.tile(np.arange(256, dtype=np.int32), (4, 1))
    Image.fromarray(ramp, mode="I").save(path)
    arr = np.asarray(prep(path, box=(1024, 1024)).image)
    assert (arr[0, :, 0] == np.arange(256)).all()


def test_float_tiff_in_unit_range(tmp_path):
    path = tmp_path / "float.tiff"
    ramp = np.tile(np.linspace(0.0, 1.0, 512, dtype=np.float32), (4, 1))
    Image.fromarray(ramp, mode="F").save(path)
    with Image.open(path) as check:
        assert check.mode == "F"
    _assert_gradient(prep(path, box=(1024, 1024)), 512)


def test_float_tiff_in_8_bit_range(tmp_path):
    path = tmp_path / "float255.tiff"
    ramp = np.tile(np.linspace(0.0, 255.0, 256, dtype=np.float32), (4, 1))
    Image.fromarray(ramp, mode="F").save(path)
    _assert_gradient(prep(path, box=(1024, 1024)), 256)


def test_float_tiff_on_a_scale_of_its_own_keeps_its_range(tmp_path):
    """0-1000 (a measurement, a scientific camera): scaled by its peak, not clipped to white above 255."""
    path = tmp_path / "float1000.tiff"
    ramp = np.tile(np.linspace(0.0, 1000.0, 512, dtype=np.float32), (4, 1))
    ramp[0, 0] = np.nan  # and a pixel with no value is black, not garbage
    Image.fromarray(ramp, mode="F").save(path)
    prepared = prep(path, box=(1024, 1024))
    _assert_gradient(prepared, 512)
    grey = np.asarray(prepared.image)[1, :, 0]
    assert grey[-1] >= 250 and 120 <= grey[256] <= 136  # 1000 -> white, 500 -> mid-grey
    assert np.asarray(prepared.image)[0, 0, 0] == 0


# --------------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------------


def quadrant_jpeg(path: Path, size=(200, 100), orientation: int | None = None) -> None:
    """Blue picture with a red top-left quadrant (as stored), optionally tagged with an EXIF orientation."""
    w, h = size
    im = Image.new("RGB", size, BLUE)
    ImageDraw.Draw(im).rectangle([0, 0, w // 2 - 1, h // 2 - 1], fill=RED)
    kwargs = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    im.save(path, format="JPEG", **kwargs)


def red_corner(prepared: PreparedImage) -> str:
    w, h = prepared.width, prepared.height
    corners = {
        "top-left": (w // 8, h // 8),
        "top-right": (w - 1 - w // 8, h // 8),
        "bottom-left": (w // 8, h - 1 - h // 8),
        "bottom-right": (w - 1 - w // 8, h - 1 - h // 8),
    }
    red = [name for name, xy in corners.items() if close(px(prepared, *xy), RED, 40)]
    blue = [name for name, xy in corners.items() if close(px(prepared, *xy), BLUE, 40)]
    assert len(red) == 1 and len(blue) == 3, f"corners: red={red} blue={blue}"
    return red[0]


@pytest.mark.parametrize(
    ("orientation", "size", "corner"),
    [
        (None, (200, 100), "top-left"),
        (1, (200, 100), "top-left"),
        (2, (200, 100), "top-right"),  # mirrored
        (3, (200, 100), "bottom-right"),  # 180
        (4, (200, 100), "bottom-left"),  # flipped
        (5, (100, 200), "top-left"),  # transpose
        (6, (100, 200), "top-right"),  # stored image is shown turned 90 degrees clockwise
        (7, (100, 200), "bottom-right"),  # transverse
        (8, (100, 200), "bottom-left"),  # shown turned 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, corner):
    path = tmp_path / f"rotated-{orientation}.jpg"
    quadrant_jpeg(path, orientation=orientation)
    prepared = prep(path)
    assert_well_formed(prepared)
    assert (prepared.width, prepared.height) == size
    assert (prepared.source_width, prepared.source_height) == (200, 100)  # as stored in the file
    assert red_corner(prepared) == corner


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
@pytest.mark.parametrize(("orientation", "size", "corner"), [
    (3, (200, 100), "bottom-right"), (6, (100, 200), "top-right"), (8, (100, 200), "bottom-left")])
def test_exif_orientation_of_a_tiff_is_applied_once(tmp_path, compression, orientation, size, corner):
    """Pillow turns a TIFF upright as it opens it: the picture is not turned a second time."""
    path = tmp_path / f"rotated-{orientation}.tiff"
    im = Image.new("RGB", (200, 100), BLUE)
    ImageDraw.Draw(im).rectangle([0, 0, 99, 49], fill=RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format="TIFF", exif=exif, **({"compression": compression} if compression else {}))
    prepared = prep(path)
    assert (prepared.width, prepared.height) == size
    assert red_corner(prepared) == corner


def test_exif_rotated_large_jpeg_fits_the_box_after_rotation(tmp_path):
    """Draft decoding must size for the rotated picture: a tall box and a sideways-stored photo."""
    path = tmp_path / "sideways.jpg"
    quadrant_jpeg(path, size=(2000, 1000), orientation=6)
    prepared = prep(path, box=(256, 512))
    assert (prepared.width, prepared.height) == (256, 512)
    assert red_corner(prepared) == "top-right"


def test_processed_jpeg_carries_no_orientation_tag(tmp_path):
    """The rotation is baked into the pixels; a viewer must not rotate the processed image again."""
    path = tmp_path / "rot.jpg"
    quadrant_jpeg(path, orientation=6)
    prepared = prep(path)
    with Image.open(io.BytesIO(prepared.jpeg_bytes)) as out:
        assert out.getexif().get(0x0112, 1) == 1


def test_broken_exif_block_does_not_cost_the_picture(tmp_path):
    path = tmp_path / "badexif.jpg"
    buf = io.BytesIO()
    two_colour().save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    # insert an APP1 "Exif" segment whose TIFF header is garbage right after SOI
    payload = b"Exif\x00\x00" + b"GARBAGEGARBAGE"
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(data[:2] + segment + data[2:])
    check_two_colour(prep(path))


# --------------------------------------------------------------------------------------------------
# Resizing: fit the box, keep the aspect ratio, never upscale
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "box", "expected"),
    [
        ((800, 400), (256, 256), (256, 128)),  # landscape
        ((300, 900), (256, 256), (85, 256)),  # portrait
        ((1000, 1000), (512, 256), (256, 256)),  # the tighter side wins
        ((1000, 500), (300, 600), (300, 150)),
        ((256, 256), (256, 256), (256, 256)),  # exactly the box
        ((50, 30), (256, 256), (50, 30)),  # small image stays its size: never upscaled
        ((10, 400), (256, 256), (6, 256)),
        ((3000, 1), (256, 256), (256, 1)),  # never below one pixel
    ],
)
def test_resize_keeps_aspect_ratio_and_never_upscales(tmp_path, source, box, expected):
    path = tmp_path / "img.png"
    Image.new("RGB", source, GREEN).save(path)
    prepared = prep(path, box=box)
    assert_well_formed(prepared)
    assert (prepared.width, prepared.height) == expected
    assert (prepared.source_width, prepared.source_height) == source
    assert prepared.width <= max(box[0], 1) and prepared.height <= box[1]


def test_small_jpeg_is_not_upscaled(tmp_path):
    path = tmp_path / "thumb.jpg"
    two_colour((40, 30)).save(path, quality=95)
    prepared = prep(path, box=(1024, 1024))
    assert (prepared.width, prepared.height) == (40, 30)


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    """A 4000x3000 photo-like JPEG (smooth gradients, a red top-left quadrant) written once per module."""
    path = tmp_path_factory.mktemp("large") / "large.jpg"
    w, h = 4000, 3000
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[..., 0] = 0
    arr[..., 1] = (x * 0.5 + y * 0.0).astype(np.uint8)
    arr[..., 2] = 255
    arr[: h // 2, : w // 2] = RED
    Image.fromarray(arr).save(path, quality=85)
    return path


@pytest.mark.parametrize(
    ("box", "expected"),
    [((1024, 1024), (1024, 768)), ((1000, 1000), (1000, 750)), ((333, 333), (333, 250)), ((4000, 4000), (4000, 3000))],
)
def test_large_jpeg_draft_decoding_still_yields_exactly_the_fitted_size(large_jpeg, box, expected):
    prepared = prep(large_jpeg, box=box)
    assert_well_formed(prepared)
    assert (prepared.width, prepared.height) == expected
    assert (prepared.source_width, prepared.source_height) == (4000, 3000)
    assert red_corner_of_quadrant_picture(prepared)


def red_corner_of_quadrant_picture(prepared: PreparedImage) -> bool:
    w, h = prepared.width, prepared.height
    return close(px(prepared, w // 8, h // 8), RED, 40) and not close(px(prepared, w - 1 - w // 8, h - 1 - h // 8), RED, 40)


_PEAK_MEMORY_PROBE = """
import sys
from pathlib import Path
from stat import S_IMODE
from image_search.preprocess import preprocess_image
def peak_kib():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
before = peak_kib()
prepared = preprocess_image(Path(sys.argv[1]), max_size=(333, 333), max_pixels=178_956_970)
assert (prepared.width, prepared.height) == (333, 250), prepared
print(peak_kib() - before)
"""


@pytest.mark.e2e
def test_large_jpeg_draft_is_actually_used(large_jpeg):
    """Draft decoding: Pillow never materialises the full 12-megapixel frame (36 MB of RGB) for a small target.

    Measured as the growth of the peak resident memory of a fresh interpreter around one call.
    """
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak memory")
    with Image.open(large_jpeg) as im:
        im.draft("RGB", (333, 250))
        assert im.size == (500, 375), "this Pillow supports JPEG draft scaling (1/8 here)"
    result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_PROBE, str(large_jpeg)], capture_output=True,
                            text=True, check=True, timeout=60)
    growth_mib = int(result.stdout.strip()) / 1024
    assert growth_mib < 20, f"peak memory grew by {growth_mib:.1f} MiB: the full frame was decoded"


_CONVERSION_PEAK_PROBE = """
import sys
from pathlib import Path
from image_search.preprocess import preprocess_image
def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
before = peak_kib()
preprocess_image(Path(sys.argv[1]), max_size=(333, 333), max_pixels=178_956_970)
print(peak_kib() - before)
"""


def _sixteen_bit_grey_gradient(size: int) -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 65535, size).round().astype(np.uint16), (size, 1)))


def _palette_with_a_clear_index(size: int) -> Image.Image:
    picture = Image.new("P", (size, size), 1)
    picture.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    picture.info["transparency"] = 0
    return picture


@pytest.mark.e2e
@pytest.mark.parametrize(("name", "make", "decoded_mib"), [
    ("grey16.png", _sixteen_bit_grey_gradient, 32),  # 2 bytes a pixel
    ("rgba.png", lambda size: Image.new("RGBA", (size, size), (200, 100, 50, 128)), 64),
    ("palette-trns.png", _palette_with_a_clear_index, 16),
])
def test_a_big_deep_grey_or_transparent_png_costs_about_what_an_rgb_one_does(tmp_path, name, make, decoded_mib):
    """A 16 MP picture of a few hundred KB: converted whole, its working copies (float64 levels, an RGBA
    copy and a white layer) took 260-400 MiB; a strip at a time, the decoded picture, its 64 MiB RGB output
    (L for deep grey) and a few strips' worth."""
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak memory")
    path = tmp_path / name
    make(4000).save(path, **({"transparency": 0} if name.startswith("palette") else {}))
    assert path.stat().st_size < 1_000_000
    result = subprocess.run([sys.executable, "-c", _CONVERSION_PEAK_PROBE, str(path)], capture_output=True,
                            text=True, check=True, timeout=120)
    growth_mib = int(result.stdout.strip()) / 1024
    assert growth_mib < decoded_mib + 64 + 32, f"peak memory grew by {growth_mib:.0f} MiB"


@pytest.mark.parametrize("name", ["grey16-trns.png", "rgb16-trns.png", "rgba.png", "la.png", "palette-alpha.png",
                                  "float.tiff", "int32.tiff"])
def test_a_picture_converted_a_strip_of_rows_at_a_time_has_the_pixels_of_one_converted_whole(
        tmp_path, monkeypatch, name):
    """Deep grey and transparency are converted in strips of rows (a big picture's working copies are a
    strip's): every seam between strips, here every 3 rows, leaves the pixels as they were."""
    import image_search.preprocess as preprocess

    rng = np.random.default_rng(3)
    levels = rng.integers(0, 65536, (61, 50)).astype(np.uint16)
    alpha = rng.integers(0, 256, (61, 50), dtype=np.uint8)
    colours = rng.integers(0, 256, (61, 50, 3), dtype=np.uint8)
    path = tmp_path / name
    if name == "grey16-trns.png":
        _png16(path, levels, (int(levels[5, 5]),))
    elif name == "rgb16-trns.png":
        _png16(path, np.dstack([levels, levels[::-1], levels[:, ::-1]]), (1000, 2000, 3000))
    elif name == "rgba.png":
        Image.fromarray(np.dstack([colours, alpha])).save(path)
    elif name == "la.png":
        Image.fromarray(np.dstack([colours[..., 0], alpha]), "LA").save(path)
    elif name == "palette-alpha.png":
        Image.fromarray(colours).quantize(32).save(path, transparency=bytes(range(0, 256, 8)))
    elif name == "float.tiff":
        scaled = levels.astype(np.float32) / 60.0
        scaled[0, :4] = np.nan
        Image.fromarray(scaled, "F").save(path)
    else:
        Image.fromarray(levels.astype(np.int32) * 9000, "I").save(path)
    whole = prep(path, box=(1024, 1024))
    monkeypatch.setattr(preprocess, "_STRIP_PIXELS", 150)  # 3 rows of 50
    pieces: list[int] = []
    real_crop = Image.Image.crop
    monkeypatch.setattr(Image.Image, "crop", lambda im, box=None: pieces.append(box[3] - box[1]) or real_crop(im, box))
    in_strips = prep(path, box=(1024, 1024))
    # Every row converted, 3 at a time (a 32-bit or float picture is gone through twice: its peak first).
    assert pieces and max(pieces) == 3 and sum(pieces) % 61 == 0
    assert in_strips.image.tobytes() == whole.image.tobytes()
    assert in_strips.jpeg_bytes == whole.jpeg_bytes


def test_deep_grey_resized_as_grey_has_the_pixels_it_had_resized_as_rgb(tmp_path) -> None:
    """16-bit grey is kept one band through the resize (a third of the memory): the same pixels as the
    whole picture made RGB first and then resized, as it was."""
    from image_search.geometry import FIT_REDUCING_GAP, FIT_RESAMPLE
    from image_search.preprocess import processed_size

    levels = np.random.default_rng(4).integers(0, 65536, (301, 157)).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)  # mode I;16
    box = (40, 40)
    rgb = Image.fromarray(np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    expected = rgb.resize(processed_size(rgb.size, box), FIT_RESAMPLE, reducing_gap=FIT_REDUCING_GAP)
    got = prep(path, box=box).image
    assert got.mode == "RGB" and got.size == expected.size
    assert got.tobytes() == expected.tobytes()


def test_large_jpeg_hash_is_deterministic(large_jpeg):
    assert prep(large_jpeg, box=(512, 512)).file_hash == prep(large_jpeg, box=(512, 512)).file_hash
    # ...because it is the MD5 of the file's bytes, whatever the draft decode and the box made of them.
    assert prep(large_jpeg, box=(512, 512)).file_hash == hashlib.md5(large_jpeg.read_bytes()).hexdigest()
    assert prep(large_jpeg, box=(1024, 1024)).file_hash == hashlib.md5(large_jpeg.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# The processed-path mirror, saving, and the identity
# --------------------------------------------------------------------------------------------------


def test_processed_path_mirrors_sub_folders_and_keeps_the_source_extension(tmp_path):
    src, out = tmp_path / "images", tmp_path / "processed"
    assert processed_path_for(src / "a.jpg", src, out) == out / "a.jpg.jpg"
    assert processed_path_for(src / "trips" / "2024" / "beach.png", src, out) == out / "trips" / "2024" / "beach.png.jpg"


def test_processed_path_distinguishes_names_that_differ_only_in_extension(tmp_path):
    src, out = tmp_path / "images", tmp_path / "processed"
    names = ["apple.png", "apple.webp", "apple.jpg", "apple.jpeg", "apple.JPG", "apple"]
    mapped = [processed_path_for(src / "fruit" / n, src, out) for n in names]
    assert len(set(mapped)) == len(names)
    assert all(p.parent == out / "fruit" for p in mapped)
    assert all(p.suffix == ".jpg" for p in mapped)


def test_a_folder_named_as_a_processed_copy_has_a_place_of_its_own(tmp_path):
    """``a.png.jpg/`` beside ``a.png``: the folder and the copy would need one name."""
    src, out = tmp_path / "images", tmp_path / "processed"
    sources = [src / "a.png", src / "a.png.jpg" / "b.png", src / "a.png.jpg_" / "b.png", src / "a.png.jpg__" / "b.png",
               src / "x" / "a.png.jpg" / "c.jpg.jpg" / "d.png", src / "x" / "a.png.jpg" / "c.jpg"]
    mapped = [processed_path_for(s, src, out) for s in sources]
    assert mapped[:2] == [out / "a.png.jpg", out / "a.png.jpg_" / "b.png.jpg"]
    assert mapped[4] == out / "x" / "a.png.jpg_" / "c.jpg.jpg_" / "d.png.jpg"
    assert len(set(mapped)) == len(sources)
    # No processed folder is any copy's path, nor the start of another's.
    folders = {folder for path in mapped for folder in path.relative_to(out).parents if folder != Path(".")}
    assert not folders & {path.relative_to(out) for path in mapped}
    assert processed_path_for(src / "x.jpeg" / "y.jpg", src, out) == out / "x.jpeg" / "y.jpg.jpg"  # only .jpg


def test_processed_path_refuses_a_source_outside_the_source_root(tmp_path):
    with pytest.raises(ValueError):
        processed_path_for(tmp_path / "elsewhere" / "x.jpg", tmp_path / "images", tmp_path / "processed")


def test_apple_png_and_apple_webp_both_survive_save_processed(tmp_path):
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    src, out = tmp_path / "images", tmp_path / "processed"
    (src / "fruit").mkdir(parents=True)
    Image.new("RGB", (32, 32), RED).save(src / "fruit" / "apple.png")
    Image.new("RGB", (32, 32), GREEN).save(src / "fruit" / "apple.webp", lossless=True)
    results = {}
    for name in ("apple.png", "apple.webp"):
        source = src / "fruit" / name
        prepared = prep(source)
        target = processed_path_for(source, src, out)
        save_processed(prepared, target)
        results[name] = (prepared, target)
    (png, png_path), (webp, webp_path) = results["apple.png"], results["apple.webp"]
    assert png_path != webp_path
    assert png_path.exists() and webp_path.exists()
    assert png.file_hash != webp.file_hash
    assert png_path.read_bytes() == png.jpeg_bytes and webp_path.read_bytes() == webp.jpeg_bytes
    with Image.open(png_path) as a, Image.open(webp_path) as b:
        assert_colour(a.convert("RGB").getpixel((16, 16)), RED)
        assert_colour(b.convert("RGB").getpixel((16, 16)), GREEN)
    assert sorted(p.name for p in (out / "fruit").iterdir()) == [
        ".apple.png.jpg.thumb.jpg", ".apple.webp.jpg.thumb.jpg", "apple.png.jpg", "apple.webp.jpg"]
    with Image.open(thumbnail_path_for(webp_path)) as thumb:  # the contact sheet's small copy
        assert thumb.size == (32, 32)  # never enlarged
        assert_colour(thumb.convert("RGB").getpixel((16, 16)), GREEN)


def test_file_hash_is_the_md5_of_the_source_bytes_and_is_deterministic(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    source = src / "photo.jpg"
    quadrant_jpeg(source, size=(640, 480), orientation=6)
    first = prep(source)
    second = prep(source)
    assert first.file_hash == second.file_hash == hashlib.md5(source.read_bytes()).hexdigest()
    assert first.jpeg_bytes == second.jpeg_bytes
    for run, out in (("run1", tmp_path / "p1"), ("run2", tmp_path / "p2")):
        target = processed_path_for(source, src, out)
        save_processed(first if run == "run1" else second, target)
        assert target.read_bytes() == first.jpeg_bytes
    # a copy of the file elsewhere, under another name, has the same identity
    copy = tmp_path / "copy-of-photo.jpeg"
    copy.write_bytes(source.read_bytes())
    assert prep(copy).file_hash == first.file_hash


def test_file_hash_is_the_source_s_alone_whatever_the_box_or_the_decode(tmp_path):
    """Identity follows the file, not what one decoder and one box made of it: a GPU decode or another
    resize-width gives other processed pixels but the same file_hash (no duplicate, no re-embedding)."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    two_colour((300, 200)).save(a)
    two_colour((300, 200), left=BLUE).save(b)
    assert prep(a).file_hash != prep(b).file_hash
    small, large = prep(a, box=(128, 128)), prep(a, box=(256, 256))
    assert small.jpeg_bytes != large.jpeg_bytes
    assert small.file_hash == large.file_hash == source_identity(a.read_bytes())
    # the same pixels in another file are another source (metadata, container and encoder all count)
    c = tmp_path / "c.png"
    two_colour((300, 200)).save(c, compress_level=1)
    assert a.read_bytes() != c.read_bytes()
    assert prep(c).file_hash != prep(a).file_hash


def test_save_processed_is_atomic_and_skips_identical_content(tmp_path):
    source = tmp_path / "pic.png"
    two_colour().save(source)
    prepared = prep(source)
    target = tmp_path / "processed" / "deep" / "er" / "pic.png.jpg"
    save_processed(prepared, target)  # creates the parent folders
    stat = target.stat()
    save_processed(prepared, target)  # identical: not rewritten
    again = target.stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # different content at the same path is replaced
    target.write_bytes(b"stale")
    save_processed(prepared, target)
    assert target.read_bytes() == prepared.jpeg_bytes
    leftovers = [p.name for p in target.parent.iterdir() if p not in (target, thumbnail_path_for(target))]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_a_copy_whose_folder_is_removed_as_it_empties_is_written_all_the_same(tmp_path, monkeypatch):
    """The service removes a processed folder left empty (the last picture of a folder renamed away) while
    a worker writes a new copy into it: between the worker's mkdir and its file, the folder went."""
    import image_search.preprocess as preprocess

    target = tmp_path / "processed" / "album" / "pic.png.jpg"
    real = preprocess.create_beside
    removed = []

    def emptied_first(path: Path):  # noqa: ANN202
        if not removed:
            path.parent.rmdir()
            removed.append(path.parent)
        return real(path)

    monkeypatch.setattr(preprocess, "create_beside", emptied_first)
    write_atomically(target, b"jpeg")
    assert removed == [target.parent] and target.read_bytes() == b"jpeg"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_processed_copy_thumbnail_and_atomic_writes_get_the_mode_open_gives_under_the_umask(tmp_path, umask, mode):
    """0666 less the umask, as ``open()`` gives a result file: with the unit's UMask=0027 the service's group
    reads the processed copies and a failed query's ``.error.txt`` (written by ``write_atomically``) too."""
    source = tmp_path / "pic.png"
    two_colour().save(source)
    target = tmp_path / "processed" / "pic.png.jpg"
    reason = tmp_path / "inbox" / "failed" / "q.png.error.txt"
    previous = os.umask(umask)
    try:
        save_processed(prep(source), target)
        write_atomically(reason, b"q.png: not an image\n")
    finally:
        os.umask(previous)
    modes = {p.name: S_IMODE(p.stat().st_mode) for p in (target, thumbnail_path_for(target), reason)}
    assert modes == dict.fromkeys(modes, mode), {k: oct(v) for k, v in modes.items()}


# --------------------------------------------------------------------------------------------------
# Bad inputs: each refused with a specific reason
# --------------------------------------------------------------------------------------------------


def refuse(path: Path, **kwargs) -> PreprocessError:
    with pytest.raises(PreprocessError) as info:
        prep(path, **kwargs)
    err = info.value
    assert err.path == path
    assert str(path) in str(err)
    assert err.reason in str(err)
    return err


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert "empty" in refuse(path).reason


def test_missing_file(tmp_path):
    assert "disappeared" in refuse(tmp_path / "gone.jpg").reason


@pytest.mark.parametrize(("name", "fmt"), [("cut.jpg", "JPEG"), ("cut.png", "PNG")])
def test_truncated_file_cut_in_half(tmp_path, name, fmt):
    path = tmp_path / name
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format=fmt)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    err = refuse(path)
    assert "truncated" in err.reason


@pytest.mark.parametrize("fraction", [0.9, 0.99])
def test_jpeg_missing_only_its_tail_is_truncated(tmp_path, fraction):
    """An unfinished copy: most of the bytes are there, the end of the stream is not."""
    path = tmp_path / "partial.jpg"
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * fraction)])
    assert "truncated" in refuse(path).reason


def test_text_file_named_jpg_is_not_a_supported_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my holiday notes, not a picture\n" * 10)
    assert "not a supported image" in refuse(path).reason


def test_a_png_whose_header_chunk_is_damaged_is_a_corrupt_picture_not_another_kind_of_file(tmp_path):
    buf = io.BytesIO()
    two_colour().save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[29] ^= 0xFF  # a byte of IHDR's CRC (8 signature + 4 length + 4 type + 13 data)
    path = tmp_path / "scratched.png"
    path.write_bytes(bytes(data))
    assert refuse(path).reason == "corrupt image (its content begins as a PNG file, but its header cannot be read)"


def test_a_png_whose_pixel_data_breaks_is_refused_not_indexed_as_what_was_decoded(tmp_path):
    """Reading a PNG's EXIF decodes it (EXIF may follow the pixels): the break must refuse the picture,
    not pass as 'no EXIF' and leave a half-black picture counted as decoded."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[data.index(b"IDAT") + 104] ^= 0xFF  # a byte inside the compressed pixels
    path = tmp_path / "scratched.png"
    path.write_bytes(bytes(data))
    assert "broken data stream" in refuse(path).reason


def _minimal_psd() -> bytes:
    """A valid 2x2 8-bit greyscale Photoshop file that Pillow's PSD decoder would happily parse."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, 2, 2, 8, 1)
    sections = struct.pack(">I", 0) * 3  # colour mode data, image resources, layer and mask info
    return header + sections + struct.pack(">H", 0) + bytes([0, 64, 128, 255])


def _minimal_eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
            b"0 0 moveto 10 10 lineto stroke\n%%EOF\n")


def test_psd_renamed_png_is_never_parsed(tmp_path):
    path = tmp_path / "layers.png"
    path.write_bytes(_minimal_psd())
    with Image.open(path) as check:  # Pillow, unrestricted, would parse it: the fixture is a real PSD
        assert check.format == "PSD"
    assert "not a supported image" in refuse(path).reason


def test_eps_renamed_png_is_never_parsed(tmp_path):
    path = tmp_path / "vector.png"
    path.write_bytes(_minimal_eps())
    with Image.open(path) as check:
        assert check.format == "EPS"
    assert "not a supported image" in refuse(path).reason


def test_pdf_renamed_png_is_not_a_supported_image(tmp_path):
    path = tmp_path / "scan.png"
    two_colour().save(path, format="PDF")
    assert path.read_bytes().startswith(b"%PDF")
    assert "not a supported image" in refuse(path).reason


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PPM"])
def test_other_pillow_formats_renamed_jpg_are_not_supported(tmp_path, fmt):
    path = tmp_path / f"disguised-{fmt.lower()}.jpg"
    Image.new("RGB", (16, 16), RED).save(path, format=fmt)
    assert "not a supported image" in refuse(path).reason


def _bilevel_png(width: int, height: int) -> bytes:
    """A genuine 1-bit PNG of any size, written by hand so huge headers cost only a few KB and no RAM."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    stream = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_bilevel_png(20_000, 20_000))
    return path


def test_bomb_fixture_is_a_small_real_png(bomb_png, monkeypatch):
    assert bomb_png.stat().st_size < 200_000
    with pytest.raises(Image.DecompressionBombError):  # stock Pillow refuses it from the header alone
        Image.open(bomb_png, formats=["PNG"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # with the guard off it opens as a real 1-bit PNG
    with Image.open(bomb_png, formats=["PNG"]) as check:
        assert (check.format, check.mode, check.size) == ("PNG", "1", (20_000, 20_000))


def test_decompression_bomb_is_refused_naming_the_limit_and_the_config_key(bomb_png):
    err = refuse(bomb_png, max_pixels=50_000_000)
    assert "max-image-pixels" in err.reason
    assert "50,000,000" in err.reason or "50000000" in err.reason


def test_decompression_bomb_above_pillows_hard_limit_is_refused_even_with_the_default_limit(bomb_png):
    err = refuse(bomb_png, max_pixels=BIG_LIMIT)
    assert "max-image-pixels" in err.reason


def _png_with_xmp(path: Path, ancestors: int) -> Path:
    """A red PNG whose XMP (a compressed iTXt, as Photoshop writes it) lists ``ancestors`` DocumentAncestors:
    57 bytes each unpacked, a few in the file."""
    bag = "".join(f"<rdf:li>xmp.did:{i:032x}</rdf:li>" for i in range(ancestors))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", f"<x:xmpmeta><photoshop:DocumentAncestors><rdf:Bag>{bag}"
                  "</rdf:Bag></photoshop:DocumentAncestors></x:xmpmeta>", zip=True)
    two_colour().save(path, pnginfo=info)
    return path


def test_a_photoshop_png_whose_xmp_unpacks_to_megabytes_is_indexed(tmp_path):
    """Pillow refuses a text chunk that unpacks to more than 1 MiB: such a PNG, valid, was refused as
    'corrupt image (ValueError: Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK)'."""
    path = _png_with_xmp(tmp_path / "layered.png", 40_000)  # 2.3 MB of XMP, ~110 KB in the file
    assert path.stat().st_size < 200_000
    check_two_colour(prep(path))


def test_a_png_text_chunk_that_unpacks_to_more_than_16_mib_is_refused_in_plain_words(tmp_path):
    path = _png_with_xmp(tmp_path / "hostile.png", 400_000)  # 23 MB of XMP, ~1 MB in the file
    reason = refuse(path).reason
    assert reason == ("a compressed metadata chunk (PNG zTXt or iTXt, such as XMP, or an iCCP colour profile) "
                      "unpacks to more than 16 MiB; refused as a possible decompression bomb")


def test_a_bomb_above_pillows_own_guard_is_refused_in_the_words_of_a_smaller_one(bomb_png, monkeypatch):
    """Pillow refuses at open a picture above twice its limit, before the header's size is ours to check: a
    15000x15000 PNG was refused naming 'max-image-pixels', this one with Pillow's own 'exceeds limit of
    357913940 pixels, could be decompression bomb DOS attack'."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BIG_LIMIT)  # as Pillow ships it (another test may raise it)
    assert refuse(bomb_png, max_pixels=BIG_LIMIT).reason == (
        "image too large: 400,000,000 pixels is above the limit of 178,956,970 (config key 'max-image-pixels'; "
        "refused as a possible decompression bomb)")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the module's filter
def test_a_limit_configured_above_pillows_own_is_the_one_that_holds(bomb_png, monkeypatch):
    """'max-image-pixels' takes up to 10^9 (a 200 MP phone's photo is 16320x12240), while Pillow as it ships
    refuses at open anything above 178,956,970 pixels: every picture in between was refused whatever the
    config said. The configured limit is the one that decides now."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    err = refuse(bomb_png, max_pixels=300_000_000)
    assert err.reason.startswith("image too large: 20000x20000 = 400,000,000 pixels is above the limit of 300,000,000")


def test_image_just_above_a_configured_small_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "medium.png"
    path.write_bytes(_bilevel_png(3000, 2000))  # 6 MP, a few KB on disk
    err = refuse(path, max_pixels=5_000_000)
    assert "max-image-pixels" in err.reason and "5,000,000" in err.reason
    assert "3000x2000" in err.reason


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the module's filter
def test_image_between_pillows_warning_and_hard_limits_uses_the_configured_limit(tmp_path):
    """12000x12000 = 144 MP: above Pillow's warning threshold, below its hard limit; our limit decides."""
    path = tmp_path / "big.png"
    path.write_bytes(_bilevel_png(12_000, 12_000))
    err = refuse(path, max_pixels=100_000_000)
    assert "max-image-pixels" in err.reason and "100,000,000" in err.reason


def test_image_exactly_at_the_limit_is_accepted(tmp_path):
    path = tmp_path / "edge.png"
    path.write_bytes(_bilevel_png(300, 200))
    prepared = prep(path, max_pixels=60_000)
    assert (prepared.width, prepared.height) == (256, 171)
    refuse(path, max_pixels=59_999)


# --- colour profiles ---------------------------------------------------------------------------------


def _hamming(a: int, b: int) -> int:
    return bin((a ^ b) & (1 << 64) - 1).count("1")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_display_p3_picture_is_converted_to_srgb_as_its_srgb_export_is(tmp_path: Path, fmt: str) -> None:
    """An iPhone's photo (Display P3) and the same photo exported to sRGB: read as they were, the P3 one's
    colours were duller than any viewer shows them (12.7 levels off on average) and the two were up to 8
    bits apart, a near-copy missed; converted, they are the same picture."""
    import io

    from PIL import ImageCms

    from tests.support.derived import scene
    from tests.support.files import display_p3_profile

    p3 = display_p3_profile()
    picture = scene(3)
    picture.save(tmp_path / f"p3.{fmt.lower()}", format=fmt, icc_profile=p3, quality=95)
    exported = ImageCms.profileToProfile(picture, ImageCms.ImageCmsProfile(io.BytesIO(p3)),
                                         ImageCms.createProfile("sRGB"), outputMode="RGB", renderingIntent=1)
    exported.save(tmp_path / "srgb.png")
    converted, export = prep(tmp_path / f"p3.{fmt.lower()}", (400, 300)), prep(tmp_path / "srgb.png", (400, 300))
    difference = np.abs(np.asarray(converted.image, np.int16) - np.asarray(export.image, np.int16))
    assert difference.mean() < 2.5
    assert _hamming(converted.phash, export.phash) <= 2


@pytest.mark.parametrize(("chunks", "level"), [
    ({b"gAMA": 100_000}, 186),  # linear light: mid-grey is brighter on a 2.2 display, as a browser shows it
    ({b"gAMA": 55_556}, 146),  # an old Mac's 1/1.8
    ({b"gAMA": 45_455}, 128),  # sRGB's own 1/2.2: as it is
    ({b"gAMA": 100_000, b"sRGB": 0}, 128),  # an sRGB chunk overrides gAMA (PNG specification 11.3.3)
])
def test_a_png_gamma_other_than_srgbs_is_corrected_as_a_viewer_shows_it(tmp_path: Path, chunks: dict,
                                                                          level: int) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for name, value in chunks.items():
        info.add(name, struct.pack(">I", value) if name == b"gAMA" else bytes([value]))
    Image.new("RGB", (64, 48), (128, 128, 128)).save(tmp_path / "grey.png", pnginfo=info)
    Image.new("L", (64, 48), 128).save(tmp_path / "grey-l.png", pnginfo=info)
    for name in ("grey.png", "grey-l.png"):
        pixels = np.asarray(prep(tmp_path / name, (64, 48)).image, np.int16)
        assert np.abs(pixels - level).max() <= 1, (name, pixels.mean())


def test_srgb_and_unreadable_profiles_leave_the_pixels_as_they_are(tmp_path: Path) -> None:
    from PIL import ImageCms

    from tests.support.derived import scene

    picture = scene(4)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, icc in (("plain.png", None), ("srgb.png", srgb), ("garbage.png", b"not a profile at all" * 10)):
        picture.save(tmp_path / name, icc_profile=icc) if icc else picture.save(tmp_path / name)
    plain = np.asarray(prep(tmp_path / "plain.png", (400, 300)).image)
    for name in ("srgb.png", "garbage.png"):
        assert np.array_equal(np.asarray(prep(tmp_path / name, (400, 300)).image), plain), name
