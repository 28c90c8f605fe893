"""SDK coalescing: concurrent small extract calls of one client become one keys-first Lookup/Extract, scattered back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from featurebank.client import FeatureBank, FeatureBankError
from featurebank.client.sdk import AsyncFeatureBank
from support import random_images

THREADS = 16
# Generous, so that on a loaded machine every thread released by the barrier joins the batch;
# a lone caller never waits for it (test_lone_caller_does_not_linger).
LINGER_MS = 300


def rpcs(server) -> float:
    return server.metric("featurebank_requests_total", method="Extract") + server.metric(
        "featurebank_requests_total", method="Lookup"
    )


def in_threads(fn, n: int = THREADS) -> list:
    """fn(k) in n threads released together; each result or the exception it raised."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def work(k):
        barrier.wait()
        try:
            results[k] = fn(k)
        except Exception as e:  # noqa: BLE001 (the test inspects it)
            results[k] = e

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.fixture
def coalescing_bank(server):
    with FeatureBank(server.target, timeout_s=60, coalesce_linger_ms=LINGER_MS) as b:
        yield b


@pytest.fixture
def plain_bank(server):
    with FeatureBank(server.target, timeout_s=60, coalesce_linger_ms=0) as b:
        yield b


def test_concurrent_single_item_calls_make_far_fewer_rpcs(server, coalescing_bank, plain_bank):
    """16 threads each extracting one new image get their own features from a handful of RPCs, not 16+."""
    images = random_images(THREADS, seed=8101)
    before = rpcs(server)
    got = in_threads(lambda k: coalescing_bank.extract([images[k]], backbone="toy"))
    sent = rpcs(server) - before
    assert sent <= 8, f"{sent} Lookup/Extract RPCs for {THREADS} coalesced single-image calls"
    expected = plain_bank.extract(images, backbone="toy")
    for k in range(THREADS):
        assert not isinstance(got[k], Exception), got[k]
        np.testing.assert_array_equal(got[k], expected[k : k + 1])


def test_coalescing_off_sends_one_call_per_caller(server, plain_bank):
    """With coalesce_linger_ms=0 every concurrent caller makes its own Lookup (16+ RPCs)."""
    images = random_images(THREADS, seed=8102)
    plain_bank.extract(images, backbone="toy")  # cached: each call is then one Lookup
    before = rpcs(server)
    got = in_threads(lambda k: plain_bank.extract([images[k]], backbone="toy"))
    assert rpcs(server) - before >= THREADS
    assert all(isinstance(g, np.ndarray) for g in got), got


def test_each_caller_gets_its_own_outcomes_and_item_errors(server, coalescing_bank, plain_bank):
    """Merged callers of different list lengths get their own outcomes, indices and item errors, in their order."""
    images = random_images(3 * THREADS, seed=8103)
    plain_bank.extract(images[::2], backbone="toy")  # some hits, some misses in every batch

    def inputs(k):
        own = images[3 * k : 3 * k + 1 + k % 3]
        return own + [b"not an image"] if k % 4 == 1 else own

    before = rpcs(server)
    got = in_threads(lambda k: coalescing_bank.extract_items(inputs(k), backbone="toy"))
    assert rpcs(server) - before <= 8
    for k in range(THREADS):
        mine = inputs(k)
        assert not isinstance(got[k], Exception), got[k]
        assert [o.index for o in got[k]] == list(range(len(mine)))
        alone = plain_bank.extract_items(mine, backbone="toy")
        assert [o.key for o in got[k]] == [o.key for o in alone]
        for o, a in zip(got[k], alone):
            if a.error is None:
                assert o.error is None, o
                np.testing.assert_array_equal(o.features, a.features)
            else:
                assert (o.error.code, o.error.index) == (a.error.code, len(mine) - 1)
                assert str(o.error).startswith(f"input {len(mine) - 1}: ")


def test_request_error_is_raised_in_every_merged_caller(server, coalescing_bank):
    """A request-level failure (an unknown layer) of a merged RPC is raised in each caller it carried."""
    images = random_images(THREADS, seed=8104)
    before = server.metric("featurebank_requests_total", method="Extract")
    got = in_threads(lambda k: coalescing_bank.extract([images[k]], backbone="toy", layer="no-such-layer"))
    assert all(isinstance(g, FeatureBankError) and g.index is None for g in got), got
    assert {g.code for g in got} == {grpc.StatusCode.NOT_FOUND}
    assert server.metric("featurebank_requests_total", method="Extract") - before <= 8


def test_unavailable_is_raised_in_every_merged_caller():
    """No server: every coalesced caller raises UNAVAILABLE (none hangs, none gets another's answer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    images = random_images(THREADS, seed=8105)
    with FeatureBank(f"127.0.0.1:{port}", timeout_s=30, coalesce_linger_ms=LINGER_MS) as bank:
        got = in_threads(lambda k: bank.extract([images[k]], backbone="toy"))
    assert [getattr(g, "code", g) for g in got] == [grpc.StatusCode.UNAVAILABLE] * THREADS


def test_lone_caller_does_not_linger(server):
    """One thread calling back-to-back never waits for company: 5 calls finish well inside one 60 s linger."""
    images = random_images(5, seed=8106)
    with FeatureBank(server.target, timeout_s=60, coalesce_linger_ms=60_000) as bank:
        start_s = time.monotonic()
        rows = [bank.extract([img], backbone="toy") for img in images]
        assert time.monotonic() - start_s < 30
    assert [r.shape[0] for r in rows] == [1] * 5


def test_async_tasks_are_coalesced_with_their_own_results(server, plain_bank):
    """16 tasks of one AsyncFeatureBank each extracting one image: few RPCs, each task its own row."""
    images = random_images(THREADS, seed=8107)

    async def main():
        async with AsyncFeatureBank(server.target, timeout_s=60, coalesce_linger_ms=LINGER_MS) as bank:
            return await asyncio.gather(*(bank.extract([img], backbone="toy") for img in images))

    before = rpcs(server)
    got = asyncio.run(main())
    assert rpcs(server) - before <= 4  # the first task alone (no linger), the other 15 in one batch
    expected = plain_bank.extract(images, backbone="toy")
    for k in range(THREADS):
        np.testing.assert_array_equal(got[k], expected[k : k + 1])


def test_async_cancelled_caller_does_not_break_its_batch(server):
    """A task cancelled while its batch lingers stops alone; the other tasks of the batch get their rows."""
    images = random_images(4, seed=8108)

    async def main():
        async with AsyncFeatureBank(server.target, timeout_s=60, coalesce_linger_ms=LINGER_MS) as bank:
            tasks = [asyncio.create_task(bank.extract([img], backbone="toy")) for img in images]
            await asyncio.sleep(0)  # all four have joined (the first alone, three in one lingering batch)
            tasks[2].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

    got = asyncio.run(main())
    assert isinstance(got[2], asyncio.CancelledError)
    assert all(isinstance(g, np.ndarray) and g.shape[0] == 1 for k, g in enumerate(got) if k != 2), got
