"""The cache value format: a small checksummed header plus the raw feature bytes."""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"FB"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<2sBBB")  # magic, version, dtype code, ndim
_DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_CODES: dict[str, int] = {v.name: k for k, v in _DTYPES.items()}
MAX_NDIM = 8


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
    return b"".join((head, struct.pack("<I", zlib.crc32(data, zlib.crc32(head))), data))


def decode(value: bytes) -> np.ndarray:
    """Parse a cached value back into a read-only array (zero copy over ``value``).

    Raises:
        CorruptValueError: wrong magic/version/dtype, truncated or extended data, bad checksum.
    """
    if len(value) < _HEAD.size:
        raise CorruptValueError(f"value is {len(value)} bytes, shorter than the header")
    magic, version, code, ndim = _HEAD.unpack_from(value)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptValueError(f"unknown value format {magic!r} v{version}")
    dtype = _DTYPES.get(code)
    if dtype is None or ndim > MAX_NDIM:
        raise CorruptValueError(f"bad header: dtype code {code}, ndim {ndim}")
    offset = _HEAD.size
    if len(value) < offset + 4 * ndim + 4:
        raise CorruptValueError("value truncated inside its header")
    shape = struct.unpack_from(f"<{ndim}I", value, offset)
    offset += 4 * ndim
    (crc,) = struct.unpack_from("<I", value, offset)
    offset += 4
    n = 1
    for d in shape:
        n *= d
    if len(value) - offset != n * dtype.itemsize:
        raise CorruptValueError(f"value holds {len(value) - offset} data bytes, shape {shape} needs {n * dtype.itemsize}")
    data = memoryview(value)[offset:]
    if zlib.crc32(data, zlib.crc32(memoryview(value)[: offset - 4])) != crc:
        raise CorruptValueError("checksum mismatch")
    return np.frombuffer(data, dtype=dtype).reshape(shape)
