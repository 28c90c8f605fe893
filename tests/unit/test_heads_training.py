"""Head training: small label sets train on every label, large ones hold out a validation split."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

from featurebank.client.datasets import FeatureSet  # noqa: E402
from featurebank.client.heads import Head, HeadMismatchError  # noqa: E402


def _blobs(per_class: int, dim: int = 8, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c * 2.0, 1.0, (per_class, dim)) for c in range(3)]).astype(np.float32)
    x[:, 0] = 5.0  # a constant feature must not be blown up by standardisation
    y = np.repeat(np.arange(3), per_class)
    return FeatureSet(x, y, ["a", "b", "c"], [""] * len(y), "bb", "f" * 32, "pooled")


def test_small_label_sets_train_on_every_label():
    """With fewer than 20 validation examples per class, all labels train and metrics say so."""
    head = Head.train(_blobs(10))
    assert head.metrics["train_examples"] == 30 and "val_accuracy" not in head.metrics
    assert head.evaluate(_blobs(50, seed=1))["accuracy"] > 0.85


def test_large_label_sets_hold_out_a_validation_split():
    """With enough labels, 20% are held out and reported as validation metrics."""
    head = Head.train(_blobs(200), epochs=30)
    assert head.metrics["train_examples"] == 480 and head.metrics["val_accuracy"] > 0.85


def test_constant_feature_stays_finite_and_proto_folds_standardisation():
    """A feature constant in training does not explode predictions; the served form predicts the same."""
    from featurebank.server.heads import CompiledHead

    data = _blobs(30)
    head = Head.train(data)
    probe = data.features.copy()
    probe[:, 0] = 6.0  # off the constant by 1: must not swing predictions wildly
    local = head.predict(probe)
    served = CompiledHead(head.to_proto("h")).predict(probe)
    np.testing.assert_allclose(served, local, atol=1e-5)
    with pytest.raises(HeadMismatchError, match="takes 8 features"):
        head.predict(probe[:, :4])
