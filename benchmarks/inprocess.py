"""The in-process limits: the backbone alone, with no gRPC, no batcher, no cache, no worker pipe.

Run by ``benchmarks.run`` as a long-lived process (``python -m benchmarks.inprocess SPEC.json``)
with the same backbone options and TensorFlow threading as a featurebank worker. It loads the
backbone, traces the shapes it will use, prints ``ready``, then answers one JSON line per
command line on stdin, so the run can measure a limit right next to the server phase it is
compared with (the machine is shared and its speed drifts):

- ``L0_b{n}``: ``forward`` on already-preprocessed items (decode/tokenise done once, off the clock);
- ``L_b{n}``: ``preprocess`` + ``forward`` on distinct raw inputs (what a worker does per batch);
- ``preprocess``: decode + resize (or tokenise) alone, per item.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

SERVER_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)  # what featurebank traces for --max-batch-size 32


def measure(fn, batch_size: int, duration_s: float, min_calls: int = 3) -> dict:
    """Call fn() for duration_s (at least min_calls times): items/s, per-call latency, cores used."""
    latencies = []
    t_start = time.time()
    start = time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - start < duration_s or len(latencies) < min_calls:
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {
        "batch_size": batch_size,
        "calls": len(latencies),
        "wall_s": wall,
        "items_per_s": batch_size * len(latencies) / wall,
        "call_p50_ms": float(np.percentile(lat, 50)),
        "call_p99_ms": float(np.percentile(lat, 99)),
        "per_item_p50_ms": float(np.percentile(lat, 50)) / batch_size,
        "cores": (time.process_time() - cpu0) / wall,
        "t_start": t_start,
        "t_end": time.time(),
    }


class Limits:
    """One loaded backbone and the inputs it is measured on."""

    def __init__(self, spec: dict):
        from benchmarks.inputs import InputMaker
        from featurebank.workers.backbones import registry
        from featurebank.workers.backbones.base import InputItem

        t = time.perf_counter()
        self.backbone = registry.create(spec["backbone"], batch_buckets=SERVER_BATCH_BUCKETS)
        self.backbone.load()
        self.load_s = time.perf_counter() - t
        raw = InputMaker(spec["kind"]).make(spec["tag"], spec["pool"])
        self.items = [InputItem(spec["kind"], x) for x in raw]
        self.pre = [self.backbone.preprocess(it) for it in self.items[:32]]
        t = time.perf_counter()
        for n in spec.get("batch_sizes", (1, 32)):  # trace the shapes used, off the clock
            self.backbone.forward(self.pre[:n])
        self.trace_s = time.perf_counter() - t
        self._cursor = 0

    def distinct(self, n: int) -> list:
        k = self._cursor
        self._cursor = (k + n) % len(self.items)
        return [self.items[(k + j) % len(self.items)] for j in range(n)]

    def run(self, what: str, duration_s: float) -> dict:
        b = self.backbone
        if what == "preprocess":
            return measure(lambda: [b.preprocess(it) for it in self.distinct(32)], 32, duration_s)
        kind, _, size = what.partition("_b")
        n = int(size)
        if kind == "L0":
            return measure(lambda: b.forward(self.pre[:n]), n, duration_s)
        if kind == "L":
            return measure(lambda: b.forward([b.preprocess(it) for it in self.distinct(n)]), n, duration_s)
        raise ValueError(f"unknown measurement {what!r}")


def main(argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with open(argv[0]) as f:
        spec = json.load(f)
    limits = Limits(spec)
    print(json.dumps({"ready": True, "load_s": limits.load_s, "trace_s": limits.trace_s}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("what") == "quit":
            break
        print(json.dumps(limits.run(cmd["what"], cmd["duration_s"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
