"""Request validation never fails with anything but a per-item error, whatever the Input."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from featurebank.common.cache import LRUCache
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import DynamicBatcher
from featurebank.server.servicer import FeatureBankServicer, ItemFailure, ServedBackbone
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.workers.backbones.base import BackboneInfo, LayerSpec


def _servicer(kind: str) -> tuple[FeatureBankServicer, ServedBackbone]:
    info = BackboneInfo(
        name="b",
        fingerprint="f" * 32,
        input_kind=kind,
        default_layer="pooled",
        layers=(LayerSpec("pooled", (4,)),),
        input_size=(8, 8, 3),
        preprocessing="none",
    )
    served = ServedBackbone(info=info, batcher=DynamicBatcher(max_batch_size=4, max_batch_delay_ms=1, max_queue_size=8))
    return FeatureBankServicer(
        {"b": served},
        LRUCache(1 << 20, 60),
        Metrics(),
        storage_dtype="float32",
        max_items_per_request=16,
        max_tensor_elements=10_000,
    ), served


tensors_st = st.builds(
    pb.Tensor,
    dtype=st.integers(min_value=-2, max_value=8),
    shape=st.lists(st.integers(min_value=-3, max_value=2**40), max_size=10),
    data=st.binary(max_size=64),
)
inputs_st = st.one_of(
    st.just(pb.Input()),
    st.builds(lambda b: pb.Input(image=b), st.binary(max_size=64)),
    st.builds(lambda t: pb.Input(text=t), st.text(max_size=32)),
    st.builds(lambda t: pb.Input(tensor=t), tensors_st),
)


@given(st.sampled_from(["image", "text", "tensor"]), inputs_st)
@settings(max_examples=400, deadline=None)
def test_parse_input_accepts_or_names_the_problem(kind, item):
    """Any Input either parses (content key + payload) or raises ItemFailure with a message."""
    servicer, served = _servicer(kind)
    try:
        key, payload = servicer._parse_input(served, item)
    except ItemFailure as f:
        assert f.message and f.code.name == "INVALID_ARGUMENT"
        return
    assert len(key) == 32 and payload.kind == item.WhichOneof("payload")
    if payload.kind == "tensor":
        assert isinstance(payload.payload, np.ndarray)
