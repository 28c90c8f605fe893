"""The hit path's metrics, read back from the scrape output, count every RPC and item exactly."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_hit_path import _servicer

from featurebank.client import content_key
from featurebank.common import codec
from featurebank.common.metrics import Metrics
from featurebank.server.interceptors import StatusInterceptor
from featurebank.v1 import featurebank_pb2 as pb


class _Context:
    """The part of a grpc.aio ServicerContext the interceptor uses: abort raises, code() remembers."""

    def __init__(self):
        self._code = None

    def time_remaining(self):
        return None

    async def abort(self, code, message):
        self._code = code
        raise grpc.aio.AbortError(message)

    def code(self):
        return self._code


def _scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the scrape output, by name and sorted labels."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served_app():
    """The in-process servicer of test_hit_path (backbone "b", 4 float32 features), with an interceptor."""
    servicer, served = _servicer()
    return servicer, served, servicer.metrics, StatusInterceptor(servicer.metrics)


def test_scrape_counts_hits_not_found_and_failures_exactly(served_app):
    """N hit RPCs, a Lookup with missing keys and refused RPCs show up in the scrape with exactly those counts."""
    servicer, served, metrics, interceptor = served_app
    images = [b"img-%d" % i for i in range(5)]
    asyncio.run(
        servicer.cache.set_many(
            [
                (servicer._cache_key(served, "pooled", content_key(x)), codec.encode(np.full(4, i, np.float32)))
                for i, x in enumerate(images[:4])
            ]
        )
    )
    extract = interceptor._wrap_unary("Extract", servicer.Extract)
    lookup = interceptor._wrap_unary("Lookup", servicer.Lookup)

    async def drive():
        for _ in range(3):  # 3 RPCs x 2 hits
            answer = await extract(pb.ExtractRequest(inputs=[pb.Input(image=x) for x in images[:2]]), _Context())
            r = pb.ExtractResponse.FromString(answer)
            assert [x.cache_hit for x in r.results] == [True, True]
        for _ in range(2):  # 2 RPCs x (3 hits, 2 not found: one never stored, one not a key)
            keys = [content_key(x) for x in images[2:5]] + [content_key(images[0]), "nope"]
            await lookup(pb.LookupRequest(backbone="b", keys=keys), _Context())
        for _ in range(4):  # refused: no inputs
            with pytest.raises(grpc.aio.AbortError):
                await extract(pb.ExtractRequest(), _Context())

    asyncio.run(drive())
    got = _scrape(metrics)
    assert got[("featurebank_requests_total", (("code", "OK"), ("method", "Extract"), ("tenant", "")))] == 3
    assert got[("featurebank_requests_total", (("code", "OK"), ("method", "Lookup"), ("tenant", "")))] == 2
    assert (
        got[("featurebank_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Extract"), ("tenant", "")))] == 4
    )
    assert got[("featurebank_request_duration_seconds_count", (("method", "Extract"),))] == 7
    assert got[("featurebank_request_duration_seconds_count", (("method", "Lookup"),))] == 2
    labels = (("backbone", "b"), ("layer", "pooled"))
    assert got[("featurebank_items_total", labels + (("result", "hit"),))] == 3 * 2 + 2 * 3
    assert got[("featurebank_lookup_not_found_total", labels)] == 2 * 1
    assert ("featurebank_items_total", labels + (("result", "miss"),)) not in got


def test_an_unexpected_exception_is_internal_and_counted(served_app):
    """A bug in a handler ends its RPC INTERNAL and is counted under that code, once."""
    _, _, metrics, interceptor = served_app

    async def broken(request, context):
        raise KeyError("boom")

    ctx = _Context()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(interceptor._wrap_unary("Extract", broken)(pb.ExtractRequest(), ctx))
    assert ctx.code() == grpc.StatusCode.INTERNAL
    got = _scrape(metrics)
    assert got[("featurebank_requests_total", (("code", "INTERNAL"), ("method", "Extract"), ("tenant", "")))] == 1
    assert ("featurebank_requests_total", (("code", "OK"), ("method", "Extract"), ("tenant", ""))) not in got
