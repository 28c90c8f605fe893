"""Served heads: validated stacks of dense layers run in numpy, their names and their limits."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

from featurebank.common import tensors
from featurebank.common.errors import InvalidArgumentError
from featurebank.v1 import featurebank_pb2 as pb

HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Rows of a Predict go through the head in chunks whose widest activation is about this many
# floats (16 MiB of float32), so memory stays bounded whatever the number of inputs.
CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class HeadLimits:
    """What PutHead accepts: parameters in all (kernels + biases) and units of any one layer."""

    max_parameters: int = 1_000_000
    max_width: int = 4096


# ----------------------------------------------------------------------------- erf and activations

# Cephes ndtr.c (S. L. Moshier, public domain): erf(x) = x T(x^2) / U(x^2) on |x| <= 1, and
# erfc(x) = exp(-x^2) P(x) / Q(x) on 1 < |x| < 8; coefficients highest power first. In float64
# the result is within 4e-16 of math.erf (tests/unit/test_heads_compute.py), far below float32's
# epsilon (1.2e-7). numpy has no erf, and scipy is not a dependency.
_ERF_T = (
    9.60497373987051638749e0,
    9.00260197203842689217e1,
    2.23200534594684319226e3,
    7.00332514112805075473e3,
    5.55923013010394962768e4,
)
_ERF_U = (
    1.0,
    3.35617141647503099647e1,
    5.21357949780152679795e2,
    4.59432382970980127987e3,
    2.26290000613890934246e4,
    4.92673942608635921086e4,
)
_ERFC_P = (
    2.46196981473530512524e-10,
    5.64189564831068821977e-1,
    7.46321056442269912687e0,
    4.86371970985681366614e1,
    1.96520832956077098242e2,
    5.26445194995477358631e2,
    9.34528527171957607540e2,
    1.02755188689515710272e3,
    5.57535335369399327526e2,
)
_ERFC_Q = (
    1.0,
    1.32281951154744992508e1,
    8.67072140885989742329e1,
    3.54937778887819891062e2,
    9.75708501743205489753e2,
    1.82390916687909736289e3,
    2.24633760818710981792e3,
    1.65666309194161350182e3,
    5.57535340817727675546e2,
)
# From here on erfc(x) < 2e-17: 1 - erfc(x) rounds to 1 in float64.
_ERF_ONE_FROM = 6.0
_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _horner(coefficients: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    y = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        y *= x
        y += c
    return y


# erf runs over blocks of this many elements: its ~40 numpy passes then stay in the CPU cache,
# about 3x faster than passes over a whole 4 M-element activation.
ERF_BLOCK = 8192


def _erf_block(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    xs = np.clip(x, -1.0, 1.0)  # the |x| <= 1 branch, kept finite where it is not used
    z = xs * xs
    small = xs * _horner(_ERF_T, z) / _horner(_ERF_U, z)
    am = np.minimum(a, _ERF_ONE_FROM)  # beyond it (and for +-inf) erfc is 0 in float64
    erfc = _horner(_ERFC_P, am)
    erfc /= _horner(_ERFC_Q, am)
    erfc *= np.exp(-am * am)
    return np.where(a <= 1.0, small, np.copysign(1.0 - erfc, x))


def _blockwise(fn, x: np.ndarray) -> np.ndarray:
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    out = np.empty_like(flat)
    for i in range(0, flat.size, ERF_BLOCK):
        out[i : i + ERF_BLOCK] = fn(flat[i : i + ERF_BLOCK])
    return out.reshape(np.shape(x))


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise and vectorised, in float64 (NaN stays NaN, +-inf gives +-1)."""
    return _blockwise(_erf_block, x)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _gelu_block(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf_block(x * _SQRT_HALF))


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, Keras' default."""
    return _blockwise(_gelu_block, x).astype(x.dtype)


ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "softmax": _softmax,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "gelu": _gelu,
}


# ----------------------------------------------------------------------------- heads


def head_info(head: pb.Head, name: str | None = None) -> pb.HeadInfo:
    """What ListHeads says of a stored head, without compiling it; ``name`` as the caller addresses it."""
    layers = head.layers
    input_dim = int(layers[0].kernel.shape[0]) if layers and len(layers[0].kernel.shape) == 2 else 0
    return pb.HeadInfo(
        name=name or head.name,
        version=head.version,
        backbone=head.backbone,
        backbone_fingerprint=head.backbone_fingerprint,
        layer=head.layer,
        class_names=head.class_names,
        metrics=head.metrics,
        kind=head.kind,
        created_unix_ms=head.created_unix_ms,
        input_dim=input_dim,
    )


class CompiledHead:
    """A head ready to run: float32 (kernel, bias, activation) per layer.

    A head is small (a logistic regression or an MLP on a few thousand features), and the server
    never loads user-supplied model code; the servicer runs ``predict`` in a thread, off the event
    loop, because a big-but-allowed head on 4,096 inputs is seconds of numpy.
    """

    def __init__(self, head: pb.Head, limits: HeadLimits = HeadLimits()):
        self.head = head
        self.layers: list[tuple[np.ndarray, np.ndarray, str]] = []
        if not head.layers:
            raise InvalidArgumentError("a head needs at least one dense layer")
        params = 0
        prev = None
        for i, layer in enumerate(head.layers):
            # Shapes first, from the message alone: a head over the limits is refused before any
            # of its weights are decoded.
            shape = tuple(layer.kernel.shape)
            if len(shape) == 2:
                params += shape[0] * shape[1] + shape[1]
                if shape[1] > limits.max_width:
                    raise InvalidArgumentError(
                        f"head layer {i} has {shape[1]} units, over the limit of {limits.max_width} (--max-head-width)"
                    )
                if params > limits.max_parameters:
                    raise InvalidArgumentError(
                        f"head has more than {limits.max_parameters} parameters (--max-head-parameters)"
                    )
            try:
                kernel = tensors.from_proto(layer.kernel).astype(np.float32)
                bias = tensors.from_proto(layer.bias).astype(np.float32)
            except tensors.TensorError as e:
                raise InvalidArgumentError(f"head layer {i}: {e}") from None
            if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
                raise InvalidArgumentError(
                    f"head layer {i}: kernel must be (in, out) and bias (out,), got {kernel.shape}, {bias.shape}"
                )
            if prev is not None and kernel.shape[0] != prev:
                raise InvalidArgumentError(
                    f"head layer {i} takes {kernel.shape[0]} inputs but layer {i - 1} gives {prev}"
                )
            if layer.activation not in ACTIVATIONS:
                raise InvalidArgumentError(
                    f"head layer {i}: activation {layer.activation!r} is not one of {sorted(ACTIVATIONS)}"
                )
            if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
                raise InvalidArgumentError(f"head layer {i} has NaN or Inf weights")
            prev = kernel.shape[1]
            self.layers.append((kernel, bias, layer.activation))
        self.parameters = params
        self.nbytes = sum(k.nbytes + b.nbytes for k, b, _ in self.layers)
        self.input_dim = self.layers[0][0].shape[0]
        self.num_outputs = prev
        self.max_width = max(max(k.shape) for k, _, _ in self.layers)
        if (
            head.class_names
            and len(head.class_names) != self.num_outputs
            and not (self.num_outputs == 1 and len(head.class_names) == 2)
        ):
            raise InvalidArgumentError(f"head has {len(head.class_names)} class names but {self.num_outputs} outputs")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for features (N, input_dim); a sigmoid unit gives (N, 2).

        Rows go through in chunks, so the activations of a wide head on many inputs stay small.
        """
        rows = max(1, CHUNK_ELEMENTS // self.max_width)
        return (
            np.concatenate([self._predict(x[i : i + rows]) for i in range(0, len(x), rows)])
            if len(x)
            else np.zeros((0, max(2, self.num_outputs)), np.float32)
        )

    def _predict(self, x: np.ndarray) -> np.ndarray:
        for kernel, bias, activation in self.layers:
            x = ACTIVATIONS[activation](x @ kernel + bias)
        if x.shape[1] == 1:  # one sigmoid unit: P(class 1)
            x = np.concatenate([1.0 - x, x], axis=1)
        return x.astype(np.float32)

    def info(self, name: str | None = None) -> pb.HeadInfo:
        return head_info(self.head, name)


def check_name(name: str) -> None:
    if not HEAD_NAME.match(name or ""):
        raise InvalidArgumentError(
            f"head name {name!r} must be 1-64 of letters, digits, '_', '.', '-', starting alphanumeric"
        )


def parse_ref(ref: str) -> tuple[str | None, str]:
    """``NAME`` (the caller's own head) or ``TENANT/NAME`` (another tenant's): (tenant or None, name).

    Raises InvalidArgumentError for anything else, before any store is asked.
    """
    owner, slash, name = (ref or "").partition("/")
    if not slash:
        owner, name = None, ref
    elif "/" in name or not HEAD_NAME.match(owner):
        raise InvalidArgumentError(
            f"head {ref!r} must be NAME or TENANT/NAME (a tenant name of letters, digits, "
            f"'_', '.', '-', starting alphanumeric)"
        )
    check_name(name)
    return owner, name


class CompiledHeadCache:
    """Compiled heads by (tenant, name, version), least recently used first out, bounded in bytes.

    Versions are written once, so an entry never goes stale; deleting a head drops its entries
    here, and another replica's delete is seen because Predict resolves the version in the store
    before it looks here.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._entries: collections.OrderedDict[tuple[str, str, int], CompiledHead] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str, int]) -> CompiledHead | None:
        compiled = self._entries.get(key)
        if compiled is not None:
            self._entries.move_to_end(key)
        return compiled

    def put(self, key: tuple[str, str, int], compiled: CompiledHead) -> None:
        self._pop(key)
        if compiled.nbytes > self.max_bytes:
            return  # larger than the whole budget: compiled again per use, never holding others out
        self._entries[key] = compiled
        self.bytes_used += compiled.nbytes
        while self.bytes_used > self.max_bytes:
            self._pop(next(iter(self._entries)))

    def discard(self, owner: str, name: str, version: int = 0) -> None:
        """Drop one version (0: every version) of a head."""
        for key in [k for k in self._entries if k[:2] == (owner, name) and version in (0, k[2])]:
            self._pop(key)

    def _pop(self, key: tuple[str, str, int]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes_used -= old.nbytes
