"""A backbone whose model costs nothing, for the serving-overhead benchmark (benchmarks/overhead.py).

The issue's serving-overhead phase runs misses through a backbone whose forward pass "costs ~0",
so that what a server answers, against how fast all cores decode the same inputs, is what the
serving path leaves to preprocessing. The ``toy`` backbone is a real two-layer Keras model: on
2 CPU cores its TensorFlow calls cost ~0.5-0.8 ms per item at the batch sizes misses form, a
fifth to a third of a decode. This one has the toy's inputs and preprocessing (decode + resize to
32x32, the same ``ImageBackbone`` code path, in the preprocessing pool or the worker) and a
forward pass in numpy: each item's first 16 pixel values, scaled to [0, 1] (deterministic, and
different for different images). No TensorFlow call, no traces.

    --backbone benchmarks.null_backbone:NullImage   (with the repository root on PYTHONPATH)
"""

from __future__ import annotations

import hashlib

import numpy as np

from featurebank.workers.backbones.base import Backbone, BackboneInfo, InputItem, LayerSpec
from featurebank.workers.backbones.images import image_input

SIZE = (32, 32)
DIM = 16


class NullImage(Backbone):
    name = "null"
    input_kind = "image"
    preprocessing = "RGB uint8 -> resize 32x32 bilinear (Pillow); features: the first 16 values / 255"

    def __init__(self, *, max_image_pixels: int = 40_000_000, batch_buckets=None, **_):
        self.max_image_pixels = max_image_pixels

    def load(self) -> None:
        pass

    def load_preprocessing(self, info: BackboneInfo) -> None:
        pass

    def info(self) -> BackboneInfo:
        return BackboneInfo(
            name=self.name,
            fingerprint=hashlib.sha256(self.preprocessing.encode()).hexdigest()[:32],
            input_kind="image",
            default_layer="pooled",
            layers=(LayerSpec("pooled", (DIM,)),),
            input_size=(*SIZE, 3),
            preprocessing=self.preprocessing,
        )

    def preprocess(self, item: InputItem) -> np.ndarray:
        return image_input(item, self.name, self.max_image_pixels, SIZE)

    def forward(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"pooled": np.stack([p.reshape(-1)[:DIM] for p in batch]).astype(np.float32) / 255.0}
