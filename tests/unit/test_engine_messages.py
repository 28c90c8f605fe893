"""Engine messages: frames keep arrays out of band, errors cross as the same domain exceptions; the frontends flag."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest

from featurebank.common.errors import DeadlineExceededError, FeatureBankError, QueueFullError
from featurebank.server import engine_messages as msgs
from featurebank.server.config import ServerConfig


def test_frames_carry_arrays_out_of_band():
    """A result's arrays travel as separate buffers (not copied into the pickle) and come back equal."""
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5, dtype=np.float16)]
    message = msgs.ComputeResult(
        7, features=[*arrays, None], from_cache=[False, True, False], errors=[None, None, ("X", "INTERNAL", "m")]
    )
    chunks = msgs.frame(message)
    assert len(chunks) == 2 + len(arrays)  # header, pickle, one chunk per array

    async def roundtrip():
        reader = asyncio.StreamReader()
        for c in chunks:
            reader.feed_data(bytes(c))
        return await msgs.read_message(reader)

    back = asyncio.run(roundtrip())
    assert back.request_id == 7 and back.from_cache == [False, True, False]
    for a, b in zip(arrays, back.features):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_errors_cross_as_the_same_domain_exceptions():
    """QueueFullError, DeadlineExceededError and coded FeatureBankErrors keep their class, code and message."""
    for e in (
        QueueFullError("full"),
        DeadlineExceededError("late"),
        FeatureBankError("bad", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        back = msgs.decode_error(msgs.encode_error(e))
        assert type(back) is type(e) and back.code == e.code and str(back) == str(e)
    back = msgs.decode_error(msgs.encode_error(ValueError("oops")))
    assert isinstance(back, FeatureBankError) and back.code == grpc.StatusCode.INTERNAL and "oops" in str(back)
    assert isinstance(msgs.decode_error(msgs.encode_error(asyncio.CancelledError())), asyncio.CancelledError)


def test_config_refuses_frontends_without_a_shared_cache():
    """--frontends 2 with --cache memory (in-process, unshareable) is refused with one line; the embedded cache and --redis-url are shared."""
    with pytest.raises(ValueError, match="need a shared cache; drop --cache memory"):
        ServerConfig(backbone=["toy"], frontends="2", cache="memory")
    assert ServerConfig(backbone=["toy"], cache="memory").frontend_count == 1  # auto without a shared cache
    assert ServerConfig(backbone=["toy"], frontends="2").frontend_count == 2  # the embedded cache is the pod's
    assert dataclasses.replace(ServerConfig(backbone=["toy"]), redis_url="redis://x", frontends="3").frontend_count == 3


def test_large_image_bytes_travel_beside_the_pickle_and_arrive_as_bytes():
    """A 100 KB image payload is one out-of-band chunk (not in the pickle) and the engine reads the same bytes."""
    from featurebank.workers.backbones.base import InputItem
    from featurebank.workers.messages import out_of_band_item

    image = bytes(range(256)) * 400
    request = msgs.ComputeRequest(
        1,
        "toy",
        "pooled",
        ["k", "s"],
        [out_of_band_item(InputItem("image", image)), out_of_band_item(InputItem("image", b"small"))],
        None,
        "",
        True,
        True,
        False,
    )
    chunks = msgs.frame(request)
    assert len(chunks) == 3 and len(chunks[1]) < 1000 and bytes(chunks[2]) == image

    async def roundtrip():
        reader = asyncio.StreamReader()
        for c in chunks:
            reader.feed_data(bytes(c))
        return await msgs.read_message(reader)

    back = asyncio.run(roundtrip())
    assert [type(i.payload) for i in back.payloads] == [bytes, bytes]
    assert back.payloads[0].payload == image and back.payloads[1].payload == b"small"
