"""The SDK's one request-planning core: the same calls and answers whichever client drives it."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from featurebank.client import planning, tensors
from featurebank.client.errors import FeatureBankError
from featurebank.client.keys import content_key
from featurebank.v1 import featurebank_pb2 as pb

LIMITS = planning.Limits(max_items=2, max_bytes=1 << 20)


class Responder:
    """Answers a plan's calls as a server would: Lookup finds ``cached`` texts, Extract embeds any text."""

    def __init__(self, cached: set[str], refuse_lookup: grpc.StatusCode | None = None):
        self.cached = {content_key(t): t for t in cached}
        self.refuse_lookup = refuse_lookup
        self.calls: list[tuple[str, list[str]]] = []

    @staticmethod
    def _result(text: str, hit: bool) -> pb.ItemResult:
        r = pb.ItemResult(key=content_key(text), cache_hit=hit)
        tensors.to_proto(np.full(3, len(text), np.float32), r.features)
        return r

    def __call__(self, call: planning.Call):
        if call.method == "Lookup":
            self.calls.append(("Lookup", list(call.request.keys)))
            if self.refuse_lookup is not None:
                raise FeatureBankError(self.refuse_lookup, "refused")
            results = [
                self._result(self.cached[k], True)
                if k in self.cached
                else pb.ItemResult(key=k, error=pb.Error(code=grpc.StatusCode.NOT_FOUND.value[0], message="nf"))
                for k in call.request.keys
            ]
            return pb.ExtractResponse(results=results, backbone="bb")
        self.calls.append(("Extract", [i.text for i in call.request.inputs]))
        return pb.ExtractResponse(results=[self._result(i.text, False) for i in call.request.inputs], backbone="bb")


def _plan(texts):
    return planning.extract(texts, LIMITS, backbone="bb")


def test_sync_and_async_drivers_make_the_same_calls_and_place_answers_in_order():
    """Keys first (duplicates looked up once), only misses to Extract in chunks, answers in input order."""
    texts = ["cached", "new-a", "cached", "new-bb", "new-ccc"]
    sync = Responder({"cached"})
    out = planning.drive(_plan(texts), sync)

    async def send(call):
        return aresp(call)

    aresp = Responder({"cached"})
    out_async = asyncio.run(planning.drive_async(_plan(texts), send))
    assert sync.calls == aresp.calls
    assert sync.calls[0] == ("Lookup", [content_key(t) for t in ["cached", "new-a", "new-bb", "new-ccc"]])
    assert sync.calls[1:] == [("Extract", ["new-a", "new-bb"]), ("Extract", ["new-ccc"])]
    for got in (out, out_async):
        assert [o.index for o in got] == [0, 1, 2, 3, 4]
        assert [o.cache_hit for o in got] == [True, False, True, False, False]
        assert [float(o.features[0]) for o in got] == [float(len(t)) for t in texts]


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED])
def test_lookup_refused_for_a_fallback_reason_sends_everything_to_extract(code):
    """A Lookup refused as unknown or unsupported falls back to Extract for every input."""
    responder = Responder({"a"}, refuse_lookup=code)
    out = planning.drive(_plan(["a", "b"]), responder)
    assert [c[0] for c in responder.calls] == ["Lookup", "Extract"] and [o.cache_hit for o in out] == [False, False]


def test_lookup_refused_for_another_reason_is_raised():
    """Overload or auth on Lookup is raised at once: Extract would fail the same way."""
    responder = Responder({"a"}, refuse_lookup=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(FeatureBankError) as raised:
        planning.drive(_plan(["a", "b"]), responder)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(responder.calls) == 1


def test_chunks_are_lazy_and_within_limits():
    """chunks() reads an iterator lazily and keeps each slice within max_items and max_bytes."""
    taken = []

    def inputs():
        for i in range(5):
            taken.append(i)
            yield pb.Input(text="x" * 10)

    chunks = planning.chunks(inputs(), planning.Limits(max_items=2, max_bytes=1 << 20))
    assert next(chunks)[0] == 0 and taken == [0, 1, 2]  # the third input closed the first chunk
    assert [(start, len(c)) for start, c in chunks] == [(2, 2), (4, 1)]
    small = list(planning.chunks([pb.Input(text="x" * 100)] * 3, planning.Limits(max_items=10, max_bytes=150)))
    assert [len(c) for _, c in small] == [1, 1, 1]
