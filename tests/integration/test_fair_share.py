"""Tenants share the batch queue: one tenant's flood never starves another (real server, two tenants)."""

from __future__ import annotations

import concurrent.futures
import json

import grpc

from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from support import random_images, wait_until

FAULTY = "fixture_backbones:FaultyToy"
TOKEN_FLOOD = "tenant-flood-token-0123456789"
TOKEN_OTHER = "tenant-other-token-0123456789"


def _request(images, policy=pb.USE) -> pb.ExtractRequest:
    return pb.ExtractRequest(backbone=FAULTY, inputs=[pb.Input(image=i) for i in images], cache_policy=policy)


def _auth(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_a_flooding_tenant_cannot_starve_another(start_server, tmp_path):
    """A tenant streaming far more than the queue holds gets at most its share of it, throttled
    rather than failed; another tenant's request meanwhile gets features, not RESOURCE_EXHAUSTED;
    a single request larger than the flooder's share is refused for that tenant alone."""
    (tmp_path / "tokens.json").write_text(
        json.dumps({"tenants": {"flood": {"tokens": [TOKEN_FLOOD]}, "other": {"tokens": [TOKEN_OTHER]}}})
    )
    server = start_server(
        "--backbone",
        FAULTY,
        "--tokens-file",
        str(tmp_path / "tokens.json"),
        "--max-batch-size",
        "1",
        "--pipeline-depth",
        "1",
        "--max-queue-size",
        "64",
        "--max-batch-delay-ms",
        "1",
        env={"FB_TEST_FORWARD_DELAY_MS": "100"},
    )
    flood = random_images(160, seed=2001, size=(8, 8))
    mine = random_images(8, seed=2002, size=(8, 8))
    with grpc.insecure_channel(server.target) as ch, concurrent.futures.ThreadPoolExecutor(1) as ex:
        stub = pb_grpc.FeatureBankStub(ch)
        messages = [_request(flood[i : i + 16], pb.BYPASS) for i in range(0, len(flood), 16)]
        stream = stub.ExtractStream(iter(messages), metadata=_auth(TOKEN_FLOOD), timeout=120)
        flooding = ex.submit(list, stream)
        try:
            wait_until(lambda: server.metric("featurebank_queue_depth") >= 30, 30, "the flood to queue")
            answer = stub.Extract(_request(mine), metadata=_auth(TOKEN_OTHER), timeout=60)
            assert all(r.HasField("features") for r in answer.results)
            try:
                stub.Extract(
                    _request(random_images(40, seed=2003, size=(8, 8))), metadata=_auth(TOKEN_FLOOD), timeout=60
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code, message = e.code(), e.details()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "share of the queue" in message
            answers = flooding.result(timeout=120)
        finally:
            stream.cancel()
    assert sum(len(a.results) for a in answers) == len(flood)
    assert all(r.HasField("features") for a in answers for r in a.results)  # throttled, never failed
    assert server.metric("featurebank_tenant_limited_total", tenant="other") == 0
    assert server.metric("featurebank_tenant_limited_total", tenant="flood", limit="queue_share") >= 1
