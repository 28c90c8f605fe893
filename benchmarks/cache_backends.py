"""Cache hits through each feature-cache backend in one run: in-process, embedded valkey (Unix socket), valkey over TCP.

``python -m benchmarks.cache_backends [--backbone efficientnet_lite0] [--rounds 3] [--out FILE]``

Three servers with the same backbone, one per backend (``--cache memory``; ``--cache embedded``;
``--redis-url`` to the same valkey-server binary on loopback TCP), each
holding the same cached inputs. Each round runs, for every backend in turn (the order rotates per
round), single-image Extract hits (16 clients x 1 image) and Lookup x64 (4 clients x 64 keys)
from ``benchmarks.loadgen`` processes. Reported: items/s, the server's CPU per item (its frontend
process plus, for valkey, the valkey-server: the cost of a hit to the pod), and ratios to the
in-process cache, per round and averaged. Workers are tracked apart (idle during hits). Then,
in one process, the cost of one read of 1 and of 64 values per cache layer, and diskcache's
(``--layers-only`` runs just that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import statistics
import sys
import tempfile
import time

from benchmarks import inputs, procs
from benchmarks.phases import PhaseRunner
from benchmarks.procs import ProcSampler
from featurebank.server.testing import RedisProcess, ServerProcess, cmdline, descendants

logger = logging.getLogger("benchmarks.cache_backends")

BACKENDS = ("memory", "embedded", "tcp")
MAX_BYTES = 512 * 1024 * 1024
TAG = 7  # an input set of its own


def hiredis_in_use() -> dict:
    """Whether redis-py parses replies with hiredis (the C parser) in this environment, as the server does."""
    import redis
    import redis.asyncio.connection as aconn

    return {
        "redis_py": redis.__version__,
        "hiredis_available": bool(redis.utils.HIREDIS_AVAILABLE),
        "async_parser": aconn.DefaultParser.__name__,
    }


def populate(server: ServerProcess, backbone: str, count: int) -> None:
    """Compute ``count`` inputs of set TAG through ``server`` and check they read back as hits."""
    from featurebank.client import FeatureBank

    data = inputs.InputMaker(inputs.KINDS[backbone]).make(TAG, count)
    with FeatureBank(server.target, timeout_s=600) as bank:
        for i in range(0, count, 32):
            bad = [o.error for o in bank.extract_items(data[i : i + 32], backbone=backbone) if o.error]
            if bad:
                raise RuntimeError(f"populating {server.name}: {bad[0]}")
        if not all(o.cache_hit for o in bank.extract_items(data[:32], backbone=backbone, lookup_first=False)):
            raise RuntimeError(f"{server.name}: populated inputs are not hits")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0", help="toy for a quick run (16-float features)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration-s", type=float, default=8.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--pool", type=int, default=256, help="distinct cached inputs the load cycles over")
    p.add_argument("--out", default="benchmarks/results/cache_backends.json")
    p.add_argument("--layers-only", action="store_true", help="only the one-process read costs per cache layer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.layers_only:
        layers = asyncio.run(layer_costs(pathlib.Path(tempfile.mkdtemp(prefix="fb-cache-layers-"))))
        print(json.dumps({"redis_client": hiredis_in_use(), "layers": layers}, indent=1))
        return 0
    inputs.KINDS.setdefault("toy", "image")  # the loadgen reads the kind from its spec
    bb = args.backbone
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="fb-cache-bench-"))
    sampler = ProcSampler().start()
    # No allkeys-lru here: the server would refuse it as its heads store; the hit set is far below
    # any bound, so eviction never runs in the embedded cache either.
    redis = RedisProcess(workdir=workdir).start()
    common = [
        "--backbone",
        bb,
        "--log-level",
        "WARNING",
        "--max-message-bytes",
        str(64 << 20),
        "--cache-max-bytes",
        str(MAX_BYTES),
        "--no-warmup",  # hits never reach a worker: no need to trace every batch shape first
    ]
    servers = {
        "memory": ServerProcess(*common, "--cache", "memory", name="memory", workdir=workdir / "memory"),
        "embedded": ServerProcess(
            *common, "--data-dir", str(workdir / "embedded-data"), name="embedded", workdir=workdir / "embedded"
        ),
        "tcp": ServerProcess(*common, "--redis-url", redis.url, name="tcp", workdir=workdir / "tcp"),
    }
    result: dict = {
        "command": " ".join(["python", "-m", "benchmarks.cache_backends", *(argv or sys.argv[1:])]),
        "machine": procs.machine_info(),
        "redis_client": hiredis_in_use(),
        "config": vars(args),
        "phases": {},
    }
    try:
        for s in servers.values():
            s.spawn()
        for name, s in servers.items():
            s.wait_ready(900)
            # The server's cost of a hit: its frontend, and the valkey it talks to.
            sampler.track(f"{name}.frontend", [s.pid])
            sampler.track(f"workers-{name}", s.worker_pids())
        (valkey,) = [pid for pid in descendants(servers["embedded"].pid) if "valkey-server" in cmdline(pid)]
        sampler.track("embedded.valkey", [valkey])
        sampler.track("tcp.valkey", [redis.proc.pid])
        for s in servers.values():
            populate(s, bb, args.pool)
        runner = PhaseRunner(workdir, sampler, log=lambda m, *a: logger.info(m, *a), warn=logger.warning)
        phases = {
            "extract_c16x1": dict(concurrency=16, items_per_request=1, client_procs=2, method="Extract"),
            "lookup_c4x64": dict(concurrency=4, items_per_request=64, client_procs=1, method="Lookup"),
        }
        for r in range(args.rounds):
            order = BACKENDS[r % 3 :] + BACKENDS[: r % 3]
            for phase, kw in phases.items():
                for name in order:
                    out = runner.run(
                        f"{phase}-{name}-r{r}",
                        servers[name],
                        backbone=bb,
                        cache_policy="USE",
                        duration_s=args.duration_s,
                        warmup_s=args.warmup_s,
                        pool=args.pool,
                        tag=TAG,
                        description=f"{name}: {phase}, all hits",
                        **kw,
                    )
                    groups = out["usage"].get("groups", {})
                    cache_cores = groups.get(f"{name}.valkey", {}).get("cores", 0.0)
                    result["phases"].setdefault(phase, {}).setdefault(name, []).append(
                        {
                            "items_per_s": out["items_per_s"],
                            "hit_ratio": out["hit_ratio"],
                            "server_cores": out["server_cores"],
                            "valkey_cores": round(cache_cores, 3),
                            "cpu_us_per_item": round(out["server_cores"] / out["items_per_s"] * 1e6, 1)
                            if out["items_per_s"]
                            else None,
                            "p50_ms": out["latency_ms"]["p50"],
                            "p99_ms": out["latency_ms"]["p99"],
                            "client_cores": out["client_cores"],
                            "other_cores": out["other_cores"],
                        }
                    )
        result["summary"] = summarise(result["phases"])
    finally:
        for s in servers.values():
            s.terminate()
        redis.stop()
        sampler.stop()
    result["layers"] = asyncio.run(layer_costs(workdir))
    out_path = pathlib.Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(render(result))
    return 0


async def layer_costs(workdir: pathlib.Path, iterations: int = 2000) -> dict:
    """One process, one call at a time: microseconds (wall) and CPU microseconds (this process
    plus the cache server's) per read of 1 and of 64 cached 5 KB values, per cache layer, and
    diskcache (SQLite files, the alternative considered) where it is installed."""
    import os

    from featurebank.common.cache import LRUCache, RedisCache
    from featurebank.common.metrics import Metrics
    from featurebank.server.embedded_cache import EmbeddedCache

    value = os.urandom(5 * 1024 + 13)  # a 1,280-d float32 feature and its header
    keys = [f"k{i:05d}" for i in range(1024)]
    embedded = EmbeddedCache(workdir / "layers-embedded", MAX_BYTES)
    redis = RedisProcess(workdir=workdir / "layers-tcp").start()
    embedded.start()
    layers = {
        "memory": (LRUCache(MAX_BYTES, 3600), None),
        "embedded": (RedisCache(embedded.url, ttl_seconds=3600, timeout_s=5, metrics=Metrics()), embedded.pid),
        "tcp": (RedisCache(redis.url, ttl_seconds=3600, timeout_s=5, metrics=Metrics()), redis.proc.pid),
    }
    out: dict = {}
    try:
        for name, (cache, server_pid) in layers.items():
            await cache.set_many([(k, value) for k in keys])
            out[name] = await _time_reads(lambda ks, c=cache: c.get_many(ks), keys, iterations, server_pid)
            await cache.close()
        try:
            import diskcache
        except ImportError:
            out["diskcache"] = "not installed (pip install diskcache)"
        else:
            dc = diskcache.Cache(
                str(workdir / "layers-diskcache"), size_limit=MAX_BYTES, eviction_policy="least-recently-used"
            )
            for k in keys:
                dc.set(k, value, expire=3600)

            async def dc_get(ks):
                return [dc.get(k) for k in ks]  # no multi-get: one SQLite read (and LRU write) per key

            out["diskcache"] = await _time_reads(dc_get, keys, iterations, None)
            dc.close()
    finally:
        embedded.stop()
        redis.stop()
    return out


async def _time_reads(read, keys: list[str], iterations: int, server_pid: int | None) -> dict:
    result = {}
    for n in (1, 64):
        got = await read(keys[:n])
        assert all(v is not None for v in got), "values must be cached before timing"
        server_cpu = procs.cpu_seconds(server_pid) if server_pid else 0.0
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(iterations):
            start = (i * n) % (len(keys) - n)
            await read(keys[start : start + n])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server_cpu = (procs.cpu_seconds(server_pid) - server_cpu) if server_pid else 0.0
        result[f"get{n}"] = {
            "us_per_call": round(wall / iterations * 1e6, 1),
            "cpu_us_per_call": round((cpu + server_cpu) / iterations * 1e6, 1),
            "server_cpu_us_per_call": round(server_cpu / iterations * 1e6, 1),
        }
    return result


def summarise(phases: dict) -> dict:
    """Per phase and backend: mean items/s and CPU per item, and their ratios to the in-process
    cache, paired per round (rounds ran back to back, so a noisy minute hits all three alike)."""
    out: dict = {}
    for phase, by_backend in phases.items():
        base = by_backend["memory"]
        for name, rounds in by_backend.items():
            mean = lambda k, rs=rounds: round(statistics.fmean(r[k] for r in rs if r[k] is not None), 2)  # noqa: E731
            out.setdefault(phase, {})[name] = {
                "items_per_s": mean("items_per_s"),
                "cpu_us_per_item": mean("cpu_us_per_item"),
                "valkey_cores": mean("valkey_cores"),
                "p50_ms": mean("p50_ms"),
                "rate_vs_memory": [round(r["items_per_s"] / b["items_per_s"], 3) for r, b in zip(rounds, base)],
                "cpu_per_item_vs_memory": [
                    round(r["cpu_us_per_item"] / b["cpu_us_per_item"], 3) for r, b in zip(rounds, base)
                ],
            }
    return out


def render(result: dict) -> str:
    lines = [
        f"redis client: {result['redis_client']}",
        "| phase | cache | items/s | vs memory (per round) | server CPU us/item (valkey incl.) | vs memory | p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, by_backend in result.get("summary", {}).items():
        for name, s in by_backend.items():
            lines.append(
                f"| {phase} | {name} | {s['items_per_s']:.0f} | {s['rate_vs_memory']} | "
                f"{s['cpu_us_per_item']:.0f} | {s['cpu_per_item_vs_memory']} | {s['p50_ms']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
