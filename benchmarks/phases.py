"""One load phase: client processes against a server, merged into one summary with the CPU of
every process and the server's own metrics for the measured window."""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
import time

from benchmarks import procs, report
from benchmarks.inputs import KINDS
from benchmarks.procs import ProcSampler
from featurebank.server.testing import ServedProcess

PYTHON = sys.executable
REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


class PhaseRunner:
    """Runs load phases (``benchmarks.loadgen`` processes) and keeps the rounds of repeated ones."""

    def __init__(self, workdir: pathlib.Path, sampler: ProcSampler, *, log, warn):
        self.workdir = workdir
        self.sampler = sampler
        self.log = log
        self.warn = warn
        self._rounds: dict[str, list[dict]] = {}

    def spec_path(self, name: str, spec: dict) -> pathlib.Path:
        path = self.workdir / "specs" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec))
        return path

    def usage(self, t0: float, t1: float, under_test: str) -> dict:
        """The sampler's view of a window, plus the cores of the process(es) under test and of
        every other process this run started (which should be idle)."""
        u = self.sampler.usage(t0, t1)
        groups = u.get("groups", {})
        cores = lambda g: groups.get(g, {}).get("cores", 0.0)  # noqa: E731
        tested = [g for g in groups if g == under_test or g.startswith(under_test + ".")]
        u["server_cores"] = round(sum(cores(g) for g in tested), 3)
        u["idle_ours_cores"] = round(sum(cores(g) for g in groups if g not in tested and g != "clients"), 3)
        return u

    def run(
        self,
        name: str,
        server: ServedProcess,
        *,
        backbone: str,
        concurrency: int,
        items_per_request: int,
        cache_policy: str,
        duration_s: float,
        warmup_s: float,
        pool: int,
        description: str,
        select: str = "cycle",
        tag: int = 1,
        client_procs: int = 1,
        method: str = "Extract",
        timeline: bool = False,
        draws_path: str | None = None,
    ) -> dict:
        """Load ``server`` from ``client_procs`` client processes for warmup_s + duration_s and
        summarise the measured window: throughput, latency, hit ratio, errors, the CPU of every
        process group, and what the server's own metrics say (batch sizes, padding, queue delay)."""
        client_procs = max(1, min(client_procs, concurrency))
        spec = {
            "target": server.target,
            "backbone": backbone,
            "kind": KINDS[backbone],
            "tag": tag,
            "method": method,
            "items_per_request": items_per_request,
            "cache_policy": cache_policy,
            "select": select,
            "start": 0,
            "pool": pool,
            "draws_path": draws_path,
            "warmup_s": warmup_s,
            "duration_s": duration_s,
            "timeline": timeline,
            "memo_requests": select == "cycle" or items_per_request == 1,
        }
        self.log(
            "phase %s: %s (%d clients x %d items, %s %s, %.0fs)",
            name,
            description,
            concurrency,
            items_per_request,
            method,
            cache_policy,
            duration_s,
        )
        clients = []
        for shard in range(client_procs):
            shard_spec = dict(spec, concurrency=concurrency // client_procs + (shard < concurrency % client_procs))
            path = self.spec_path(f"{name}-{shard}", shard_spec)
            out = self.workdir / "specs" / f"{name}-{shard}.out.json"
            p = subprocess.Popen(
                [PYTHON, "-m", "benchmarks.loadgen", str(path), str(out), str(shard), str(client_procs)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO_DIR,
            )
            clients.append((p, out))
        for p, _ in clients:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"client for {name} failed to start (said {line!r}); exit {p.wait()}")
        self.sampler.track("clients", [p.pid for p, _ in clients])
        t0 = time.time() + 0.3
        for p, _ in clients:
            p.stdin.write(f"{t0}\n")
            p.stdin.flush()
        metered = server.ports.get("metrics_port", -1) not in (-1, None)
        time.sleep(max(0.0, t0 + warmup_s - time.time()))
        before = server.scrape() if metered else {}
        time.sleep(max(0.0, t0 + warmup_s + duration_s - time.time()))
        after = server.scrape() if metered else {}
        shards = []
        for p, out in clients:
            if p.wait(timeout=warmup_s + duration_s + 300) != 0:
                raise RuntimeError(f"client for {name} exited {p.returncode}")
            shards.append(json.loads(out.read_text()))
        self.sampler.sample()
        self.sampler.untrack("clients")
        t_start = min(s["t_start"] for s in shards)
        t_end = max(s["t_end"] for s in shards)
        latencies = [x for s in shards for x in s["latencies_ms"]]
        items = sum(s["items"] for s in shards)
        hits = sum(s["hits"] for s in shards)
        usage = self.usage(t_start, t_end, server.name)
        items_per_s = items / duration_s
        result = {
            "description": description,
            "server": server.name,
            "backbone": backbone,
            "method": method,
            "concurrency": concurrency,
            "items_per_request": items_per_request,
            "cache_policy": cache_policy,
            "client_procs": client_procs,
            "window_s": duration_s,
            "items_per_s": round(items_per_s, 2),
            "requests_per_s": round(sum(s["requests"] for s in shards) / duration_s, 2),
            "items": round(items, 1),
            "hit_ratio": round(hits / items, 4) if items else None,
            "item_errors": round(sum(s["item_errors"] for s in shards), 1),
            "failed_requests": round(sum(s["failed_requests"] for s in shards), 1),
            "rpc_errors": {k: sum(s["rpc_errors"].get(k, 0) for s in shards) for s in shards for k in s["rpc_errors"]},
            "latency_ms": report.latency_summary(latencies),
            "client_cores": round(sum(s["client_cpu_s"] for s in shards) / duration_s, 3),
            "server_cores": usage.get("server_cores"),
            "items_per_server_core_s": round(items_per_s / usage["server_cores"], 2)
            if usage.get("server_cores")
            else None,
            "other_cores": usage.get("other_cores"),
            "usage": usage,
            "server_stats": procs.server_stats(before, after, backbone) if metered else None,
        }
        if result["failed_requests"] or result["item_errors"]:
            self.warn(
                f"{name}: {result['failed_requests']} failed requests {result['rpc_errors']}, "
                f"{result['item_errors']} item errors"
            )
        if timeline:
            result["timeline"] = sorted(x for s in shards for x in s["timeline"])
            result["issued_total"] = max(s["issued_total"] for s in shards)
        lat = result["latency_ms"]
        self.log(
            "  %.1f items/s, p50 %s ms, p99 %s ms, hit %s; cores: server %s, client %.2f, other %s",
            result["items_per_s"],
            lat["p50"],
            lat["p99"],
            result["hit_ratio"],
            result["server_cores"],
            result["client_cores"],
            result["other_cores"],
        )
        return result

    def record(self, name: str, result: dict) -> dict:
        """The phase as reported: a phase run in several rounds keeps every round and their mean."""
        rounds = self._rounds.setdefault(name, [])
        rounds.append(result)
        if len(rounds) == 1:
            return result
        merged = dict(result)
        for key in (
            "items_per_s",
            "requests_per_s",
            "client_cores",
            "server_cores",
            "other_cores",
            "items_per_server_core_s",
        ):
            values = [r[key] for r in rounds if r.get(key) is not None]
            merged[key] = round(statistics.fmean(values), 3) if values else None
        merged["items"] = sum(r["items"] for r in rounds)
        merged["window_s"] = sum(r["window_s"] for r in rounds)
        # Pooled percentiles would need every raw sample; keep the round with the median p50.
        merged["latency_ms"] = sorted((r["latency_ms"] for r in rounds), key=lambda l: l["p50"] or 0)[len(rounds) // 2]
        merged["rounds"] = [
            {k: r.get(k) for k in ("items_per_s", "server_cores", "other_cores", "latency_ms")} for r in rounds
        ]
        return merged
