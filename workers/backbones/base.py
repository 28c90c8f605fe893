"""The contract every backbone implements: the backbone class, its description, its inputs and errors."""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any

import numpy as np


class InvalidInputError(ValueError):
    """One input item cannot be turned into model input (maps to INVALID_ARGUMENT for that item)."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A feature layer a client may ask for: its name and per-item output shape."""

    name: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """What ListBackbones reports about one loaded backbone."""

    name: str
    fingerprint: str
    input_kind: str  # "image" | "text" | "tensor"
    default_layer: str
    layers: tuple[LayerSpec, ...]
    input_size: tuple[int, ...]  # (H, W, C) for images, (max_tokens,) for text
    preprocessing: str  # human-readable, also hashed into the fingerprint


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One raw input as the worker receives it: kind in image|text|tensor."""

    kind: str
    payload: Any  # bytes for image, str for text, np.ndarray for tensor


class Backbone(abc.ABC):
    """A frozen feature extractor, loaded once per worker process.

    The worker calls ``load()`` once, then ``preprocess()`` per item (errors stay with that item)
    and ``forward()`` per batch of preprocessed items. ``forward`` returns every layer listed in
    ``info().layers`` for the whole batch; the caller picks each item's requested layer. Keras
    backbones build on ``keras_base.TracedKerasBackbone``, image ones on ``keras_base.ImageBackbone``.
    """

    name: str = ""
    input_kind: str = "image"

    @abc.abstractmethod
    def load(self) -> None:
        """Build the model, load weights, freeze it (trainable=False)."""

    @abc.abstractmethod
    def info(self) -> BackboneInfo:
        """Describe the loaded backbone (only valid after load())."""

    @abc.abstractmethod
    def preprocess(self, item: InputItem) -> Any:
        """Turn one raw input into model input; raise InvalidInputError for a bad item."""

    @abc.abstractmethod
    def forward(self, batch: list[Any]) -> dict[str, np.ndarray]:
        """Run the frozen model (training=False) on preprocessed items: {layer: (N, *shape)}."""

    def load_preprocessing(self, info: BackboneInfo) -> None:
        """Make ``preprocess`` work without ``load()``: no model, no TensorFlow (a preprocessing process).

        ``info`` is what ``info()`` returned in a model worker (input shape and kind, for backbones
        that learn them from the model). A backbone whose preprocessing needs its model keeps the
        default, NotImplementedError: its items are then preprocessed in the model workers.
        """
        raise NotImplementedError(f"{type(self).__name__} preprocesses only with its model loaded")

    def warmup(self) -> None:
        """Trace every shape bucket so serving never traces; default: nothing to do."""

    @property
    def trace_count(self) -> int:
        """How many times the forward function has been traced (0 for eager backbones)."""
        return 0

    def keras_model(self):  # pragma: no cover - optional
        """The underlying Keras model, for tests that check frozen weights; None if not Keras."""
        return None


# Names that lived here before the module was split by concept, and where they live now; kept
# importable from here so code written against the old layout (user backbones) keeps working.
_MOVED = {
    "DEFAULT_BATCH_BUCKETS": "buckets",
    "bucket_for": "buckets",
    "split_into_buckets": "buckets",
    "run_bucketed": "buckets",
    "canonical_architecture": "fingerprint",
    "fingerprint_model": "fingerprint",
    "decode_image": "images",
    "resize_image": "images",
    "pixels_from_tensor": "images",
    "image_input": "images",
    "ImageBackbone": "keras_base",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"featurebank.workers.backbones.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
