"""The engine's own CPU per miss, without gRPC: MissPath.compute driven in process, with the real
preprocessing pool and model worker processes of a backbone.

Concurrent callers each compute ``--items`` new keys at a time (BYPASS: no claims, no cache
writes), cycling through the benchmark's 224x224 PNGs; what is measured is the CPU of this
process alone (the frontend's share of a miss: single-flight, the pool's round trips, the
batcher, the worker's pipe), not that of its children. ``--preprocess-workers 0`` has the model
worker decode, as before the pool. ``--profile`` prints cProfile's top functions.

    python -m benchmarks.miss_profile [--backbone toy] [--concurrency 16] [--items 1] [--preprocess-workers 2] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import json
import logging
import pstats
import sys
import time

from benchmarks.inputs import InputMaker
from benchmarks.null_backbone import NullImage
from featurebank.common.cache import LRUCache
from featurebank.common.keys import image_key
from featurebank.common.metrics import Metrics
from featurebank.server.config import ServerConfig
from featurebank.server.engine_core import Engine
from featurebank.workers.backbones.base import InputItem

BACKBONES = {"toy": "toy", "null": f"{NullImage.__module__}:{NullImage.__name__}"}


async def run(args) -> dict:
    backbone = BACKBONES[args.backbone]
    config = ServerConfig(backbone=[backbone], cache="memory", preprocess_workers=args.preprocess_workers)
    engine = Engine(config, Metrics(), LRUCache(1 << 26, 0))
    engine.spawn()
    served = (await engine.wait_ready())[backbone]
    layer = served.info.default_layer
    images = InputMaker("image").make(7, 256)
    requests = itertools.count()
    done = 0

    async def caller(until: float) -> None:
        nonlocal done
        while time.monotonic() < until:
            i = next(requests)
            batch = [images[(i * args.items + j) % len(images)] for j in range(args.items)]
            keys = [f"{image_key(b)}:{i}:{j}" for j, b in enumerate(batch)]  # new keys: every item a miss
            payloads = {k: InputItem("image", b) for k, b in zip(keys, batch)}
            out = await engine.misses.compute(served, layer, keys, payloads, deadline=None, claim=False, write=False)
            assert not any(isinstance(o, BaseException) for o in out.values()), out
            done += args.items

    try:
        await asyncio.gather(*(caller(time.monotonic() + args.warmup_s) for _ in range(args.concurrency)))
        done = 0
        prof = cProfile.Profile() if args.profile else None
        cpu0, wall0 = time.process_time(), time.monotonic()
        if prof:
            prof.enable()
        await asyncio.gather(*(caller(time.monotonic() + args.duration_s) for _ in range(args.concurrency)))
        if prof:
            prof.disable()
        cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile_top)
    finally:
        await engine.close()
    return {
        "backbone": args.backbone,
        "preprocess_workers": config.num_preprocess_workers,
        "concurrency": args.concurrency,
        "items_per_call": args.items,
        "items_per_s": round(done / wall_s, 1),
        "engine_cpu_ms_per_item": round(cpu_s / max(done, 1) * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.miss_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="toy")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--items", type=int, default=1, help="new keys per compute call")
    parser.add_argument("--preprocess-workers", type=int, default=-1, help="-1: one per usable CPU; 0: none")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING")
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":  # the engine spawns its children: nothing above runs in them
    sys.exit(main())
