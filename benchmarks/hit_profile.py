"""featurebank's own CPU per cache hit, without gRPC: the interceptor and servicer driven in process.

Each call parses the request from bytes and serialises the response, as gRPC would; what this
measures is what the hit path costs on top of a bare grpc.aio server (benchmarks/floor_server.py).
``--profile`` prints cProfile's top functions for the chosen scenario.

    python benchmarks/hit_profile.py --cache lru --scenario single --concurrency 16 [--profile]
    python benchmarks/hit_profile.py --cache redis --scenario lookup64
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import pathlib
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from featurebank.client import content_key  # noqa: E402
from featurebank.common import codec  # noqa: E402
from featurebank.common.cache import LRUCache, RedisCache  # noqa: E402
from featurebank.common.metrics import Metrics  # noqa: E402
from featurebank.engine.batching import DynamicBatcher  # noqa: E402
from featurebank.server.interceptors import StatusInterceptor  # noqa: E402
from featurebank.server.servicer import FeatureBankServicer, ServedBackbone  # noqa: E402
from featurebank.server.wire import passing_bytes  # noqa: E402
from featurebank.v1 import featurebank_pb2 as pb  # noqa: E402
from featurebank.workers.backbones.base import BackboneInfo, LayerSpec  # noqa: E402

log = logging.getLogger("hit_profile")
DIM = 1280


class _Context:
    """What the hit path asks of a grpc.aio ServicerContext (nothing, unless it fails)."""

    def time_remaining(self):
        return None

    async def abort(self, code, message):
        raise RuntimeError(f"{code}: {message}")


def servicer(cache) -> tuple[FeatureBankServicer, ServedBackbone]:
    info = BackboneInfo(
        name="b",
        fingerprint="f" * 32,
        input_kind="image",
        default_layer="pooled",
        layers=(LayerSpec("pooled", (DIM,)),),
        input_size=(224, 224, 3),
        preprocessing="none",
    )
    served = ServedBackbone(info=info, batcher=DynamicBatcher(max_batch_size=4, max_batch_delay_ms=1, max_queue_size=8))
    s = FeatureBankServicer({"b": served}, cache, Metrics(), storage_dtype="float32", max_items_per_request=256)
    return s, served


def images(n: int, size_bytes: int) -> list[bytes]:
    rng = np.random.default_rng(11)
    return [rng.bytes(size_bytes) for _ in range(n)]


async def run(args) -> dict:
    metrics = Metrics()
    redis = None
    if args.cache == "redis":
        from support import RedisProcess

        redis = RedisProcess().start()
        cache = RedisCache(redis.url, ttl_seconds=3600, timeout_s=2.0, metrics=metrics)
    else:
        cache = LRUCache(1 << 30, 3600)
    try:
        s, served = servicer(cache)
        imgs = images(256, args.image_bytes)
        keys = [content_key(x) for x in imgs]
        rng = np.random.default_rng(3)
        await cache.set_many(
            [
                (s._cache_key(served, "pooled", k), codec.encode(rng.standard_normal(DIM).astype(np.float32)))
                for k in keys
            ]
        )
        n = {"single": 1, "batch32": 32, "lookup1": 1, "lookup64": 64}[args.scenario]
        if args.scenario.startswith("lookup"):
            reqs = [pb.LookupRequest(backbone="b", keys=keys[i : i + n]) for i in range(0, 256, n)]
            method, parse = s.Lookup, pb.LookupRequest.FromString
        else:
            reqs = [pb.ExtractRequest(inputs=[pb.Input(image=x) for x in imgs[i : i + n]]) for i in range(0, 256, n)]
            method, parse = s.Extract, pb.ExtractRequest.FromString
        raw = [r.SerializeToString() for r in reqs]
        behavior = StatusInterceptor(metrics)._wrap_unary(args.scenario, method)
        serialize = passing_bytes(pb.ExtractResponse.SerializeToString)  # as the interceptor gives gRPC
        ctx = _Context()

        async def one(i: int) -> None:
            answer = serialize(await behavior(parse(raw[i % len(raw)]), ctx))
            if i < len(raw):  # checked once per request, outside what is measured most of the time
                assert all(r.cache_hit for r in pb.ExtractResponse.FromString(answer).results)

        async def client(c: int, calls: int) -> None:
            for i in range(calls):
                await one(c + i * args.concurrency)

        per_client = max(1, args.calls // args.concurrency)
        await asyncio.gather(*(client(c, 20) for c in range(args.concurrency)))  # warm up
        prof = cProfile.Profile() if args.profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        await asyncio.gather(*(client(c, per_client) for c in range(args.concurrency)))
        if prof:
            prof.disable()
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        calls = per_client * args.concurrency
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile_top)
        return {
            "cache": args.cache,
            "scenario": args.scenario,
            "concurrency": args.concurrency,
            "calls": calls,
            "cpu_us_per_call": round(cpu_s / calls * 1e6, 1),
            "cpu_us_per_item": round(cpu_s / calls / n * 1e6, 2),
            "wall_us_per_call": round(wall_s / calls * 1e6, 1),
        }
    finally:
        await cache.close()
        if redis is not None:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", choices=("lru", "redis"), default="lru")
    parser.add_argument("--scenario", choices=("single", "batch32", "lookup1", "lookup64"), default="single")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--image-bytes", type=int, default=88_000, help="the triton-hits harness' mean PNG size")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%s", json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
