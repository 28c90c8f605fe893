"""Hand-built served heads (featurebank.v1.Head) for tests that talk to the server over raw gRPC."""

from __future__ import annotations

import grpc
import numpy as np

from featurebank.client import tensors
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc


def dense_head(
    name: str,
    fingerprint: str,
    widths: tuple[int, ...] = (16, 2),
    seed: int = 0,
    activations: tuple[str, ...] | None = None,
    backbone: str = "toy",
    layer: str = "pooled",
    version: int = 0,
) -> pb.Head:
    """A head of dense layers widths[0] -> widths[1] -> ..., seeded random weights, softmax last."""
    rng = np.random.default_rng(seed)
    n = len(widths) - 1
    activations = activations or ("relu",) * (n - 1) + ("softmax",)
    head = pb.Head(
        name=name,
        version=version,
        backbone=backbone,
        backbone_fingerprint=fingerprint,
        layer=layer,
        kind="mlp" if n > 1 else "logistic",
    )
    for i in range(n):
        kernel = rng.normal(0, 1 / np.sqrt(widths[i]), (widths[i], widths[i + 1])).astype(np.float32)
        bias = rng.normal(0, 0.1, widths[i + 1]).astype(np.float32)
        head.layers.add(kernel=tensors.to_proto(kernel), bias=tensors.to_proto(bias), activation=activations[i])
    return head


class Stub:
    """A FeatureBank stub that sends one tenant's bearer token with every call."""

    def __init__(self, target: str, token: str = "", timeout_s: float = 60):
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.FeatureBankStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def __getattr__(self, method: str):
        call = getattr(self.stub, method)
        return lambda request, **kw: call(
            request, metadata=self.metadata, timeout=kw.pop("timeout", self.timeout_s), **kw
        )

    def fingerprint(self, backbone: str = "toy") -> str:
        return next(
            b.fingerprint for b in self.ListBackbones(pb.ListBackbonesRequest()).backbones if b.name == backbone
        )

    def close(self) -> None:
        self.channel.close()
