"""The feature cache's pipelined connection (common/redis_pipeline.py) against a real Redis-protocol server."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from featurebank.common.cache import CLAIM_CACHED, CLAIM_HELD, CLAIM_TAKEN, RedisCache, claim_key
from featurebank.common.metrics import Metrics
from featurebank.common.redis_pipeline import pipelined_connection_for
from support import RedisProcess


def _errors(metrics: Metrics) -> float:
    return metrics.cache_errors.labels(op="get")._value.get()


def test_plain_urls_read_through_the_pipelined_connection_and_others_through_redis_py():
    """redis:// and unix:// URLs (with db and password) get pipelined reads; TLS, cluster and URL
    options it does not know stay on redis-py."""
    for url in ("redis://127.0.0.1:1/0", "redis://u:p@h:2/3", "unix:///tmp/fb.sock", "unix:///tmp/fb.sock?db=2"):
        assert pipelined_connection_for(url, 1.0) is not None, url
    for url in ("rediss://h:1", "redis://h:1/0?protocol=3", "redis://h:1/0?socket_keepalive=true"):
        assert pipelined_connection_for(url, 1.0) is None, url
    cache = RedisCache("redis+cluster://h:1", ttl_seconds=1, timeout_s=1, metrics=Metrics())
    assert cache._conn is None


async def test_many_concurrent_reads_on_one_connection_each_get_their_own_values(redis_server):
    """200 concurrent reads of different keys (present, absent, and 1 MiB values that arrive in
    many pieces) pipelined over one connection: each caller gets exactly its own keys' values."""
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=5, metrics=Metrics())
    big = os.urandom(1 << 20)
    try:
        assert cache._conn is not None
        await cache.set_many([(f"k{i}", b"v%d" % i) for i in range(100)] + [("big", big)])
        asks = [[f"k{(c * 7) % 130}", "big"] if c % 10 == 0 else [f"k{(c * 7) % 130}"] for c in range(200)]
        got = await asyncio.gather(*(cache._conn.mget(keys) for keys in asks))
        for keys, values in zip(asks, got):
            want = [b"v%d" % int(k[1:]) if int(k[1:]) < 100 else None for k in keys if k != "big"]
            assert values[: len(want)] == want
            if "big" in keys:
                assert values[-1] == big
    finally:
        await cache.close()


async def test_a_caller_that_leaves_mid_read_never_shifts_replies_to_the_next(redis_server):
    """A read cancelled after its command was sent: its reply is dropped when it arrives, and the
    reads after it on the same connection get their own values."""
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=5, metrics=Metrics())
    try:
        await cache.set_many([("a", b"A"), ("b", b"B")])
        await cache.get_many(["a"])  # connected
        leaving = asyncio.ensure_future(cache._conn.mget(["a"]))
        await asyncio.sleep(0)  # its MGET is written
        leaving.cancel()
        assert await cache._conn.mget(["b"]) == [b"B"]
        assert await cache.get_many(["a", "b"]) == [b"A", b"B"]
        assert leaving.cancelled()
    finally:
        await cache.close()


async def test_a_server_that_stops_answering_times_out_reads_as_misses_and_stale_replies_never_reach_later_reads(
    redis_server,
):
    """With the server paused (SIGSTOP), reads time out as counted misses and the connection is
    dropped; once it answers again, reads get their own values, not the replies to the reads that
    timed out."""
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=0.3, metrics=metrics, retry_interval_s=0)
    try:
        await cache.set_many([("a", b"A"), ("b", b"B")])
        assert await cache.get_many(["a"]) == [b"A"]
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            assert await cache.get_many(["a"]) == [None]
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert _errors(metrics) == 1
        for _ in range(20):  # the first reads after the pause may still find it slow
            if await cache.get_many(["b"]) == [b"B"]:
                break
            await asyncio.sleep(0.1)
        assert await cache.get_many(["b", "a"]) == [b"B", b"A"]
    finally:
        await cache.close()


async def test_reads_reconnect_after_the_server_restarts(redis_server):
    """A restart closes the connection: reads in the outage are counted misses, then values come back."""
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=1, metrics=metrics, retry_interval_s=0)
    try:
        await cache.set_many([("a", b"A")])
        assert await cache.get_many(["a"]) == [b"A"]
        redis_server.stop()
        assert await cache.get_many(["a"]) == [None]
        assert _errors(metrics) >= 1
        redis_server.start()  # empty: it keeps nothing
        redis_server.client().set("a", b"again")
        assert await cache.get_many(["a"]) == [b"again"]
    finally:
        await cache.close()


@pytest.fixture
def password_redis():
    """A Redis-protocol server that requires a password."""
    r = RedisProcess(password="s3cret").start()
    yield r
    r.stop()


async def test_the_urls_password_and_database_are_used_and_a_wrong_password_reads_as_counted_misses(password_redis):
    """Reads authenticate with the URL's password and read its database; with a wrong password
    every read is a miss, counted as a cache error, and nothing else fails."""
    port = password_redis.port
    password_redis.client(db=3).set("k", b"in-db-3")
    password_redis.client(db=0).set("k", b"in-db-0")
    cache = RedisCache(f"redis://:s3cret@127.0.0.1:{port}/3", ttl_seconds=60, timeout_s=2, metrics=Metrics())
    metrics = Metrics()
    wrong = RedisCache(f"redis://:nope@127.0.0.1:{port}/3", ttl_seconds=60, timeout_s=2, metrics=metrics)
    try:
        assert cache._conn is not None
        assert await cache.get_many(["k", "absent"]) == [b"in-db-3", None]
        assert await wrong.get_many(["k"]) == [None]
        assert _errors(metrics) == 1
    finally:
        await cache.close()
        await wrong.close()


@pytest.mark.parametrize("through", ["pipelined", "redis-py"])
async def test_writes_claims_and_releases_answer_alike_through_either_client(redis_server, through):
    """set_many (with the TTL), claim_many (taken, held, cached) and release_many give the same
    answers and leave the same keys through the pipelined connection as through redis-py."""
    here = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=5, metrics=Metrics())
    there = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=5, metrics=Metrics())
    if through == "redis-py":
        here._conn = there._conn = None
    try:
        await here.set_many([("a", b"A"), ("b", b"B")])
        assert 0 < redis_server.client().ttl("a") <= 60
        mine, other = here.claim_token(), there.claim_token()
        assert await here.claim_many(["a", "c"], 5000, [mine, mine]) == [CLAIM_CACHED, CLAIM_TAKEN]
        assert await there.claim_many(["c"], 5000, [other]) == [CLAIM_HELD]
        await there.release_many(["c"], [other])  # not its claim: nothing happens
        assert redis_server.client().exists(claim_key("c"))
        await here.release_many(["c"], [mine])
        assert not redis_server.client().exists(claim_key("c"))
        assert await there.claim_many(["c"], 5000, [other]) == [CLAIM_TAKEN]
    finally:
        await here.close()
        await there.close()


async def test_an_error_reply_fails_its_call_alone_and_the_connection_stays_in_step(redis_server):
    """A claim whose key holds the wrong type gets an error reply: that claim_many answers as in an
    outage (compute locally), counted; the commands after it on the connection get their own replies."""
    metrics = Metrics()
    cache = RedisCache(redis_server.url, ttl_seconds=60, timeout_s=5, metrics=metrics, retry_interval_s=0)
    try:
        redis_server.client().rpush(claim_key("listy"), b"x")  # the claim script's GET fails: WRONGTYPE
        await cache.set_many([("a", b"A")])
        token = cache.claim_token()
        assert await cache.claim_many(["ok", "listy", "ok2"], 5000, [token] * 3) == [CLAIM_TAKEN] * 3
        assert metrics.cache_errors.labels(op="claim")._value.get() == 1
        assert await cache.get_many(["a"]) == [b"A"]
        assert await cache.claim_many(["ok3"], 5000, [token]) == [CLAIM_TAKEN]
        assert redis_server.client().get(claim_key("ok3")) == token.encode()
    finally:
        await cache.close()
