"""SDK coalescing throughput: N threads each calling extract([one cached image]) against a toy server with Redis, on vs off.

    python benchmarks/sdk_coalescing.py --threads 16 --duration-s 5 --rounds 3

Each round also measures the floor the issue compares with: a bare grpc.aio server returning
canned features (benchmarks/floor_server.py) driven by 16 single-image Extract calls in flight
from a pre-serialised grpc.aio client (as ../shared/peers/triton-hits does), so the SDK's
items/s are reported as a ratio to that floor's, measured in the same run.

Measured 2026-12-01 on the shared 2-core dev box (client, server and Redis on it, other work running):
16 threads, off 610 / 984 / 887 items/s (1 item an RPC), on (1 ms) 2,396 / 3,029 / 3,556 items/s
(13-16 items an RPC); 1 thread (--threads 1 --duration-s 3): off 608 / 712 / 844, on 649 / 792 / 815.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import grpc  # noqa: E402

from featurebank.client import FeatureBank  # noqa: E402
from featurebank.server.testing import ServedProcess  # noqa: E402
from featurebank.v1 import featurebank_pb2 as pb  # noqa: E402
from support import RedisProcess, ServerProcess, random_images  # noqa: E402

FLOOR_CONCURRENCY = 16

log = logging.getLogger("sdk_coalescing")


def rpcs(server: ServerProcess) -> float:
    return sum(server.metric("featurebank_requests_total", method=m) for m in ("Extract", "Lookup"))


def run(server: ServerProcess, images: list[bytes], threads: int, duration_s: float, linger_ms: float) -> dict:
    """Items/s of ``threads`` threads sharing one client, each extracting one cached image at a time."""
    counts = [0] * threads
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    with FeatureBank(server.target, timeout_s=60, coalesce_linger_ms=linger_ms) as bank:
        bank.extract(images[:1], backbone="toy")  # connect

        def work(k: int) -> None:
            barrier.wait()
            i = k
            while not stop.is_set():
                bank.extract([images[i % len(images)]], backbone="toy")
                counts[k] += 1
                i += threads

        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        before = rpcs(server)
        barrier.wait()
        start_s = time.monotonic()
        time.sleep(duration_s)
        stop.set()
        for w in workers:
            w.join()
        elapsed_s = time.monotonic() - start_s
    items = sum(counts)
    return {
        "linger_ms": linger_ms,
        "items_per_s": round(items / elapsed_s),
        "items": items,
        "rpcs": int(rpcs(server) - before),
        "items_per_rpc": round(items / max(1, rpcs(server) - before), 2),
    }


def floor_rate(target: str, images: list[bytes], duration_s: float) -> dict:
    """Single-image Extract calls/s of FLOOR_CONCURRENCY pre-serialised grpc.aio calls in flight."""
    requests = [pb.ExtractRequest(inputs=[pb.Input(image=x)], cache_policy=pb.USE).SerializeToString() for x in images]

    async def drive() -> int:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/featurebank.v1.FeatureBank/Extract")  # bytes in, bytes out
            await call(requests[0])
            done = 0
            stop_at = time.monotonic() + duration_s

            async def one(k: int) -> None:
                nonlocal done
                i = k
                while time.monotonic() < stop_at:
                    await call(requests[i % len(requests)])
                    done += 1
                    i += FLOOR_CONCURRENCY

            await asyncio.gather(*(one(k) for k in range(FLOOR_CONCURRENCY)))
            return done

    start_s = time.monotonic()
    calls = asyncio.run(drive())
    return {"floor": True, "items_per_s": round(calls / (time.monotonic() - start_s))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved off/on rounds")
    parser.add_argument("--linger-ms", type=float, default=1.0)
    parser.add_argument(
        "--image-side", type=int, default=40, help="random PNGs of this side (170: ~88 KB, as the triton-hits harness)"
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the floor server's rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    redis = RedisProcess().start()
    server = ServerProcess("--backbone", "toy", "--redis-url", redis.url).start()
    floor = None
    if not args.no_floor:
        floor_script = pathlib.Path(__file__).resolve().parent / "floor_server.py"
        floor = ServedProcess([sys.executable, str(floor_script), "--port", "0"], name="floor", check_health=False)
        floor.start()
    try:
        images = random_images(256, seed=4242, size=(args.image_side, args.image_side))
        with FeatureBank(server.target) as bank:
            bank.extract(images, backbone="toy")  # every image cached
        results = []
        for _ in range(args.rounds):
            if floor is not None:
                results.append(floor_rate(floor.target, images, args.duration_s))
                log.info(json.dumps(results[-1]))
            for linger_ms in (0.0, args.linger_ms):
                results.append(run(server, images, args.threads, args.duration_s, linger_ms))
                log.info(json.dumps(results[-1]))
        floor_rates = [r["items_per_s"] for r in results if r.get("floor")]
        for linger_ms in (0.0, args.linger_ms):
            rates = [r["items_per_s"] for r in results if r.get("linger_ms") == linger_ms]
            log.info("coalescing %s (linger %g ms): %s items/s", "on" if linger_ms else "off", linger_ms, rates)
            if floor_rates:
                ratios = [round(r / f, 2) for r, f in zip(rates, floor_rates)]
                log.info("  / the floor's single-image rate in the same round (%s items/s): %s", floor_rates, ratios)
    finally:
        if floor is not None:
            floor.terminate()
        server.terminate()
        redis.stop()


if __name__ == "__main__":
    main()
