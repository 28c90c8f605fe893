"""Admission before work: callers are authenticated from metadata before their message is read, and what is read is bounded."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import pathlib

import grpc
import pytest

from featurebank.client import FeatureBank, FeatureBankError
from featurebank.client.sdk import channel_options
from featurebank.v1 import featurebank_pb2 as pb
from support import TESTS_DIR, ServerProcess, random_images, wait_until

logger = logging.getLogger(__name__)

TOKEN = "admission-token-0123456789"
EXTRACT = "/featurebank.v1.FeatureBank/Extract"
EXTRACT_STREAM = "/featurebank.v1.FeatureBank/ExtractStream"
BIG_BYTES = 50 * 1024 * 1024
# Lets a test send what the SDK never would.
BIG_CHANNEL = [("grpc.max_send_message_length", 2 * BIG_BYTES), ("grpc.max_receive_message_length", 2 * BIG_BYTES)]

# A toy backbone whose forward passes (after warm-up) wait until the gate file exists: RPCs stay
# in flight exactly as long as a test needs, with no timing involved.
GATED_BACKBONE = """
import os, time
from featurebank.workers.backbones.toy import ToyBackbone


class GatedToy(ToyBackbone):
    gated = False  # warm-up runs ungated

    def warmup(self):
        super().warmup()
        self.gated = True

    def forward(self, batch):
        deadline = time.monotonic() + 120
        while self.gated and not os.path.exists(os.environ["FB_TEST_GATE"]):
            if time.monotonic() > deadline:
                raise RuntimeError("gate never opened")
            time.sleep(0.01)
        return super().forward(batch)
"""


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since the last reset) of a process, in KiB."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux: write 5 to clear_refs)."""
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def tokens_server(tmp_path_factory):
    """A toy-backbone server requiring bearer tokens, with the default receive limit."""
    d = tmp_path_factory.mktemp("admission")
    (d / "tokens.json").write_text(json.dumps({"tenants": {"a": {"tokens": [TOKEN]}}}))
    s = ServerProcess("--backbone", "toy", "--tokens-file", str(d / "tokens.json")).start()
    yield s
    assert s.terminate() == 0


def _big_extract(size: int) -> bytes:
    return pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=b"\0" * size)]).SerializeToString()


def test_unauthenticated_messages_are_refused_unread(tokens_server):
    """Six concurrent 50 MB messages without a valid token (unary and streaming) all get UNAUTHENTICATED while the server's peak RSS grows by less than one of them; then it serves."""
    request = _big_extract(BIG_BYTES)
    pid = tokens_server.proc.pid
    calls = [
        (EXTRACT, ()),
        (EXTRACT, (("authorization", "Bearer not-a-token-of-anyone"),)),
        (EXTRACT, (("authorization", "Basic xyz"),)),
        (EXTRACT, ()),
        (EXTRACT_STREAM, ()),
        (EXTRACT_STREAM, (("authorization", "Bearer not-a-token-of-anyone"),)),
    ]
    with grpc.insecure_channel(tokens_server.target, options=BIG_CHANNEL) as channel:

        def call(method_and_metadata):
            method, metadata = method_and_metadata
            try:
                if method == EXTRACT:
                    channel.unary_unary(method)(request, metadata=metadata, timeout=120)
                else:
                    list(channel.stream_stream(method)(iter([request]), metadata=metadata, timeout=120))
            except grpc.RpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

        reset_peak(pid)
        before = memory_kib(pid)["VmRSS"]
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(call, calls))
        growth_bytes = (memory_kib(pid)["VmHWM"] - before) * 1024
    logger.info(
        "server peak RSS growth for %d unauthenticated 50 MB messages: %.1f MiB", len(calls), growth_bytes / 2**20
    )
    assert [code for code, _ in answers] == [grpc.StatusCode.UNAUTHENTICATED] * len(calls), answers
    assert any("bearer token" in details for _, details in answers)
    assert growth_bytes < BIG_BYTES, (
        f"peak RSS grew by {growth_bytes / 2**20:.0f} MiB for {len(calls)} unread 50 MB messages"
    )
    with FeatureBank(tokens_server.target, token=TOKEN, timeout_s=60) as bank:
        assert bank.extract(random_images(1, seed=501), backbone="toy").shape == (1, 16)
    assert tokens_server.metric("featurebank_requests_total", code="UNAUTHENTICATED") >= len(calls)


def test_a_message_over_the_receive_limit_is_resource_exhausted(tokens_server):
    """By default a request over 4 MiB gets RESOURCE_EXHAUSTED naming both sizes, and the SDK's split requests (under 3 MiB each) pass."""
    with grpc.insecure_channel(tokens_server.target, options=BIG_CHANNEL) as channel, pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(EXTRACT)(
            _big_extract(5 * 1024 * 1024), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60
        )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.details() and str(4 * 1024 * 1024) in e.value.details(), e.value.details()
    # ~1.1 MB of noise each: 6 MB in all, sent by the SDK as several requests under the limit.
    images = random_images(6, seed=502, size=(600, 600))
    assert sum(map(len, images)) > 4 * 1024 * 1024
    with FeatureBank(tokens_server.target, token=TOKEN, timeout_s=120) as bank:
        assert bank.extract(images, backbone="toy").shape == (6, 16)


@pytest.fixture
def gated_server(tmp_path):
    """A gated toy backbone with at most 2 RPCs at once, 1 per connection, and a plaintext health port."""
    (tmp_path / "tests_gated_toy.py").write_text(GATED_BACKBONE)
    (tmp_path / "tokens.json").write_text(
        json.dumps({"tenants": {"a": {"tokens": [TOKEN], "max_inflight_items": 1000}}})
    )
    gate = tmp_path / "gate"
    s = ServerProcess(
        "--backbone",
        "tests_gated_toy:GatedToy",
        "--tokens-file",
        str(tmp_path / "tokens.json"),
        "--max-concurrent-rpcs",
        "2",
        "--max-concurrent-streams",
        "1",
        "--health-port",
        "0",
        "--max-batch-delay-ms",
        "0",
        env={"PYTHONPATH": f"{tmp_path}:{TESTS_DIR}", "FB_TEST_GATE": str(gate)},
    )
    s.gate = gate
    try:
        yield s.start()
    finally:
        gate.touch()
        s.terminate()


def _health(target: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name


def test_concurrency_is_bounded_per_server_and_per_connection(gated_server):
    """With --max-concurrent-rpcs 2 a third RPC gets RESOURCE_EXHAUSTED; with --max-concurrent-streams 1 a second call on one
    connection waits in the client instead (and then succeeds); the health port answers SERVING throughout."""
    s = gated_server
    health_target = f"127.0.0.1:{json.loads(pathlib.Path(s.port_file).read_text())['health_port']}"
    images = random_images(4, seed=503)
    inflight = lambda: s.metric("featurebank_tenant_inflight_items", tenant="a")  # noqa: E731
    # Three client connections: channels with equal arguments would share one (gRPC's global subchannel pool).
    a, b, c = (
        FeatureBank(
            s.target,
            token=TOKEN,
            timeout_s=120,
            channel=grpc.insecure_channel(
                s.target, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
            ),
        )
        for _ in range(3)
    )
    with a, b, c, concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(a.extract, images[:1], backbone="tests_gated_toy:GatedToy", cache_policy=pb.BYPASS)
        wait_until(lambda: inflight() == 1, 30, "the first call in flight")
        queued = pool.submit(a.extract, images[1:2], backbone="tests_gated_toy:GatedToy", cache_policy=pb.BYPASS)
        other = pool.submit(b.extract, images[2:3], backbone="tests_gated_toy:GatedToy", cache_policy=pb.BYPASS)
        # Had the second call on connection a reached the server, the third would be over the RPC limit.
        wait_until(lambda: inflight() == 2, 30, "the call on connection b in flight")
        with pytest.raises(FeatureBankError) as over:
            c.backbones()  # a third connection: the stream limit does not hold it back, the RPC limit refuses it
        assert over.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, over.value
        assert _health(health_target) == "SERVING"
        assert not queued.done()
        s.gate.touch()
        for f in (first, queued, other):
            assert f.result(timeout=120).shape == (1, 16)
        assert c.extract(images[3:], backbone="tests_gated_toy:GatedToy").shape == (1, 16)


@pytest.mark.slow
def test_text_over_max_text_bytes_fails_alone_and_a_50_mb_text_is_refused(start_server):
    """A text over --max-text-bytes (counted in UTF-8 bytes) gets its own INVALID_ARGUMENT while its neighbours are embedded;
    a 50 MB text is refused as a request with RESOURCE_EXHAUSTED, by the SDK too; the server keeps serving."""
    from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

    s = start_server("--backbone", "minilm", "--no-warmup")
    cap = 64 * 1024
    too_long = {
        "ascii": "word " * 20_000,
        "multi-byte": "\u20ac" * 30_000,
    }  # 100,000 and 90,000 bytes; the latter 30,000 characters
    with grpc.insecure_channel(s.target, options=BIG_CHANNEL) as channel:
        stub = pb_grpc.FeatureBankStub(channel)
        for case, text in too_long.items():
            assert len(text.encode()) > cap
            r = stub.Extract(
                pb.ExtractRequest(
                    backbone="minilm",
                    inputs=[pb.Input(text="a short sentence"), pb.Input(text=text), pb.Input(text="another one")],
                ),
                timeout=120,
            ).results
            assert r[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], case
            assert (
                f"{len(text.encode())} bytes" in r[1].error.message and f"max_text_bytes={cap}" in r[1].error.message
            ), r[1].error
            assert [list(x.features.shape) for x in (r[0], r[2])] == [[384], [384]], case
        with pytest.raises(grpc.RpcError) as e:
            stub.Extract(pb.ExtractRequest(backbone="minilm", inputs=[pb.Input(text="x" * BIG_BYTES)]), timeout=120)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    with FeatureBank(s.target, timeout_s=120) as bank:
        with pytest.raises(FeatureBankError) as big:
            bank.extract(["fine", "x" * BIG_BYTES, "also fine"], backbone="minilm")
        assert big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert bank.extract(["the server keeps serving"], backbone="minilm").shape == (1, 384)


def test_a_connection_kept_at_its_stream_limit_gets_no_refused_streams(start_server):
    """64 calls kept in flight on one connection limited to 8 streams, for 400 calls: every call
    succeeds. Calls over the limit wait in the client; none is refused when another one's stream
    closes (before: gRPC counted a finished stream until its memory was freed, so the client's next
    stream was refused: UNAVAILABLE "RST_STREAM with error code 7")."""
    import asyncio
    import collections

    server = start_server("--backbone", "toy", "--max-concurrent-streams", "8", "--cache", "memory")
    images = random_images(16, seed=504)
    requests = [pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=x)]).SerializeToString() for x in images]
    outcomes: collections.Counter = collections.Counter()

    async def drive() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = channel.unary_unary(EXTRACT)  # bytes in, bytes out
            await call(requests[0], timeout=60)  # connected, the server's settings known
            todo = iter(range(400))

            async def client() -> None:
                for i in todo:
                    try:
                        await call(requests[i % len(requests)], timeout=60)
                        outcomes["OK"] += 1
                    except grpc.aio.AioRpcError as e:
                        outcomes[f"{e.code().name}: {e.details()}"] += 1

            await asyncio.gather(*(client() for _ in range(64)))

    asyncio.run(drive())
    assert outcomes == {"OK": 400}, outcomes
