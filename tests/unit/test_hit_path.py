"""The cache-hit path answers exactly what the numpy path answered, only cheaper.

Hits are passed on as the cached value's raw bytes when the requested dtype is the stored one
(see ``servicer._cached_to_proto``); these tests pin that the Tensor is byte-identical to
``tensors.to_proto(codec.decode(value).astype(out_dtype))`` and that corruption is still caught.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from featurebank.client import content_key, tensors
from featurebank.common import codec
from featurebank.common.cache import LRUCache
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import DynamicBatcher
from featurebank.server.servicer import (
    _OUTPUT_DTYPES,
    _OUTPUT_TENSOR_DTYPES,
    HASH_OFFLOAD_BYTES,
    HASH_OFFLOAD_REQUEST_BYTES,
    FeatureBankServicer,
    ServedBackbone,
    _cached_to_proto,
)
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.workers.backbones.base import BackboneInfo, LayerSpec

OUTPUT_DTYPES = [pb.DTYPE_UNSPECIFIED, pb.FLOAT32, pb.FLOAT16]
feature_arrays = st.sampled_from([np.dtype("<f4"), np.dtype("<f2")]).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)


def numpy_path(value: bytes, output_dtype: int) -> pb.Tensor:
    """What the hit path did before: decode to an array, convert, encode."""
    return tensors.to_proto(codec.decode(value).astype(_OUTPUT_DTYPES[output_dtype], copy=False))


@given(feature_arrays, st.sampled_from(OUTPUT_DTYPES))
@settings(max_examples=300, deadline=None)
def test_cached_value_tensor_equals_the_numpy_path(a, output_dtype):
    """For every stored dtype, shape (0-d and empty included) and requested dtype, the same message bytes."""
    value = codec.encode(a)
    out = pb.Tensor()
    with np.errstate(over="ignore", invalid="ignore"):  # float32 -> float16 may overflow to inf: both paths alike
        _cached_to_proto(
            value, codec.check(value), _OUTPUT_TENSOR_DTYPES[output_dtype], _OUTPUT_DTYPES[output_dtype], out
        )
        expected = numpy_path(value, output_dtype)
    assert out.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@given(feature_arrays)
@settings(max_examples=100, deadline=None)
def test_check_agrees_with_decode(a):
    """check() reports the shape and data offset decode() reads the array from."""
    value = codec.encode(a)
    header = codec.check(value)
    assert header.shape == a.shape
    assert codec.DTYPE_NAMES[header.code] == a.dtype.name
    assert value[header.offset :] == a.tobytes()
    assert codec.to_array(value, header).tobytes() == codec.decode(value).tobytes()


# ----------------------------------------------------------------------------- the servicer, in process


def _servicer() -> tuple[FeatureBankServicer, ServedBackbone]:
    info = BackboneInfo(
        name="b",
        fingerprint="f" * 32,
        input_kind="image",
        default_layer="pooled",
        layers=(LayerSpec("pooled", (4,)),),
        input_size=(8, 8, 3),
        preprocessing="none",
    )
    served = ServedBackbone(info=info, batcher=DynamicBatcher(max_batch_size=4, max_batch_delay_ms=1, max_queue_size=8))
    return FeatureBankServicer(
        {"b": served}, LRUCache(1 << 20, 60), Metrics(), storage_dtype="float32", max_items_per_request=16
    ), served


def _store(servicer, served, images, rows) -> None:
    items = [
        (servicer._cache_key(served, "pooled", content_key(img)), codec.encode(row)) for img, row in zip(images, rows)
    ]
    asyncio.run(servicer.cache.set_many(items))


@pytest.mark.parametrize("output_dtype", OUTPUT_DTYPES)
def test_extract_and_lookup_hits_answer_the_cached_features(output_dtype):
    """All-hit Extract (with a duplicate) and Lookup give the stored rows, in the requested dtype."""
    servicer, served = _servicer()
    images = [b"image-%d" % i + bytes(100 * i) for i in range(3)]
    rows = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    _store(servicer, served, images, rows)
    expected = rows.astype(_OUTPUT_DTYPES[output_dtype])

    request = pb.ExtractRequest(
        backbone="b", inputs=[pb.Input(image=x) for x in images + images[:1]], output_dtype=output_dtype
    )
    response = asyncio.run(servicer.extract(request, None))
    assert [r.cache_hit for r in response.results] == [True] * 4
    got = np.stack([tensors.from_proto(r.features) for r in response.results])
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, np.concatenate([expected, expected[:1]]))

    lookup = pb.LookupRequest(backbone="b", keys=[content_key(x) for x in images], output_dtype=output_dtype)
    response = pb.ExtractResponse.FromString(asyncio.run(servicer.Lookup(lookup, None)))
    np.testing.assert_array_equal(np.stack([tensors.from_proto(r.features) for r in response.results]), expected)


def test_lookup_never_serves_a_corrupt_value():
    """A value failing its checksum is NOT_FOUND for Lookup (the client then sends the input to Extract)."""
    servicer, served = _servicer()
    img = b"corrupt-me"
    key = servicer._cache_key(served, "pooled", content_key(img))
    value = codec.encode(np.ones(4, np.float32))
    asyncio.run(servicer.cache.set_many([(key, value[:-1] + bytes([value[-1] ^ 1]))]))
    answer = asyncio.run(servicer.Lookup(pb.LookupRequest(backbone="b", keys=[content_key(img)]), None))
    (result,) = pb.ExtractResponse.FromString(answer).results
    assert not result.cache_hit and not result.HasField("features")
    assert result.error.code == 5  # NOT_FOUND


def test_large_inputs_hashed_in_threads_get_the_same_keys_and_hits():
    """Inputs over HASH_OFFLOAD_BYTES (hashed beside the event loop) and small ones (inline), mixed
    and duplicated, get the documented content keys, in input order, and hit their entries."""
    servicer, served = _servicer()
    rng = np.random.default_rng(5)
    big = [rng.bytes(HASH_OFFLOAD_REQUEST_BYTES // 4 + i) for i in range(5)]  # 1.25 MiB in all
    small = [rng.bytes(100), rng.bytes(HASH_OFFLOAD_BYTES)]
    pixels = rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)  # a 76,800-byte tensor
    assert pixels.nbytes > HASH_OFFLOAD_BYTES
    inputs = [big[0], small[0], big[1], pixels, big[2], small[1], big[3], big[0], big[4]]
    rows = rng.standard_normal((len(inputs), 4)).astype(np.float32)
    rows[7] = rows[0]  # the duplicate of big[0]
    _store(servicer, served, inputs, rows)

    from featurebank.client.inputs import to_input

    request = pb.ExtractRequest(backbone="b", inputs=[to_input(x) for x in inputs])
    response = asyncio.run(servicer.extract(request, None))
    assert [r.key for r in response.results] == [content_key(x) for x in inputs]
    assert all(r.cache_hit for r in response.results)
    np.testing.assert_array_equal(np.stack([tensors.from_proto(r.features) for r in response.results]), rows)
    assert servicer._hasher is not None  # the large ones did go to the hashing threads


def test_a_request_with_little_to_hash_is_hashed_inline():
    """One large image (under HASH_OFFLOAD_REQUEST_BYTES in all) is hashed on the loop: no thread hand-off."""
    servicer, served = _servicer()
    img = np.random.default_rng(6).bytes(HASH_OFFLOAD_BYTES * 2)
    _store(servicer, served, [img], np.ones((1, 4), np.float32))

    from featurebank.client.inputs import to_input

    response = asyncio.run(servicer.extract(pb.ExtractRequest(backbone="b", inputs=[to_input(img)]), None))
    assert response.results[0].cache_hit and response.results[0].key == content_key(img)
    assert servicer._hasher is None
