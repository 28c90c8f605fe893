"""--frontends 1 against --frontends 2 on cached single-image Extracts, and the engine's IPC round trip.

``python -m benchmarks.frontends [--rounds 2] [--duration-s 8]``: one run, the two settings
interleaved round by round on the same Redis and the same inputs, ratios within the run. Hits
come from CLIENT_PROCESSES grpc.aio processes, each over CHANNELS_PER_CLIENT connections of its
own (so SO_REUSEPORT spreads them over the frontends). The round trip: an EngineClient here, the
engine in its own process, asking for a key the engine answers from memory (no worker), i.e.
frontend -> engine -> frontend and both pickles, per request of 1 and of 32 items.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

CLIENT_PROCESSES = 2
CHANNELS_PER_CLIENT = 4
IN_FLIGHT_PER_CHANNEL = 8
NUM_IMAGES = 64


def _images() -> list[bytes]:
    """NUM_IMAGES random 224x224 PNGs (~150 KB each), the same in every process."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(99)
    out = []
    for _ in range(NUM_IMAGES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _client(target: str, duration_s: float, out: multiprocessing.Queue) -> None:
    """One load process: single-image Extract hits for duration_s; puts (answered, errors)."""
    import grpc

    from featurebank.v1 import featurebank_pb2 as pb

    requests = [
        pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=img)]).SerializeToString() for img in _images()
    ]

    async def run() -> tuple[int, int]:
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CHANNELS_PER_CLIENT)
        ]
        calls = [
            ch.unary_unary(
                "/featurebank.v1.FeatureBank/Extract",
                request_serializer=lambda b: b,
                response_deserializer=pb.ExtractResponse.FromString,
            )
            for ch in channels
        ]
        stop = time.monotonic() + duration_s
        counts = [0, 0]

        async def loop(call, i: int) -> None:
            while time.monotonic() < stop:
                try:
                    r = await call(requests[i % len(requests)], timeout=30)
                    counts[0 if r.results[0].cache_hit else 1] += 1
                except grpc.aio.AioRpcError:
                    counts[1] += 1
                i += 7

        await asyncio.gather(*(loop(c, j) for c in calls for j in range(IN_FLIGHT_PER_CHANNEL)))
        for ch in channels:
            await ch.close()
        return counts[0], counts[1]

    out.put(asyncio.run(run()))


def hits_per_s(target: str, duration_s: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(target, duration_s, q)) for _ in range(CLIENT_PROCESSES)]
    for p in procs:
        p.start()
    results = [q.get(timeout=duration_s + 120) for _ in procs]
    for p in procs:
        p.join()
    answered = sum(a for a, _ in results)
    errors = sum(e for _, e in results)
    if errors:
        print(f"  ({errors} non-hits or errors)", file=sys.stderr)
    return answered / duration_s


def _warm(target: str) -> None:
    from featurebank.client import FeatureBank

    with FeatureBank(target, timeout_s=120) as bank:
        bank.extract(_images(), backbone="toy")


def _engine_process(socket_path: str, parent_pid: int) -> None:
    from featurebank.server.config import ServerConfig
    from featurebank.server.engine_server import serve_engine
    from featurebank.server.supervisor import die_with_parent

    die_with_parent(parent_pid)

    asyncio.run(serve_engine(ServerConfig(backbone=["toy"]), socket_path))


async def _round_trips(socket_path: str, items: int, n: int) -> float:
    """Mean µs per EngineClient.compute of ``items`` keys the engine answers from memory."""
    from featurebank.server.engine_client import EngineClient
    from featurebank.server.servicer import ServedBackbone
    from featurebank.workers.backbones.base import InputItem

    client = EngineClient(socket_path)
    client.start()
    infos = await asyncio.wait_for(client.wait_ready(), 300)
    served = ServedBackbone(info=infos["toy"], batcher=None)
    images = _images()[:items]
    keys = [f"bench-{i}" for i in range(items)]
    payloads = {k: InputItem("image", img) for k, img in zip(keys, images)}
    layer = served.info.default_layer
    await client.compute(served, layer, keys, payloads, deadline=None, write=True)  # computed once, remembered
    t0 = time.perf_counter()
    for _ in range(n):
        await client.compute(served, layer, keys, payloads, deadline=None)
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed / n * 1e6


def round_trip_us() -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    socket_path = os.path.join(tempfile.mkdtemp(prefix="fb-bench-engine-"), "engine.sock")
    engine = ctx.Process(target=_engine_process, args=(socket_path, os.getpid()))
    engine.start()
    try:  # the first EngineClient waits for the engine's workers
        # 32 items carry ~5 MB of PNGs each way in: fewer of them.
        return {
            f"{items} items": asyncio.run(_round_trips(socket_path, items, n)) for items, n in ((1, 2000), (32, 100))
        }
    finally:
        engine.terminate()
        engine.join(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontends", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration-s", type=float, default=8.0)
    args = parser.parse_args(argv)
    from featurebank.common.cpus import usable_cpus
    from featurebank.server.testing import RedisProcess, ServerProcess

    print(f"usable CPUs: {usable_cpus()} (shared with whatever else runs on this machine)")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    rates: dict[str, list[float]] = {"1": [], "2": []}
    redis = RedisProcess().start()
    try:
        for r in range(args.rounds):
            for n in ("1", "2"):
                s = ServerProcess("--backbone", "toy", "--redis-url", redis.url, "--frontends", n).start(300)
                try:
                    _warm(s.target)
                    rate = hits_per_s(s.target, args.duration_s)
                finally:
                    s.terminate()
                rates[n].append(rate)
                print(f"round {r + 1}: --frontends {n}: {rate:,.0f} hits/s")
    finally:
        redis.stop()
    print(f"load average after the hit rounds: {os.getloadavg()[0]:.1f}")
    one, two = statistics.mean(rates["1"]), statistics.mean(rates["2"])
    print(f"single-image Extract hits: --frontends 1 {one:,.0f}/s, --frontends 2 {two:,.0f}/s, ratio {two / one:.2f}")
    trips = round_trip_us()
    for what, us in trips.items():
        print(f"engine round trip ({what} answered from the engine's memory): {us:,.0f} us")
    print(json.dumps({"hits_per_s": rates, "ratio": two / one, "round_trip_us": trips}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
