"""Per-request plumbing of the hit path: one wrapped handler per method, Redis calls bounded by
``asyncio.timeout`` (a silent server costs a request the timeout, never more)."""

from __future__ import annotations

import asyncio
import collections
import socket
import time

import grpc

from featurebank.common.cache import RedisCache
from featurebank.common.metrics import Metrics
from featurebank.server.interceptors import StatusInterceptor

Details = collections.namedtuple("Details", "method invocation_metadata")


def test_wrapped_handler_is_built_once_per_method():
    """The second call of a method reuses the first call's wrapped handler; methods stay apart;
    other services (health) pass through untouched."""
    interceptor = StatusInterceptor(Metrics())
    asked: list[str] = []

    async def behaviour(request, context):
        return request

    def handler_for(method):
        asked.append(method)
        return grpc.unary_unary_rpc_method_handler(behaviour)

    async def continuation(details):
        return handler_for(details.method)

    async def main():
        extract = Details("/featurebank.v1.FeatureBank/Extract", ())
        lookup = Details("/featurebank.v1.FeatureBank/Lookup", ())
        health = Details("/grpc.health.v1.Health/Check", ())
        first = await interceptor.intercept_service(continuation, extract)
        assert await interceptor.intercept_service(continuation, extract) is first
        other = await interceptor.intercept_service(continuation, lookup)
        assert other is not first and other.unary_unary is not behaviour
        h1 = await interceptor.intercept_service(continuation, health)
        assert h1.unary_unary is behaviour  # not wrapped
        await interceptor.intercept_service(continuation, health)

    asyncio.run(main())
    assert asked == [
        "/featurebank.v1.FeatureBank/Extract",
        "/featurebank.v1.FeatureBank/Lookup",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Check",
    ]


def test_silent_redis_costs_the_timeout_and_reads_as_misses():
    """A Redis that accepts connections but never answers: every call returns within its timeout,
    reads are misses, claims are granted locally, and the failures are counted."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        metrics = Metrics()
        cache = RedisCache(
            f"redis://127.0.0.1:{port}/0", ttl_seconds=60, timeout_s=0.2, metrics=metrics, retry_interval_s=0.0
        )

        async def main():
            start = time.monotonic()
            assert await cache.get_many(["a", "b"]) == [None, None]
            await cache.set_many([("a", b"x")])
            assert await cache.claim_many(["a"], 1000) == [True]
            await cache.release_many(["a"])
            elapsed = time.monotonic() - start
            await cache.close()
            return elapsed

        elapsed = asyncio.run(main())
    assert elapsed < 4 * 0.2 + 1.0
    for op in ("get", "set", "claim", "release"):
        assert metrics.cache_errors.labels(op=op)._value.get() == 1
