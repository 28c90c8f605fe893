"""numpy <-> featurebank.v1.Tensor (featurebank.client.tensors): exact round trips, and every malformed message named."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from featurebank.client import tensors
from featurebank.client.tensors import TensorError
from featurebank.v1 import featurebank_pb2 as pb

SUPPORTED = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "uint8": pb.UINT8,
    "int32": pb.INT32,
    "int64": pb.INT64,
}


def shapes(min_dims: int = 1):
    # 0-d arrays are covered by test_scalar_round_trips_with_empty_shape.
    return hnp.array_shapes(min_dims=min_dims, max_dims=4, min_side=0, max_side=5)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_round_trip_each_dtype(name, data):
    """to_proto then from_proto (also through the wire format) gives back the dtype, shape and exact bytes, for every supported dtype."""
    a = data.draw(hnp.arrays(np.dtype(name), shapes()))
    t = tensors.to_proto(a)
    assert t.dtype == SUPPORTED[name]
    assert list(t.shape) == list(a.shape)
    assert t.data == a.astype(np.dtype(name).newbyteorder("<")).tobytes()
    for msg in (t, pb.Tensor.FromString(t.SerializeToString())):
        out = tensors.from_proto(msg)
        assert out.dtype == np.dtype(name).newbyteorder("<")
        assert out.shape == a.shape
        assert out.tobytes() == a.tobytes()


@pytest.mark.parametrize("name", ["float32", "float16", "int32", "int64"])
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_big_endian_arrays_are_sent_little_endian(name, data):
    """A big-endian array is encoded as little-endian bytes and decodes to the same values."""
    le_dtype = np.dtype(name).newbyteorder("<")
    be = data.draw(hnp.arrays(np.dtype(name).newbyteorder(">"), shapes()))
    t = tensors.to_proto(be)
    assert t.data == be.astype(le_dtype).tobytes()
    out = tensors.from_proto(t)
    assert out.dtype == le_dtype
    np.testing.assert_array_equal(out, be)


def test_non_contiguous_array_is_sent_in_c_order():
    """A transposed/strided view is encoded in C order of its logical layout."""
    a = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2].T
    t = tensors.to_proto(a)
    assert t.data == np.ascontiguousarray(a).tobytes()
    np.testing.assert_array_equal(tensors.from_proto(t), a)


def test_to_proto_fills_a_given_message():
    """to_proto(a, out=msg) writes into msg (e.g. an Input's tensor field) and returns it."""
    msg = pb.Input()
    returned = tensors.to_proto(np.ones((2, 2), np.uint8), msg.tensor)
    assert returned is msg.tensor
    assert msg.WhichOneof("payload") == "tensor"
    assert list(msg.tensor.shape) == [2, 2]


def test_from_proto_is_a_read_only_view():
    """from_proto returns a read-only array (a view over the message bytes, not a writable copy)."""
    t = tensors.to_proto(np.arange(6, dtype=np.float32))
    out = tensors.from_proto(t)
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0] = 1


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_scalar_round_trips_with_empty_shape(name):
    """A 0-d array is sent with an empty shape and decodes back to a 0-d array."""
    a = np.array(3, dtype=name)
    t = tensors.to_proto(a)
    assert list(t.shape) == []
    assert tensors.from_proto(t).shape == ()


def test_empty_shape_message_decodes_to_scalar():
    """A message with no shape and one element of data decodes to a 0-d array."""
    out = tensors.from_proto(pb.Tensor(dtype=pb.INT64, data=np.int64(5).tobytes()))
    assert out.shape == ()
    assert int(out) == 5


@pytest.mark.parametrize("dtype", ["float64", "bool", "int8", "uint16", "complex64", "object"])
def test_to_proto_rejects_unsupported_dtypes(dtype):
    """to_proto raises TensorError naming the dtype for arrays the protocol has no enum for."""
    with pytest.raises(TensorError, match="unsupported dtype"):
        tensors.to_proto(np.zeros(2, dtype=dtype))


# ----------------------------------------------------------------------------- malformed messages


@pytest.mark.parametrize(
    "shape,data_len",
    [([3], 8), ([3], 16), ([2, 2], 0), ([], 0), ([0], 4)],
)
def test_data_length_mismatch_is_named(shape, data_len):
    """Data shorter or longer than prod(shape) * itemsize raises TensorError stating both sizes."""
    t = pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=bytes(data_len))
    with pytest.raises(TensorError, match=rf"tensor data is {data_len} bytes but shape .* needs"):
        tensors.from_proto(t)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [-1, -1], [0, -2]])
def test_negative_dims_are_named(shape):
    """A shape with a negative dimension raises TensorError saying so (before any size arithmetic)."""
    with pytest.raises(TensorError, match="negative dimension"):
        tensors.from_proto(pb.Tensor(dtype=pb.UINT8, shape=shape, data=b""))


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 6, 1000])
def test_unknown_dtype_is_named(dtype):
    """An unspecified or unknown dtype enum raises TensorError naming the value and the supported dtypes."""
    with pytest.raises(TensorError, match=rf"tensor dtype {dtype} is not one of FLOAT32"):
        tensors.from_proto(pb.Tensor(dtype=dtype, shape=[1], data=b"\0"))


def test_over_max_elements_is_named():
    """More elements than max_elements raises TensorError naming the count and the limit; exactly the limit is fine."""
    at_limit = pb.Tensor(dtype=pb.UINT8, shape=[4, 25], data=bytes(100))
    assert tensors.from_proto(at_limit, max_elements=100).shape == (4, 25)
    over = pb.Tensor(dtype=pb.UINT8, shape=[101], data=bytes(101))
    with pytest.raises(TensorError, match="101 elements, over the limit of 100"):
        tensors.from_proto(over, max_elements=100)


def test_max_elements_checked_before_data_length():
    """A huge declared shape is refused by max_elements even when the data is short (no allocation, no length confusion)."""
    t = pb.Tensor(dtype=pb.FLOAT32, shape=[100_000, 100_000], data=b"")
    with pytest.raises(TensorError, match="over the limit"):
        tensors.from_proto(t, max_elements=1_000_000)


@pytest.mark.parametrize(
    "shape", [[2**32, 2**32], [2**62, 4], [2**63 - 1, 2]], ids=["wraps-to-0", "wraps-to-0b", "wraps-negative"]
)
def test_overflowing_shape_is_over_max_elements(shape):
    """A shape whose element count overflows int64 raises TensorError (a dimension or the count is over its limit)."""
    t = pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"")
    with pytest.raises(TensorError, match="over"):
        tensors.from_proto(t, max_elements=1_000_000)


def test_tensor_error_is_value_error():
    """TensorError is a ValueError, so input validation that catches ValueError catches it."""
    assert issubclass(TensorError, ValueError)


def test_dtype_tables_agree():
    """The enum -> numpy, numpy-name -> enum and enum -> key-name tables describe the same five little-endian dtypes."""
    assert set(tensors.DTYPE_TO_NUMPY) == set(SUPPORTED.values())
    assert tensors.NUMPY_TO_DTYPE == SUPPORTED
    assert tensors.DTYPE_NAMES == {v: k for k, v in SUPPORTED.items()}
    for dt in tensors.DTYPE_TO_NUMPY.values():
        assert dt.byteorder in ("<", "|", "=")
        assert dt.newbyteorder("<") == dt


def test_many_dimensions_with_a_zero_are_refused():
    """A 16-dim shape whose zeros make it empty is refused by the rank limit (found by the fuzzer)."""
    t = pb.Tensor(dtype=pb.UINT8, shape=[0, 0, 0, 0, 65, 84, 120, 12700, 100, 96, 100, 98, 0, 0, 0, 59], data=b"")
    with pytest.raises(TensorError, match="dimensions, over the limit"):
        tensors.from_proto(t, max_elements=1_000_000)


def test_empty_shape_with_huge_other_dims_is_refused():
    """A zero-size shape whose other dims overflow numpy raises TensorError (found by the fuzzer)."""
    t = pb.Tensor(dtype=pb.UINT8, shape=[0, 2**31 - 1, 2**31 - 1, 2**31 - 1], data=b"")
    with pytest.raises(TensorError, match="not a valid array shape"):
        tensors.from_proto(t, max_elements=1_000_000)
