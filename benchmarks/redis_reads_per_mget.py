"""Extract RPCs per Redis MGET under real grpc.aio arrival: toy backbone, 16 closed-loop clients, single cached images.

python benchmarks/redis_reads_per_mget.py [--clients 16] [--duration-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import sys
import time

import grpc
import redis

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from featurebank.v1 import featurebank_pb2 as pb  # noqa: E402
from support import RedisProcess, ServerProcess, random_images  # noqa: E402

log = logging.getLogger("redis_reads_per_mget")
EXTRACT = "/featurebank.v1.FeatureBank/Extract"


def mgets(r: RedisProcess) -> int:
    return int(redis.Redis(port=r.port).info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


async def load(target: str, requests: list[bytes], clients: int, duration_s: float) -> int:
    channel = grpc.aio.insecure_channel(target)
    rpc = channel.unary_unary(EXTRACT)  # bytes in, bytes out
    done = 0
    end_s = time.monotonic() + duration_s

    async def client(i: int) -> None:
        nonlocal done
        while time.monotonic() < end_s:
            await rpc(requests[i % len(requests)])
            done += 1
            i += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    await channel.close()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = RedisProcess().start()
    server = ServerProcess("--backbone", "toy", "--redis-url", r.url).start()
    try:
        images = random_images(64, seed=7, size=(100, 100))
        with grpc.insecure_channel(server.target) as channel:
            prime = channel.unary_unary(
                EXTRACT,
                request_serializer=pb.ExtractRequest.SerializeToString,
                response_deserializer=pb.ExtractResponse.FromString,
            )
            for i in range(0, len(images), 16):  # every image cached
                prime(pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=x) for x in images[i : i + 16]]))
        requests = [pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=x)]).SerializeToString() for x in images]
        before = mgets(r)
        rpcs = asyncio.run(load(server.target, requests, args.clients, args.duration_s))
        n = mgets(r) - before
        log.info("%s", json.dumps({"extract_rpcs": rpcs, "mgets": n, "rpcs_per_mget": round(rpcs / max(1, n), 2)}))
    finally:
        server.terminate()
        r.stop()


if __name__ == "__main__":
    main()
