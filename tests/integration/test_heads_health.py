"""Nothing slow runs on the event loop: health answers while a big head predicts; oversized heads are refused at PutHead."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from head_protos import Stub, dense_head

from featurebank.v1 import featurebank_pb2 as pb
from support import ServerProcess, random_images

# Two wide GELU layers: ~2.2 M parameters, 8,448 erf evaluations per input (35 M for 4,096 inputs).
WIDE = (16, 4096, 256, 4096, 2)
WIDE_PARAMETERS = sum(a * b + b for a, b in zip(WIDE, WIDE[1:]))
# What a health check may take: under the kubelet's readiness timeout in deploy/ (3 s).
HEALTH_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(
        "--backbone",
        "toy",
        "--max-head-parameters",
        str(WIDE_PARAMETERS),
        "--max-head-width",
        "4096",
        "--max-message-bytes",
        str(64 * 1024 * 1024),  # the head and 4,096 images in one call
        "--heads-dir",
        str(tmp_path_factory.mktemp("heads")),
    ).start()
    yield s
    assert s.terminate() == 0


def test_health_answers_while_a_large_predict_runs(server):
    """While a big-but-allowed GELU head runs on 4,096 inputs, grpc.health.v1 Check answers SERVING within its deadline,
    several times between the Predict's start and its answer."""
    stub = Stub(server.target, timeout_s=600)
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        assert (
            stub.PutHead(
                pb.PutHeadRequest(
                    head=dense_head(
                        "wide", stub.fingerprint(), widths=WIDE, activations=("gelu", "linear", "gelu", "softmax")
                    )
                )
            ).version
            == 1
        )
        image = pb.Input(image=random_images(1, seed=40)[0])
        stub.Predict(pb.PredictRequest(head="wide", inputs=[image]))  # compiles the head, caches the features

        started, done = threading.Event(), threading.Event()
        answers: list[tuple[bool, bool, str]] = []  # (sent while Predict ran, answered after it ended, status)

        def poll() -> None:
            while not done.is_set():
                during = started.is_set()
                try:
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                        health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S).status
                    )
                except grpc.RpcError as e:
                    status = e.code().name
                answers.append((during, done.is_set(), status))

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            while not answers:  # the poller is answered before the Predict starts
                threading.Event().wait(0.01)
            started.set()
            response = stub.Predict(pb.PredictRequest(head="wide", inputs=[image] * 4096))
        finally:
            done.set()
            poller.join()
        assert len(response.predictions) == 4096 and all(len(p.probabilities.data) == 8 for p in response.predictions)
        assert [a for a in answers if a[2] != "SERVING"] == [], "a health check failed during the Predict"
        during = [a for a in answers if a[0] and not a[1]]
        assert len(during) >= 3, f"only {len(during)} health answers while the Predict ran"
    finally:
        channel.close()
        stub.close()


def test_heads_over_the_limits_are_refused_at_put(server):
    """PutHead of a head one unit wider than --max-head-width, or one over --max-head-parameters, is INVALID_ARGUMENT naming the flag; nothing is stored."""
    stub = Stub(server.target)
    try:
        fingerprint = stub.fingerprint()
        for head, flag in (
            (dense_head("too-wide", fingerprint, widths=(16, 4097, 2)), "--max-head-width"),
            (dense_head("too-big", fingerprint, widths=(16, 4096, 256, 4096, 3)), "--max-head-parameters"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.PutHead(pb.PutHeadRequest(head=head))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and flag in e.value.details()
            assert list(stub.ListHeads(pb.ListHeadsRequest(name=head.name)).heads) == []
    finally:
        stub.close()
