"""Client CPU per cache read: redis-py's asyncio MGET against the hit path's pipelined reads.

Starts its own Redis-protocol server (valkey, by PID), stores one value of ``--value-bytes`` (a
1280-float32 feature with its header by default) and times ``--reads`` single-key MGETs from 1
and from 16 concurrent tasks, interleaved ``--rounds`` times. Reports this process's CPU per read.

    python -m benchmarks.redis_read_cost [--reads 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys

import redis.asyncio as redis_asyncio

from featurebank.common.redis_pipeline import pipelined_connection_for
from featurebank.server.testing import RedisProcess


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _per_read_us(mget, reads: int, concurrency: int) -> float:
    async def one(n: int) -> None:
        for _ in range(n):
            await mget(["k"])

    start = _cpu_s()
    await asyncio.gather(*(one(reads // concurrency) for _ in range(concurrency)))
    return (_cpu_s() - start) / reads * 1e6


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reads", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--value-bytes", type=int, default=5140)
    a = p.parse_args(argv)
    server = RedisProcess().start()
    try:
        server.client().set("k", os.urandom(a.value_bytes))
        client = redis_asyncio.Redis.from_url(server.url, max_connections=256)
        reads = pipelined_connection_for(server.url, 5.0)
        systems = {"redis-py": client.mget, "pipelined": reads.mget}
        for mget in systems.values():  # connected, warm
            await _per_read_us(mget, 200, 16)
        rows = []
        for rnd in range(a.rounds):
            for concurrency in (1, 16):
                for name, mget in systems.items():
                    us = await _per_read_us(mget, a.reads, concurrency)
                    rows.append(
                        {"round": rnd, "client": name, "concurrency": concurrency, "cpu_us_per_read": round(us, 1)}
                    )
                    print(json.dumps(rows[-1]), flush=True)
        await client.aclose()
        await reads.close()
    finally:
        server.stop()
    for concurrency in (1, 16):
        mean = {
            name: sum(r["cpu_us_per_read"] for r in rows if r["client"] == name and r["concurrency"] == concurrency)
            / a.rounds
            for name in systems
        }
        print(
            f"concurrency {concurrency}: redis-py {mean['redis-py']:.0f} us, pipelined {mean['pipelined']:.0f} us "
            f"per read ({mean['redis-py'] / mean['pipelined']:.1f}x less CPU)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    asyncio.run(main())
