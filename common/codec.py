"""The cache value format: a small checksummed header plus the raw feature bytes."""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

try:  # ISA-L's CRC-32 is zlib's, bit for bit, ~3x faster (SIMD): it runs over every hit's bytes
    from isal.isal_zlib import crc32
except ImportError:  # no isal wheel for this platform: the same checksum, slower
    from zlib import crc32

MAGIC = b"FB"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<2sBBB")  # magic, version, dtype code, ndim
_DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_CODES: dict[str, int] = {v.name: k for k, v in _DTYPES.items()}
# The stored dtype's name by header code, for callers that must not touch numpy per value.
DTYPE_NAMES: dict[int, str] = {k: v.name for k, v in _DTYPES.items()}
MAX_NDIM = 8
_ITEMSIZES: dict[int, int] = {k: v.itemsize for k, v in _DTYPES.items()}
_TAILS = [struct.Struct(f"<{n}II") for n in range(MAX_NDIM + 1)]  # after the head: shape, crc32


class CorruptValueError(ValueError):
    """A cached value failed its format or checksum check: treat it as a miss and rewrite it."""


def encode(features: np.ndarray) -> bytes:
    """Serialise float32/float16 features as header (magic, version, dtype, shape, crc32) + data."""
    a = np.asarray(features)
    code = _CODES.get(a.dtype.name)
    if code is None:
        raise ValueError(f"cache values are float32 or float16, got {a.dtype}")
    if a.ndim > MAX_NDIM:
        raise ValueError(f"cache values have at most {MAX_NDIM} dims, got {a.ndim}")
    data = np.asarray(a, dtype=_DTYPES[code]).tobytes(order="C")
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, code, a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
    # The checksum covers the header too: a flipped dtype, ndim or shape byte is caught as well.
    return b"".join((head, struct.pack("<I", crc32(data, crc32(head))), data))


class Header(NamedTuple):
    """A checked value's layout: dtype code (see ``DTYPE_NAMES``), shape, and where the data starts."""

    code: int
    shape: tuple[int, ...]
    offset: int


def check(value: bytes) -> Header:
    """Verify a cached value (format, lengths, checksum) without building an array.

    The data after ``offset`` is then exactly the features as little-endian C-order bytes of
    the stored dtype, so the hit path can pass it on as is, with no numpy in between.

    Raises:
        CorruptValueError: wrong magic/version/dtype, truncated or extended data, bad checksum.
    """
    if len(value) < _HEAD.size:
        raise CorruptValueError(f"value is {len(value)} bytes, shorter than the header")
    magic, version, code, ndim = _HEAD.unpack_from(value)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptValueError(f"unknown value format {magic!r} v{version}")
    itemsize = _ITEMSIZES.get(code)
    if itemsize is None or ndim > MAX_NDIM:
        raise CorruptValueError(f"bad header: dtype code {code}, ndim {ndim}")
    tail = _TAILS[ndim]  # shape and checksum in one precompiled unpack: this runs once per hit
    offset = _HEAD.size + tail.size
    if len(value) < offset:
        raise CorruptValueError("value truncated inside its header")
    fields = tail.unpack_from(value, _HEAD.size)
    shape, crc = fields[:-1], fields[-1]
    n = itemsize
    for d in shape:
        n *= d
    if len(value) - offset != n:
        raise CorruptValueError(f"value holds {len(value) - offset} data bytes, shape {shape} needs {n}")
    view = memoryview(value)
    if crc32(view[offset:], crc32(view[: offset - 4])) != crc:
        raise CorruptValueError("checksum mismatch")
    return Header(code, shape, offset)


def decode(value: bytes) -> np.ndarray:
    """Parse a cached value back into a read-only array (zero copy over ``value``).

    Raises:
        CorruptValueError: wrong magic/version/dtype, truncated or extended data, bad checksum.
    """
    return to_array(value, check(value))


def to_array(value: bytes, header: Header) -> np.ndarray:
    """The array of a value ``check`` accepted (zero copy over ``value``)."""
    return np.frombuffer(memoryview(value)[header.offset :], dtype=_DTYPES[header.code]).reshape(header.shape)
