"""The perceptual hash: what makes two files "the same picture" without the model (a near-copy).

A near-copy is one picture saved again: re-encoded at another JPEG quality, resized, converted between
JPEG, PNG, WebP, HEIC and AVIF, its metadata stripped, or its pixels turned against an EXIF orientation
flag. The hash is taken of the normalised picture (upright, RGB: ``preprocess``), so a turned file and
its upright twin hash alike, and it does not depend on the model: it is the same for every model and
every host, and existing rows get it from their processed copies with no model work.

How (a DCT hash, as pHash does, at a finer grid): the picture's luma is reduced to 64 x 64 (box
filter: every source pixel counts once, so resizing and re-encoding noise averages away), its 2-D DCT
taken, and the 16 x 16 lowest frequencies but the constant one kept; each bit says whether that
coefficient is above their median. 255 bits, held as an int and stored as 32 bytes (``to_bytes``).
It is taken of the contact sheet's thumbnail (``geometry.thumbnail_size``, at most 256 px): at ingest
from the thumbnail in memory, later from the thumbnail file, so both give the same hash (within 4 bits,
measured) at a fraction of a millisecond.

Why 255 bits and not pHash's 64: a burst (the same scene a moment later, framed a few pixels
otherwise) must not be a near-copy, it is ``similar``. The 64-bit hash sees only the 8 x 8 lowest
frequencies, which a small shift hardly moves: bursts fell within the distance of a quality-50
re-encode (0 to 4 bits of 64). At 255 bits, measured on photo-like scenes (tests/support/derived.py):
every derivation above within 4 bits of its original; bursts whose camera moved by 1 % to 3 % of the
frame 16 bits or more apart; distinct pictures 100 or more. ``NEAR_COPY_MAX_DISTANCE`` (10, config key
``near-copy-max-distance``) sits between the first two with a margin of 6 bits each way. What it
misses: a burst moved by well under 1 % of the frame is a near-copy (4 to 10 bits); a crop, a mirror
or a colour edit is not one (it is ``similar`` at best); flat pictures (a blank page, a clear sky)
have few bits that mean anything and may match one another.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

GRID = 64  # the luma is reduced to GRID x GRID before the DCT
LOW = 16  # the LOW x LOW lowest frequencies are kept (but the constant one)
HASH_BITS = LOW * LOW - 1  # 255 bits; stored in 32 bytes (``to_bytes``)
HASH_BYTES = 32
# Hamming distance at or below which two hashes are the same picture (see the module's docstring).
NEAR_COPY_MAX_DISTANCE = 10


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of size n (row k: frequency k), float64."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def _luma_grid(image: Image.Image) -> np.ndarray:
    """The picture's luma reduced to GRID x GRID, float64: each cell the mean of the pixels it covers (a box
    filter straight from the full size; a ``reduce`` step first would round differently for a picture and
    its half-size copy)."""
    return np.asarray(image.convert("L").resize((GRID, GRID), Image.Resampling.BOX), dtype=np.float64)


@functools.cache
def _low_rows() -> tuple[np.ndarray, np.ndarray]:
    """The DCT matrix's LOW lowest-frequency rows, and their transpose (contiguous): only those
    coefficients are kept, so only those are computed."""
    low = np.ascontiguousarray(_dct_matrix(GRID)[:LOW])
    return low, np.ascontiguousarray(low.T)


def perceptual_hash(image: Image.Image) -> int:
    """The 255-bit hash of an upright picture (any mode; RGB as ``preprocess`` makes it), as an int."""
    low, low_t = _low_rows()
    coefficients = (low @ _luma_grid(image) @ low_t).reshape(-1)[1:]  # without the constant term
    # Their median: 255 values, an odd count, so the middle one itself (what np.median returns, without
    # its checks for NaN and masks).
    bits = coefficients > np.partition(coefficients, HASH_BITS // 2)[HASH_BITS // 2]
    return int.from_bytes(np.packbits(bits).tobytes(), "big") >> (HASH_BYTES * 8 - HASH_BITS)


def to_bytes(value: int) -> bytes:
    """The hash as stored (BYTEA): 32 bytes, big-endian."""
    return value.to_bytes(HASH_BYTES, "big")


def from_bytes(data: bytes) -> int:
    return int.from_bytes(bytes(data), "big")


def distance(a: int, b: int) -> int:
    """Hamming distance: the number of bits in which two hashes differ (0 to ``HASH_BITS``)."""
    return (a ^ b).bit_count()


def as_words(values: list[int]) -> np.ndarray:
    """Hashes as an (n, 4) uint64 array (most significant word first): how many are compared at once."""
    out = np.zeros((len(values), HASH_BYTES // 8), dtype=np.uint64)
    mask = (1 << 64) - 1
    for row, value in enumerate(values):
        for word in range(HASH_BYTES // 8):
            out[row, HASH_BYTES // 8 - 1 - word] = (value >> (64 * word)) & mask
    return out


def distances(words: np.ndarray, one: np.ndarray) -> np.ndarray:
    """Hamming distances of every row of ``words`` ((n, 4) uint64) to ``one`` ((4,) uint64)."""
    return np.bitwise_count(words ^ one).sum(axis=1, dtype=np.int64)
