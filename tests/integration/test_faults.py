"""Restarts, shared caches, Redis outages, dying workers, overload: real processes, no fakes."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from featurebank.client import FeatureBank, FeatureBankError
from fixture_backbones import KILL_MARKER
from support import random_images, wait_until

FAULTY = "fixture_backbones:FaultyToy"


@pytest.mark.slow
def test_hits_survive_a_server_restart_and_are_shared_between_servers(redis_server, start_server):
    """Features written by one server process are hits for a restarted one and for a second one."""
    images = random_images(4, seed=1)
    first = start_server("--backbone", "toy", "--redis-url", redis_server.url)
    with FeatureBank(first.target) as bank:
        computed = bank.extract_items(images, backbone="toy")
    assert not any(o.cache_hit for o in computed)
    assert first.terminate() == 0

    restarted = start_server("--backbone", "toy", "--redis-url", redis_server.url)
    other = start_server("--backbone", "toy", "--redis-url", redis_server.url)
    for server in (restarted, other):
        with FeatureBank(server.target) as bank:  # the inputs themselves, to count Extract's hits
            again = bank.extract_items(images, backbone="toy", lookup_first=False)
        assert all(o.cache_hit for o in again)
        np.testing.assert_array_equal(np.stack([o.features for o in again]), np.stack([o.features for o in computed]))
        assert server.metric("featurebank_items_total", result="hit") == 4
        assert server.metric("featurebank_items_total", result="miss") == 0


@pytest.mark.slow
def test_redis_outage_fails_no_request_and_caching_resumes(redis_server, start_server):
    """Redis stopped for 10 s under load: no request fails, the outage is counted, caching resumes within 5 s."""
    server = start_server("--backbone", "toy", "--redis-url", redis_server.url, "--redis-timeout-ms", "200")
    pool = random_images(32, seed=10, size=(16, 16))
    failures: list[str] = []
    served = [0]
    stop_load = threading.Event()

    def load(seed: int):
        rng = np.random.default_rng(seed)
        with FeatureBank(server.target, timeout_s=30) as bank:
            while not stop_load.is_set():
                try:
                    bank.extract([pool[i] for i in rng.integers(0, len(pool), 2)], backbone="toy")
                    served[0] += 1
                except FeatureBankError as e:
                    failures.append(str(e))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: served[0] >= 20, 30, "load to run")
        redis_server.stop()
        time.sleep(10)  # the outage itself: the length is the contract, not a wait for readiness
        during = served[0]
        redis_server.start()
        back = time.monotonic()
        probe = random_images(1, seed=12)[0]
        with FeatureBank(server.target, timeout_s=30) as bank:

            def cached_again():
                bank.extract([probe], backbone="toy")
                return bank.extract_items([probe], backbone="toy")[0].cache_hit

            wait_until(cached_again, 5, "caching to resume within 5 s of Redis coming back", interval_s=0.1)
        resumed_after_s = time.monotonic() - back
    finally:
        stop_load.set()
        for t in threads:
            t.join()
    assert failures == []
    assert during > 20 and server.metric("featurebank_cache_errors_total") >= 1
    assert resumed_after_s < 5


@pytest.mark.slow
def test_killed_worker_mid_batch_loses_no_request(start_server):
    """SIGKILL of a worker mid-batch: every request of the batch still succeeds, the restart is counted."""
    server = start_server("--backbone", FAULTY, "--max-batch-delay-ms", "50", env={"FB_TEST_FORWARD_DELAY_MS": "1500"})
    images = random_images(6, seed=20)
    (worker,) = server.worker_pids()
    with FeatureBank(server.target, timeout_s=120) as bank, concurrent.futures.ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(bank.extract, [img], backbone=FAULTY) for img in images]
        wait_until(lambda: server.metric("featurebank_batch_size_count") >= 1, 10, "a batch to reach the worker")
        time.sleep(0.3)  # inside the 1.5 s forward pass
        os.kill(worker, signal.SIGKILL)
        results = [f.result() for f in futures]
    assert all(r.shape == (1, 16) for r in results)
    assert server.metric("featurebank_worker_restarts_total") == 1
    wait_until(lambda: server.metric("featurebank_workers_ready") == 1, 60, "the worker to be back")
    assert "exit -9 (SIGKILL: killed, out of memory?)" in server.log()


@pytest.mark.slow
def test_an_input_that_kills_workers_fails_alone(start_server):
    """An item that crashes its worker twice gets INTERNAL; its batch neighbours succeed; the pool lives."""
    # The model worker's crash handling: it preprocesses here (the pool's own: test_preprocess_pool.py).
    server = start_server("--backbone", FAULTY, "--max-batch-delay-ms", "20", "--preprocess-workers", "0")
    good = random_images(3, seed=30)
    with FeatureBank(server.target, timeout_s=180) as bank:
        outcomes = bank.extract_items([good[0], KILL_MARKER + b"poison", good[1]], backbone=FAULTY)
        assert outcomes[0].error is None and outcomes[2].error is None
        assert outcomes[1].error.code == grpc.StatusCode.INTERNAL
        assert "crashed" in outcomes[1].error.message
        assert bank.extract([good[2]], backbone=FAULTY).shape == (1, 16)
    assert server.metric("featurebank_worker_restarts_total") == 2


@pytest.mark.slow
def test_only_the_batch_being_computed_is_blamed_for_a_crash(start_server):
    """Two batches in flight: a crash blames the one the worker was computing, not the one queued
    behind it, so innocent items never run out of tries while a poisonous one is isolated."""
    server = start_server(
        "--backbone",
        FAULTY,
        "--max-batch-size",
        "2",
        "--pipeline-depth",
        "2",
        "--max-batch-delay-ms",
        "20",
        "--preprocess-workers",  # the model worker preprocesses, so the KILL input crashes it
        "0",
        env={"FB_TEST_FORWARD_DELAY_MS": "200"},
    )
    good = random_images(7, seed=31)
    with FeatureBank(server.target, timeout_s=180) as bank:
        outcomes = bank.extract_items([KILL_MARKER + b"poison", *good], backbone=FAULTY)
    assert outcomes[0].error.code == grpc.StatusCode.INTERNAL
    assert [o.error for o in outcomes[1:]] == [None] * 7
    assert all(o.features.shape == (16,) for o in outcomes[1:])
    assert server.metric("featurebank_worker_restarts_total") == 2


def test_full_queue_answers_resource_exhausted(start_server):
    """Beyond max_queue_size, requests fail fast with RESOURCE_EXHAUSTED; the server keeps serving."""
    server = start_server(
        "--backbone", FAULTY, "--max-batch-size", "2", "--max-queue-size", "4", env={"FB_TEST_FORWARD_DELAY_MS": "300"}
    )
    with FeatureBank(server.target, timeout_s=60) as bank, concurrent.futures.ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(bank.extract, random_images(3, seed=40 + i), backbone=FAULTY) for i in range(8)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except FeatureBankError as e:
                codes.append(e.code.name)
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        assert bank.extract(random_images(1, seed=49), backbone=FAULTY).shape == (1, 16)
    assert server.metric("featurebank_rejected_items_total") >= 3


def test_expired_items_are_dropped_before_a_worker(start_server):
    """Items whose deadline passed while queued are never computed."""
    server = start_server("--backbone", FAULTY, "--max-batch-size", "1", env={"FB_TEST_FORWARD_DELAY_MS": "500"})
    with FeatureBank(server.target, timeout_s=0.8) as bank, concurrent.futures.ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(bank.extract, [img], backbone=FAULTY) for img in random_images(6, seed=50)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except FeatureBankError as e:
                codes.append(e.code.name)
    assert "DEADLINE_EXCEEDED" in codes
    wait_until(lambda: server.metric("featurebank_dropped_items_total") >= 1, 10, "queued items to be dropped")
    assert server.metric("featurebank_batch_size_count") < 6


def test_health_is_not_serving_until_workers_are_warm_and_sigterm_drains(start_server):
    """Health says NOT_SERVING while the backbone loads, SERVING when warm; SIGTERM exits 0."""
    server = start_server("--backbone", FAULTY, "--grace-period-s", "5", env={"FB_TEST_LOAD_DELAY_S": "6"}, wait=False)
    server.wait_port()
    assert server.health() == "NOT_SERVING"
    with FeatureBank(server.target, timeout_s=10) as bank, pytest.raises(FeatureBankError) as e:
        bank.extract(random_images(1), backbone=FAULTY)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    server.wait_ready(120)
    assert server.health() == "SERVING"
    assert server.terminate() == 0


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_sigterm_while_the_backbone_loads_stops_cleanly(start_server, redis_server, frontends):
    """SIGTERM before the workers are warm (a rollout replacing a starting pod): exit 0 with
    "featurebank stopped", no traceback, and no worker blamed as killed or out of memory."""
    server = start_server(
        "--backbone", FAULTY, "--redis-url", redis_server.url, "--frontends", frontends,
        env={"FB_TEST_LOAD_DELAY_S": "30"}, wait=False,
    )  # fmt: skip
    server.wait_port()
    wait_until(lambda: server.worker_pids(), 30, "a worker loading")
    assert server.terminate(timeout_s=60) == 0, server.log(3000)
    log = server.log()
    assert log.rstrip().endswith("featurebank stopped"), log[-3000:]
    assert "Traceback" not in log and "out of memory" not in log, log[-3000:]


def test_a_backbone_that_fails_to_load_stops_the_server_with_a_reason(start_server):
    """A backbone that raises while loading makes the server exit non-zero, saying why."""
    server = start_server("--backbone", FAULTY, env={"FB_TEST_FAIL_SETUP": "1"}, wait=False)
    wait_until(lambda: server.proc.poll() is not None, 120, "the server to exit")
    assert server.proc.returncode != 0
    assert "refuses to load" in server.log()


@pytest.mark.parametrize("corruption", ["truncate", "bitflip"])
def test_corrupt_cached_value_is_recomputed_never_served(redis_server, start_server, corruption):
    """A truncated or bit-flipped value in Redis is caught by its checksum, recomputed and rewritten."""
    server = start_server("--backbone", "toy", "--redis-url", redis_server.url)
    img = random_images(1, seed=60)[0]
    with FeatureBank(server.target) as bank:
        good = bank.extract([img], backbone="toy")
        r = redis_server.client()
        (key,) = r.keys("fb1:*")
        value = r.get(key)
        bad = value[:-7] if corruption == "truncate" else value[:-3] + bytes([value[-3] ^ 0x10]) + value[-2:]
        r.set(key, bad)
        (again,) = bank.extract_items([img], backbone="toy")
        assert not again.cache_hit
        np.testing.assert_array_equal(again.features, good[0])
        assert r.get(key) == value  # rewritten
        assert bank.extract_items([img], backbone="toy")[0].cache_hit
    assert server.metric("featurebank_cache_corrupt_values_total") == 1


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(start_server):
    """On SIGTERM in-flight requests complete, new ones are refused with UNAVAILABLE, and the exit code is 0."""
    server = start_server("--backbone", FAULTY, "--grace-period-s", "20", env={"FB_TEST_FORWARD_DELAY_MS": "2000"})
    with FeatureBank(server.target, timeout_s=60) as bank, concurrent.futures.ThreadPoolExecutor(2) as ex:
        in_flight = ex.submit(bank.extract, random_images(2, seed=70), backbone=FAULTY)
        wait_until(lambda: server.metric("featurebank_batch_size_count") >= 1, 20, "the batch to reach a worker")
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: server.health() in ("NOT_SERVING", "UNAVAILABLE"), 10, "health to leave SERVING")
        assert in_flight.result().shape == (2, 16)
    with grpc.insecure_channel(server.target) as ch:
        from featurebank.v1 import featurebank_pb2 as pb
        from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.FeatureBankStub(ch).ListBackbones(pb.ListBackbonesRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(30) == 0


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_overload_is_refused_fast_memory_stays_bounded_and_throughput_recovers(start_server):
    """A flood far above the sustainable rate gets fast RESOURCE_EXHAUSTED, bounded RSS, and full service after."""
    server = start_server(
        "--backbone", FAULTY, "--max-batch-size", "8", "--max-queue-size", "32", env={"FB_TEST_FORWARD_DELAY_MS": "100"}
    )  # sustainable: ~80 items/s
    images = random_images(64, seed=80)
    with FeatureBank(server.target, timeout_s=30) as bank:
        bank.extract(images[:8], backbone=FAULTY, cache_policy=1)
        rss_before = _rss_mib(server.proc.pid)
        stop = time.monotonic() + 10
        outcomes: list[tuple[str, float]] = []
        lock = threading.Lock()

        def flood(seed: int):
            rng = np.random.default_rng(seed)
            while time.monotonic() < stop:
                batch = [images[i] for i in rng.integers(0, len(images), 4)]
                t0 = time.perf_counter()
                try:
                    bank.extract(batch, backbone=FAULTY, cache_policy=1)  # BYPASS: every item costs compute
                    code = "OK"
                except FeatureBankError as e:
                    code = e.code.name
                with lock:
                    outcomes.append((code, time.perf_counter() - t0))

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_after = _rss_mib(server.proc.pid)
        rejected = [dt for code, dt in outcomes if code == "RESOURCE_EXHAUSTED"]
        assert rejected and any(code == "OK" for code, _ in outcomes)
        assert set(code for code, _ in outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}
        assert sorted(rejected)[len(rejected) // 2] < 0.5  # refusals are fast, not queued
        assert rss_after - rss_before < 200, (rss_before, rss_after)
        t0 = time.perf_counter()
        assert bank.extract(images[:8], backbone=FAULTY, cache_policy=1).shape == (8, 16)
        assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("depth", [1, 2])
def test_cancelled_requests_are_not_computed_and_do_not_delay_others(start_server, depth):
    """Queued items of cancelled RPCs never reach a worker; a request behind them is not slowed by them.

    With two batches in flight, one batch (here one item) is already in the worker's pipe when the
    cancellations arrive and is computed anyway; everything still queued is dropped.
    """
    from featurebank.v1 import featurebank_pb2 as pb
    from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

    server = start_server(
        "--backbone",
        FAULTY,
        "--max-batch-size",
        "1",
        "--pipeline-depth",
        str(depth),
        env={"FB_TEST_FORWARD_DELAY_MS": "400"},
    )
    images = random_images(8, seed=90)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.FeatureBankStub(ch)
        busy = stub.Extract.future(pb.ExtractRequest(backbone=FAULTY, inputs=[pb.Input(image=images[0])]), timeout=30)
        wait_until(lambda: server.metric("featurebank_batch_size_count") >= 1, 20, "the first batch to start")
        cancelled = [
            stub.Extract.future(pb.ExtractRequest(backbone=FAULTY, inputs=[pb.Input(image=img)]), timeout=30)
            for img in images[1:6]
        ]
        wait_until(lambda: server.metric("featurebank_queue_depth") >= 5 - (depth - 1), 10, "the items to queue")
        for f in cancelled:
            f.cancel()
        t0 = time.perf_counter()
        last = stub.Extract(pb.ExtractRequest(backbone=FAULTY, inputs=[pb.Input(image=images[7])]), timeout=30)
        waited = time.perf_counter() - t0
        assert busy.result().results[0].HasField("features") and last.results[0].HasField("features")
    ahead = depth - 1  # batches already sent to the worker when the RPCs were cancelled
    wait_until(
        lambda: server.metric("featurebank_dropped_items_total", reason="cancelled") >= 5 - ahead, 10, "drops counted"
    )
    assert server.metric("featurebank_dropped_items_total", reason="cancelled") == 5 - ahead
    assert server.metric("featurebank_batch_size_count") == 2 + ahead  # the busy one, those sent ahead, the last
    assert waited < (2 + ahead) * 0.4 + 0.8  # not behind five more 400 ms batches (>= 2.4 s)
