"""Preprocessing: decode any supported image safely, normalise it, and give it an identity.

Pure functions apart from ``save_processed``. Normalising means: EXIF orientation applied, any
mode converted to 8-bit RGB (transparency composited onto white), resized to fit the configured
box keeping the aspect ratio and never upscaling, and encoded as a JPEG.

The identity (``file_hash``) is the MD5 of the source file's bytes, exactly the bytes that were decoded
(the file is read once). Not of the processed JPEG: decoders differ in their last bits (nvJPEG on a
GPU against libjpeg-turbo here, one libjpeg-turbo release against another), and an identity must be
the same on every host and every decode path, or a mixed fleet and a fallback would store one picture
twice and embed it again. See ``source_identity`` and the README's "Identity".
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from .claimed import holds_marker
from .colours import in_srgb
from .config import Config
from .discover import SUPPORTED_FORMATS, supported_formats_for_people
from .entries import EntryRefused, LinkPolicy, open_regular, read_regular
from .errors import OutputUnwritable, UnusableFile
from .geometry import (
    FIT_REDUCING_GAP,
    FIT_RESAMPLE,
    JPEG_QUALITY,
    THUMBNAIL_QUALITY,
    THUMBNAIL_REDUCING_GAP,
    THUMBNAIL_RESAMPLE,
    THUMBNAIL_SIZE,  # noqa: F401  (sheet.py reads it from here)
    decode_box,
    exif_orientation,
    fit_inside,
    processed_size,
    thumbnail_size,
    upright_transpose,
)
from .metadata import PictureMetadata, picture_metadata
from .names import escape, fit_name, fits_path
from .phash import perceptual_hash

PROCESSED_SUFFIX = ".jpg"

# Register every plugin so the formats we name can be opened; only those formats are ever tried.
Image.init()
# HEIC/HEIF through libheif. libheif applies the file's rotation and mirroring while decoding and
# pillow-heif then reports EXIF orientation 1, so the orientation rule below never turns it twice.
# Embedded thumbnails, depth maps and auxiliary images are never used: do not even read them.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
# Truncation is how an unfinished write shows: never decode a partial file as if it were whole.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# A PNG's compressed text chunk (zTXt, iTXt) or colour profile (iCCP) may unpack to this much; Pillow's own 1 MiB refused a valid PNG
# whose XMP Photoshop made 2.2 MB with a long DocumentAncestors list. Still a bound: a chunk of a few KB can
# unpack to gigabytes. All text chunks together stay at Pillow's 64 MiB (MAX_TEXT_MEMORY).
TEXT_CHUNK_LIMIT = 16 * 1024 * 1024
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, TEXT_CHUNK_LIMIT)
# Our own pixel limit (checked from the header, before decoding) is the guard; Pillow's softer
# warning between its limit and twice it would only be noise next to it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class PreprocessError(UnusableFile):
    """A picture that cannot be used, with the specific reason (shown to the user with the path)."""


class IncompleteFile(PreprocessError):
    """Empty or truncated: what a picture that is still being written looks like (see ``UnusableFile``)."""

    still_arriving = True


# The model's input from the normalised RGB picture (e.g. ``functools.partial(to_model_pixels, spec=...)``):
# a top-level, picklable callable, since the worker pool sends it to every worker.
ModelInput = Callable[[Image.Image], np.ndarray]


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One prepared picture, from preprocessing to its row: the only such type, made alike by the CPU path
    (``preprocess_image``, in a worker process or in this one) and by the batched JPEG decoder
    (``gpudecode``). What is stored for the source is its identity (``source_identity``), the processed
    JPEG, its sizes and the contact sheet's thumbnail; what the model gets is ``pixels``.

    ``image``: the normalised RGB picture, only in the process that decoded it on the CPU path (a query,
    the result bundle); None once it has crossed from a worker (plain bytes and numbers are cheap to send)
    and from the GPU decoder. ``pixels``: the model's input (``model_input(image)``: an (H, W, 3) uint8
    array from the CPU path, a tensor on the device from the GPU decoder), or None when none was asked for.
    ``Embedder.embed_images`` takes it as it is.
    """

    path: Path
    jpeg_bytes: bytes = field(repr=False)
    file_hash: str
    width: int
    height: int
    source_width: int
    source_height: int
    thumbnail_jpeg: bytes = field(repr=False)
    image: Image.Image | None = field(default=None, repr=False)
    pixels: np.ndarray | Any | None = field(default=None, repr=False)  # Any: a torch tensor (never imported here)
    metadata: PictureMetadata | None = None  # read from the original's header (``metadata``)
    # ``phash.perceptual_hash`` of the thumbnail; None from the GPU decoder (filled later from the
    # thumbnail file: ``duplicates.fill_missing_hashes``).
    phash: int | None = None
    # Where the processed JPEG and its thumbnail were saved already (by the worker process that made them,
    # ``workers.ProcessedFolders``; ``jpeg_bytes`` and ``thumbnail_jpeg`` are then empty: read the files);
    # None: not saved, the indexer saves them itself.
    saved_to: Path | None = None

    def without_image(self) -> PreparedImage:
        """This picture without the PIL image: what crosses between processes."""
        return replace(self, image=None) if self.image is not None else self


def normalised_pixels(image: Image.Image) -> np.ndarray:
    """A ``model_input`` that returns the normalised RGB image itself, (H, W, 3) uint8.

    For a model whose own processor still wants the full image: ``Image.fromarray(pixels)`` gives back
    exactly the pixels ``preprocess_image`` produced (not a JPEG round trip of them).
    """
    return np.asarray(image, dtype=np.uint8)


def _md5(data: bytes = b"") -> hashlib._Hash:
    return hashlib.md5(data, usedforsecurity=False)


def md5_hex(data: bytes) -> str:
    return _md5(data).hexdigest()


def source_identity(data: bytes) -> str:
    """The ``file_hash`` of a source file whose bytes are ``data``: their MD5, whatever decodes them."""
    return md5_hex(data)


def source_identity_of_file(path: Path, expected: tuple[int, int]) -> str | None:
    """``source_identity`` of the file at ``path``, streamed (the identity migration hashes whole
    libraries without holding any file in memory), or None when its (size, mtime_ns) is not
    ``expected`` once it has been read: a file rewritten while it was hashed is not the one whose
    identity was wanted. OSError if it cannot be read; EntryRefused if it is no regular file."""
    with open_regular(path) as (handle, _):
        identity = hashlib.file_digest(handle, _md5).hexdigest()
        st = os.fstat(handle.fileno())
    return identity if (st.st_size, st.st_mtime_ns) == expected else None


def unreadable_reason(exc: OSError, expected: str) -> str:
    """Why a file the user dropped could not be read, in their words (``expected``: what it should be)."""
    if isinstance(exc, FileNotFoundError):
        return "file disappeared before it could be read"
    if isinstance(exc, IsADirectoryError):
        return f"is a folder, not {expected}"
    if exc.errno == errno.ENAMETOOLONG:
        return "its name or path is longer than this system allows"
    return f"cannot read file ({exc.strerror or exc})"


def read_source(path: Path, links: LinkPolicy | None = None) -> bytes:
    """A source file's bytes, read once (hashed and decoded from the same bytes, never read twice), or
    PreprocessError naming why it cannot be read: not a regular file or a link ``links`` does not
    follow (``entries``); an empty file, or one still growing, is ``IncompleteFile``."""
    try:
        data = read_regular(path, links)
    except EntryRefused as exc:
        raise (IncompleteFile if exc.growing else PreprocessError)(path, exc.reason) from None
    except OSError as exc:
        raise PreprocessError(path, unreadable_reason(exc, "an image file")) from None
    if not data:
        raise IncompleteFile(path, "empty file (0 bytes)")
    return data


# The modes whose pixels an RGB colour profile describes (``colours``); a CMYK or grey picture's profile is
# of another space, and its pixels are converted as they always were.
_PROFILED_MODES = frozenset({"RGB", "RGBA", "RGBX", "P"})


# The modes of grey on more than 8 bits: convert("RGB") clips these to two levels, so their real range is scaled.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# The pixels of one strip of rows converted at a time (``_in_strips``): a conversion's working copies (float64
# levels of 16-bit grey, an RGBA copy and a white layer to composite on) are of a strip, not of the picture
# (converted whole, a 374 KB 16-bit grey PNG of 177 MP took 4.5 GB).
_STRIP_PIXELS = 1 << 20


def _to_8bit(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, transparency composited onto white; a grey picture of more than 8 bits
    to 8-bit grey (L), made RGB by the caller once it is resized: the same pixels (a resize treats each band
    alike) for a third of the memory."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:  # an RGB PNG may carry a tRNS colour key
        return im
    if mode in _WIDE_GREY_MODES:
        peak = max((_peak(strip) for strip in _strips(im)), default=0.0) if mode in ("I", "F") else 0.0
        return _in_strips(im, "L", lambda strip: _wide_grey_to_l(strip, peak))
    key = im.info.get("transparency")
    if mode == "RGB" and isinstance(key, tuple) and max(key) > 255:
        # A 16-bit RGB PNG's tRNS colour, in 16-bit values, while Pillow keeps 8 bits a channel (the high
        # byte): compared as is, no pixel ever matched and the hidden colour showed.
        key = tuple(value >> 8 for value in key)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB", "1") and key is not None)
    if has_alpha:
        return _in_strips(im, "RGB", lambda strip: _onto_white(strip, key))
    return im.convert("RGB")


def _strips(im: Image.Image) -> Iterator[Image.Image]:
    """``im`` as strips of whole rows of about ``_STRIP_PIXELS`` pixels, top to bottom (each a copy: its
    own ``info``)."""
    width, height = im.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield im.crop((0, top, width, min(height, top + rows)))


def _in_strips(im: Image.Image, mode: str, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``convert`` of ``im`` a strip of rows at a time (``_strips``), pasted into one picture of ``mode``: the
    same pixels as ``convert(im)``, since each of its output pixels depends on that input pixel alone."""
    out = Image.new(mode, im.size)
    top = 0
    for strip in _strips(im):
        out.paste(convert(strip), (0, top))
        top += strip.height
    return out


def _peak(strip: Image.Image) -> float:
    """The brightest level of a strip of an "I" or "F" picture (a float's NaN and infinities count as 0)."""
    arr = np.asarray(strip, dtype=np.float64)
    if strip.mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return float(arr.max(initial=0))


def _wide_grey_to_l(strip: Image.Image, peak: float) -> Image.Image:
    """A strip of a grey picture of more than 8 bits in 8-bit grey; ``peak``: the whole picture's
    (``_peak``; only "I" and "F" need it), so that every strip is scaled alike."""
    mode = strip.mode
    arr = np.asarray(strip, dtype=np.float64)
    if mode == "I" and peak > 65535:  # a 32-bit integer picture on a range of its own: that range, not a clip
        arr = arr * (255.0 / peak)
    elif mode.startswith("I;16") or (mode == "I" and peak > 255):
        arr = arr / 257.0
    elif mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)  # a float image may hold them
        if peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0:  # on a scale of its own (0-1000, say): its range, not a clip to white
            arr = arr * (255.0 / peak)
    grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    key = strip.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):  # a 16-bit grey PNG's tRNS: that value is clear
        clear = np.asarray(strip) == key
        grey.paste(255, mask=Image.fromarray((clear * 255).astype(np.uint8), mode="L"))
    return grey


def _onto_white(strip: Image.Image, key: object) -> Image.Image:
    """A strip of a picture with transparency (an alpha band or the colour key ``key``) composited onto
    white: RGBA -> RGB would keep the hidden colour of transparent pixels."""
    if key is not None:
        strip.info["transparency"] = key  # the strip's own info (``_strips``), never the decoded picture's
    rgba = strip.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# ISO base media file brands of HEIF-family still images (HEVC: heic..., AV1: avif, avis; generic: mif1).
_HEIF_FAMILY_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                                 b"mif1", b"mif2", b"msf1", b"avif", b"avis"})


def _is_heif_family(data: bytes) -> bool:
    """True when a file's bytes start like HEIC/HEIF/AVIF (an ``ftyp`` box with one of their brands)."""
    return len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _HEIF_FAMILY_BRANDS


def preprocess_image(path: Path, *, max_size: tuple[int, int], max_pixels: int,
                     links: LinkPolicy | None = None, model_input: ModelInput | None = None) -> PreparedImage:
    """Decode ``path`` and normalise it; raise PreprocessError with a specific reason if it cannot be used.
    ``links``: which symbolic links may be followed to it (None: any, for a file named by the user).
    ``model_input``: makes the model's input (``pixels``) from the normalised picture; None: no pixels."""
    path = Path(path)
    _let_pillow_open(max_pixels)
    source = read_source(path, links)
    try:
        rgb, (src_w, src_h), metadata = _normalise(source, path, max_size=max_size, max_pixels=max_pixels)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_error(path, exc, source, max_pixels) from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    small = _thumbnail(rgb)
    return PreparedImage(
        path=path,
        image=rgb,
        pixels=model_input(rgb) if model_input is not None else None,
        jpeg_bytes=buffer.getvalue(),
        file_hash=source_identity(source),
        width=rgb.width,
        height=rgb.height,
        source_width=src_w,
        source_height=src_h,
        thumbnail_jpeg=_jpeg(small, THUMBNAIL_QUALITY),
        metadata=metadata,
        phash=perceptual_hash(small),
    )


def _normalise(source: bytes, path: Path, *, max_size: tuple[int, int],
               max_pixels: int) -> tuple[Image.Image, tuple[int, int], PictureMetadata]:
    """The source's picture oriented, in RGB, fitted inside ``max_size``; the source's size; and what its
    header says (``metadata``: read before decoding, from the same opened file)."""
    with Image.open(io.BytesIO(source), formats=SUPPORTED_FORMATS) as im:
        src_w, src_h = im.size
        if src_w * src_h > max_pixels:
            raise _too_large(path, f"{src_w}x{src_h} = {src_w * src_h:,} pixels", max_pixels)
        if im.format not in ("JPEG", "MPO"):
            # A PNG's EXIF may follow its pixels, so reading the header below decodes the whole file; an
            # error there would be taken for "no EXIF" and leave Pillow counting the picture as loaded
            # (black where the data broke). Decoded first, a broken file is refused as broken.
            im.load()
        metadata = picture_metadata(im, path)
        # Every size, turn and filter comes from ``geometry``, which the batched JPEG decoder uses too.
        orientation = exif_orientation(im)
        if im.format in ("JPEG", "MPO"):  # MPO: a JPEG with extra frames, opened by the JPEG plugin
            # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 size when the target is that small.
            im.draft("RGB", fit_inside((src_w, src_h), decode_box(orientation, max_size)))
        im.load()
        turn = upright_transpose(orientation)  # what exif_transpose does, read from the same EXIF tag
        rgb = _to_8bit(im.transpose(turn) if turn is not None else im)
        target = processed_size(rgb.size, max_size)
        if target != rgb.size:
            rgb = rgb.resize(target, FIT_RESAMPLE, reducing_gap=FIT_REDUCING_GAP)
        elif rgb is im:
            rgb = rgb.copy()  # detach from the file being closed
        rgb = rgb.convert("RGB") if rgb.mode == "L" else rgb  # deep grey, kept 8-bit grey through the resize
        # At the fitted size: a transform's cost grows with the pixels. A PNG's gAMA counts only without
        # a profile or an sRGB chunk, which override it (PNG specification, 11.3.3).
        gamma = im.info.get("gamma") if not {"icc_profile", "srgb"} & set(im.info) else None
        rgb = in_srgb(rgb, im.info.get("icc_profile") if im.mode in _PROFILED_MODES else None, gamma=gamma)
    return rgb, (src_w, src_h), metadata


def _too_large(path: Path, size: str, max_pixels: int) -> PreprocessError:
    """A picture above 'max-image-pixels' (``size``: its pixels, as known), refused before decoding."""
    return PreprocessError(path, f"image too large: {size} is above the limit of {max_pixels:,} "
                                 "(config key 'max-image-pixels'; refused as a possible decompression bomb)")


def _let_pillow_open(max_pixels: int) -> None:
    """Pillow refuses at open a picture above twice its ``MAX_IMAGE_PIXELS`` (178,956,970 pixels as it
    ships): raised in this process to 'max-image-pixels', so that a 200 MP phone's photo can be let in, and
    the configured limit (checked from the header, before decoding) is the one a refusal names."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _decode_error(path: Path, exc: Exception, source: bytes, max_pixels: int) -> PreprocessError:
    """What a decoder's exception means for the user's file, in their words."""
    if isinstance(exc, UnidentifiedImageError):
        if _is_heif_family(source):
            # libheif refuses a container it cannot parse as a whole, and a file still being written
            # looks exactly like that: name it as truncated, so the service waits for the writer.
            return PreprocessError(
                path, "truncated or incomplete image (a HEIC/HEIF/AVIF file whose container cannot be read)")
        begins_as = _signature_format(source)
        if begins_as is not None:  # Pillow's plugin refused it at open (a PNG chunk's bad CRC, a broken header)
            return PreprocessError(path, f"corrupt image (its content begins as a {begins_as} file, "
                                         "but its header cannot be read)")
        return PreprocessError(path, f"not a supported image (content is not {supported_formats_for_people()})")
    if isinstance(exc, Image.DecompressionBombError):
        # Pillow's own hard guard (twice its MAX_IMAGE_PIXELS, at least the limit) tripped in open(), before
        # the header's size was ours to check: the configured limit is the one named, with the pixels
        # Pillow counted ("Image size (3600000000 pixels) exceeds limit of ...").
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        return _too_large(path, f"{int(counted[1]):,} pixels" if counted else "its size", max_pixels)
    text = str(exc).strip()
    if isinstance(exc, ValueError) and "MAX_TEXT_CHUNK" in text:  # PngImagePlugin's name for the bound above
        # Pillow bounds a compressed colour profile (iCCP) by the same name.
        return PreprocessError(path, f"a compressed metadata chunk (PNG zTXt or iTXt, such as XMP, or an iCCP "
                                     f"colour profile) unpacks to more than {TEXT_CHUNK_LIMIT // 2**20} MiB; refused as "
                                     "a possible decompression bomb")
    if isinstance(exc, ValueError) and "MAX_TEXT_MEMORY" in text:
        return PreprocessError(path, f"its text metadata chunks (PNG tEXt, zTXt, iTXt) come to more than "
                                     f"{PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MiB in all; refused as a possible "
                                     "decompression bomb")
    # libheif (HEIC) says "Unexpected end of file" where Pillow's own decoders say "truncated".
    if ("truncated" in text or isinstance(exc, EOFError) or "broken data stream" in text
            or "end of file" in text.lower()):
        return IncompleteFile(path, f"truncated or incomplete image ({text})")
    return PreprocessError(path, f"corrupt image ({type(exc).__name__}: {text})")


# The first bytes of each supported format that has a fixed signature (HEIF's family is told apart by
# ``_is_heif_family``): a file that begins so but that no decoder opens is a damaged picture, not another
# kind of file.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _signature_format(source: bytes) -> str | None:
    if source[:4] == b"RIFF" and source[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if source.startswith(magic)), None)


def _thumbnail(rgb: Image.Image) -> Image.Image:
    """The contact sheet's thumbnail of the normalised picture (the perceptual hash is taken of it too)."""
    # geometry.thumbnail_size, not thumbnail(): the GPU path (gpudecode) sizes its thumbnails with it too.
    target = thumbnail_size(rgb.size)
    return rgb.resize(target, THUMBNAIL_RESAMPLE, reducing_gap=THUMBNAIL_REDUCING_GAP) if target != rgb.size else rgb


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def preprocess_for(path: Path, cfg: Config, links: LinkPolicy | None = None) -> PreparedImage:
    """``preprocess_image`` with the configured box and pixel limit: how every caller prepares a file."""
    return preprocess_image(path, max_size=(cfg.resize_width, cfg.resize_height), max_pixels=cfg.max_image_pixels,
                            links=links)


# What a thumbnail's name adds to its processed copy's (``thumbnail_path_for``): processed names leave room.
_THUMBNAIL_PREFIX, _THUMBNAIL_SUFFIX = ".", ".thumb.jpg"
# Processed copies too deep for the system's path limit live here, under a hash of their source's path.
LONG_PATHS_FOLDER = ".long-paths"
# In processed-directory: the real path of the source-directory whose copies it holds, written at its first use
# (``sync.claim_processed_folder``). An empty one (a file made by hand) adopts the configured source.
SOURCE_MARKER = ".source-directory"


def processed_folder_present(processed_root: Path) -> bool:
    """True while ``processed_root`` is the folder the copies were made in: its ``SOURCE_MARKER`` is there.
    Without it, another folder holds the name: the disk the copies are on was unmounted (the empty mount
    point on the disk under it, or no folder at all), or the folder was emptied, moved or replaced. A copy
    written there would land on the wrong disk, and a rescan would make every copy again there."""
    return holds_marker(processed_root, SOURCE_MARKER)


def processed_folder_gone(processed_root: Path) -> OutputUnwritable:
    """The outage of a processed folder that is not ``processed_folder_present``: nothing is written there
    until it is (the service waits it out; ``index`` ends with exit 7)."""
    marker = escape(Path(processed_root) / SOURCE_MARKER)
    return OutputUnwritable(
        f"cannot write processed images into {escape(processed_root)}: its record of the source folder ({marker}) "
        "is gone, so it is not the folder the copies were made in: its disk is not mounted (the copies would "
        "land on the disk under it), or it was emptied, moved or replaced: mount it or put it back; if you "
        f"emptied or removed it on purpose, give it an empty record (mkdir -p {escape(processed_root)} && touch "
        f"{marker}) and the copies are made again from the source files")


# A folder name that ends as a processed copy's name does (``.jpg``), or as such a folder's own processed name.
_ENDS_AS_A_COPY = re.compile(re.escape(PROCESSED_SUFFIX) + "_*$")


def processed_folder_name(name: str) -> str:
    """The name in processed-directory of the source folder ``name``. A folder named as the processed copy of
    a file beside it (``a.png.jpg/`` beside ``a.png``) would need the very name the copy has, and one of the
    two could never be written: such a folder gets a ``_`` more (``a.png.jpg_/``, ``a.png.jpg__/`` for one
    named ``a.png.jpg_``). A processed folder name then never ends in ``.jpg``, and no two folders share one."""
    return name + "_" if _ENDS_AS_A_COPY.search(name) else name


def processed_path_for(source: Path, source_root: Path, processed_root: Path) -> Path:
    """Where the processed JPEG of ``source`` lives: the same sub-folders (``processed_folder_name``), the full
    source name plus ``.jpg``.

    Keeping the source's own extension in the name (``apple.png.jpg``, ``apple.webp.jpg``) is what
    lets two sources that differ only in extension both survive. A name that would pass the 255-byte
    limit (with its thumbnail's) is shortened (``names.fit_name``: its start, a hash of the whole
    name, ``.png.jpg``); a path that would pass the system's path limit goes to ``.long-paths/`` under
    a hash of the source's path. The row records where each one went.
    """
    relative = Path(source).relative_to(source_root)
    name = relative.name + PROCESSED_SUFFIX
    name = fit_name(name, keep_suffix=relative.suffix + PROCESSED_SUFFIX,
                    reserve=len(_THUMBNAIL_PREFIX) + len(_THUMBNAIL_SUFFIX))
    path = Path(processed_root).joinpath(*map(processed_folder_name, relative.parent.parts), name)
    if fits_path(thumbnail_path_for(path)):
        return path
    digest = md5_hex(os.fsencode(relative))
    return Path(processed_root) / LONG_PATHS_FOLDER / f"{digest}{relative.suffix}{PROCESSED_SUFFIX}"


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file.
    The file's mode is what ``open()`` gives: 0666 less the process's umask. The folder is made only
    when it is missing (the create says so): a mkdir per file would cost two system calls for nothing."""
    for attempt in range(3):
        try:
            fd, tmp = create_beside(path)
            break
        except (FileNotFoundError, NotADirectoryError):
            if attempt == 2:
                raise
            # No folder yet: made (an entry of yours in its place is named by mkdir), and once more if it was
            # removed as it emptied (sync.remove_processed) in between.
            path.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


TEMPORARY_PREFIX = ".tmp-"  # a file being written (``create_beside``); one left behind was cut short by a crash


def create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file under a hidden temporary name in ``path``'s folder, open for writing. Created as
    ``mkstemp`` does (exclusively: never a file or link already there) but with mode 0666, which the kernel
    masks with the umask: ``mkstemp``'s 0600 would hide every processed copy and every failed query's
    reason from anyone but the service's user, whatever the unit's ``UMask`` allows."""
    folder, suffix = os.fspath(path.parent), path.suffix
    while True:
        tmp = f"{folder}/{TEMPORARY_PREFIX}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), Path(tmp)
        except FileExistsError:
            continue


def thumbnail_path_for(processed: Path) -> Path:
    """The contact-sheet thumbnail beside a processed JPEG: a hidden name, which no processed name (made
    from a source name, and hidden sources are never indexed) can collide with."""
    processed = Path(processed)
    return processed.with_name(thumbnail_name_for(processed.name))


def thumbnail_name_for(processed_name: str) -> str:
    """The name of the thumbnail beside the processed JPEG named ``processed_name`` (``thumbnail_path_for``)."""
    return f"{_THUMBNAIL_PREFIX}{processed_name}{_THUMBNAIL_SUFFIX}"


def copy_name_of_thumbnail(name: str) -> str | None:
    """The processed JPEG's name whose thumbnail is named ``name``; None if ``name`` is no thumbnail's."""
    if name.startswith(_THUMBNAIL_PREFIX) and name.endswith(PROCESSED_SUFFIX + _THUMBNAIL_SUFFIX):
        return name[len(_THUMBNAIL_PREFIX):-len(_THUMBNAIL_SUFFIX)]
    return None


def save_processed(prepared: PreparedImage, path: Path) -> None:
    """Store the processed JPEG and its thumbnail, unless identical ones are already there (a relink or a
    rescan of unchanged content writes nothing)."""
    try:
        unchanged = path.stat().st_size == len(prepared.jpeg_bytes) and path.read_bytes() == prepared.jpeg_bytes
    except OSError:
        unchanged = False
    thumbnail = thumbnail_path_for(path)
    if not (unchanged and thumbnail.is_file()):
        write_atomically(thumbnail, prepared.thumbnail_jpeg)
    if not unchanged:
        write_atomically(path, prepared.jpeg_bytes)
