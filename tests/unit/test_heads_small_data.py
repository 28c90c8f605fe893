"""Small-data training says that it skipped validation and which metrics are training metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("keras")

from featurebank.client.datasets import FeatureSet  # noqa: E402
from featurebank.client.heads import Head, SmallDataWarning  # noqa: E402


def _blobs(per_class: int, dim: int = 8, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c * 2.0, 1.0, (per_class, dim)) for c in range(2)]).astype(np.float32)
    y = np.repeat(np.arange(2), per_class)
    return FeatureSet(x, y, ["a", "b"], [""] * len(y), "bb", "f" * 32, "pooled")


def test_small_set_warns_that_validation_was_skipped_and_metrics_are_training_metrics():
    """A validation_split too small to hold out warns, naming the counts, and metrics say no examples were held out."""
    with pytest.warns(SmallDataWarning) as caught:
        head = Head.train(_blobs(6), validation_split=0.2)
    message = str(caught[0].message)
    assert "12 labelled examples" in message and "validation_split=0.2" in message
    assert "training metrics" in message and "train_accuracy" in message
    assert head.metrics["validation_examples"] == 0 and "val_accuracy" not in head.metrics
    assert not head.validated


def test_large_set_holds_out_without_a_warning():
    """With enough labels per class the split is held out, nothing is warned, and the count is recorded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallDataWarning)
        head = Head.train(_blobs(100), validation_split=0.2, epochs=5)
    assert head.metrics["validation_examples"] == 40 and head.validated


def test_no_validation_asked_trains_on_everything_without_a_warning():
    """validation_split=0 is a choice, not a surprise: no warning, metrics are still named train_*."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallDataWarning)
        head = Head.train(_blobs(6), validation_split=0)
    assert "train_accuracy" in head.metrics and head.metrics["validation_examples"] == 0


def test_head_predict_on_raw_inputs_without_a_bank_says_what_to_do():
    """Text, bytes or paths given to a local Head raise a TypeError naming bank=, bank.predict and bank.features."""
    head = Head.train(_blobs(6), validation_split=0)
    for raw in (["some raw text"], [b"\x89PNG..."], "one text", np.array(["a", "b"])):
        with pytest.raises(TypeError, match=r"bank=.*bank\.predict") as raised:
            head.predict(raw)
        assert "bank.features" in str(raised.value) and "bb/pooled" in str(raised.value)
