"""Content-key versions: BLAKE2b keys of SDKs and servers from before key versions still read right, never wrongly."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from test_hit_path import _servicer

from featurebank.client import content_key, tensors
from featurebank.common import codec
from featurebank.common.errors import InvalidArgumentError
from featurebank.server.keys import cache_key
from featurebank.v1 import featurebank_pb2 as pb

FP = "f" * 32


@pytest.fixture
def app():
    """The in-process servicer of test_hit_path (backbone "b", fingerprint FP)."""
    servicer, served = _servicer()
    assert served.info.fingerprint == FP
    return servicer


def _store(servicer, image: bytes, row, version: int) -> None:
    """An entry as a server computing ``version`` keys writes it (version 1: a server before key versions)."""
    key = cache_key(
        content_key(image, version), fingerprint=FP, layer="pooled", storage_dtype="float32", key_version=version
    )
    asyncio.run(servicer.cache.set_many([(key, codec.encode(np.asarray(row, np.float32)))]))


def _lookup(servicer, keys, key_version=None) -> list[pb.ItemResult]:
    kw = {} if key_version is None else {"key_version": key_version}
    answer = asyncio.run(servicer.Lookup(pb.LookupRequest(backbone="b", keys=keys, **kw), None))
    return list(pb.ExtractResponse.FromString(answer).results)


def _features(result: pb.ItemResult):
    return tensors.from_proto(result.features).tolist()


def test_an_old_sdks_keys_read_entries_an_old_server_wrote(app):
    """An SDK from before key versions (BLAKE2b keys, no key_version field) finds what an old server stored."""
    _store(app, b"old", [1, 2, 3, 4], version=1)
    wire = pb.LookupRequest(backbone="b", keys=[content_key(b"old", version=1)]).SerializeToString()
    (r,) = pb.ExtractResponse.FromString(asyncio.run(app.Lookup(pb.LookupRequest.FromString(wire), None))).results
    assert r.cache_hit and _features(r) == [1, 2, 3, 4]


def test_an_old_sdk_gets_the_right_features_for_what_a_new_server_stored(app):
    """An old SDK's keys-first Lookup of an input a new server stored is NOT_FOUND (never another
    input's features); its Extract then hits, with the right features and a version-2 key, and a
    Lookup of that reported key (no key_version) finds it."""
    _store(app, b"new", [5, 6, 7, 8], version=2)
    (miss,) = _lookup(app, [content_key(b"new", version=1)])
    assert not miss.cache_hit and miss.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    (hit,) = asyncio.run(app.extract(pb.ExtractRequest(inputs=[pb.Input(image=b"new")]), None)).results
    assert hit.cache_hit and _features(hit) == [5, 6, 7, 8] and hit.key == content_key(b"new")
    (again,) = _lookup(app, [hit.key])
    assert again.cache_hit and _features(again) == [5, 6, 7, 8]


def test_versions_never_alias(app):
    """A key string asked as version 2 never reads a version-1 entry of the same string, and the reverse."""
    k = content_key(b"x", version=1)
    asyncio.run(
        app.cache.set_many(
            [
                (
                    cache_key(k, fingerprint=FP, layer="pooled", storage_dtype="float32", key_version=1),
                    codec.encode(np.ones(4, np.float32)),
                )
            ]
        )
    )
    assert not _lookup(app, [k], key_version=2)[0].cache_hit
    assert _lookup(app, [k], key_version=1)[0].cache_hit
    _store(app, b"y", [9, 9, 9, 9], version=2)
    assert not _lookup(app, [content_key(b"y")], key_version=1)[0].cache_hit


def test_a_lookup_of_mixed_versions_finds_each(app):
    """Keys of unknown origin (key_version unset) are looked up as version 2, then the absent ones as
    version 1: each answered with its own features, in order, absent ones NOT_FOUND."""
    _store(app, b"a", [1, 1, 1, 1], version=1)
    _store(app, b"b", [2, 2, 2, 2], version=2)
    results = _lookup(app, [content_key(b"b"), content_key(b"a", version=1), content_key(b"c"), content_key(b"b")])
    assert [r.cache_hit for r in results] == [True, True, False, True]
    assert _features(results[0]) == [2] * 4 and _features(results[1]) == [1] * 4 and _features(results[3]) == [2] * 4


def test_an_unknown_key_version_is_invalid_argument(app):
    """key_version 3 is refused with a message naming the versions there are."""
    with pytest.raises(InvalidArgumentError, match="key_version 3"):
        _lookup(app, [content_key(b"a")], key_version=3)


def test_the_sdks_keys_first_lookup_says_its_key_version():
    """The SDK's keys-first Lookup carries the version of the keys it computed, so the server reads them once."""
    from featurebank.client import planning

    plan = planning.lookup_hits([pb.Input(image=b"q")], [None], backbone="b", layer="", output_dtype=pb.FLOAT32)
    call = next(plan)
    assert call.request.key_version == 2 and list(call.request.keys) == [content_key(b"q")]


def test_extract_answers_an_entry_an_old_server_wrote_and_moves_it_to_version_2(app):
    """An input cached before key versions (under its BLAKE2b key) is an Extract hit, with its
    features, and is copied under its version-2 key (the next read is one round trip)."""
    _store(app, b"old", [4, 3, 2, 1], version=1)
    request = pb.ExtractRequest(inputs=[pb.Input(image=b"old")])
    (r,) = asyncio.run(asyncio.wait_for(app.extract(request, None), 10)).results  # no worker: a miss would hang
    assert r.cache_hit and _features(r) == [4, 3, 2, 1] and r.key == content_key(b"old")
    v2 = app._cache_key(app.backbones["b"], "pooled", content_key(b"old"))
    (value,) = asyncio.run(app.cache.get_many([v2]))
    assert codec.decode(value).tolist() == [4, 3, 2, 1]
