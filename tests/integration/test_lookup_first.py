"""SDK keys-first: extract_items looks content keys up first and sends only the misses to Extract.

Real server process, real Redis-protocol server, toy backbone. The server's per-method request
counter (``featurebank_requests_total{method}``), the per-item counter (``featurebank_items_total``:
Extract's items, and the keys Lookup found) and Lookup's not-found counter show what travelled.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from featurebank.client import FLOAT16, FeatureBankError, planning
from featurebank.client.sdk import AsyncFeatureBank
from featurebank.v1 import featurebank_pb2 as pb
from support import random_images


class Traffic:
    """What reached the server between two points: RPCs per method and Extract's items."""

    def __init__(self, server):
        self.server = server
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        m = self.server.metric
        return {
            "Extract": m("featurebank_requests_total", method="Extract"),
            "Lookup": m("featurebank_requests_total", method="Lookup"),
            "items": m("featurebank_items_total", backbone="toy"),
            "hit": m("featurebank_items_total", backbone="toy", result="hit"),
            "miss": m("featurebank_items_total", backbone="toy", result="miss"),
            "error": m("featurebank_items_total", backbone="toy", result="error"),
            "not_found": m("featurebank_lookup_not_found_total", backbone="toy"),
        }

    def since(self) -> dict[str, float]:
        now = self._read()
        return {k: now[k] - self.before[k] for k in now}


def test_second_extract_is_all_hits_and_sends_no_inputs(server, bank):
    """The same inputs again: one Lookup answers all of them; no Extract request, no item sent."""
    images = random_images(5, seed=1001)
    first = bank.extract_items(images, backbone="toy")
    assert [o.cache_hit for o in first] == [False] * 5
    traffic = Traffic(server)
    second = bank.extract_items(images, backbone="toy")
    assert [o.cache_hit for o in second] == [True] * 5
    assert [o.index for o in second] == list(range(5))
    assert [o.key for o in second] == [o.key for o in first]
    np.testing.assert_array_equal(np.stack([o.features for o in second]), np.stack([o.features for o in first]))
    assert traffic.since() == {"Extract": 0, "Lookup": 1, "items": 5, "hit": 5, "miss": 0, "error": 0, "not_found": 0}
    np.testing.assert_array_equal(bank.extract(images, backbone="toy"), np.stack([o.features for o in first]))


def test_only_misses_and_bad_inputs_go_to_extract_in_input_order(server, bank):
    """Cached, new, duplicated and bad inputs mixed: hits from Lookup, the rest from one Extract,
    merged in input order; each bad input fails alone with its own index."""
    cached = random_images(3, seed=1002)
    new = random_images(2, seed=1003)
    bank.extract(cached, backbone="toy")
    inputs = [new[0], cached[0], pb.Input(), cached[1], b"junk", new[1], cached[2], new[0], cached[0]]
    traffic = Traffic(server)
    outcomes = bank.extract_items(inputs, backbone="toy")
    assert [o.index for o in outcomes] == list(range(len(inputs)))
    assert [o.cache_hit for o in outcomes] == [False, True, False, True, False, False, True, False, True]
    assert "empty input" in outcomes[2].error.message and outcomes[2].error.index == 2
    assert "cannot decode image" in outcomes[4].error.message and outcomes[4].error.index == 4
    assert all(outcomes[i].error is None for i in (0, 1, 3, 5, 6, 7, 8))
    np.testing.assert_array_equal(outcomes[0].features, outcomes[7].features)
    np.testing.assert_array_equal(outcomes[1].features, outcomes[8].features)
    # Lookup found the 3 distinct cached keys and not new[0], new[1], b"junk" (the empty input has
    # no key); Extract saw only new[0] (twice), b"junk", the empty input and new[1].
    assert traffic.since() == {"Extract": 1, "Lookup": 1, "items": 8, "hit": 3, "miss": 3, "error": 2, "not_found": 3}
    np.testing.assert_array_equal(
        np.stack([o.features for o in outcomes if o.cache_hit]),
        bank.extract([cached[0], cached[1], cached[2], cached[0]], backbone="toy", lookup_first=False),
    )


def test_lookup_first_false_sends_everything(server, bank):
    """The opt-out: every input goes to Extract, whose hits are counted there."""
    images = random_images(3, seed=1004)
    bank.extract(images, backbone="toy")
    traffic = Traffic(server)
    assert all(o.cache_hit for o in bank.extract_items(images, backbone="toy", lookup_first=False))
    assert traffic.since() == {"Extract": 1, "Lookup": 0, "items": 3, "hit": 3, "miss": 0, "error": 0, "not_found": 0}


def test_other_policies_defaults_and_dtypes(server, bank):
    """REFRESH and BYPASS never look up; without a backbone name Extract picks it (no Lookup);
    FLOAT16 hits come back as float16, equal to the cast float32 features."""
    images = random_images(2, seed=1005)
    full = bank.extract(images, backbone="toy")
    traffic = Traffic(server)
    assert not any(o.cache_hit for o in bank.extract_items(images, backbone="toy", cache_policy=pb.REFRESH))
    assert all(o.cache_hit for o in bank.extract_items(images))  # the server's default backbone: toy
    assert traffic.since()["Lookup"] == 0
    half = bank.extract_items(images, backbone="toy", output_dtype=FLOAT16)
    assert all(o.cache_hit and o.features.dtype == np.float16 for o in half)
    np.testing.assert_array_equal(np.stack([o.features for o in half]), full.astype(np.float16))


def test_lookup_is_chunked(server, bank, monkeypatch):
    """Keys go out LOOKUP_CHUNK at a time (1,024 by default; 2 here, to see it)."""
    monkeypatch.setattr(planning, "LOOKUP_CHUNK", 2)
    images = random_images(5, seed=1006)
    first = bank.extract(images, backbone="toy")
    traffic = Traffic(server)
    np.testing.assert_array_equal(bank.extract(images, backbone="toy"), first)
    assert traffic.since()["Lookup"] == 3 and traffic.since()["Extract"] == 0


def test_unknown_backbone_or_layer_still_fails_as_before(bank):
    """A failed Lookup falls back to Extract, which names the problem as it always did."""
    img = random_images(1, seed=1007)
    with pytest.raises(FeatureBankError) as e:
        bank.extract_items(img, backbone="no-such-backbone")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "unknown backbone" in e.value.message
    with pytest.raises(FeatureBankError) as e:
        bank.extract_items(img, backbone="toy", layer="no-such-layer")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "no layer" in e.value.message


def test_async_client_looks_up_first_too(server):
    """AsyncFeatureBank.extract_items: same outcomes, misses only to Extract."""
    images = random_images(4, seed=1008)

    async def run():
        async with AsyncFeatureBank(server.target, timeout_s=60) as bank:
            first = await bank.extract_items(images[:2], backbone="toy")
            traffic = Traffic(server)
            mixed = await bank.extract_items([images[2], images[0], b"junk", images[1], images[3]], backbone="toy")
            return first, mixed, traffic.since()

    first, mixed, since = asyncio.run(run())
    assert [o.cache_hit for o in mixed] == [False, True, False, True, False]
    assert [o.index for o in mixed] == [0, 1, 2, 3, 4] and mixed[2].error.index == 2
    np.testing.assert_array_equal(mixed[1].features, first[0].features)
    np.testing.assert_array_equal(mixed[3].features, first[1].features)
    assert since == {"Extract": 1, "Lookup": 1, "items": 5, "hit": 2, "miss": 2, "error": 1, "not_found": 3}
