"""A user's .keras file and SavedModel directory are served with their named layers."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from featurebank.client import FeatureBank
from support import ServerProcess, png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import keras

    d = tmp_path_factory.mktemp("byo")
    keras.utils.set_random_seed(11)
    x_in = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(x_in)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="features_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    image_model = keras.Model(x_in, keras.layers.Dense(5, name="head")(x))
    image_model.save(d / "image.keras")

    v_in = keras.Input((8,))
    vec_model = keras.Model(v_in, keras.layers.Dense(3, activation="tanh")(v_in))
    vec_model.export(str(d / "vec_savedmodel"), format="tf_saved_model")
    return image_model, vec_model, d


def test_keras_file_and_savedmodel_are_served(models):
    """Both models serve the features the models compute in-process; bad tensors fail alone."""
    image_model, vec_model, d = models
    spec = f"img={d / 'image.keras'}#features_conv,vec={d / 'vec_savedmodel'}"
    server = ServerProcess("--backbone", spec, "--max-batch-size", "4").start(timeout_s=300)
    try:
        pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        vectors = np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)
        with FeatureBank(server.target, timeout_s=120) as bank:
            infos = {b.name: b for b in bank.backbones()}
            out = bank.extract([png_bytes(p) for p in pixels], backbone="img")
            conv = bank.extract([png_bytes(pixels[0])], backbone="img", layer="features_conv")
            vec = bank.extract(list(vectors), backbone="vec")
            bad = bank.extract_items([np.zeros(7, np.float32), vectors[0]], backbone="vec")
        assert infos["img"].input_kind == "image" and tuple(infos["img"].input_size) == (16, 16, 3)
        assert {l.name: tuple(l.shape) for l in infos["img"].layers} == {"output": (5,), "features_conv": (6,)}
        assert infos["vec"].input_kind == "tensor"
        np.testing.assert_allclose(out, image_model.predict(pixels.astype(np.float32), verbose=0), atol=1e-5)
        assert conv.shape == (1, 6)
        np.testing.assert_allclose(vec, vec_model.predict(vectors, verbose=0), atol=1e-5)
        assert bad[0].error.code == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in bad[0].error.message
        assert bad[1].error is None
    finally:
        assert server.terminate() == 0
