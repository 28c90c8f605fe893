"""keras.applications image models as backbones: classifier removed, pooled features."""

from __future__ import annotations

import os

from featurebank.workers.backbones.keras_base import ImageBackbone

# application -> (keras.applications module with preprocess_input, input size, the layers exposed
# besides "pooled", globally average-pooled)
APPLICATIONS = {
    "MobileNetV2": ("mobilenet_v2", (224, 224), ("block_13_expand_relu",)),
    "EfficientNetB0": ("efficientnet", (224, 224), ("block6a_expand_activation",)),
    "ResNet50": ("resnet50", (224, 224), ("conv4_block6_out",)),
}


class KerasApplication(ImageBackbone):
    """A keras.applications model with ``include_top=False``.

    Args:
        application: a key of APPLICATIONS ("MobileNetV2", "EfficientNetB0", "ResNet50").
        weights: "imagenet" (Keras downloads and caches them; needs internet the first time) or a
            path to a local weights file (``.h5`` / ``.weights.h5``) for the headless model.
    Layers: ``pooled`` (global average pool of the last conv block, default) and one mid-network
    layer per application, also pooled.
    """

    default_layer = "pooled"

    def __init__(self, *, application: str, weights: str = "imagenet", **kwargs):
        super().__init__(**kwargs)
        if application not in APPLICATIONS:
            raise ValueError(f"application must be one of {sorted(APPLICATIONS)}, got {application!r}")
        if weights != "imagenet" and not os.path.exists(weights):
            raise FileNotFoundError(f"weights file {weights!r} does not exist")
        self.application = application
        self.weights = weights
        module, self.input_size, self.mid_layers = APPLICATIONS[application]
        self.preprocessing = (
            f"RGB uint8 -> resize {self.input_size[0]}x{self.input_size[1]} bilinear (Pillow) -> "
            f"keras.applications.{module}.preprocess_input"
        )

    def build(self):
        import importlib

        import keras

        module_name, _, _ = APPLICATIONS[self.application]
        app = getattr(keras.applications, self.application)
        module = importlib.import_module(f"keras.applications.{module_name}")
        h, w = self.input_size
        base = app(include_top=False, weights=None if self.weights != "imagenet" else "imagenet", input_shape=(h, w, 3))
        if self.weights != "imagenet":
            base.load_weights(self.weights)
        x_in = keras.Input((h, w, 3), name="pixels")
        x = module.preprocess_input(x_in)
        features = keras.Model(base.input, [base.output] + [base.get_layer(n).output for n in self.mid_layers])
        outs = features(x, training=False)
        outputs = {"pooled": keras.layers.GlobalAveragePooling2D(name="pooled")(outs[0])}
        for name, t in zip(self.mid_layers, outs[1:]):
            outputs[name] = keras.layers.GlobalAveragePooling2D(name=f"{name}_pooled")(t)
        return keras.Model(x_in, outputs, name=self.application.lower())
