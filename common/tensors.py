"""Conversions between numpy arrays and featurebank.v1.Tensor (raw little-endian bytes, C order)."""

from __future__ import annotations

import math

import numpy as np

from featurebank.v1 import featurebank_pb2 as pb

DTYPE_TO_NUMPY: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.UINT8: np.dtype("u1"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
}
NUMPY_TO_DTYPE: dict[str, int] = {np.dtype(v).name: k for k, v in DTYPE_TO_NUMPY.items()}
# The names used in content keys ("float32", ...), by proto enum value.
DTYPE_NAMES: dict[int, str] = {k: v.name for k, v in DTYPE_TO_NUMPY.items()}


MAX_NDIM = 8
MAX_DIM = 2**31 - 1  # numpy refuses shapes whose product (ignoring zeros) overflows


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array."""


def to_proto(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array as a Tensor message (converted to little-endian C order if needed)."""
    a = np.asarray(array)
    name = a.dtype.name
    if name not in NUMPY_TO_DTYPE:
        raise TensorError(f"unsupported dtype {a.dtype}; use one of {sorted(NUMPY_TO_DTYPE)}")
    code = NUMPY_TO_DTYPE[name]
    a = np.asarray(a, dtype=DTYPE_TO_NUMPY[code])  # not ascontiguousarray: it turns a scalar into shape (1,)
    t = out if out is not None else pb.Tensor()
    t.dtype = code
    t.shape[:] = a.shape
    t.data = a.tobytes(order="C")
    return t


def from_proto(t: pb.Tensor, max_elements: int | None = None) -> np.ndarray:
    """Decode a Tensor message to a read-only array view over its bytes (zero copy).

    Raises:
        TensorError: unknown dtype, negative dims, or data length != prod(shape) * itemsize.
    """
    if t.dtype not in DTYPE_TO_NUMPY:
        raise TensorError(f"tensor dtype {t.dtype} is not one of FLOAT32, FLOAT16, UINT8, INT32, INT64")
    dtype = DTYPE_TO_NUMPY[t.dtype]
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor shape {list(shape)} has a negative dimension")
    if len(shape) > MAX_NDIM:
        raise TensorError(f"tensor has {len(shape)} dimensions, over the limit of {MAX_NDIM}")
    if any(d > MAX_DIM for d in shape):
        raise TensorError(f"tensor shape {list(shape)} has a dimension over {MAX_DIM}")
    n = math.prod(shape)  # Python ints: a huge shape cannot wrap around and slip past the limit
    if max_elements is not None and n > max_elements:
        raise TensorError(f"tensor has {n} elements, over the limit of {max_elements}")
    expected = n * dtype.itemsize
    if len(t.data) != expected:
        raise TensorError(f"tensor data is {len(t.data)} bytes but shape {list(shape)} x {dtype.name} needs {expected}")
    try:
        return np.frombuffer(t.data, dtype=dtype).reshape(shape)
    except ValueError as e:  # e.g. an empty shape whose other dims multiply past numpy's limit
        raise TensorError(f"tensor shape {list(shape)} is not a valid array shape: {e}") from None
