"""The contract every backbone implements, and the pieces image and text backbones share."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import logging
import re
from typing import Any, Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Batch sizes the forward pass is traced for; a batch is zero-padded up to the next one, so no
# request size ever causes a new trace after warm-up.
DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


class InvalidInputError(ValueError):
    """One input item cannot be turned into model input (maps to INVALID_ARGUMENT for that item)."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A feature layer a client may ask for: its name and per-item output shape."""

    name: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """What ListBackbones reports about one loaded backbone."""

    name: str
    fingerprint: str
    input_kind: str  # "image" | "text" | "tensor"
    default_layer: str
    layers: tuple[LayerSpec, ...]
    input_size: tuple[int, ...]  # (H, W, C) for images, (max_tokens,) for text
    preprocessing: str  # human-readable, also hashed into the fingerprint


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One raw input as the worker receives it: kind in image|text|tensor."""

    kind: str
    payload: Any  # bytes for image, str for text, np.ndarray for tensor


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; callers split batches larger than the largest bucket."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


_JSON_NAME = re.compile(r'"name": "([^"]+)"')


def canonical_architecture(architecture_json: str) -> str:
    """Keras architecture JSON with every layer/model name replaced by its order of appearance.

    Keras names layers from a per-process counter ("conv2d_7"), so the same model built in two
    processes serialises differently; numbering names by first appearance keeps the structure
    and makes the fingerprint the same wherever the model is built.
    """
    mapping: dict[str, str] = {}
    for m in _JSON_NAME.finditer(architecture_json):
        mapping.setdefault(m.group(1), f"n{len(mapping)}")
    if not mapping:
        return architecture_json
    pattern = re.compile('"(' + "|".join(re.escape(n) for n in sorted(mapping, key=len, reverse=True)) + ')"')
    return pattern.sub(lambda m: f'"{mapping[m.group(1)]}"', architecture_json)


def split_into_buckets(n: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(items, traced batch size) pieces covering n items with little padding.

    Padding a batch of 9 up to 16 computes 7 rows of zeros (a third of the work at a typical
    mix of request sizes); 9 = 8 + 1 costs one extra call (~1 ms) instead. A remainder only pads
    up when that wastes fewer rows than the calls it saves: at most a quarter of the bucket.
    """
    pieces: list[tuple[int, int]] = []
    while n > 0:
        fit = max((b for b in buckets if b <= n), default=buckets[0])
        up = bucket_for(n, buckets) if n <= buckets[-1] else buckets[-1]
        if up - n <= up // 4 or fit > n:
            take = min(n, up)
            pieces.append((take, up))
        else:
            take = fit
            pieces.append((fit, fit))
        n -= take
    return pieces


def fingerprint_model(name: str, architecture: str, weights: Sequence[np.ndarray], preprocessing: str) -> str:
    """A hash of everything that determines a backbone's output: new weights give a new key space."""
    h = hashlib.blake2b(digest_size=16)
    architecture = canonical_architecture(architecture)
    for part in (b"featurebank-backbone-v1", name.encode(), architecture.encode(), preprocessing.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    for w in weights:
        a = np.ascontiguousarray(w)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Backbone(abc.ABC):
    """A frozen feature extractor, loaded once per worker process.

    The worker calls ``load()`` once, then ``preprocess()`` per item (errors stay with that item)
    and ``forward()`` per batch of preprocessed items. ``forward`` returns every layer listed in
    ``info().layers`` for the whole batch; the caller picks each item's requested layer.
    """

    name: str = ""
    input_kind: str = "image"

    @abc.abstractmethod
    def load(self) -> None:
        """Build the model, load weights, freeze it (trainable=False)."""

    @abc.abstractmethod
    def info(self) -> BackboneInfo:
        """Describe the loaded backbone (only valid after load())."""

    @abc.abstractmethod
    def preprocess(self, item: InputItem) -> Any:
        """Turn one raw input into model input; raise InvalidInputError for a bad item."""

    @abc.abstractmethod
    def forward(self, batch: list[Any]) -> dict[str, np.ndarray]:
        """Run the frozen model (training=False) on preprocessed items: {layer: (N, *shape)}."""

    def warmup(self) -> None:
        """Trace every shape bucket so serving never traces; default: nothing to do."""

    @property
    def trace_count(self) -> int:
        """How many times the forward function has been traced (0 for eager backbones)."""
        return 0

    def keras_model(self):  # pragma: no cover - optional
        """The underlying Keras model, for tests that check frozen weights; None if not Keras."""
        return None


# ---------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to an RGB uint8 (H, W, 3) array, refusing decompression bombs.

    The pixel limit is checked on the header, before any pixel is decoded. Grayscale, palette,
    16-bit and RGBA inputs become RGB (alpha is dropped, not composited).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidInputError("empty image: no bytes")
    # Our own limit, checked on the header below, replaces Pillow's global one (which would refuse
    # with a less useful message, and only at twice its default).
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidInputError(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (max_image_pixels)"
                )
            img.draft("RGB", (w, h))
            rgb = img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except InvalidInputError:
        raise
    except UnidentifiedImageError:
        raise InvalidInputError(f"cannot decode image ({len(data)} bytes): not a recognised image format") from None
    except Exception as e:  # Pillow's plugins raise many types on hostile files: all mean "not decodable"
        raise InvalidInputError(f"cannot decode image ({len(data)} bytes): {e}") from None


def resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 pixels to (H, W) with Pillow's bilinear filter (antialiased when shrinking).

    Images already at the target size are returned untouched, so a 224x224 input reaches the
    model bit-exact.
    """
    from PIL import Image

    h, w = size
    if pixels.shape[0] == h and pixels.shape[1] == w:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def pixels_from_tensor(a: np.ndarray) -> np.ndarray:
    """Accept a raw pixel tensor (H, W), (H, W, 1|3|4), uint8 or float in [0, 255], as RGB uint8."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"an image tensor must be (H, W) or (H, W, 1|3|4) pixels, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidInputError(f"an image tensor must not be empty, got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.all(np.isfinite(a)):
            raise InvalidInputError("image tensor contains NaN or Inf")
        if a.min() < 0 or a.max() > 255:
            raise InvalidInputError("image tensor pixel values must be in [0, 255] (raw pixels, not normalised)")
        a = np.round(a).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def image_input(item: InputItem, backbone: str, max_pixels: int, size: tuple[int, int]) -> np.ndarray:
    """An encoded image or a raw pixel tensor as RGB uint8 pixels at ``size``."""
    if item.kind == "image":
        pixels = decode_image(item.payload, max_pixels)
    elif item.kind == "tensor":
        pixels = pixels_from_tensor(item.payload)
    else:
        raise InvalidInputError(f"backbone {backbone!r} takes images (or pixel tensors), not {item.kind}")
    return resize_image(pixels, size)


def run_bucketed(fn: Callable, batch: list[np.ndarray], item_shape: tuple[int, ...],
                 buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Call ``fn`` (a traced forward pass returning {layer: tensor}) on traced batch sizes only,
    zero-padding at most a quarter of each piece, and return the layers for exactly ``batch``."""
    out: dict[str, list[np.ndarray]] = {}
    start = 0
    for size, b in split_into_buckets(len(batch), buckets):
        x = np.zeros((b, *item_shape), np.float32)
        for i, p in enumerate(batch[start : start + size]):
            x[i] = p
        start += size
        for k, v in fn(x).items():
            out.setdefault(k, []).append(np.asarray(v)[:size])
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}


class ImageBackbone(Backbone):
    """A Keras image model: decode + resize on the CPU, the model's own preprocessing in-graph.

    Subclasses implement ``build()`` returning a Keras model that takes raw RGB pixels as float32
    in [0, 255], shape (N, H, W, 3), applies its own preprocessing, and outputs a dict
    {layer_name: (N, *shape)}; plus ``weights_source()`` used in the fingerprint.
    """

    input_kind = "image"
    input_size: tuple[int, int] = (224, 224)
    default_layer: str = "pooled"
    preprocessing: str = ""

    def __init__(self, *, max_image_pixels: int = 50_000_000, batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS):
        self.max_image_pixels = max_image_pixels
        self.batch_buckets = tuple(sorted(batch_buckets))
        self._model = None
        self._fn: Callable | None = None
        self._traces = 0
        self._info: BackboneInfo | None = None

    @abc.abstractmethod
    def build(self):
        """Return the frozen Keras model (raw pixels in, dict of layer outputs out)."""

    def load(self) -> None:
        import tensorflow as tf

        model = self.build()
        model.trainable = False
        self._model = model
        h, w = self.input_size

        def _forward(x):
            self._traces += 1  # Python side effect: runs once per trace, never per call
            return model(x, training=False)

        self._fn = tf.function(_forward, input_signature=None, reduce_retracing=False, jit_compile=False)
        probe = model(np.zeros((1, h, w, 3), np.float32), training=False)
        layers = tuple(LayerSpec(k, tuple(int(d) for d in v.shape[1:])) for k, v in sorted(probe.items()))
        fp = fingerprint_model(self.name, model.to_json(), model.get_weights(), self.preprocessing)
        self._info = BackboneInfo(
            name=self.name,
            fingerprint=fp,
            input_kind="image",
            default_layer=self.default_layer,
            layers=layers,
            input_size=(h, w, 3),
            preprocessing=self.preprocessing,
        )

    def info(self) -> BackboneInfo:
        assert self._info is not None, "load() first"
        return self._info

    def preprocess(self, item: InputItem) -> np.ndarray:
        return image_input(item, self.name, self.max_image_pixels, self.input_size)

    def forward(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        return run_bucketed(lambda x: self._fn(tf.constant(x)), batch, (*self.input_size, 3), self.batch_buckets)

    def warmup(self) -> None:
        h, w = self.input_size
        for b in self.batch_buckets:
            self.forward([np.zeros((h, w, 3), np.uint8)] * b)

    @property
    def trace_count(self) -> int:
        return self._traces

    def keras_model(self):
        return self._model
