"""Bring your own model: a Keras ``.keras`` file or a TF SavedModel directory, with named layers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from featurebank.workers.backbones.base import BackboneInfo, InputItem, InvalidInputError
from featurebank.workers.backbones.buckets import DEFAULT_BATCH_BUCKETS, run_bucketed
from featurebank.workers.backbones.fingerprint import fingerprint_model
from featurebank.workers.backbones.images import image_input
from featurebank.workers.backbones.keras_base import TracedKerasBackbone, layer_specs


def _pool(x):
    """Feature maps become vectors: average over every axis between batch and channels."""
    import keras

    if len(x.shape) > 2:
        return keras.ops.mean(x, axis=tuple(range(1, len(x.shape) - 1)))
    return x


class KerasFileBackbone(TracedKerasBackbone):
    """A user's model served as a backbone.

    Args:
        path: a ``.keras`` file (any functional or sequential Keras model) or a SavedModel
            directory (its ``serving_default`` signature).
        layers: for ``.keras`` models, names of layers to expose besides ``output`` (the model's
            own output); feature maps are averaged over space (or time). SavedModels expose the
            outputs of their signature.

    A model whose input is (H, W, 3) is an image backbone: images are decoded and resized to
    (H, W) and fed as float32 pixels in [0, 255], so the model must contain its own
    preprocessing (e.g. a Rescaling layer). Any other input is a tensor backbone: a request
    tensor must have the model's per-item shape.
    """

    def __init__(
        self,
        *,
        path: str,
        layers: Sequence[str] = (),
        max_image_pixels: int = 40_000_000,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
    ):
        if not os.path.exists(path):
            raise FileNotFoundError(f"model {path!r} does not exist")
        super().__init__()
        self.path = path
        self.layer_names = tuple(layers)
        self.max_image_pixels = max_image_pixels
        self.batch_buckets = tuple(sorted(batch_buckets))

    def _build(self):
        import keras

        if os.path.isdir(self.path):
            import tensorflow as tf

            signature = tf.saved_model.load(self.path).signatures["serving_default"]
            specs = list(signature.structured_input_signature[1].values())
            if len(specs) != 1:
                raise ValueError(f"SavedModel {self.path!r} must take one input, its signature takes {len(specs)}")
            layer = keras.layers.TFSMLayer(self.path, call_endpoint="serving_default")
            inp = keras.Input(tuple(specs[0].shape[1:]))
            out = layer(inp)
            outputs = {k: keras.layers.Lambda(_pool, name=f"pool_{k}")(v) for k, v in sorted(out.items())}
            return keras.Model(inp, outputs), "savedmodel:" + hashlib.sha256(
                open(os.path.join(self.path, "saved_model.pb"), "rb").read()
            ).hexdigest()
        base = keras.saving.load_model(self.path, compile=False)
        outputs = {"output": keras.layers.Lambda(_pool, name="pool_output")(base.output)}
        for name in self.layer_names:
            try:
                outputs[name] = keras.layers.Lambda(_pool, name=f"pool_{name}")(base.get_layer(name).output)
            except ValueError:
                raise ValueError(f"model {self.path!r} has no layer {name!r}") from None
        return keras.Model(base.input, outputs), base.to_json()

    def load(self) -> None:
        model, architecture = self._build()
        self.freeze(model)
        self.item_shape = tuple(int(d) for d in model.input.shape[1:])
        image = len(self.item_shape) == 3 and self.item_shape[2] == 3
        self.input_kind = "image" if image else "tensor"
        self.preprocessing = (
            f"RGB uint8 -> resize {self.item_shape[0]}x{self.item_shape[1]} bilinear (Pillow) -> "
            "float32 pixels [0, 255] -> the model's own layers"
            if image
            else "float32 tensor as sent -> the model's own layers"
        )

        self.trace(lambda x: model(x, training=False))
        probe = model(np.zeros((1, *self.item_shape), np.float32), training=False)
        layers = layer_specs(probe)
        self._info = BackboneInfo(
            name=self.name,
            fingerprint=fingerprint_model(self.name, architecture, model.get_weights(), self.preprocessing),
            input_kind=self.input_kind,
            default_layer="output" if "output" in probe else layers[0].name,
            layers=layers,
            input_size=self.item_shape,
            preprocessing=self.preprocessing,
        )

    def load_preprocessing(self, info: BackboneInfo) -> None:
        """The model's input shape and kind, from what the loaded model reported (no model loaded here)."""
        self.item_shape = tuple(info.input_size)
        self.input_kind = info.input_kind

    def preprocess(self, item: InputItem) -> np.ndarray:
        if self.input_kind == "image":
            return image_input(item, self.name, self.max_image_pixels, self.item_shape[:2]).astype(np.float32)
        if item.kind != "tensor":
            raise InvalidInputError(
                f"backbone {self.name!r} takes tensors of shape {list(self.item_shape)}, not {item.kind}"
            )
        a = np.asarray(item.payload)
        if a.shape != self.item_shape:
            raise InvalidInputError(
                f"tensor shape {list(a.shape)} does not match the model's input {list(self.item_shape)}"
            )
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise InvalidInputError("tensor contains NaN or Inf")
        return a

    def forward(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        return run_bucketed(self._fn, batch, self.item_shape, self.batch_buckets)

    def warmup(self) -> None:
        with self.planned_traces():
            for b in self.batch_buckets:
                self.forward([np.zeros(self.item_shape, np.float32)] * b)
