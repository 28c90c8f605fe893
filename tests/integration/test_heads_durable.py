"""Heads are durable: a cache Redis evicting under pressure never takes a head with it (two real Redis processes)."""

from __future__ import annotations

import pytest
from head_protos import Stub, dense_head

from featurebank.v1 import featurebank_pb2 as pb
from support import RedisProcess, random_images


@pytest.fixture
def lru_cache_redis():
    """A cache Redis like deploy/'s (allkeys-lru), with maxmemory set just above what it holds empty."""
    r = RedisProcess(extra_args=("--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "10")).start()
    client = r.client()
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 384 * 1024)
    yield r
    r.stop()


@pytest.fixture
def heads_redis():
    """A heads Redis like deploy/'s heads-redis: noeviction, append-only file."""
    r = RedisProcess(extra_args=("--maxmemory-policy", "noeviction", "--appendonly", "yes")).start()
    yield r
    r.stop()


def test_heads_survive_a_cache_filled_past_maxmemory(start_server, lru_cache_redis, heads_redis):
    """With --heads-redis-url, extracts filling the allkeys-lru cache Redis past maxmemory evict cache entries and heads kept the
    old way (no-TTL hashes in the cache Redis), but every head in the heads Redis is intact and still predicts."""
    cache = lru_cache_redis.client()
    server = start_server(
        "--backbone",
        "toy",
        "--redis-url",
        lru_cache_redis.url,
        "--heads-redis-url",
        heads_redis.url,
        "--max-batch-delay-ms",
        "1",
    )
    stub = Stub(server.target)
    try:
        fingerprint = stub.fingerprint()
        for i in range(5):
            assert stub.PutHead(pb.PutHeadRequest(head=dense_head(f"kept-{i}", fingerprint, seed=i))).version == 1
        old_layout = [f"fbheads:old-{i}" for i in range(5)]  # where the old default put heads: the cache Redis
        for i, key in enumerate(old_layout):
            cache.hset(key, "1", dense_head(f"old-{i}", fingerprint, seed=i).SerializeToString())

        for batch in range(200):  # extracts until the cache has evicted several times what it held
            images = random_images(64, seed=10_000 + batch, size=(8, 8))
            stub.Extract(pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=i) for i in images]))
            stats = cache.info("stats")
            if stats["evicted_keys"] > 3_000 and not any(cache.exists(k) for k in old_layout):
                break
        assert cache.info("stats")["evicted_keys"] > 3_000, "the cache never filled past maxmemory"
        assert not any(cache.exists(k) for k in old_layout), "heads kept the old way survived: the fill proved nothing"

        listed = {(h.name, h.version) for h in stub.ListHeads(pb.ListHeadsRequest()).heads}
        assert listed == {(f"kept-{i}", 1) for i in range(5)}
        image = [pb.Input(image=random_images(1, seed=5)[0])]
        for i in range(5):
            assert (
                len(stub.Predict(pb.PredictRequest(head=f"kept-{i}", inputs=image)).predictions[0].probabilities.data)
                == 8
            )
        assert heads_redis.client().info("stats")["evicted_keys"] == 0
    finally:
        stub.close()


def test_a_heads_redis_that_evicts_is_refused_at_start(start_server, lru_cache_redis):
    """Heads that would live in an allkeys-* Redis (the cache's, as --redis-url alone used to put them) stop the server at
    start-up with an error naming --heads-redis-url and the policy."""
    for args in (("--redis-url", lru_cache_redis.url), ("--heads-redis-url", lru_cache_redis.url)):
        server = start_server("--backbone", "toy", *args, wait=False)
        assert server.proc.wait(120) != 0
        log = server.log()
        assert "--heads-redis-url" in log and "maxmemory-policy allkeys-lru" in log, log[-2000:]


def test_a_heads_redis_refusing_config_is_used_with_a_warning(start_server, tmp_path):
    """A heads Redis whose ACL refuses CONFIG (as managed Redis often does) is used; the log says what to check by hand."""
    limited = RedisProcess(
        extra_args=("--user", "limited", "on", ">secret-password", "~*", "&*", "+@all", "-config")
    ).start()
    try:
        url = f"redis://limited:secret-password@127.0.0.1:{limited.port}/0"
        server = start_server("--backbone", "toy", "--heads-redis-url", url)
        assert "refuses CONFIG GET" in server.log() and "secret-password" not in server.log()
        stub = Stub(server.target)
        try:
            assert stub.PutHead(pb.PutHeadRequest(head=dense_head("h", stub.fingerprint()))).version == 1
            assert [h.name for h in stub.ListHeads(pb.ListHeadsRequest()).heads] == ["h"]
        finally:
            stub.close()
    finally:
        limited.stop()
