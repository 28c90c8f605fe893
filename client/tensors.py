"""Tensor <-> numpy conversion, under the SDK's import path; defined in ``featurebank.common.tensors``."""

from featurebank.common.tensors import (  # noqa: F401
    DTYPE_NAMES,
    DTYPE_TO_NUMPY,
    MAX_DIM,
    MAX_NDIM,
    NUMPY_TO_DTYPE,
    TensorError,
    from_proto,
    to_proto,
)
