"""The cache value format (featurebank.common.codec): round trips exactly, and corruption is never read as features."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from featurebank.common import codec
from featurebank.common.codec import CorruptValueError

# Byte layout of an encoded value (see codec.encode): magic(2) version(1) dtype(1) ndim(1) shape(4*ndim) crc32(4) data.
VERSION_BYTE, DTYPE_BYTE, NDIM_BYTE = 2, 3, 4
FLOAT_DTYPES = st.sampled_from([np.dtype("<f4"), np.dtype("<f2")])


def header_size(ndim: int) -> int:
    return 5 + 4 * ndim + 4


@st.composite
def feature_arrays(draw, min_side: int = 0, elements=None) -> np.ndarray:
    """float32/float16 arrays of up to 4 dims (any values, NaN and inf included unless ``elements`` says otherwise)."""
    dtype = draw(FLOAT_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=min_side, max_side=5))
    return draw(hnp.arrays(dtype, shape, elements=elements))


def nonzero_floats(dtype_width: int = 16):
    """Finite non-zero values representable in float16 (so also in float32)."""
    return st.floats(min_value=2.0**-10, max_value=1024.0, width=dtype_width) | st.floats(
        min_value=-1024.0, max_value=-(2.0**-10), width=dtype_width
    )


def flip(value: bytes, index: int, mask: int) -> bytes:
    b = bytearray(value)
    b[index] ^= mask
    return bytes(b)


# ----------------------------------------------------------------------------- round trip


@given(feature_arrays())
@settings(max_examples=200, deadline=None)
def test_round_trip_is_exact(a):
    """decode(encode(a)) has a's dtype, shape and exact bytes (NaN payloads included) for float32/float16 up to 4 dims."""
    out = codec.decode(codec.encode(a))
    assert out.dtype == a.dtype
    assert out.shape == a.shape
    assert out.tobytes() == a.tobytes()


@pytest.mark.parametrize("dtype", [">f4", ">f2"])
def test_big_endian_input_round_trips_as_little_endian(dtype):
    """A big-endian float array is stored little-endian and decodes to the same values."""
    a = np.array([[1.5, -2.25, 3.0], [0.0, 65504.0 if dtype == ">f2" else 1e30, -0.5]], dtype=dtype)
    value = codec.encode(a)
    out = codec.decode(value)
    assert out.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(out, a)
    assert value.endswith(a.astype(out.dtype).tobytes())


def test_non_contiguous_input_round_trips():
    """A strided (non C-contiguous) view is encoded by value, in C order."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    a = base[::2, ::3].T
    assert not a.flags.c_contiguous
    np.testing.assert_array_equal(codec.decode(codec.encode(a)), a)


def test_decoded_array_is_read_only_view_over_value():
    """decode returns a read-only array that shares memory with the value bytes (no copy of the data)."""
    a = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    value = codec.encode(a)
    out = codec.decode(value)
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0, 0] = 1.0
    assert np.shares_memory(out, np.frombuffer(value, dtype=np.uint8))


@given(st.integers(min_value=0, max_value=4096))
@settings(deadline=None)
def test_float16_value_is_two_bytes_per_dim_plus_small_header(dim):
    """A 1-D float16 value of n features is exactly 2*n bytes plus a header of at most 24 bytes."""
    value = codec.encode(np.zeros(dim, np.float16))
    header = len(value) - 2 * dim
    assert header == header_size(1)
    assert header <= 24


@pytest.mark.parametrize("dtype", ["float64", "int32", "uint8", "bool"])
def test_encode_rejects_non_float_dtypes(dtype):
    """encode only stores float32/float16; another dtype is a ValueError naming it (not silently cast)."""
    with pytest.raises(ValueError, match=dtype):
        codec.encode(np.zeros(3, dtype=dtype))


def test_encode_rejects_more_than_max_ndim():
    """An array with more than MAX_NDIM dims is a ValueError naming the limit."""
    with pytest.raises(ValueError, match=str(codec.MAX_NDIM)):
        codec.encode(np.zeros((1,) * (codec.MAX_NDIM + 1), np.float32))
    assert codec.decode(codec.encode(np.zeros((1,) * codec.MAX_NDIM, np.float32))).ndim == codec.MAX_NDIM


# ----------------------------------------------------------------------------- corruption


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_any_truncation_is_corrupt(data):
    """Every proper prefix of an encoded value (cut in the header or the data) raises CorruptValueError."""
    value = codec.encode(data.draw(feature_arrays()))
    cut = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
    with pytest.raises(CorruptValueError):
        codec.decode(value[:cut])


@given(feature_arrays(), st.binary(min_size=1, max_size=16))
@settings(max_examples=200, deadline=None)
def test_any_extension_is_corrupt(a, extra):
    """Bytes appended to an encoded value raise CorruptValueError."""
    with pytest.raises(CorruptValueError):
        codec.decode(codec.encode(a) + extra)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_any_single_byte_flip_outside_ndim_is_corrupt(data):
    """Changing any one byte (magic, version, dtype, shape, checksum or data) of a non-empty value raises CorruptValueError.

    The ndim byte is covered by the next tests.
    """
    value = codec.encode(data.draw(feature_arrays(min_side=1)))
    index = data.draw(st.integers(min_value=0, max_value=len(value) - 1).filter(lambda i: i != NDIM_BYTE))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(CorruptValueError):
        codec.decode(flip(value, index, mask))


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_ndim_byte_flip_is_corrupt_for_nonzero_features(data):
    """Changing the ndim byte of a value whose features are all non-zero raises CorruptValueError."""
    a = data.draw(feature_arrays(min_side=1, elements=nonzero_floats()))
    value = codec.encode(a)
    mask = data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(CorruptValueError):
        codec.decode(flip(value, NDIM_BYTE, mask))


def test_ndim_byte_flip_on_zero_features_is_corrupt():
    """Changing the ndim byte of a float32 value holding [0, 0] raises CorruptValueError (it must not decode as another shape)."""
    value = codec.encode(np.zeros(2, np.float32))
    corrupted = flip(
        value, NDIM_BYTE, 1 ^ 3
    )  # ndim 1 -> 3: shape becomes (2, crc, 0), the last zero word the "crc" of b""
    with pytest.raises(CorruptValueError):
        codec.decode(corrupted)


@pytest.mark.parametrize("index,mask", [(DTYPE_BYTE, 1 ^ 2), (5 + 4, 7)], ids=["dtype", "shape"])
def test_header_flip_on_empty_value_is_corrupt(index, mask):
    """Changing the dtype code or a dimension of an encoded (0, 3) float32 value raises CorruptValueError."""
    value = codec.encode(np.zeros((0, 3), np.float32))
    with pytest.raises(CorruptValueError):
        codec.decode(flip(value, index, mask))


@pytest.mark.parametrize(
    "index,mask,what",
    [
        (0, 0x01, "magic"),
        (1, 0x80, "magic"),
        (VERSION_BYTE, 0x01, "version"),
        (DTYPE_BYTE, 0x04, "dtype code"),
        (DTYPE_BYTE, 1 ^ 2, "dtype float32 -> float16"),
        (5, 0x01, "shape"),
        (5 + 4, 0x10, "checksum"),
        (5 + 4 + 4, 0x01, "first data byte"),
        (-1, 0x80, "last data byte"),
    ],
)
def test_single_bit_flips_in_header_and_data_are_corrupt(index, mask, what):
    """A single flipped bit in the magic, version, dtype, shape, checksum or data of a value raises CorruptValueError."""
    value = codec.encode(np.arange(1, 7, dtype=np.float32))
    with pytest.raises(CorruptValueError):
        codec.decode(flip(value, index, mask))


def test_wrong_magic_and_version_are_corrupt():
    """A value with another format's magic or another format version raises CorruptValueError naming the format."""
    value = codec.encode(np.ones(4, np.float32))
    with pytest.raises(CorruptValueError, match="format"):
        codec.decode(b"XX" + value[2:])
    for version in (0, codec.FORMAT_VERSION + 1, 255):
        with pytest.raises(CorruptValueError, match="format"):
            codec.decode(value[:2] + bytes([version]) + value[3:])


def test_unknown_dtype_code_and_oversized_ndim_are_corrupt():
    """A header with a dtype code or ndim the codec does not know raises CorruptValueError."""
    value = codec.encode(np.ones(4, np.float32))
    for code in (0, 3, 255):
        with pytest.raises(CorruptValueError):
            codec.decode(value[:3] + bytes([code]) + value[4:])
    with pytest.raises(CorruptValueError):
        codec.decode(value[:4] + bytes([codec.MAX_NDIM + 1]) + value[5:])


def test_bad_checksum_with_consistent_header_is_corrupt():
    """Data that fits the header's shape but not its checksum raises CorruptValueError (checksum mismatch)."""
    a = np.ones(4, np.float32)
    data = a.tobytes()
    header = struct.pack("<2sBBB", codec.MAGIC, codec.FORMAT_VERSION, 1, 1) + struct.pack("<I", 4)
    crc = zlib.crc32(data, zlib.crc32(header))  # the checksum covers header and data
    good = header + struct.pack("<I", crc) + data
    np.testing.assert_array_equal(codec.decode(good), a)
    with pytest.raises(CorruptValueError, match="checksum"):
        codec.decode(header + struct.pack("<I", crc ^ 1) + data)


@pytest.mark.parametrize("value", [b"", b"F", b"FB\x01\x01", bytes(8)])
def test_short_or_empty_values_are_corrupt(value):
    """Values shorter than a header (empty, a few bytes) raise CorruptValueError, never struct.error or IndexError."""
    with pytest.raises(CorruptValueError):
        codec.decode(value)


def test_corrupt_value_error_is_a_value_error():
    """CorruptValueError is a ValueError, so callers that treat bad values as ValueError still catch it."""
    assert issubclass(CorruptValueError, ValueError)


def test_values_checksummed_with_zlib_are_read_and_corruption_still_caught():
    """Values written with zlib's CRC-32 (servers before the ISA-L checksum) pass check, byte for byte
    the same checksum; a flipped data bit in them is still caught."""
    import struct
    import zlib

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    head = struct.pack("<2sBBB", codec.MAGIC, codec.FORMAT_VERSION, 1, 2) + struct.pack("<2I", 2, 3)
    data = a.tobytes()
    value = head + struct.pack("<I", zlib.crc32(data, zlib.crc32(head))) + data
    assert value == codec.encode(a)
    np.testing.assert_array_equal(codec.decode(value), a)
    flipped = value[:-1] + bytes([value[-1] ^ 0x10])
    with pytest.raises(CorruptValueError, match="checksum"):
        codec.check(flipped)
