"""A load-generating client process: grpc.aio, pre-framed requests, latencies and its own CPU.

Run by ``benchmarks.run`` (one or more per phase), never by hand:
``python -m benchmarks.loadgen SPEC.json OUT.json``. It builds its inputs, connects, prints
``ready``, reads the absolute start time from stdin, sends load for warm-up + duration with
``concurrency`` requests in flight, and writes what it measured to OUT.json.

Requests are framed by hand (header fields + one length-prefixed ``Input`` per item, the wire
format protobuf would produce) from memoised per-item bytes, and responses are parsed only to
count hits and errors, so the client spends as little CPU per request as Python gRPC allows;
it reports that CPU so a run can tell when the client, not the server, is the limit.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

import grpc
import numpy as np

from featurebank.client.errors import FeatureBankError
from featurebank.server.wire import varint
from featurebank.v1 import featurebank_pb2 as pb


class RequestFactory:
    """ExtractRequest bytes for a list of item indices, from memoised framed ``Input`` bytes."""

    def __init__(self, spec: dict):
        from benchmarks.inputs import InputMaker

        self.kind = spec["kind"]
        self.tag = spec["tag"]
        self.maker = InputMaker(self.kind)
        policy = {"USE": pb.USE, "BYPASS": pb.BYPASS, "REFRESH": pb.REFRESH}[spec.get("cache_policy", "USE")]
        dtype = {"FLOAT32": pb.FLOAT32, "FLOAT16": pb.FLOAT16}[spec.get("output_dtype", "FLOAT32")]
        self.method = spec.get("method", "Extract")
        if self.method == "Lookup":  # content keys instead of inputs; LookupRequest.keys is field 3 too
            self.header = pb.LookupRequest(
                backbone=spec["backbone"], layer=spec.get("layer", ""), output_dtype=dtype
            ).SerializeToString()
        else:
            self.header = pb.ExtractRequest(
                backbone=spec["backbone"], layer=spec.get("layer", ""), output_dtype=dtype, cache_policy=policy
            ).SerializeToString()
        self._framed: dict[int, bytes] = {}
        self._raw: dict[int, object] = {}
        self._requests: dict[tuple, bytes] = {}
        self.memo_requests = spec.get("memo_requests", True)

    def raw(self, index: int):
        """The input itself (image bytes or text), for the SDK mode."""
        x = self._raw.get(index)
        if x is None:
            (x,) = self.maker.make_indices(self.tag, [index])
            self._raw[index] = x
        return x

    def framed(self, index: int) -> bytes:
        f = self._framed.get(index)
        if f is None:
            (x,) = self.maker.make_indices(self.tag, [index])
            msg = pb.Input(image=x) if self.kind == "image" else pb.Input(text=x)
            if self.method == "Lookup":
                from featurebank.client.keys import input_key

                body = input_key(msg).encode()
            else:
                body = msg.SerializeToString()
            f = self._framed[index] = b"\x1a" + varint(len(body)) + body  # field 3, length-delimited
        return f

    def request(self, indices: tuple[int, ...]) -> bytes:
        r = self._requests.get(indices)
        if r is None:
            r = self.header + b"".join(self.framed(i) for i in indices)
            if self.memo_requests:
                self._requests[indices] = r
        return r


class Selector:
    """Which items request number k carries: a cycle over a pool, a fixed set, or Zipf draws."""

    def __init__(self, spec: dict, shard: int, num_shards: int):
        self.n = spec["items_per_request"]
        self.mode = spec["select"]
        self.shard, self.num_shards = shard, num_shards
        self.start = spec.get("start", 0)
        self.pool = spec.get("pool", 1)
        self.draws = np.load(spec["draws_path"]) if self.mode == "zipf" else None

    def indices(self, k: int) -> tuple[int, ...]:
        g = k * self.num_shards + self.shard  # request number across every client process
        if self.mode == "cycle":  # consecutive distinct items, wrapping around the pool
            first = g * self.n
            return tuple(self.start + (first + j) % self.pool for j in range(self.n))
        first = g * self.n
        return tuple(int(self.draws[(first + j) % len(self.draws)]) for j in range(self.n))

    def prepare(self, factory: RequestFactory, max_requests: int) -> None:
        """Build inputs ahead of the timed window where that is cheap (cycle mode: the whole pool)."""
        if self.mode == "cycle":
            for k in range(min(max_requests, -(-self.pool // (self.n * self.num_shards)) + 1)):
                if factory.method == "SDK":
                    for i in self.indices(k):
                        factory.raw(i)
                else:
                    factory.request(self.indices(k))


async def run(spec: dict, shard: int, num_shards: int, t0: float) -> dict:
    factory = RequestFactory(spec)
    selector = Selector(spec, shard, num_shards)
    concurrency = spec["concurrency"]
    warmup_s, duration_s = spec["warmup_s"], spec["duration_s"]
    timeout_s = spec.get("timeout_s", 120.0)
    record_timeline = spec.get("timeline", False)
    channel = grpc.aio.insecure_channel(
        spec["target"],
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    await channel.channel_ready()
    if factory.method == "SDK":
        # What a service using the SDK does: content keys hashed here, one Lookup, Extract for
        # the inputs not found (cache_policy USE), outcomes as objects. Nothing is pre-framed.
        from featurebank.client import AsyncFeatureBank

        bank = AsyncFeatureBank(spec["target"], timeout_s=timeout_s)
        policy = getattr(pb, spec.get("cache_policy", "USE"))

        async def call(indices, timeout):
            outcomes = await bank.extract_items(
                [factory.raw(i) for i in indices],
                backbone=spec["backbone"],
                layer=spec.get("layer", ""),
                cache_policy=policy,
            )
            return len(outcomes), sum(o.cache_hit for o in outcomes), sum(o.error is not None for o in outcomes)
    else:
        raw_call = channel.unary_unary(f"/featurebank.v1.FeatureBank/{factory.method}")  # bytes in, bytes out

        async def call(indices, timeout):
            response = pb.ExtractResponse.FromString(await raw_call(factory.request(indices), timeout=timeout))
            n = len(response.results)
            return n, sum(r.cache_hit for r in response.results), sum(r.HasField("error") for r in response.results)

    selector.prepare(factory, 4096)
    print("ready", flush=True)
    t0 = float(sys.stdin.readline()) if t0 <= 0 else t0
    await asyncio.sleep(max(0.0, t0 - time.time()))
    start = time.perf_counter()
    t_measure, t_end = start + warmup_s, start + warmup_s + duration_s
    issued = {"total": 0, "before_window": 0}
    latencies_ms: list[float] = []
    timeline: list[tuple[float, int, int, int]] = []
    totals = collections.Counter()
    errors = collections.Counter()
    cpu = {}

    async def mark_cpu() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        cpu["start"], cpu["start_wall"] = time.process_time(), time.time()
        issued["before_window"] = issued["total"]
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        cpu["end"], cpu["end_wall"] = time.process_time(), time.time()

    async def client() -> None:
        while True:
            sent = time.perf_counter()
            if sent >= t_end:
                return
            k = issued["total"]
            issued["total"] = k + 1
            idx = selector.indices(k)
            try:
                n, hits, item_errors = await call(idx, timeout=timeout_s)
                code = None
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            except FeatureBankError as e:
                code = e.code.name
            done = time.perf_counter()
            if done <= t_measure:
                continue
            # The share of this request's lifetime inside the window: counting items that way
            # instead of by completion keeps slow phases (seconds per request) free of rounding.
            share = (min(done, t_end) - max(sent, t_measure)) / max(done - sent, 1e-9)
            if code is not None:
                errors[code] += 1
                totals["failed_requests"] += share
                continue
            totals["requests"] += share
            totals["items"] += n * share
            totals["hits"] += hits * share
            totals["item_errors"] += item_errors * share
            if done <= t_end:
                latencies_ms.append((done - sent) * 1e3)
                if record_timeline:
                    timeline.append((round(done - t_measure, 4), n, hits, item_errors))

    await asyncio.gather(mark_cpu(), *(client() for _ in range(concurrency)))
    await channel.close()
    if factory.method == "SDK":
        await bank.close()
    return {
        "shard": shard,
        "window_s": duration_s,
        "t_start": cpu.get("start_wall"),
        "t_end": cpu.get("end_wall"),
        "client_cpu_s": cpu["end"] - cpu["start"],
        "requests": totals["requests"],
        "items": totals["items"],
        "hits": totals["hits"],
        "item_errors": totals["item_errors"],
        "failed_requests": totals["failed_requests"],
        "rpc_errors": dict(errors),
        "issued_before_window": issued["before_window"] * num_shards,
        "issued_total": issued["total"] * num_shards,
        "latencies_ms": latencies_ms,
        "timeline": timeline,
    }


def main(argv: list[str]) -> int:
    spec_path, out_path = argv[0], argv[1]
    shard, num_shards = int(argv[2]) if len(argv) > 2 else 0, int(argv[3]) if len(argv) > 3 else 1
    with open(spec_path) as f:
        spec = json.load(f)
    result = asyncio.run(run(spec, shard, num_shards, spec.get("t0", 0.0)))
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
