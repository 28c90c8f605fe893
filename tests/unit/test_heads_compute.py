"""Head numpy: the vectorised erf against math.erf, GELU, chunked predict, PutHead limits, the bounded compiled-heads cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

from featurebank.client import tensors
from featurebank.common.errors import InvalidArgumentError
from featurebank.server.heads import CompiledHead, CompiledHeadCache, HeadLimits, erf, parse_ref
from featurebank.v1 import featurebank_pb2 as pb

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _head(widths, activation="gelu", seed=0, name="h") -> pb.Head:
    rng = np.random.default_rng(seed)
    head = pb.Head(name=name)
    for i in range(len(widths) - 1):
        head.layers.add(
            kernel=tensors.to_proto(rng.normal(0, 1, (widths[i], widths[i + 1])).astype(np.float32)),
            bias=tensors.to_proto(rng.normal(0, 1, widths[i + 1]).astype(np.float32)),
            activation=activation if i < len(widths) - 2 else "softmax",
        )
    return head


def test_erf_matches_math_erf_far_below_float32_eps():
    """On a dense grid over [-10, 10], every float32 sample and the branch edges, erf is within 1e-15 of math.erf."""
    x = np.concatenate(
        [
            np.linspace(-10, 10, 400_001),
            np.linspace(-1.001, 1.001, 20_001),
            np.linspace(5.99, 6.01, 2001),
            np.random.default_rng(0).uniform(-7, 7, 100_000).astype(np.float32).astype(np.float64),
            [0.0, -0.0, 1.0, -1.0, 6.0, -6.0, 8.0, 30.0, 1e300, -1e300, 5e-324, 1e-300],
        ]
    )
    want = np.array([math.erf(v) for v in x])
    error = np.abs(erf(x) - want)
    assert error.max() < 1e-15, (error.max(), x[error.argmax()])
    assert error.max() < FLOAT32_EPS / 1e8
    assert np.array_equal(erf(np.array([np.inf, -np.inf])), [1.0, -1.0]) and np.isnan(erf(np.array([np.nan]))[0])
    assert erf(np.zeros((3, 4), np.float32)).shape == (3, 4)


def test_gelu_layer_equals_the_exact_formula():
    """A GELU layer gives 0.5 x (1 + erf(x / sqrt 2)) computed with math.erf, to float32 rounding."""
    head = _head((8, 32, 3))
    compiled = CompiledHead(head)
    x = np.random.default_rng(1).normal(0, 3, (50, 8)).astype(np.float32)
    k0, b0, _ = compiled.layers[0]
    k1, b1, _ = compiled.layers[1]
    pre = (x @ k0 + b0).astype(np.float64)
    hidden = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(pre).astype(np.float32)
    logits = hidden @ k1 + b1
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(compiled.predict(x), want, rtol=1e-5, atol=1e-6)


def test_predict_in_chunks_equals_one_pass(monkeypatch):
    """Rows split into chunks give the probabilities of one pass (to BLAS rounding); zero rows give an empty (0, C) array."""
    from featurebank.server import heads

    compiled = CompiledHead(_head((16, 64, 4), activation="relu"))
    x = np.random.default_rng(2).normal(0, 1, (1000, 16)).astype(np.float32)
    whole = compiled.predict(x)
    monkeypatch.setattr(heads, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows a chunk
    np.testing.assert_allclose(compiled.predict(x), whole, rtol=1e-5, atol=1e-6)  # BLAS blocks by row count
    assert compiled.predict(x[:0]).shape == (0, 4)


@pytest.mark.parametrize(
    "widths, limits, message",
    [
        (
            (16, 100, 2),
            HeadLimits(max_parameters=1000, max_width=4096),
            "more than 1000 parameters (--max-head-parameters)",
        ),
        (
            (16, 300, 2),
            HeadLimits(max_parameters=10**6, max_width=256),
            "300 units, over the limit of 256 (--max-head-width)",
        ),
    ],
)
def test_heads_over_the_limits_are_refused_naming_the_flag(widths, limits, message):
    """A head over --max-head-parameters or --max-head-width is INVALID_ARGUMENT naming the flag; one at the limit is accepted."""
    with pytest.raises(InvalidArgumentError) as e:
        CompiledHead(_head(widths), limits)
    assert message in str(e.value)
    exact = HeadLimits(max_parameters=sum(a * b + b for a, b in zip(widths, widths[1:])), max_width=max(widths[1:]))
    assert CompiledHead(_head(widths), exact).parameters == exact.max_parameters


def test_limits_are_checked_before_weights_are_decoded():
    """A layer declaring a huge kernel is refused from its shape, before its (absent) data is looked at."""
    head = pb.Head(name="h")
    head.layers.add(
        kernel=pb.Tensor(dtype=pb.FLOAT32, shape=[100_000, 100_000]),
        bias=pb.Tensor(dtype=pb.FLOAT32, shape=[100_000]),
        activation="softmax",
    )
    with pytest.raises(InvalidArgumentError, match="--max-head"):
        CompiledHead(head, HeadLimits())


def test_compiled_heads_cache_is_a_bounded_lru():
    """The cache never holds more bytes than its budget, evicts the least recently used first, and drops a deleted head's versions."""
    heads = [CompiledHead(_head((16, 16, 2), seed=i)) for i in range(10)]
    size = heads[0].nbytes
    cache = CompiledHeadCache(max_bytes=3 * size)
    for i, h in enumerate(heads[:3]):
        cache.put(("t", f"h{i}", 1), h)
    assert cache.get(("t", "h0", 1)) is heads[0]  # h0 is now the most recent
    cache.put(("t", "h3", 1), heads[3])
    assert cache.get(("t", "h1", 1)) is None and cache.get(("t", "h0", 1)) is heads[0]
    for i, h in enumerate(heads):
        cache.put(("t", "many", i + 1), h)
        assert cache.bytes_used <= cache.max_bytes and len(cache) <= 3
    cache.discard("t", "many")
    assert all(k[1] != "many" for k in cache._entries)
    tiny = CompiledHeadCache(max_bytes=size - 1)
    tiny.put(("t", "big", 1), heads[0])  # larger than the whole budget: not kept
    assert len(tiny) == 0 and tiny.bytes_used == 0


@pytest.mark.parametrize(
    "ref, expected", [("clf", (None, "clf")), ("search/clf", ("search", "clf")), ("a.b/c-1", ("a.b", "c-1"))]
)
def test_head_references(ref, expected):
    """NAME is the caller's own head, TENANT/NAME another tenant's."""
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "/clf", "a/", "a/b/c", "../etc", "bad name", "a/.hidden", "x" * 65])
def test_malformed_head_references_are_invalid(ref):
    """Anything but NAME or TENANT/NAME (each 1-64 safe characters) is INVALID_ARGUMENT."""
    with pytest.raises(InvalidArgumentError):
        parse_ref(ref)
