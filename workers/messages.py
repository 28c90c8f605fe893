"""Typed messages between the frontend and its worker processes, grouped by direction."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from featurebank.common.framing import out_of_band
from featurebank.workers.backbones.base import BackboneInfo, InputItem

__all__ = [
    "InputItem",
    "PREPROCESSED",
    "WorkerSetup",
    "Batch",
    "Shutdown",
    "WorkerReady",
    "WorkerFailed",
    "BatchResult",
    "PreprocessSetup",
    "PreprocessChunk",
    "PreprocessReady",
    "PreprocessResult",
    "out_of_band_item",
    "with_bytes",
]

# The kind of an InputItem a preprocessing process already turned into model input (its payload is
# what ``Backbone.preprocess`` returned): the model worker runs only the forward pass on it.
PREPROCESSED = "preprocessed"


def out_of_band_item(item: InputItem) -> InputItem:
    """The item with large bytes as a PickleBuffer, to travel beside the pickle of a frame
    (common/framing.py); the receiver gets a memoryview back (``with_bytes``)."""
    payload = out_of_band(item.payload)
    return item if payload is item.payload else InputItem(item.kind, payload)


def with_bytes(item: InputItem) -> InputItem:
    """The item with bytes for a payload that travelled out of band (it arrives as a memoryview of
    the message read): backbones may call bytes' methods on it."""
    if isinstance(item.payload, memoryview):
        return InputItem(item.kind, item.payload.tobytes())
    return item


# Frontend -> worker


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """Everything a spawned worker needs to load its backbone (passed at spawn time)."""

    backbone: str  # a registry name
    options: dict[str, Any]  # backbone constructor kwargs (weights path, limits, buckets)
    worker_index: int
    gpu: str | None = None  # a CUDA device index to pin to; None = CPU / all visible
    intra_op_threads: int = 0  # 0 = TensorFlow's default
    inter_op_threads: int = 0
    warmup: bool = True
    memory_limit_mb: int = 0  # the worker's RLIMIT_DATA (heap + private mappings); 0 = no cap


@dataclasses.dataclass(frozen=True)
class Batch:
    """Items to compute; ``layers[i]`` is the layer to return for ``items[i]``."""

    batch_id: int
    items: list[InputItem]
    layers: list[str]


@dataclasses.dataclass(frozen=True)
class Shutdown:
    """Finish and exit 0."""


# Worker -> frontend


@dataclasses.dataclass(frozen=True)
class WorkerReady:
    """The backbone is loaded, frozen and warmed up."""

    info: BackboneInfo
    trace_count: int
    load_seconds: float


@dataclasses.dataclass(frozen=True)
class WorkerFailed:
    """The backbone could not be loaded; the worker exits after sending this."""

    error: str


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """Per item: features (None on error) and an error message (None on success)."""

    batch_id: int
    features: list[np.ndarray | None]
    errors: list[tuple[str, str] | None]  # (code name, message): "INVALID_ARGUMENT" | "INTERNAL"
    inference_seconds: float
    trace_count: int
    idle_seconds: float = 0.0  # the worker waited this long for the batch (nothing to do)
    read_seconds: float = 0.0  # reading and unpickling it took this long (beside the previous batch)


# Frontend -> preprocessing process


@dataclasses.dataclass(frozen=True)
class PreprocessSetup:
    """What a spawned preprocessing process needs: the backbone's options and what its model workers reported."""

    backbone: str  # a registry name
    options: dict[str, Any]  # the same constructor kwargs the model workers get
    info: BackboneInfo  # from the loaded backbone (input shape and kind, for backbones that need them)
    process_index: int
    memory_limit_mb: int = 0  # RLIMIT_DATA, as for the model workers; 0 = no cap


@dataclasses.dataclass(frozen=True)
class PreprocessChunk:
    """Raw items to preprocess, each on its own (a bad one fails alone)."""

    chunk_id: int
    items: list[InputItem]


# Preprocessing process -> frontend


@dataclasses.dataclass(frozen=True)
class PreprocessReady:
    """The process can preprocess (``supported``), or the backbone needs its model to (its workers do it)."""

    supported: bool
    tensorflow_loaded: bool  # never, for the built-in backbones: the process holds no model
    load_seconds: float
    reason: str = ""  # why not supported


@dataclasses.dataclass(frozen=True)
class PreprocessResult:
    """Per item: the preprocessed value (None on error) and an error (None on success), and its seconds."""

    chunk_id: int
    values: list[Any]
    errors: list[tuple[str, str] | None]  # (code name, message), as in BatchResult
    seconds: list[float]
