"""keras.applications backbones load weights from a local file and serve what the model computes."""

from __future__ import annotations

import numpy as np
import pytest

from featurebank.client import FeatureBank
from support import ServerProcess, random_images

pytestmark = pytest.mark.slow


def test_mobilenet_v2_with_a_local_weights_file_matches_in_process(tmp_path):
    """MobileNetV2 served from a local weights file gives the in-process model's features."""
    import keras

    from featurebank.workers.backbones import registry
    from featurebank.workers.backbones.base import InputItem

    weights = tmp_path / "mobilenet_v2_headless.weights.h5"
    keras.utils.set_random_seed(3)
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3)).save_weights(weights)
    server = ServerProcess("--backbone", f"mobilenet_v2={weights}", "--max-batch-size", "4").start(timeout_s=300)
    try:
        images = random_images(3, seed=9, size=(100, 150))
        with FeatureBank(server.target, timeout_s=120) as bank:
            served = bank.extract(images, backbone="mobilenet_v2")
            (info,) = bank.backbones()
        assert served.shape == (3, 1280)
        assert {l.name for l in info.layers} == {"pooled", "block_13_expand_relu"}
        local = registry.create("mobilenet_v2", weights=str(weights))
        local.load()
        assert local.info().fingerprint == info.fingerprint
        direct = local.forward([local.preprocess(InputItem("image", b)) for b in images])["pooled"]
        np.testing.assert_allclose(served, direct, atol=1e-4)
    finally:
        assert server.terminate() == 0
