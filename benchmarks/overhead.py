"""Serving overhead: toy-backbone misses against the all-core decode + resize limit of the same PNGs.

The ``toy`` backbone's forward pass costs almost nothing, so what a server answers in misses per
second, divided by how fast every core of the machine decodes and resizes the same inputs (the
limit, no server at all), is the fraction of the CPU the serving path leaves to preprocessing.
One run: the limit, then ``--preprocess-workers 0`` (before: the model worker decodes) and
``--preprocess-workers N`` (after: a preprocessing pool), at 16 clients x 1 image and 4 x 32,
all with one model worker; the limit is measured again between phases (the machine is shared)
and each phase is compared with the mean of the limits measured just before and after it.

The ceiling: the same load through the gRPC floor (``benchmarks/floor_server.py``: parse, canned
answer) gives the CPU that gRPC itself costs per item, server and load generator, at each shape.
A server that did nothing but that and the decode (free batching, IPC and model) could reach at
most ``decode / (decode + floor server + floor client)`` of the limit, CPU per item, when the load
generator shares the machine's cores: the most any Python gRPC server can show here.

    python -m benchmarks.overhead --out bench-out/overhead.json [--duration-s 15] [--rounds 1] [--backbone null]

``--backbone null`` serves ``benchmarks/null_backbone.py`` instead of ``toy``: the same inputs and
preprocessing with a model that costs nothing (the toy's TensorFlow calls are not free on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

from benchmarks import procs
from benchmarks.inputs import KINDS, InputMaker
from benchmarks.phases import PhaseRunner
from benchmarks.procs import ProcSampler
from featurebank.common.cpus import usable_cpus

logger = logging.getLogger("benchmarks.overhead")

BACKBONES = {  # --backbone: the served name, and what the floor answers per item (its default layer's size)
    "toy": ("toy", 16),  # a real two-layer Keras model: TensorFlow's calls cost CPU per batch
    "null": ("benchmarks.null_backbone:NullImage", 16),  # the same inputs and preprocessing, no model
}
TOY_SIZE = (32, 32)
MAX_IMAGE_PIXELS = 40_000_000  # the server's default --max-image-pixels
TAG = 7  # the set of PNGs every phase and the limit cycle through (BYPASS: never cached)
SHAPES = ((16, 1), (4, 32))  # (clients, images per request): the two targets
TARGETS = {(16, 1): 0.80, (4, 32): 0.90}

for _name, _ in BACKBONES.values():
    KINDS.setdefault(_name, "image")  # the load generator sends them the same PNGs as EfficientNet-Lite0


def _decoder(index: int, images: list[bytes], ready, go, start_at, duration_s: float, results) -> None:
    """One process: imports done, say ready; at the start time decode + resize PNGs for duration_s."""
    from featurebank.workers.backbones.base import InputItem
    from featurebank.workers.backbones.images import image_input

    items = [InputItem("image", b) for b in images]
    image_input(items[0], "toy", MAX_IMAGE_PIXELS, TOY_SIZE)  # Pillow's plugins loaded off the clock
    ready.put(index)
    go.wait()
    time.sleep(max(0.0, start_at.value - time.time()))
    cpu0, n, end = time.process_time(), 0, start_at.value + duration_s
    while time.time() < end:
        image_input(items[(index * 101 + n) % len(items)], "toy", MAX_IMAGE_PIXELS, TOY_SIZE)
        n += 1
    results.put((n, time.process_time() - cpu0))


def decode_limit(images: list[bytes], processes: int, duration_s: float) -> dict:
    """Decode + resize on ``processes`` processes at once (started together), the way the pool's own do it."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    workers = [
        ctx.Process(target=_decoder, args=(i, images, ready, go, start_at, duration_s, results), daemon=True)
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=120)
    start_at.value = time.time() + 0.1
    go.set()
    done = [results.get(timeout=duration_s + 120) for _ in workers]
    for w in workers:
        w.join(10)
    items = sum(n for n, _ in done)
    return {
        "items_per_s": round(items / duration_s, 1),
        "processes": processes,
        "cores": round(sum(c for _, c in done) / duration_s, 2),
        "items_per_core_s": round(items / max(sum(c for _, c in done), 1e-9), 1),
        "loadavg_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-out/overhead.json")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        default="toy",
        help="toy (a real Keras model, as in the issue) or null (the same preprocessing, a model that costs nothing)",
    )
    parser.add_argument("--duration-s", type=float, default=15.0, help="measured seconds per phase")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--limit-s", type=float, default=6.0, help="seconds per all-core decode measurement")
    parser.add_argument("--rounds", type=int, default=1, help="each phase this many times, interleaved")
    parser.add_argument("--pool", type=int, default=1024, help="distinct PNGs cycled through")
    parser.add_argument(
        "--preprocess-workers", type=int, default=0, help="the 'after' server's pool (0 = the CPUs usable)"
    )
    args = parser.parse_args(argv)
    backbone, dim = BACKBONES[args.backbone]
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    cpus = usable_cpus()
    after_workers = args.preprocess_workers or cpus
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="fb-overhead-"))
    sampler = ProcSampler().start()
    runner = PhaseRunner(workdir, sampler, log=lambda m, *a: logger.info(m, *a), warn=logger.warning)
    images = InputMaker("image").make(TAG, min(args.pool, 256))
    servers = {
        "before": procs.featurebank_server(
            workdir, "before", [backbone], extra=["--workers", "1", "--preprocess-workers", "0"]
        ),
        "after": procs.featurebank_server(
            workdir, "after", [backbone], extra=["--workers", "1", "--preprocess-workers", str(after_workers)]
        ),
        "floor": procs.floor_server(workdir, dim),
    }
    results: dict = {
        "command": " ".join(["python", "-m", "benchmarks.overhead", *(argv if argv is not None else sys.argv[1:])]),
        "machine": procs.machine_info(),
        "backbone": args.backbone,
        "usable_cpus": cpus,
        "after_preprocess_workers": after_workers,
        "limits": [],
        "phases": {},
        "floor": {},
        "ratios": {},
        "ceilings": {},
    }
    try:
        for s in servers.values():
            s.spawn()
        for s in servers.values():
            s.wait_ready()
            sampler.track(f"{s.name}.frontend", lambda s=s: [s.pid] if s.proc.poll() is None else [])
            sampler.track(f"{s.name}.worker", lambda s=s: s.worker_pids())
            sampler.track(f"{s.name}.preprocess", lambda s=s: s.preprocess_pids())

        def limit() -> dict:
            m = decode_limit(images, cpus, args.limit_s)
            results["limits"].append(m)
            logger.info("all-core decode + resize: %.1f items/s (%.2f cores)", m["items_per_s"], m["cores"])
            return m

        def phase(name: str, server: str, clients: int, n: int, description: str) -> dict:
            return runner.run(
                name,
                servers[server],
                backbone=backbone,
                concurrency=clients,
                items_per_request=n,
                cache_policy="BYPASS",
                duration_s=args.duration_s,
                warmup_s=args.warmup_s,
                pool=args.pool,
                tag=TAG,
                description=description,
            )

        before_limit = limit()
        for _ in range(args.rounds):
            for clients, n in SHAPES:
                shape = f"{clients}x{n}"
                results["floor"].setdefault(shape, []).append(
                    phase(f"floor-{shape}", "floor", clients, n, f"gRPC floor, same inputs ({clients} x {n})")
                )
                for which in ("before", "after"):
                    name = f"{which}-{shape}"
                    result = phase(name, which, clients, n, f"{args.backbone} misses, {which} ({clients} x {n})")
                    result["loadavg_1m"] = os.getloadavg()[0]
                    after_limit = limit()
                    ref = statistics.fmean([before_limit["items_per_s"], after_limit["items_per_s"]])
                    result["limit_items_per_s"] = round(ref, 1)
                    result["ratio"] = round(result["items_per_s"] / ref, 3)
                    # On a machine other processes load, how much of it each side gets varies; per
                    # core-second of CPU actually used, the comparison holds whatever the load.
                    per_core = statistics.fmean([before_limit["items_per_core_s"], after_limit["items_per_core_s"]])
                    result["limit_items_per_core_s"] = round(per_core, 1)
                    if result.get("items_per_server_core_s"):
                        result["cpu_ratio"] = round(result["items_per_server_core_s"] / per_core, 3)
                    results["phases"].setdefault(name, []).append(result)
                    before_limit = after_limit
        for clients, n in SHAPES:
            for which in ("before", "after"):
                name = f"{which}-{clients}x{n}"
                runs = results["phases"][name]
                results["ratios"][name] = {
                    "throughput": round(statistics.fmean(p["ratio"] for p in runs), 3),
                    "cpu": round(statistics.fmean(p.get("cpu_ratio", 0.0) for p in runs), 3),
                }
        results["ceilings"] = ceilings(results)
    finally:
        for s in servers.values():
            if s.proc is not None and s.proc.poll() is None:
                s.terminate()
        sampler.stop()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return 0


def _group_cores(phase: dict, group: str) -> float:
    return phase["usage"]["groups"].get(group, {}).get("cores", 0.0)


def ceilings(results: dict) -> dict:
    """Per shape: decode, gRPC floor server and load-generator CPU per item (ms), the ceiling
    ``decode / (decode + floor server + floor client)`` and what featurebank's servers spend per
    item beyond decode and the floor's gRPC (ms of server CPU)."""
    decode_ms = 1000.0 / statistics.fmean(m["items_per_core_s"] for m in results["limits"])
    out = {}
    for clients, n in SHAPES:
        shape = f"{clients}x{n}"
        floors = results["floor"].get(shape, [])
        if not floors:
            continue
        server_ms = statistics.fmean(1000.0 * p["server_cores"] / p["items_per_s"] for p in floors)
        client_ms = statistics.fmean(1000.0 * p["client_cores"] / p["items_per_s"] for p in floors)
        row = {
            "decode_ms_per_item": round(decode_ms, 3),
            "floor_server_ms_per_item": round(server_ms, 3),
            "floor_client_ms_per_item": round(client_ms, 3),
            "ceiling": round(decode_ms / (decode_ms + server_ms + client_ms), 3),
            "target": TARGETS[(clients, n)],
        }
        for which in ("before", "after"):
            runs = results["phases"].get(f"{which}-{shape}", [])
            if not runs:
                continue
            spent = statistics.fmean(1000.0 * p["server_cores"] / p["items_per_s"] for p in runs)
            row[f"{which}_beyond_decode_and_floor_ms"] = round(spent - decode_ms - server_ms, 3)
            # Where it goes, per process group (ms of CPU per item): the frontend against the floor's
            # gRPC, the model worker (the toy's forward pass, and decode too before the pool), the pool.
            for group in ("frontend", "worker", "preprocess"):
                row[f"{which}_{group}_ms"] = round(
                    statistics.fmean(1000.0 * _group_cores(p, f"{which}.{group}") / p["items_per_s"] for p in runs), 3
                )
        out[shape] = row
    return out


def table(results: dict) -> str:
    rows = [
        "| server | clients x items | items/s | all-core decode limit items/s | ratio | target | server cores | "
        "items per server core-s | decode items per core-s | CPU ratio | other cores | load avg 1m |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for clients, n in SHAPES:
        for which in ("before", "after"):
            for p in results["phases"][f"{which}-{clients}x{n}"]:
                label = (
                    "before (--preprocess-workers 0)"
                    if which == "before"
                    else (f"after (--preprocess-workers {results['after_preprocess_workers']})")
                )
                rows.append(
                    f"| {label} | {clients} x {n} | {p['items_per_s']:.1f} | {p['limit_items_per_s']:.1f} | "
                    f"**{p['ratio']:.2f}** | {TARGETS[(clients, n)]:.2f} | {p['server_cores']} | "
                    f"{p.get('items_per_server_core_s')} | {p['limit_items_per_core_s']} | {p.get('cpu_ratio')} | "
                    f"{p['other_cores']} | {p['loadavg_1m']:.2f} |"
                )
    rows += [
        "",
        "| clients x items | decode ms/item (one core) | gRPC floor: server, client ms/item | ceiling (any server "
        "with the floor's gRPC) | target | featurebank's server CPU beyond decode + floor, ms/item: before, after |",
        "|---|---|---|---|---|---|",
    ]
    for shape, c in results.get("ceilings", {}).items():
        rows.append(
            f"| {shape.replace('x', ' x ')} | {c['decode_ms_per_item']} | {c['floor_server_ms_per_item']}, "
            f"{c['floor_client_ms_per_item']} | **{c['ceiling']:.2f}** | {c['target']:.2f} | "
            f"{c.get('before_beyond_decode_and_floor_ms')}, {c.get('after_beyond_decode_and_floor_ms')} |"
        )
    rows += [
        "",
        "| server | clients x items | server CPU ms/item: frontend | model worker | preprocessing pool |",
        "|---|---|---|---|---|",
    ]
    for shape, c in results.get("ceilings", {}).items():
        for which in ("before", "after"):
            if f"{which}_frontend_ms" in c:
                rows.append(
                    f"| {which} | {shape.replace('x', ' x ')} | {c[f'{which}_frontend_ms']} | "
                    f"{c[f'{which}_worker_ms']} | {c[f'{which}_preprocess_ms']} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
