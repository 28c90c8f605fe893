"""Single-flight survives its callers: an input abandoned mid-way is answered promptly next time (real Redis)."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from support import random_images, wait_until

FAULTY = "fixture_backbones:FaultyToy"
GENEROUS_S = 8.0  # a deadline far above what the answer takes, far below the 30 s claims of old


def _request(images, backbone="toy", policy=pb.USE) -> pb.ExtractRequest:
    return pb.ExtractRequest(backbone=backbone, inputs=[pb.Input(image=i) for i in images], cache_policy=policy)


def _code(call) -> str:
    try:
        call.result()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def _paused_clients(redis_server) -> int:
    """Clients whose commands wait out a CLIENT PAUSE (a claim in flight shows up here)."""
    return int(redis_server.client().info("clients").get("blocked_clients", 0))


def _wait_pause_over(redis_server) -> None:
    wait_until(lambda: redis_server.client().set("fb-test-probe", 1), 30, "the pause to end")


def test_request_abandoned_while_redis_pauses_writes_does_not_block_the_next(redis_server, start_server):
    """An input whose request gave up (100 ms) while Redis paused writes is answered to the next
    requests for it with a generous deadline, during and after the pause."""
    server = start_server("--backbone", "toy", "--redis-url", redis_server.url)
    img = random_images(1, seed=1001)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.FeatureBankStub(ch)
        redis_server.client().execute_command("CLIENT", "PAUSE", 2000, "WRITE")
        with pytest.raises(grpc.RpcError) as first:
            stub.Extract(_request(img), timeout=0.1)
        assert first.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        during = stub.Extract(_request(img), timeout=GENEROUS_S)
        assert during.results[0].HasField("features")
        _wait_pause_over(redis_server)
        after = stub.Extract(_request(img), timeout=GENEROUS_S)
        assert after.results[0].HasField("features")


def test_deadline_during_the_claim_never_hangs_a_stream_without_deadline(redis_server, start_server):
    """A request whose deadline passes while its claim waits on Redis leaves nothing behind: a
    stream without a deadline asking for the same input gets its features."""
    server = start_server("--backbone", "toy", "--redis-url", redis_server.url, "--redis-timeout-ms", "5000")
    img = random_images(1, seed=1002)
    with grpc.insecure_channel(server.target) as ch, concurrent.futures.ThreadPoolExecutor(1) as ex:
        stub = pb_grpc.FeatureBankStub(ch)
        redis_server.client().execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        with pytest.raises(grpc.RpcError) as first:
            stub.Extract(_request(img), timeout=0.3)  # its claim is held up by the pause
        assert first.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = stub.ExtractStream(iter([_request(img)]))  # no deadline
        try:
            answers = ex.submit(list, stream).result(timeout=30)
        finally:
            stream.cancel()
        assert len(answers) == 1 and answers[0].results[0].HasField("features")


def test_items_keep_their_room_while_claiming_and_none_is_stuck(redis_server, start_server):
    """A request admitted while its claim is in flight keeps its room in the queue: a later request that does not
    fit is refused RESOURCE_EXHAUSTED at once, the first is answered, and the next request for the same inputs is
    answered promptly (before holding room: the first was refused partway through, and before that its unqueued
    inputs were stuck)."""
    server = start_server(
        "--backbone",
        FAULTY,
        "--redis-url",
        redis_server.url,
        "--redis-timeout-ms",
        "10000",
        "--max-batch-size",
        "1",
        "--max-queue-size",
        "8",
        "--max-batch-delay-ms",
        "1",
        env={"FB_TEST_FORWARD_DELAY_MS": "200"},
    )
    first, other = random_images(6, seed=1003), random_images(6, seed=1004)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.FeatureBankStub(ch)
        redis_server.client().execute_command("CLIENT", "PAUSE", 20000, "WRITE")
        try:
            held = stub.Extract.future(_request(first, FAULTY), timeout=60)  # fits now; waits in its claim
            wait_until(lambda: _paused_clients(redis_server) >= 1, 10, "the claim to wait on the pause")
            filler = stub.Extract.future(_request(other, FAULTY, pb.BYPASS), timeout=60)  # 6 more: only 2 places left
            assert _code(filler) == "RESOURCE_EXHAUSTED"  # refused while the claim is still paused
        finally:
            redis_server.client().execute_command("CLIENT", "UNPAUSE")
        assert _code(held) == "OK"
        again = stub.Extract(_request(first, FAULTY), timeout=GENEROUS_S)
        assert all(r.HasField("features") for r in again.results)


def test_cancelled_leader_still_writes_and_releases(redis_server, start_server):
    """The request that started a computation is cancelled while a second one waits on it: the
    second gets the features, the cache is written and the claim released, so a third request
    is a prompt cache hit."""
    server = start_server(
        "--backbone",
        FAULTY,
        "--redis-url",
        redis_server.url,
        "--max-batch-size",
        "1",
        "--pipeline-depth",
        "1",
        # Long enough that the leader (hashed, claimed, preprocessed) queues behind it on a loaded machine.
        env={"FB_TEST_FORWARD_DELAY_MS": "1500"},
    )
    busy_img, img = random_images(2, seed=1005)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.FeatureBankStub(ch)
        busy = stub.Extract.future(_request([busy_img], FAULTY, pb.BYPASS), timeout=60)
        wait_until(lambda: server.metric("featurebank_batch_size_count") >= 1, 20, "the worker to be busy")
        leader = stub.Extract.future(_request([img], FAULTY), timeout=60)
        wait_until(lambda: server.metric("featurebank_queue_depth") >= 1, 10, "the leader's item to queue")
        joiner = stub.Extract.future(_request([img], FAULTY), timeout=60)
        wait_until(lambda: server.metric("featurebank_singleflight_joins_total") >= 1, 10, "the second to join")
        leader.cancel()
        assert joiner.result().results[0].HasField("features")
        assert busy.result().results[0].HasField("features")
        third = stub.Extract(_request([img], FAULTY), timeout=GENEROUS_S)
        assert third.results[0].HasField("features") and third.results[0].cache_hit
    assert not redis_server.client().keys("fb1claim:*")  # every claim given back


def test_claims_are_leases_with_an_owner_token(redis_server):
    """A claim is given back only by its own token (compare-and-delete) and extended by it; it is
    taken over from an abandoned owner of the same process, never from another process, and not
    taken at all when the value is already cached."""
    import asyncio

    from featurebank.common.cache import CLAIM_CACHED, CLAIM_HELD, CLAIM_TAKEN, RedisCache, claim_key
    from featurebank.common.metrics import Metrics

    client = redis_server.client()

    async def main():
        here, there = (RedisCache(redis_server.url, ttl_seconds=60, timeout_s=2, metrics=Metrics()) for _ in range(2))
        first, second, other = here.claim_token(), here.claim_token(), there.claim_token()
        try:
            assert await here.claim_many(["k"], 1000, [first]) == [CLAIM_TAKEN]
            assert await there.claim_many(["k"], 1000, [other]) == [CLAIM_HELD]
            await there.release_many(["k"], [other])  # not its claim: nothing happens
            assert client.get(claim_key("k")) == first.encode()
            assert await here.claim_many(["k"], 60_000, [first]) == [CLAIM_TAKEN]  # extended
            assert client.pttl(claim_key("k")) > 30_000
            assert await here.claim_many(["k"], 1000, [second]) == [CLAIM_TAKEN]  # the first owner was abandoned
            await here.release_many(["k"], [first])
            assert client.get(claim_key("k")) == second.encode()
            await here.release_many(["k"], [second])
            assert client.get(claim_key("k")) is None
            await here.set_many([("k", b"features")])
            assert await there.claim_many(["k"], 1000, [other]) == [CLAIM_CACHED]
            assert client.get(claim_key("k")) is None
        finally:
            await here.close()
            await there.close()

    asyncio.run(main())


def test_claim_is_renewed_while_the_input_waits_in_the_queue(redis_server):
    """An input queued on one replica for longer than the claim TTL keeps its claim: a second
    replica asking for it meanwhile waits and reads it from the cache instead of computing it."""
    from support import ServerProcess

    args = (
        "--backbone",
        FAULTY,
        "--redis-url",
        redis_server.url,
        "--claim-ttl-ms",
        "1000",
        "--max-batch-size",
        "1",
        "--pipeline-depth",
        "1",
    )
    env = {"FB_TEST_FORWARD_DELAY_MS": "1500"}
    first, second = ServerProcess(*args, env=env).spawn(), ServerProcess(*args, env=env).spawn()
    try:
        for s in (first, second):
            s.wait_ready()
        busy_img, img = random_images(2, seed=1006)
        with grpc.insecure_channel(first.target) as ch1, grpc.insecure_channel(second.target) as ch2:
            one, two = pb_grpc.FeatureBankStub(ch1), pb_grpc.FeatureBankStub(ch2)
            busy = one.Extract.future(_request([busy_img], FAULTY, pb.BYPASS), timeout=60)
            wait_until(lambda: first.metric("featurebank_batch_size_count") >= 1, 20, "the worker to be busy")
            computing = one.Extract.future(_request([img], FAULTY), timeout=60)
            wait_until(lambda: first.metric("featurebank_queue_depth") >= 1, 10, "the input to queue behind it")
            elsewhere = two.Extract(_request([img], FAULTY), timeout=60)  # asked while queued, past the 1 s TTL
            assert elsewhere.results[0].HasField("features") and elsewhere.results[0].cache_hit
            assert computing.result().results[0].HasField("features") and busy.result()
        assert second.metric("featurebank_batch_size_count") == 0  # the second replica computed nothing
    finally:
        for s in (first, second):
            assert s.terminate() == 0
