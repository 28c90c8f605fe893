"""--frontends 2: two gRPC frontend processes on one port in front of one engine process (real processes)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from support import ServerProcess, random_images, wait_until

pytestmark = pytest.mark.slow


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.FeatureBankStub]:
    """A channel with a connection of its own (not shared through gRPC's global subchannel pool),
    so the kernel's SO_REUSEPORT hash may send it to either frontend."""
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, pb_grpc.FeatureBankStub(channel)


def _extract(target: str, image: bytes, timeout_s: float = 60) -> pb.ExtractResponse:
    channel, stub = _stub(target)
    with channel:
        return stub.Extract(pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=image)]), timeout=timeout_s)


def _per_pid(server: ServerProcess, name: str) -> dict[str, float]:
    """{pid label: value} of a multiprocess_mode="all" gauge."""
    return {dict(labels)["pid"]: v for (n, labels), v in server.scrape().items() if n == name}


def _ports(server: ServerProcess) -> dict:
    return json.loads(server.port_file.read_text())


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def server(shared_redis):
    """Two frontends and an engine on the module's Redis; a queued item waits up to 1 s for its batch,
    so concurrent requests overlap. Must exit 0."""
    s = ServerProcess(
        "--backbone", "toy", "--redis-url", shared_redis.url, "--frontends", "2", "--max-batch-delay-ms", "1000"
    ).start()
    yield s
    assert s.terminate() == 0, s.log(3000)


def test_hits_are_answered_by_both_frontends(server):
    """Hits through fresh connections are answered by two frontend processes (two pids in the scrape)."""
    image = random_images(1, seed=11)[0]
    assert not _extract(server.target, image).results[0].cache_hit
    pids = _ports(server)["frontend_pids"]
    assert len(set(pids)) == 2

    def both_answered() -> bool:
        for _ in range(8):
            assert _extract(server.target, image).results[0].cache_hit
        answered = {pid for pid, n in _per_pid(server, "featurebank_frontend_requests").items() if n > 0}
        return answered >= {str(p) for p in pids}

    wait_until(both_answered, 60, "hits answered by both frontends")


def test_metrics_endpoint_sums_every_frontend(server):
    """featurebank_requests_total on the one scrape endpoint counts the RPCs of every frontend."""
    image = random_images(1, seed=12)[0]
    _extract(server.target, image)
    before = server.metric("featurebank_requests_total", method="Extract")
    for _ in range(20):
        _extract(server.target, image)
    assert server.metric("featurebank_requests_total", method="Extract") == before + 20
    wait_until(
        lambda: (
            sum(_per_pid(server, "featurebank_frontend_requests").values())
            >= server.metric("featurebank_requests_total")
        ),
        30,
        "every frontend's sampled count",
    )


def test_one_input_asked_through_both_frontends_is_computed_once(server):
    """One new input requested concurrently through both frontends reaches a worker once (one item in one batch)."""
    image = random_images(1, seed=13)[0]
    items_before = server.metric("featurebank_batch_size_sum", backbone="toy")
    per_pid_before = _per_pid(server, "featurebank_frontend_requests")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: _extract(server.target, image), range(12)))
    assert {r.results[0].key for r in responses} == {responses[0].results[0].key}
    assert all(r.results[0].features.data == responses[0].results[0].features.data for r in responses)
    assert server.metric("featurebank_batch_size_sum", backbone="toy") == items_before + 1
    pids = {str(p) for p in _ports(server)["frontend_pids"]}
    wait_until(
        lambda: (
            {
                pid
                for pid, n in _per_pid(server, "featurebank_frontend_requests").items()
                if n > per_pid_before.get(pid, 0)
            }
            == pids
        ),
        30,
        "both frontends to have answered some of the 12 requests",
    )


def test_cancelled_extract_leaves_the_engine_clean(server):
    """A client cancelling an Extract whose miss is queued: the engine drops the item uncomputed and serves it afresh after."""
    image = random_images(1, seed=14)[0]
    batches_before = server.metric("featurebank_batch_size_count", backbone="toy")
    dropped_before = server.metric("featurebank_dropped_items_total", backbone="toy", reason="cancelled")
    channel, stub = _stub(server.target)
    with channel:
        call = stub.Extract.future(pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=image)]))
        wait_until(lambda: server.metric("featurebank_queue_depth", backbone="toy") >= 1, 10, "the item queued")
        assert call.cancel()
    wait_until(
        lambda: (
            server.metric("featurebank_dropped_items_total", backbone="toy", reason="cancelled") == dropped_before + 1
        ),
        30,
        "the engine to drop the cancelled item",
    )
    assert server.metric("featurebank_batch_size_count", backbone="toy") == batches_before
    assert server.metric("featurebank_queue_depth", backbone="toy") == 0
    response = _extract(server.target, image)  # a new flight: nothing of the old one is left to join
    assert not response.results[0].cache_hit and not response.results[0].HasField("error")
    assert server.metric("featurebank_batch_size_count", backbone="toy") == batches_before + 1


def test_killed_frontend_is_restarted_and_sigterm_leaves_no_process(start_server, redis_server):
    """A frontend killed by PID is restarted and the pod keeps serving; SIGTERM then exits 0 with every child gone."""
    s = start_server("--backbone", "toy", "--redis-url", redis_server.url, "--frontends", "2")
    image = random_images(1, seed=15)[0]
    _extract(s.target, image)
    ports = _ports(s)
    victim, survivor = ports["frontend_pids"]
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):  # the survivor answers meanwhile (a connection to the dead one fails fast)
        try:
            assert _extract(s.target, image, timeout_s=10).results[0].cache_hit
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(
        lambda: _ports(s)["frontend_pids"][0] not in (victim, None) and s.health() == "SERVING",
        60,
        "the killed frontend restarted",
    )
    restarted = _ports(s)["frontend_pids"]
    assert restarted[1] == survivor and _alive(restarted[0])
    assert f"frontend-0 (pid {victim}) died (exit -9 (SIGKILL" in s.log()
    assert _extract(s.target, image).results[0].cache_hit
    everyone = s.pids()
    assert len(everyone) >= 5  # supervisor, engine, two frontends, a worker
    assert s.terminate() == 0
    assert s.log().rstrip().endswith("featurebank stopped"), s.log(2000)
    wait_until(lambda: not any(_alive(p) for p in everyone), 30, "every process of the pod gone")


def test_sigterm_finishes_an_in_flight_miss(start_server, redis_server):
    """SIGTERM while a miss waits in the engine: the frontend finishes that RPC (features), then the pod exits 0."""
    s = start_server(
        "--backbone", "toy", "--redis-url", redis_server.url, "--frontends", "2", "--max-batch-delay-ms", "3000"
    )
    channel, stub = _stub(s.target)
    with channel:
        call = stub.Extract.future(
            pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=random_images(1, seed=17)[0])]), timeout=60
        )
        wait_until(lambda: s.metric("featurebank_queue_depth", backbone="toy") >= 1, 10, "the item queued")
        s.proc.send_signal(signal.SIGTERM)
        response = call.result()
    assert not response.results[0].HasField("error") and len(response.results[0].features.data) > 0
    assert s.proc.wait(60) == 0
    assert s.log().rstrip().endswith("featurebank stopped"), s.log(2000)


def test_engine_failing_to_start_stops_the_pod(redis_server):
    """A backbone that cannot load: the engine exits during start-up, and the pod exits 1 instead of restarting it."""
    s = ServerProcess("--backbone", "no_such_backbone", "--redis-url", redis_server.url, "--frontends", "2").spawn()
    try:
        assert s.proc.wait(120) == 1
    finally:
        s.terminate()
    assert "engine (pid" in s.log() and "exited during start-up" in s.log(), s.log(3000)


def test_frontends_mistakes_are_one_line():
    """--frontends 2 with --cache memory (unshareable) exits 2, and on a port in use exits 1, each in one stderr line naming the flag."""
    serve = [sys.executable, "-m", "featurebank.server", "--backbone", "toy", "--metrics-port", "-1"]
    r = subprocess.run([*serve, "--frontends", "2", "--cache", "memory"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--cache memory" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [
                *serve,
                "--frontends",
                "2",
                "--redis-url",
                "redis://127.0.0.1:1",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 1 and f"gRPC port {port} on 127.0.0.1 is already in use" in r.stderr, r.stderr
    assert "--port" in r.stderr.strip().splitlines()[-1]


def test_pod_survives_a_killed_engine(start_server, redis_server):
    """A killed engine takes the frontends to NOT_SERVING, is restarted, and misses are computed again."""
    s = start_server("--backbone", "toy", "--redis-url", redis_server.url, "--frontends", "2")
    engine = _ports(s)["engine_pid"]
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: s.health() == "NOT_SERVING", 30, "NOT_SERVING without the engine")
    wait_until(lambda: _ports(s)["engine_pid"] != engine and s.health() == "SERVING", 120, "the engine back")
    assert f"the engine (pid {engine}) died (exit -9 (SIGKILL" in s.log()
    response = _extract(s.target, random_images(1, seed=16)[0])
    assert not response.results[0].cache_hit and not response.results[0].HasField("error")


def test_frontends_share_the_pods_embedded_cache_and_it_stops_with_the_pod(start_server, tmp_path):
    """With the default embedded cache, --frontends 2 starts one valkey for the pod: what the engine wrote is a hit in
    every frontend, the features survive a restart of the pod, and SIGTERM leaves no valkey behind."""
    data_dir = tmp_path / "data"
    env = {"FEATUREBANK_DATA_DIR": str(data_dir)}
    images = random_images(6, seed=23)
    s = start_server("--backbone", "toy", "--frontends", "2", env=env)
    first = [_extract(s.target, im) for im in images]
    assert not any(r.results[0].cache_hit for r in first)
    again = [_extract(s.target, im) for im in images]  # new connections: both frontends, by the kernel's hash
    assert all(r.results[0].cache_hit for r in again)
    valkey_pid = int((data_dir / "valkey.pid").read_text())
    assert _alive(valkey_pid)
    assert s.terminate() == 0
    wait_until(lambda: not _alive(valkey_pid), 30, "the pod's valkey to stop")
    s2 = start_server("--backbone", "toy", "--frontends", "2", env=env)
    after = [_extract(s2.target, im) for im in images]
    assert all(r.results[0].cache_hit for r in after)
    assert [r.results[0].features.data for r in after] == [r.results[0].features.data for r in first]


def test_a_tenants_limits_hold_for_the_pod_not_for_each_frontend(start_server, redis_server, tmp_path):
    """A tenant allowed a burst of 4 requests (and next to no refill) gets 4 answered by the pod,
    through connections spread over both frontends, not 4 by each; the rest are RESOURCE_EXHAUSTED."""
    token = "pod-tenant-token-0123456789"
    (tmp_path / "tokens.json").write_text(
        json.dumps({"tenants": {"t": {"tokens": [token], "requests_per_s": 0.001, "burst": 4}}})
    )
    s = start_server(
        "--backbone",
        "toy",
        "--redis-url",
        redis_server.url,
        "--frontends",
        "2",
        "--tokens-file",
        str(tmp_path / "tokens.json"),
    )
    codes = []
    for _ in range(24):  # each on a connection of its own: 24 draws of the kernel's SO_REUSEPORT hash
        channel, stub = _stub(s.target)
        with channel:
            try:
                stub.Lookup(
                    pb.LookupRequest(backbone="toy", keys=["0" * 32]),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
    assert codes.count("OK") == 4 and codes.count("RESOURCE_EXHAUSTED") == 20, codes
    pids = {str(p) for p in _ports(s)["frontend_pids"]}
    wait_until(
        lambda: {pid for pid, n in _per_pid(s, "featurebank_frontend_requests").items() if n > 0} >= pids,
        30,
        "both frontends to have answered some of them",
    )
