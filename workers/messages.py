"""Typed messages between the frontend and its worker processes, grouped by direction."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from featurebank.workers.backbones.base import BackboneInfo, InputItem

__all__ = ["InputItem", "WorkerSetup", "Batch", "Shutdown", "WorkerReady", "WorkerFailed", "BatchResult"]


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
