"""A tiny deterministic image backbone (fixed-seed weights) for fast tests and smoke runs."""

from __future__ import annotations

from featurebank.workers.backbones.keras_base import ImageBackbone


class ToyBackbone(ImageBackbone):
    """Two seeded conv layers on 32x32 RGB; not pre-trained, but a real, frozen Keras model.

    Layers: ``conv`` (8, first conv globally average-pooled) and ``pooled`` (16, default).
    """

    name = "toy"
    input_size = (32, 32)
    default_layer = "pooled"
    preprocessing = "RGB uint8 -> resize 32x32 bilinear (Pillow) -> x / 255"

    def __init__(self, *, seed: int = 1234, **kwargs):
        kwargs.setdefault("batch_buckets", (1, 4, 16, 32))
        super().__init__(**kwargs)
        self.seed = seed

    def build(self):
        import keras

        init = lambda k: keras.initializers.GlorotUniform(seed=self.seed + k)  # noqa: E731
        x_in = keras.Input((32, 32, 3), name="pixels")
        x = keras.layers.Rescaling(1.0 / 255.0)(x_in)
        c1 = keras.layers.Conv2D(
            8, 3, activation="relu", kernel_initializer=init(1), bias_initializer="zeros", name="conv1"
        )(x)
        c2 = keras.layers.Conv2D(16, 3, strides=2, activation="relu", kernel_initializer=init(2), name="conv2")(c1)
        outputs = {
            "conv": keras.layers.GlobalAveragePooling2D(name="conv_pool")(c1),
            "pooled": keras.layers.GlobalAveragePooling2D(name="pool")(c2),
        }
        return keras.Model(x_in, outputs, name="toy")
