"""Responses written in wire format (server/wire.py) are, byte for byte, what protobuf serialises."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hit_path import OUTPUT_DTYPES, _servicer, _store

from featurebank.client import content_key
from featurebank.common import codec
from featurebank.server.wire import ResponseWriter, passing_bytes, varint
from featurebank.v1 import featurebank_pb2 as pb

hit = st.tuples(
    st.text(max_size=40),  # the key: any string, empty and non-ASCII included
    st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.FLOAT32, pb.FLOAT16]),
    st.lists(st.integers(0, 70_000), max_size=4).map(tuple),  # varints of 1 to 3 bytes
    st.binary(max_size=300),
)
other = st.builds(
    lambda key, code, message, hit: pb.ItemResult(key=key, error=pb.Error(code=code, message=message), cache_hit=hit),
    st.text(max_size=10),
    st.integers(0, 16),
    st.text(max_size=20),
    st.booleans(),
)


@given(st.integers(0, 2**63 - 1))
def test_varint_is_protobufs(n):
    """A varint decodes back to its number through protobuf (as an int64 Tensor dimension)."""
    t = pb.Tensor.FromString(b"\x10" + varint(n))  # shape = 2, one unpacked varint element
    assert list(t.shape) == [n]


@given(st.lists(st.one_of(hit, other), max_size=12), st.text(max_size=40), st.text(max_size=10), st.text(max_size=10))
@settings(max_examples=300, deadline=None)
def test_written_response_equals_the_serialised_message(results, fingerprint, backbone, layer):
    """Any mix of hits and other results, in order, gives exactly ``SerializeToString``'s bytes."""
    writer = ResponseWriter()
    expected = pb.ExtractResponse(backbone_fingerprint=fingerprint, backbone=backbone, layer=layer)
    for r in results:
        if isinstance(r, pb.ItemResult):
            writer.message(r)
            expected.results.append(r)
        else:
            key, dtype, shape, data = r
            writer.hit(key, dtype, shape, memoryview(data))
            expected.results.add(key=key, cache_hit=True, features=pb.Tensor(dtype=dtype, shape=shape, data=data))
    assert writer.finish(fingerprint, backbone, layer) == expected.SerializeToString(deterministic=True)


def test_large_hits_keep_their_bytes():
    """A 1 MiB feature (a 3-byte length) from a memoryview over the cached value comes out intact."""
    data = np.random.default_rng(1).bytes(1 << 20)
    writer = ResponseWriter()
    writer.hit("k" * 32, pb.FLOAT32, (1 << 18,), memoryview(b"head" + data)[4:])
    (r,) = pb.ExtractResponse.FromString(writer.finish("f", "b", "l")).results
    assert r.features.data == data and list(r.features.shape) == [1 << 18] and r.cache_hit


def test_handlers_messages_are_still_serialised_and_written_bytes_pass():
    """The serializer gRPC is given sends encoded bytes as they are and serialises messages."""
    serialize = passing_bytes(pb.ExtractResponse.SerializeToString)
    m = pb.ExtractResponse(backbone="b")
    assert serialize(m) == m.SerializeToString()
    assert serialize(b"\x1a\x01b") == b"\x1a\x01b"


@pytest.mark.parametrize("output_dtype", OUTPUT_DTYPES)
def test_encoded_extract_and_lookup_answer_what_the_message_path_answers(output_dtype):
    """Hits, a duplicate, an empty input, a corrupt entry and a key that is not one: the wire
    bytes of Extract and Lookup parse to the same results the message path builds."""
    servicer, served = _servicer()
    images = [b"image-%d" % i for i in range(3)]
    rows = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    _store(servicer, served, images, rows)
    corrupt_key = servicer._cache_key(served, "pooled", content_key(images[2]))
    value = codec.encode(rows[2])
    asyncio.run(servicer.cache.set_many([(corrupt_key, value[:-1] + bytes([value[-1] ^ 1]))]))
    request = pb.ExtractRequest(
        backbone="b",
        inputs=[pb.Input(image=images[0]), pb.Input(), pb.Input(image=images[1]), pb.Input(image=images[0])],
        output_dtype=output_dtype,
    )
    encoded = pb.ExtractResponse.FromString(asyncio.run(servicer.extract(request, None, encoded=True)))
    assert encoded == asyncio.run(servicer.extract(request, None))
    assert [r.cache_hit for r in encoded.results] == [True, False, True, True]

    keys = [content_key(images[1]), "not-a-key", content_key(images[2]), content_key(b"absent"), content_key(images[0])]
    lookup = pb.LookupRequest(backbone="b", keys=keys, output_dtype=output_dtype)
    got = pb.ExtractResponse.FromString(asyncio.run(servicer.Lookup(lookup, None)))
    assert [r.key for r in got.results] == keys
    assert [r.cache_hit for r in got.results] == [True, False, False, False, True]
    assert [r.error.code for r in got.results] == [0, 3, 5, 5, 0]  # INVALID_ARGUMENT, NOT_FOUND
    assert got.results[0].features == encoded.results[2].features
    assert got.results[4].features == encoded.results[0].features
