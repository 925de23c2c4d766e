"""Batched JPEG decoding on the GPU (nvJPEG, through torchvision), for an indexer whose model runs on CUDA.

Camera JPEGs are most of a photo library, and decoding them is most of the CPU's share of an ingest
(issue 8: about 80 images/s on 16 cores, against 2,000 a second that ViT-L/14 embeds). Here threads
read and hash a batch (file reads and MD5 release the GIL), nvJPEG decodes it in one call, and the
orientation, the fit into the configured box, the processed JPEG and its thumbnail (nvJPEG's encoder, on
a thread of its own) and the model's input are all made on the device, pictures of one shape resized
together. Every size, turn and filter is ``geometry``'s, as on the CPU path; only the kernels are this
module's. The result is the CPU path's type, ``preprocess.PreparedImage``: only the bytes to store come
back to the host; the model's input stays there for ``Embedder.embed_images``. A canary catches a decode
nvJPEG reports done but skipped (``skipped_decodes``).

Only plain JPEGs come here (``read_plain_jpeg``): Huffman-coded baseline (sequential), 8 bits, three
components in YCbCr, one picture (not MPO), complete (ending in EOI), within the pixel limit. Anything
else, and any file nvJPEG refuses, takes the CPU path (``workers.PreprocessPool``) as it is, with its
reasons and messages. The two paths make slightly different pixels (another IDCT, another resampler:
see the README), so the identity is taken from neither: it is the MD5 of the file's bytes on both
(``preprocess.source_identity``), and a GPU host, a CPU host and a fallback agree on every file.

nvJPEG runs in this process, unlike the CPU workers: a file that crashes it (a driver fault, not a
Python exception) takes the whole service down. ``DecodeQuarantine`` writes down each chunk before it is
decoded, so the next start sends the files of the chunk that killed a process to the CPU workers, where
a crash costs one file, instead of crashing on them again at every restart.

The same code runs on ``device="cpu"`` (torchvision's libjpeg-turbo decoder), which is how the tests
prove it on a machine without a GPU; the indexer uses it only on CUDA, where it is the fast path.
"""

from __future__ import annotations

import fcntl
import io
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from PIL import Image

from .colours import needs_conversion
from .entries import EntryRefused, LinkPolicy, open_regular, read_at_most
from .errors import describe
from .names import escape, unescape
from .geometry import (
    FIT_RESAMPLE,
    JPEG_QUALITY,
    THUMBNAIL_QUALITY,
    THUMBNAIL_RESAMPLE,
    exif_orientation,
    model_crop,
    model_resize,
    processed_size,
    thumbnail_size,
    upright_transpose,
)
from .pixels import PixelSpec
from .metadata import PictureMetadata, picture_metadata
from .preprocess import PreparedImage, source_identity
from .workers import HEARTBEAT_EVERY_S, BatchHandle, Outcome, PreprocessPool

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec, once per call; they are
# what this module is written and tested against (torchvision is a direct dependency: pyproject.toml).
warnings.filterwarnings("ignore", message=r".*TorchCodec.*")
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg  # noqa: E402

log = structlog.get_logger(__name__)

# Pictures decoded at once: at most 32, and at most 400 megapixels (32 12-megapixel photos: 1.2 GB
# decoded; a picture is resized one at a time, 4 bytes a channel while it is). A larger picture is a
# chunk of its own. Whatever the read batch is, the device memory this takes stays bounded.
DECODE_CHUNK = 32
DECODE_CHUNK_PIXELS = 400_000_000
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
# Huffman-coded baseline and extended sequential: what nvJPEG decodes in its batched hardware path.
# Progressive JPEGs (SOF2) take the CPU workers: nvJPEG decodes those one at a time on the calling CPU
# thread (its hybrid path), slower than a worker per core and holding up the device's queue. The other
# SOF markers (lossless, hierarchical, arithmetic coding) take the CPU path too.
_PLAIN_FRAMES = frozenset({0xC0, 0xC1})
PROGRESSIVE_FRAME = 0xC2
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC are not frames
# In the state directory (DecodeQuarantine): the chunk a process is decoding (one file per process), the
# files a dead process was decoding, and the mark of a death in the start-up check. One "<md5>\t<path>"
# line per file; the start-up check's line has CHECK_KEY.
IN_FLIGHT_PREFIX = "gpu-jpeg-in-flight"
QUARANTINE_NAME = "gpu-jpeg-quarantine"
CHECK_CRASHED_NAME = "gpu-jpeg-check-crashed"
CHECK_KEY = "start-up-check"


@dataclass(frozen=True, eq=False)
class PlainJpeg:
    """A file read for the batched decoder: its bytes, identity and what the decode needs to know."""

    path: Path
    data: bytearray = field(repr=False)  # writable: torch wraps it without a copy
    file_hash: str
    width: int
    height: int
    orientation: int
    metadata: PictureMetadata | None = None  # the header's (``metadata``), as the CPU path reads it


def _frame_header(data: bytes | bytearray) -> tuple[int, int, int, int, int, bool] | None:
    """(SOF marker, precision, height, width, components, Adobe RGB) from the markers before the
    first frame header, or None when the markers do not read as a JPEG's."""
    if data[:2] != _SOI:
        return None
    adobe_rgb = False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker in _FRAME_MARKERS:
            seg = data[i + 4:i + 10]
            if len(seg) < 6:
                return None
            return (marker, seg[0], int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5],
                    adobe_rgb)
        if marker == 0xEE and data[i + 4:i + 9] == b"Adobe" and length >= 14 and i + 15 < len(data):
            adobe_rgb = data[i + 15] == 0  # transform 0: the components are RGB, not YCbCr
        if marker == 0xDA:  # a scan before any frame header
            return None
        i += 2 + length
    return None


def read_plain_jpeg(path: Path, *, max_pixels: int, links: LinkPolicy | None = None) -> PlainJpeg | None:
    """Read ``path`` and return it when the batched decoder makes of it what the CPU path would; None
    for anything else (the CPU path then decides, with its own reasons: a pipe, a link ``links`` does
    not follow, a file still growing). Never raises for a file."""
    try:
        with open_regular(path, links) as (handle, st):
            if handle.read(2) != _SOI:  # not a JPEG: read no further (the CPU path reads it)
                return None
            handle.seek(0)
            data = bytearray(read_at_most(handle, st.st_size + 1))
    except (OSError, EntryRefused):
        return None
    if len(data) > st.st_size:  # grew while being read: still being written, the CPU path says so
        return None
    if not data.endswith(_EOI):  # cut short (still being written) or trailing bytes: the CPU path knows
        return None
    header = _frame_header(data)
    if header is None:
        return None
    marker, precision, height, width, components, adobe_rgb = header
    if (marker not in _PLAIN_FRAMES or precision != 8 or components != 3 or adobe_rgb
            or width * height == 0 or width * height > max_pixels):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            # Pillow names a JPEG with more pictures (an MPF index) MPO: one picture, chosen by the CPU path.
            if im.format != "JPEG" or im.mode != "RGB" or im.size != (width, height):
                return None
            if needs_conversion(im.info.get("icc_profile")):  # a Display P3 photo: ``colours``, on the CPU
                return None
            orientation = exif_orientation(im)  # as the CPU path reads it (``geometry``)
            metadata = picture_metadata(im, path)
    except Exception:  # anything Pillow does not like is the CPU path's to name
        return None
    return PlainJpeg(Path(path), data, source_identity(data), width, height, orientation, metadata)


# Pillow's turns and mirrors as torch operations on the last two dimensions of a (..., H, W) picture.
# Which one an orientation needs is ``geometry``'s decision (``upright_transpose``), as on the CPU path.
_TRANSPOSE_KERNELS = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda t: t.flip(-1),
    Image.Transpose.FLIP_TOP_BOTTOM: lambda t: t.flip(-2),
    Image.Transpose.ROTATE_180: lambda t: t.flip((-2, -1)),
    Image.Transpose.TRANSPOSE: lambda t: t.transpose(-2, -1),
    Image.Transpose.TRANSVERSE: lambda t: t.transpose(-2, -1).flip((-2, -1)),
    Image.Transpose.ROTATE_90: lambda t: torch.rot90(t, k=1, dims=(-2, -1)),
    Image.Transpose.ROTATE_270: lambda t: torch.rot90(t, k=-1, dims=(-2, -1)),
}
# Pillow's filters as torch's interpolation modes (antialiased: the filters' support, as Pillow's); any
# other filter is resized bicubic here, as it always was.
_INTERPOLATION = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (3, H, W) picture turned as EXIF ``orientation`` says (what Pillow's ``exif_transpose`` does)."""
    turn = upright_transpose(orientation)
    return image if turn is None else _TRANSPOSE_KERNELS[turn](image)


def resize(image: torch.Tensor, size: tuple[int, int], resample: Image.Resampling = FIT_RESAMPLE) -> torch.Tensor:
    """A (3, H, W) or (n, 3, H, W) uint8 picture resized to ``size`` (width, height) with Pillow's filter
    ``resample`` (bicubic or bilinear), antialiased as torch's ``antialias=True`` computes Pillow's
    filters' support, rounded back to uint8."""
    width, height = size
    if (image.shape[-1], image.shape[-2]) == (width, height):
        return image
    batch = image if image.dim() == 4 else image[None]
    scaled = F.interpolate(batch.float(), size=(height, width), mode=_INTERPOLATION.get(resample, "bicubic"),
                           antialias=True, align_corners=False)
    scaled = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return scaled if image.dim() == 4 else scaled[0]


def _chunks(files: Sequence[PlainJpeg]) -> list[Sequence[PlainJpeg]]:
    """``files`` in order, in chunks of at most DECODE_CHUNK files and DECODE_CHUNK_PIXELS pixels."""
    chunks: list[Sequence[PlainJpeg]] = []
    start, pixels = 0, 0
    for end, source in enumerate(files):
        size = source.width * source.height
        if end > start and (end - start >= DECODE_CHUNK or pixels + size > DECODE_CHUNK_PIXELS):
            chunks.append(files[start:end])
            start, pixels = end, 0
        pixels += size
    if start < len(files):
        chunks.append(files[start:])
    return chunks


class DecodeQuarantine:
    """The JPEGs the batched decoder must not take again: those it was decoding when a process died.

    Each process that decodes keeps one in-flight file, ``gpu-jpeg-in-flight.<random>`` in the state
    directory, open and locked (``flock``) for as long as it runs: during a chunk it holds the chunk's
    lines, between chunks it is empty. The kernel releases a lock when its process dies, however it dies,
    so a file another start can lock belongs to a dead process (whatever host, container or pid it had):
    its lines are appended to ``gpu-jpeg-quarantine`` and it is removed. Quarantined files take the CPU
    path from then on; by MD5, so a renamed file stays quarantined and a changed one (new bytes) is tried
    again. A process that died in the decoder's start-up check leaves ``gpu-jpeg-check-crashed`` instead,
    which turns GPU decoding off until it is deleted (the quarantined files stay quarantined).

    Lines are written without fsync: what must survive is the death of a process, not of the machine.
    """

    def __init__(self, directory: Path) -> None:
        """Raises OSError when ``directory`` cannot be written (then nothing protects a restart)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / QUARANTINE_NAME
        self.check_crashed_path = directory / CHECK_CRASHED_NAME
        self._entries = _read_entries(self.path)
        crashed = self._reclaim(directory)
        self._own_path, self._own = _locked_in_flight_file(directory)
        if crashed:
            files = sorted(name for key, name in crashed.items() if key != CHECK_KEY)
            log.warning("gpu_jpeg_decode_crashed", files=files, quarantine=self.path,
                        detail="a process stopped in the GPU decoder's start-up check; GPU decoding stays off "
                               f"until {self.check_crashed_path} is deleted" if CHECK_KEY in crashed else
                               "a process stopped while the GPU decoded these files; the CPU workers decode them "
                               "from now on")

    def _reclaim(self, directory: Path) -> dict[str, str]:
        """Quarantine what dead processes' in-flight files hold, then remove those files. A file that
        cannot be opened or locked (another user's; a filesystem without locks) is left as it is."""
        crashed: dict[str, str] = {}
        reclaimed: list[tuple[Path, int]] = []
        try:
            for left in sorted(directory.glob(f"{IN_FLIGHT_PREFIX}.*")):
                try:
                    # Read and write: where flock is emulated with fcntl locks (NFS), an exclusive lock
                    # needs a descriptor open for writing, and reading through another would drop it.
                    fd = os.open(left, os.O_RDWR)
                except OSError:  # gone (another start reclaimed it), or not ours to open
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    crashed.update(_parse_entries(os.pread(fd, os.fstat(fd).st_size, 0)))
                except OSError:  # BlockingIOError: its process runs
                    os.close(fd)
                    continue
                reclaimed.append((left, fd))
            self.add({key: name for key, name in crashed.items() if key != CHECK_KEY})
            if CHECK_KEY in crashed:
                self.check_crashed_path.write_text(
                    "A process stopped in the GPU JPEG decoder's start-up check. Delete this file to try GPU "
                    "decoding again.\n", encoding="utf-8")
            for left, _ in reclaimed:  # only now: a crash before this line loses nothing
                left.unlink(missing_ok=True)
        finally:
            for _, fd in reclaimed:
                os.close(fd)
        return crashed

    def __contains__(self, file_hash: object) -> bool:
        return file_hash in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def check_crashed(self) -> bool:
        return self.check_crashed_path.exists()

    @contextmanager
    def in_flight(self, entries: Sequence[tuple[str, str]]) -> Iterator[None]:
        """Written down for the next start while the block runs: (md5 or CHECK_KEY, path) per file."""
        data = memoryview(_format_entries(entries).encode("utf-8"))
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(self._own, data[written:], written)
            yield
        finally:
            os.ftruncate(self._own, 0)

    def add(self, entries: dict[str, str]) -> None:
        """Quarantine these files now (md5 -> path)."""
        new = {key: name for key, name in entries.items() if key not in self._entries}
        if new:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(_format_entries(new.items()))
            self._entries.update(new)

    def close(self) -> None:
        if self._own < 0:
            return
        self._own_path.unlink(missing_ok=True)
        os.close(self._own)
        self._own = -1


def _locked_in_flight_file(directory: Path) -> tuple[Path, int]:
    """A new, empty in-flight file, locked by this process. Locked under a hidden name first, so no
    other start can take it for a dead process's in the moment between creating and locking it. The
    descriptor is not inheritable (os.open's default): the processes this one starts (CPU workers, the
    embedded PostgreSQL) cannot keep the lock alive after it dies."""
    name = f"{IN_FLIGHT_PREFIX}.{uuid.uuid4().hex}"
    hidden = directory / f".{name}"
    fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, directory / name)
    except OSError:
        os.close(fd)
        hidden.unlink(missing_ok=True)
        raise
    return directory / name, fd


def _read_entries(path: Path) -> dict[str, str]:
    """key -> path from the quarantine file (none when there is none)."""
    try:
        return _parse_entries(path.read_bytes())
    except FileNotFoundError:
        return {}


def _format_entries(entries: Iterable[tuple[str, str]]) -> str:
    # Escaped: a name with a newline or bytes that are not UTF-8 stays one line of valid text.
    return "".join(f"{key}\t{escape(name)}\n" for key, name in entries)


def _parse_entries(data: bytes) -> dict[str, str]:
    """key -> path from "<md5 or CHECK_KEY>\t<path>" lines; a line cut short by a crash is skipped."""
    entries = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, tab, name = line.partition("\t")
        if tab and (key == CHECK_KEY or (len(key) == 32 and all(c in "0123456789abcdef" for c in key))):
            entries[key] = unescape(name)
    return entries


# Source pixels resized in one call (pictures of one shape going to one size are resized together): the
# float32 working copies of one call stay under about 1 GB, whatever the chunk holds.
RESIZE_GROUP_PIXELS = 64_000_000


def resize_each(pictures: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]],
                resample: Image.Resampling = FIT_RESAMPLE) -> list[torch.Tensor]:
    """``resize(picture, size)`` for each pair, in order; the pictures of one shape going to one size in
    one call (a camera's photos share both), at most ``RESIZE_GROUP_PIXELS`` source pixels a call."""
    out: list[torch.Tensor | None] = [None] * len(pictures)
    groups: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = {}
    for index, (picture, size) in enumerate(zip(pictures, sizes, strict=True)):
        groups.setdefault((tuple(picture.shape), tuple(size)), []).append(index)  # type: ignore[arg-type]
    for (shape, size), indices in groups.items():
        per_call = max(1, RESIZE_GROUP_PIXELS // max(1, shape[-1] * shape[-2]))
        for start in range(0, len(indices), per_call):
            part = indices[start:start + per_call]
            batch = torch.stack([pictures[i] for i in part]) if len(part) > 1 else pictures[part[0]][None]
            for index, resized in zip(part, resize(batch, size, resample).unbind(0)):
                out[index] = resized
    return out  # type: ignore[return-value]  # every index was filled


# The canary against skipped decodes. nvJPEG's batched hardware decoder has been reported (on other GPUs)
# to report success while skipping an image: its output is then whatever memory it was given, and that
# would be embedded as if it were the picture. So before each decode the memory the outputs will take is
# filled with a pattern no picture decodes to (bytes 0, 1, ..., 250, 0, 1, ...: flat index mod 251), and
# after it each output's first and last rows are compared with it: an output still holding it was not
# written, and its chunk goes to the CPU workers. torchvision allocates the outputs itself, through
# torch's caching allocator, so the pattern is written into blocks of exactly the outputs' sizes that
# are freed just before the call (the allocator hands them straight back). A pattern that did not land
# (another allocator, a block split otherwise) cannot trip: it costs the protection, never a picture.
# tests/test_gpu.py checks on a real device that it lands.
CANARY_MODULUS = 251


def canary(shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """A uint8 tensor of ``shape`` holding the canary pattern: what an output the decoder skipped holds."""
    count = 1
    for side in shape:
        count *= int(side)
    flat = torch.arange(count, device=device, dtype=torch.int32) % CANARY_MODULUS
    return flat.to(torch.uint8).view(*shape)


def _canary_rows(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The canary's first and last rows of a (3, H, W) output: (3, 2, W)."""
    channels, height, width = (int(s) for s in shape)
    flat = (torch.arange(channels, device=device)[:, None, None] * (height * width)
            + torch.tensor([0, (height - 1) * width], device=device)[None, :, None]
            + torch.arange(width, device=device)[None, None, :])
    return (flat % CANARY_MODULUS).to(torch.uint8)


def prime_canaries(shapes: Sequence[Sequence[int]], device: torch.device) -> None:
    """Fill blocks of the decoder's output sizes with the canary and free them for its outputs to take."""
    primed = [canary(shape, device) for shape in shapes]
    del primed


def skipped_decodes(pictures: Sequence[torch.Tensor | None]) -> list[int]:
    """Indices of the decoded (3, H, W) pictures that still hold the canary: not written by the decoder.
    One comparison per picture, one wait for all of them."""
    checked = [(i, p) for i, p in enumerate(pictures) if p is not None and p.dim() == 3 and p.shape[-2] > 0]
    if not checked:
        return []
    still = torch.stack([(p[:, [0, -1], :] == _canary_rows(p.shape, p.device)).all() for _, p in checked])
    return [i for (i, _), hit in zip(checked, still.tolist()) if hit]


def encode(pictures: Sequence[torch.Tensor], quality: int) -> list[bytes]:
    """(3, H, W) uint8 pictures as JPEG files (nvJPEG's encoder on CUDA)."""
    return [bytes(t.cpu().numpy()) for t in encode_jpeg(list(pictures), quality=quality)]


class JpegEncoder:
    """The processed JPEGs and thumbnails encoded on a thread of their own, so that the calling thread goes
    on queueing the model's input meanwhile.

    torchvision's encoder runs on a stream of its own, not ordered after the caller's (pytorch/vision
    PR 8929). Two things keep it safe without draining the device: (1) it waits for an event recorded on
    the caller's stream right after the kernels that made its pictures, so it never reads them half
    made; (2) on CUDA its thread allocates on a side stream of its own, so the caching allocator never
    hands it memory that work still queued on the caller's stream was freed from (the race of PR 9606),
    and its own encodes are host-synchronous, one after another."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeg-encode")
        self._stream: torch.cuda.Stream | None = None  # made in the thread at its first job (CUDA only)

    def submit(self, *jobs: tuple[Sequence[torch.Tensor], int]) -> Future[list[list[bytes]]]:
        """Encode each (pictures, quality) job in the thread; its JPEG files, job by job."""
        ready: torch.cuda.Event | None = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return self._thread.submit(self._encode_jobs, jobs, ready)

    def _encode_jobs(self, jobs: Sequence[tuple[Sequence[torch.Tensor], int]],
                     ready: torch.cuda.Event | None) -> list[list[bytes]]:
        if ready is None:
            return [encode(pictures, quality) for pictures, quality in jobs]
        ready.synchronize()  # the pictures are made (an event, not a device-wide synchronisation)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            return [encode(pictures, quality) for pictures, quality in jobs]

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class BatchedJpegDecoder:
    """Plain JPEGs to ``PreparedImage`` results on ``device``: the processed JPEG, its thumbnail and the
    model's input (``spec``), made as the CPU path makes them, with ``geometry``'s sizes, turns and filters."""

    def __init__(self, device: torch.device | str, *, max_size: tuple[int, int], spec: PixelSpec,
                 quarantine: DecodeQuarantine | None = None) -> None:
        self.device = torch.device(device)
        self.max_size = max_size
        self.spec = spec
        self.quarantine = quarantine
        self.encoder = JpegEncoder(self.device)

    def close(self) -> None:
        self.encoder.close()

    def check(self) -> str | None:
        """None when this device decodes and encodes JPEGs, else why not (one line)."""
        if self.quarantine is not None and self.quarantine.check_crashed:
            return f"a process stopped in this check before (delete {self.quarantine.check_crashed_path} to try again)"
        probe = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 30, 30)).save(probe, format="JPEG")
        try:
            with self._in_flight([(CHECK_KEY, "")]):
                [picture] = self._decode([bytearray(probe.getvalue())], [(3, 8, 16)])
                self._encode([picture], JPEG_QUALITY)
        except Exception as exc:  # no nvJPEG in this build, a driver without it...
            return describe(exc)
        return None

    def _in_flight(self, entries: Sequence[tuple[str, str]]):
        return self.quarantine.in_flight(entries) if self.quarantine is not None else nullcontext()

    def prepare(self, files: Sequence[PlainJpeg]) -> list[PreparedImage | None]:
        """One result per file, in order; None for a file the decoder refused, or for a chunk the device
        could not finish (out of memory, a kernel error, a skipped decode, any error): the CPU path takes
        those. A chunk that leaves the device broken (``_device_fault``) is quarantined as well."""
        out: list[PreparedImage | None] = []
        for chunk in _chunks(files):
            entries = [(f.file_hash, str(f.path)) for f in chunk]
            try:
                if self.device.type == "cuda":
                    prime_canaries([(3, f.height, f.width) for f in chunk], self.device)
                # First: a fault left by earlier work (the model's) is not this chunk's. This is also the
                # drain before the decode (``_decode``), the canary's fills included: nothing is queued
                # between the two, so it is the chunk's one device-wide synchronisation.
                self._synchronize()
                with self._in_flight(entries):
                    try:
                        prepared = self._prepare_chunk(chunk)
                        self._wait_for_queued()  # a fault of this chunk's kernels surfaces while it is written down
                    except Exception:
                        # A kernel fault is raised as an error, and the process is likely to stop soon after
                        # (every later CUDA call fails): its files must not come back to the device.
                        if self.quarantine is not None and self._device_fault():
                            self.quarantine.add(dict(entries))
                        raise
            except Exception as exc:
                log.warning("gpu_jpeg_chunk_failed", files=len(chunk), reason=describe(exc),
                            detail="decoded by the CPU workers")
                if self.device.type == "cuda" and not self._device_fault():
                    torch.cuda.empty_cache()
                prepared = [None] * len(chunk)
            out.extend(prepared)
        return out

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wait_for_queued(self) -> None:
        """Wait for the work queued on this thread's stream (an event: other streams run on)."""
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()

    def _device_fault(self) -> bool:
        """After an error: is the device itself broken? A CUDA kernel fault (an illegal address...) is
        sticky: every later call fails with it, a device synchronisation first. A refused file, or out of
        memory, leaves the device working."""
        try:
            self._synchronize()
        except RuntimeError:
            return True
        return False

    def _prepare_chunk(self, files: Sequence[PlainJpeg]) -> list[PreparedImage | None]:
        decoded = self._decode_each([f.data for f in files], [(3, f.height, f.width) for f in files], primed=True)
        skipped = skipped_decodes(decoded)
        if skipped:
            log.warning("gpu_jpeg_decode_skipped", files=[str(files[i].path) for i in skipped], chunk=len(files),
                        detail="the decoder reported success without writing these pictures; the chunk is decoded "
                               "by the CPU workers")
            return [None] * len(files)
        kept = [i for i, (source, picture) in enumerate(zip(files, decoded))
                if picture is not None and tuple(picture.shape) == (3, source.height, source.width)]
        if not kept:
            return [None] * len(files)
        upright = [orient(decoded[i], files[i].orientation) for i in kept]  # type: ignore[arg-type]
        fitted = [p.contiguous() for p in resize_each(
            upright, [processed_size((p.shape[-1], p.shape[-2]), self.max_size) for p in upright])]
        thumbnails = [p.contiguous() for p in resize_each(
            fitted, [thumbnail_size((p.shape[-1], p.shape[-2])) for p in fitted], THUMBNAIL_RESAMPLE)]
        encoding = self.encoder.submit((fitted, JPEG_QUALITY), (thumbnails, THUMBNAIL_QUALITY))
        model_inputs = self._model_inputs(fitted)  # queued while the encoder thread encodes
        jpegs, thumbs = encoding.result()
        out: list[PreparedImage | None] = [None] * len(files)
        for row, index in enumerate(kept):
            source, picture = files[index], fitted[row]
            out[index] = PreparedImage(
                path=source.path, jpeg_bytes=jpegs[row], file_hash=source.file_hash, width=picture.shape[-1],
                height=picture.shape[-2], source_width=source.width, source_height=source.height,
                thumbnail_jpeg=thumbs[row], pixels=model_inputs[row], metadata=source.metadata)
        return out

    def _model_inputs(self, fitted: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The model's input from each fitted picture, (H, W, 3) uint8 on the device (``to_model_pixels``,
        with ``geometry``'s sizes), resized in groups of one shape."""
        spec = self.spec
        resized = resize_each(fitted, [model_resize((p.shape[-1], p.shape[-2]), spec) for p in fitted], spec.resample)
        out = []
        for picture in resized:
            box = model_crop((picture.shape[-1], picture.shape[-2]), spec)
            if box is not None:
                left, top, right, bottom = box
                picture = picture[:, top:bottom, left:right]
            out.append(picture.permute(1, 2, 0))
        return out

    def _decode(self, data: Sequence[bytearray], shapes: Sequence[Sequence[int]] | None = None, *,
                primed: bool = False) -> list[torch.Tensor]:
        """One decode call. ``shapes``: the outputs' (3, H, W), for the canary (none without them);
        ``primed``: the caller has primed the canary and drained the device since, with nothing queued."""
        encoded = [torch.frombuffer(d, dtype=torch.uint8) for d in data]
        if not primed:
            if shapes is not None and self.device.type == "cuda":
                prime_canaries(shapes, self.device)
            # torchvision's CUDA decoder writes on a stream of its own, not ordered after the caller's:
            # memory freed by queued work can be overwritten before that work runs (pytorch/vision PR 9606,
            # reproduced on H100s). Draining the device first avoids it (the canary's fills included).
            self._synchronize()
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))

    def _decode_each(self, data: Sequence[bytearray], shapes: Sequence[Sequence[int]] | None = None, *,
                     primed: bool = False) -> list[torch.Tensor | None]:
        """The whole chunk in one call; when that fails (one odd file fails the call), file by file (each
        primed and drained again). An error that left the device broken is raised: it is no file's refusal."""
        try:
            return list(self._decode(data, shapes, primed=primed))
        except RuntimeError:
            if self._device_fault():
                raise
        out: list[torch.Tensor | None] = []
        for index, one in enumerate(data):
            try:
                out.append(self._decode([one], None if shapes is None else [shapes[index]])[0])
            except RuntimeError:
                if self._device_fault():
                    raise
                out.append(None)
        return out

    def _encode(self, pictures: Sequence[torch.Tensor], quality: int) -> list[bytes]:
        """Encode now (through the encoder's thread, ordered after the caller's stream: ``JpegEncoder``)."""
        [jpegs] = self.encoder.submit((pictures, quality)).result()
        return jpegs


class _GpuBatch:
    """One submitted batch: its files are being read by threads; ``results`` decodes what is plain on the
    device and hands the rest to the CPU workers, merging both in the order of the paths."""

    def __init__(self, reader: GpuJpegReader, paths: Sequence[Path], reads: list[Future[PlainJpeg | None]]) -> None:
        self._reader = reader
        self.paths = tuple(Path(p) for p in paths)
        self._reads = reads

    def wait(self, timeout: float) -> bool:
        """Every file read (the decoding, on the device, is ``results``'s own), waiting up to ``timeout``."""
        return not futures.wait(self._reads, timeout=timeout).not_done

    def results(self) -> list[Outcome]:
        plain = [read.result() for read in self._reads]
        on_cpu = [i for i, source in enumerate(plain) if source is None]
        # The CPU workers start on the odd files while the device decodes the plain ones.
        cpu_batch = self._reader.pool.submit([self.paths[i] for i in on_cpu]) if on_cpu else None
        on_device = [i for i, source in enumerate(plain) if source is not None]
        decoded = self._reader.decoder.prepare([plain[i] for i in on_device])  # type: ignore[misc]
        outcomes: list[Outcome | None] = [None] * len(self.paths)
        refused = []
        for i, result in zip(on_device, decoded):
            if result is None:
                refused.append(i)
            outcomes[i] = result
        if refused:
            again = self._reader.pool.submit([self.paths[i] for i in refused])
            for i, outcome in zip(refused, self._reader.cpu_results(again)):
                outcomes[i] = outcome
        if cpu_batch is not None:
            for i, outcome in zip(on_cpu, self._reader.cpu_results(cpu_batch)):
                outcomes[i] = outcome
        self._reader.decoded_on_device += len(on_device) - len(refused)
        return outcomes  # type: ignore[return-value]  # every index was filled


class GpuJpegReader:
    """The indexer's reader on a device: ``submit(paths)`` like ``PreprocessPool.submit``, plain JPEGs
    decoded by ``decoder``, everything else by ``pool``. At most two batches' bytes are held (the one
    being decoded and the next one being read), as with the pool."""

    def __init__(self, pool: PreprocessPool, decoder: BatchedJpegDecoder, *, threads: int) -> None:
        self.pool = pool
        self.decoder = decoder
        self.decoded_on_device = 0
        # Called about once a second while a batch waits for the CPU workers' files (the service's watchdog
        # ping, as ``Indexer.heartbeat``): one file may take them up to ``FILE_SECONDS_LIMIT``.
        self.heartbeat: Callable[[], None] | None = None
        self._threads = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="jpeg-read")

    def cpu_results(self, handle: BatchHandle) -> list[Outcome]:
        """The outcomes of a batch handed to the CPU workers, ``heartbeat`` called while they take."""
        if self.heartbeat is not None:
            while not handle.wait(HEARTBEAT_EVERY_S):
                self.heartbeat()
        return handle.results()

    def _read(self, path: Path) -> PlainJpeg | None:
        settings = self.pool.settings
        source = read_plain_jpeg(path, max_pixels=settings.max_pixels, links=settings.links)
        quarantine = self.decoder.quarantine
        if source is not None and quarantine is not None and source.file_hash in quarantine:
            return None  # it killed a process once: the CPU workers take it
        return source

    def submit(self, paths: Sequence[Path]) -> _GpuBatch:
        return _GpuBatch(self, paths, [self._threads.submit(self._read, Path(p)) for p in paths])

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        self.decoder.close()
        if self.decoder.quarantine is not None:
            self.decoder.quarantine.close()


def open_gpu_reader(pool: PreprocessPool, device: torch.device | str, *, spec: PixelSpec,
                    threads: int, state_directory: Path) -> GpuJpegReader | None:
    """A ``GpuJpegReader`` when ``device`` decodes JPEGs, else None (with one log line saying why).
    Its quarantine lives in ``state_directory``; where that cannot be written, the CPU path is used."""
    quarantine: DecodeQuarantine | None = None
    decoder: BatchedJpegDecoder | None = None
    try:
        quarantine = DecodeQuarantine(state_directory)
    except OSError as exc:
        problem: str | None = (f"state directory {state_directory} cannot hold the decoder's crash quarantine "
                               f"({describe(exc)}); nothing would keep a file that crashes the decoder from "
                               "crashing it again")
    else:
        decoder = BatchedJpegDecoder(device, max_size=pool.settings.max_size, spec=spec, quarantine=quarantine)
        problem = decoder.check()
    if problem is not None:
        log.warning("gpu_jpeg_decode_unavailable", device=str(device), reason=problem,
                    detail="JPEGs are decoded by the CPU workers")
        if decoder is not None:
            decoder.close()
        if quarantine is not None:
            quarantine.close()
        return None
    log.info("gpu_jpeg_decode", device=str(device), chunk=DECODE_CHUNK, quarantined=len(quarantine))
    return GpuJpegReader(pool, decoder, threads=threads)
