"""Every bad-input case of the README's table gets its documented answer; the server keeps serving."""

from __future__ import annotations

import struct
import zlib

import grpc
import numpy as np
import pytest

from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from support import ServerProcess, random_images


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def stub():
    server = ServerProcess(
        "--backbone",
        "toy",
        "--max-message-bytes",
        str(2 * 1024 * 1024),
        "--max-items-per-request",
        "1000",
        "--max-image-pixels",
        "1000000",
    ).start()
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    s = pb_grpc.FeatureBankStub(channel)
    s.target = server.target
    yield s
    channel.close()
    assert server.terminate() == 0


def _extract(stub, *inputs: pb.Input) -> list[pb.ItemResult]:
    return list(stub.Extract(pb.ExtractRequest(backbone="toy", inputs=list(inputs)), timeout=60).results)


GOOD = pb.Input(image=random_images(1, seed=1)[0])


@pytest.mark.parametrize(
    "case,item,message",
    [
        ("undecodable image", pb.Input(image=b"GIF89a-not-really"), "cannot decode image"),
        ("truncated image", pb.Input(image=GOOD.image[: len(GOOD.image) // 2]), "cannot decode image"),
        ("decompression bomb", pb.Input(image=bomb_png()), "over the limit of 1000000"),
        ("empty image", pb.Input(image=b""), "empty image"),
        ("empty input", pb.Input(), "empty input"),
        (
            "data length mismatch",
            pb.Input(tensor=pb.Tensor(dtype=pb.UINT8, shape=[4, 4, 3], data=b"\0" * 47)),
            "needs 48",
        ),
        (
            "NaN pixels",
            pb.Input(
                tensor=pb.Tensor(
                    dtype=pb.FLOAT32, shape=[2, 2, 3], data=np.full((2, 2, 3), np.nan, np.float32).tobytes()
                )
            ),
            "NaN",
        ),
        (
            "Inf pixels",
            pb.Input(
                tensor=pb.Tensor(
                    dtype=pb.FLOAT32, shape=[2, 2, 3], data=np.full((2, 2, 3), np.inf, np.float32).tobytes()
                )
            ),
            "NaN or Inf",
        ),
        (
            "wrong rank",
            pb.Input(tensor=pb.Tensor(dtype=pb.UINT8, shape=[12], data=b"\0" * 12)),
            "(H, W) or (H, W, 1|3|4)",
        ),
        ("negative dimension", pb.Input(tensor=pb.Tensor(dtype=pb.UINT8, shape=[-1, 3], data=b"")), "negative"),
        ("text for an image backbone", pb.Input(text="hello"), "takes image inputs, not text"),
    ],
)
def test_bad_item_fails_alone(stub, case, item, message):
    """A bad item gets INVALID_ARGUMENT with a message naming the problem; its neighbours get features."""
    before, bad, after = _extract(stub, GOOD, item, GOOD)
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], case
    assert message in bad.error.message, (case, bad.error.message)
    for r in (before, after):
        assert not r.HasField("error") and list(r.features.shape) == [16]


def test_too_many_inputs_in_one_request(stub):
    """More inputs than max_items_per_request fail the request with INVALID_ARGUMENT saying to split it."""
    with pytest.raises(grpc.RpcError) as e:
        stub.Extract(
            pb.ExtractRequest(backbone="toy", inputs=[pb.Input(text=str(i)) for i in range(10_000)]), timeout=60
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "split the request" in e.value.details()


def test_oversized_message(stub):
    """A message over max_message_bytes is refused with RESOURCE_EXHAUSTED before it is parsed."""
    with pytest.raises(grpc.RpcError) as e:
        stub.Extract(pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=b"\0" * (3 * 1024 * 1024))]), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_non_utf8_text_is_refused_and_server_keeps_serving(stub):
    """A request whose text field is not UTF-8 cannot be parsed: the RPC fails, the next one succeeds."""
    raw = pb.ExtractRequest(backbone="toy").SerializeToString() + b"\x1a\x03\x12\x01\xff"  # inputs { text: b"\xff" }
    with grpc.insecure_channel(stub.target) as channel, pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/featurebank.v1.FeatureBank/Extract")(raw, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad UTF-8" in e.value.details()
    assert not _extract(stub, GOOD)[0].HasField("error")


def test_unknown_backbone_layer_head(stub):
    """Unknown backbone, layer or head: NOT_FOUND naming what exists."""
    for request, fragment in (
        (pb.ExtractRequest(backbone="nope", inputs=[GOOD]), "served: toy"),
        (pb.ExtractRequest(backbone="toy", layer="nope", inputs=[GOOD]), "layers: conv, pooled"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.Extract(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and fragment in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(pb.PredictRequest(head="nope", inputs=[GOOD]), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
