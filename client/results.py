"""What the SDK returns: plain dataclasses with numpy arrays and one-line reprs, built from the protos."""

from __future__ import annotations

import dataclasses

import numpy as np

from featurebank.client.errors import FeatureBankError, status_code
from featurebank.common import tensors
from featurebank.v1 import featurebank_pb2 as pb


def _error_text(error: FeatureBankError) -> str:
    return f"{error.code.name}: {' '.join(error.message.split())}"


@dataclasses.dataclass(repr=False)
class ItemOutcome:
    """One input's answer: features or an error, the content key, and whether it was a hit.

    Attributes:
        index: the input's position in the caller's list.
        key: its content key (32 hex characters).
        cache_hit: the features came from the cache.
        features: numpy array, or None when ``error`` is set.
        error: FeatureBankError (``.code``, ``.message``, ``.index``) or None.
    """

    index: int
    key: str
    cache_hit: bool
    features: np.ndarray | None
    error: FeatureBankError | None

    def __repr__(self) -> str:
        if self.error is not None:
            return f"ItemOutcome({self.index}: error {_error_text(self.error)})"
        shape = tuple(self.features.shape) if self.features is not None else ()
        dtype = self.features.dtype if self.features is not None else "-"
        return f"ItemOutcome({self.index}: {'hit' if self.cache_hit else 'computed'}, key {self.key[:12]}.., {dtype} {shape})"


@dataclasses.dataclass(repr=False)
class Prediction:
    """A served head's answer for one input.

    Attributes:
        index: the input's position in the caller's list.
        label: the most probable class name ("" when ``error`` is set).
        label_index: its index in the head's class names (-1 on error).
        probabilities: (num_classes,) float32 numpy array, or None on error.
        cache_hit: the input's features came from the cache.
        key: the input's content key.
        error: FeatureBankError or None.
    """

    index: int
    label: str
    label_index: int
    probabilities: np.ndarray | None
    cache_hit: bool
    key: str
    error: FeatureBankError | None

    @property
    def probability(self) -> float:
        """The probability of ``label`` (NaN on error)."""
        if self.probabilities is None:
            return float("nan")
        return float(self.probabilities[self.label_index])

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Prediction({self.index}: error {_error_text(self.error)})"
        return f"Prediction({self.index}: {self.label!r} p={self.probability:.3f}{', cache hit' if self.cache_hit else ''})"


@dataclasses.dataclass(repr=False)
class HeadInfo:
    """A served head version: what it takes, what it answers, and its training metrics.

    Attributes:
        name, version: how to ask for it (``bank.predict(name, inputs, version=...)``).
        kind: "logistic" or "mlp".
        backbone, layer, fingerprint: the features it takes.
        input_dim: their size.
        class_names: what it answers.
        metrics: training-time metrics (``val_*`` on a held-out split, ``train_*`` otherwise).
        created_unix_ms: when it was uploaded.
    """

    name: str
    version: int
    kind: str
    backbone: str
    layer: str
    fingerprint: str
    input_dim: int
    class_names: list[str]
    metrics: dict[str, float]
    created_unix_ms: int

    def __repr__(self) -> str:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.metrics.items()) if k.endswith("accuracy"))
        return (
            f"HeadInfo({self.name} v{self.version}: {self.kind} on {self.backbone}/{self.layer}, {self.input_dim}-d, "
            f"classes {self.class_names}{', ' + shown if shown else ''})"
        )


def outcomes(response: pb.ExtractResponse, offset: int = 0) -> list[ItemOutcome]:
    """ItemOutcomes of an Extract or Lookup response whose first item is input ``offset``."""
    out = []
    for j, r in enumerate(response.results):
        if r.HasField("error"):
            out.append(
                ItemOutcome(
                    offset + j,
                    r.key,
                    r.cache_hit,
                    None,
                    FeatureBankError(status_code(r.error.code), r.error.message, offset + j),
                )
            )
        else:
            out.append(ItemOutcome(offset + j, r.key, r.cache_hit, tensors.from_proto(r.features), None))
    return out


def prediction(p: pb.Prediction, index: int) -> Prediction:
    if p.HasField("error"):
        return Prediction(
            index, "", -1, None, p.cache_hit, p.key, FeatureBankError(status_code(p.error.code), p.error.message, index)
        )
    probabilities = np.asarray(tensors.from_proto(p.probabilities), np.float32).reshape(-1)
    return Prediction(index, p.label, p.label_index, probabilities, p.cache_hit, p.key, None)


def head_info(h: pb.HeadInfo) -> HeadInfo:
    return HeadInfo(
        name=h.name,
        version=h.version,
        kind=h.kind,
        backbone=h.backbone,
        layer=h.layer,
        fingerprint=h.backbone_fingerprint,
        input_dim=h.input_dim,
        class_names=list(h.class_names),
        metrics=dict(h.metrics),
        created_unix_ms=h.created_unix_ms,
    )


def stack(items: list[ItemOutcome]) -> np.ndarray:
    """Features of every outcome as one array; raises the first item's error."""
    for o in items:
        if o.error is not None:
            raise o.error
    if not items:
        return np.zeros((0, 0), np.float32)
    return np.stack([o.features for o in items])
