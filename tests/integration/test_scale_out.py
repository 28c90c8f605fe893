"""Several replicas on one Redis (and on a real 3-node Redis Cluster): each input computed once."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from featurebank.client import FeatureBank
from support import RedisProcess, ServerProcess, free_cluster_port, random_images, wait_until

# Several servers (and a 3-node Redis Cluster) per test: minutes on 2 CPUs.
pytestmark = pytest.mark.slow


@pytest.fixture
def redis_cluster():
    """Three valkey/redis-server processes joined into one cluster covering all 16384 slots."""
    nodes = [
        RedisProcess(
            free_cluster_port(),
            extra_args=(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ),
        )
        for _ in range(3)
    ]
    for n in nodes:
        n.start()
    try:
        first = nodes[0].client()
        for n in nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
        bounds = [0, 5461, 10923, 16384]
        for n, lo, hi in zip(nodes, bounds, bounds[1:]):
            n.client().execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi - 1)

        def cluster_ok():
            return all(n.client().cluster("info").get("cluster_state") == "ok" for n in nodes)

        wait_until(cluster_ok, 30, "the cluster to be ok")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _extract_everywhere(servers, images, clients_per_server=2):
    with concurrent.futures.ThreadPoolExecutor(len(servers) * clients_per_server) as ex:
        futures = []
        for s in servers:
            for _ in range(clients_per_server):

                def call(target=s.target):
                    with FeatureBank(target, timeout_s=120) as bank:
                        return bank.extract(images, backbone="toy")

                futures.append(ex.submit(call))
        return [f.result() for f in futures]


def test_three_replicas_compute_each_input_once(redis_server):
    """The same new inputs sent to three replicas at once are computed once in total (Redis claims)."""
    servers = [
        ServerProcess("--backbone", "toy", "--redis-url", redis_server.url, "--max-batch-delay-ms", "20").spawn()
        for _ in range(3)
    ]
    try:
        for s in servers:
            s.wait_ready()
        images = random_images(24, seed=31)
        results = _extract_everywhere(servers, images)
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])
        computed = sum(s.metric("featurebank_batch_size_sum", backbone="toy") for s in servers)
        assert computed == len(images)
    finally:
        for s in servers:
            assert s.terminate() == 0


def test_killing_a_replica_loses_no_request_with_round_robin(redis_server):
    """A client spread over three replicas (round_robin, retries) loses no request when one is killed."""
    servers = [ServerProcess("--backbone", "toy", "--redis-url", redis_server.url).spawn() for _ in range(3)]
    try:
        for s in servers:
            s.wait_ready()
        target = "ipv4:" + ",".join(s.target for s in servers)
        images = random_images(60, seed=32)
        done = []
        with FeatureBank(target, timeout_s=60) as bank:
            for i, img in enumerate(images):
                if i == 20:
                    servers[1].proc.kill()
                    servers[1].proc.wait()
                done.append(bank.extract([img], backbone="toy").shape)
        assert done == [(1, 16)] * len(images)
        served = [s.metric("featurebank_requests_total", method="Extract", code="OK") for s in (servers[0], servers[2])]
        assert all(n > 0 for n in served)  # both survivors took traffic
    finally:
        for s in (servers[0], servers[2]):
            assert s.terminate() == 0


def test_redis_cluster_backend(redis_cluster):
    """With a 3-node Redis Cluster, multi-key reads split per slot; hits, claims and restarts work."""
    url = f"redis+cluster://127.0.0.1:{redis_cluster[0].port}/0"
    images = random_images(30, seed=33)
    first = ServerProcess("--backbone", "toy", "--redis-url", url).start()
    try:
        with FeatureBank(first.target) as bank:
            computed = bank.extract_items(images, backbone="toy")
            assert not any(o.cache_hit for o in computed)
    finally:
        assert first.terminate() == 0
    keys_per_node = [n.client().dbsize() for n in redis_cluster]
    assert sum(keys_per_node) >= 30 and sum(k > 0 for k in keys_per_node) >= 2  # spread over the nodes
    second = ServerProcess("--backbone", "toy", "--redis-url", url).start()
    try:
        with FeatureBank(second.target) as bank:
            again = bank.extract_items(images, backbone="toy")
        assert all(o.cache_hit for o in again)
        np.testing.assert_array_equal(np.stack([o.features for o in again]), np.stack([o.features for o in computed]))
        assert second.metric("featurebank_cache_errors_total") == 0
    finally:
        assert second.terminate() == 0
