"""Cache reads that arrive while Redis round trips are out are gathered into one MGET and come back to each caller."""

from __future__ import annotations

import asyncio

import redis

from featurebank.common.cache import READS_IN_FLIGHT, RedisCache
from featurebank.common.metrics import Metrics


def _mget_calls(r) -> int:
    return int(redis.Redis(port=r.port).info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


async def test_reads_beyond_the_round_trips_in_flight_share_one_mget(redis_server):
    """16 concurrent get_many calls (overlapping keys, misses among them): READS_IN_FLIGHT go at
    once, the other 14 wait and share one MGET; each caller gets exactly its own keys' values in
    its own order."""
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=5, metrics=Metrics())
    try:
        await cache.set_many([(f"k{i}", b"v%d" % i) for i in range(20)])
        await cache.get_many(["k0"])  # connected
        before = _mget_calls(redis_server)
        asks = [[f"k{(c * 3 + j) % 25}" for j in range(c % 4 + 1)] for c in range(16)]  # k20..k24 absent
        got = await asyncio.gather(*(cache.get_many(keys) for keys in asks))
        assert _mget_calls(redis_server) - before == READS_IN_FLIGHT + 1
        for keys, values in zip(asks, got):
            assert values == [b"v%d" % int(k[1:]) if int(k[1:]) < 20 else None for k in keys]
        assert cache._reads_in_flight == 0 and not cache._waiting
    finally:
        await cache.close()


async def test_a_waiting_caller_that_leaves_does_not_cost_the_others_their_reads(redis_server):
    """A read cancelled while it waits for a round trip leaves the rest alone: the others get their values."""
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=5, metrics=Metrics())
    try:
        await cache.set_many([("a", b"A"), ("b", b"B")])
        first = [asyncio.ensure_future(cache.get_many(["a"])) for _ in range(READS_IN_FLIGHT)]
        await asyncio.sleep(0)  # these are out
        leaving = asyncio.ensure_future(cache.get_many(["a"]))
        staying = asyncio.ensure_future(cache.get_many(["b", "a"]))
        await asyncio.sleep(0)  # both wait
        assert len(cache._waiting) == 2
        leaving.cancel()
        assert await staying == [b"B", b"A"]
        assert [await f for f in first] == [[b"A"]] * READS_IN_FLIGHT
        assert leaving.cancelled() and cache._reads_in_flight == 0
    finally:
        await cache.close()


async def test_an_outage_reads_as_misses_for_every_caller_and_is_counted_once_per_round_trip(redis_server):
    """With Redis down, every caller gets misses; failures are counted per MGET sent, not per caller."""
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=0.5, metrics=metrics, retry_interval_s=0)
    try:
        redis_server.stop()
        got = await asyncio.gather(*(cache.get_many([f"k{i}", "x"]) for i in range(8)))
        assert got == [[None, None]] * 8
        assert metrics.cache_errors.labels(op="get")._value.get() == READS_IN_FLIGHT + 1
    finally:
        await cache.close()
