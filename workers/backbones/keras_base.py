"""The one traced-Keras base every Keras backbone reuses, and the Keras image base built on it."""

from __future__ import annotations

import abc
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from featurebank.workers.backbones.base import Backbone, BackboneInfo, InputItem, LayerSpec
from featurebank.workers.backbones.buckets import DEFAULT_BATCH_BUCKETS, run_bucketed
from featurebank.workers.backbones.fingerprint import fingerprint_model
from featurebank.workers.backbones.images import image_input

logger = logging.getLogger(__name__)


class _PlannedTraceFilter(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning while a warm-up traces on purpose.

    Warm-up traces one shape per call by design, which is exactly what TensorFlow warns about;
    outside a warm-up the filter is removed, so a retrace while serving still warns (and is
    counted and logged by the backbone itself).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and "triggered tf.function retracing" in record.getMessage())


_PLANNED = _PlannedTraceFilter()


def layer_specs(outputs: dict[str, Any]) -> tuple[LayerSpec, ...]:
    """The layers of a model's dict output (one probe call), sorted by name."""
    return tuple(LayerSpec(k, tuple(int(d) for d in v.shape[1:])) for k, v in sorted(outputs.items()))


class TracedKerasBackbone(Backbone):
    """A frozen Keras model behind one ``tf.function`` whose traces are counted.

    A subclass builds and freezes its model in ``load()`` (``self.freeze(model)``), compiles its
    forward pass with ``self.trace(fn)`` and sets ``self._info``; its ``warmup()`` runs the
    planned shapes inside ``self.planned_traces()``. A trace outside a warm-up (a shape it did
    not cover) is still counted in ``trace_count`` and logged as a warning with its shapes.
    """

    def __init__(self) -> None:
        self._model = None
        self._fn: Callable | None = None
        self._traces = 0
        self._planning = 0
        self._info: BackboneInfo | None = None

    def freeze(self, model):
        """Mark ``model`` frozen (trainable=False) and keep it as this backbone's model."""
        model.trainable = False
        self._model = model
        return model

    def trace(self, forward: Callable) -> Callable:
        """Compile ``forward`` (tensors in, {layer: tensor} out) as this backbone's one counted tf.function."""
        import tensorflow as tf

        def counted(*args):
            self._traces += 1  # a Python side effect: runs once per trace, never per call
            if not self._planning:
                logger.warning(
                    "%s: unplanned trace #%d of the forward pass for input shapes %s "
                    "(not covered by the warm-up; each new shape costs a trace)",
                    self.name,
                    self._traces,
                    [tuple(a.shape) for a in args],
                )
            return forward(*args)

        self._fn = tf.function(counted, reduce_retracing=False, jit_compile=False)
        return self._fn

    @contextlib.contextmanager
    def planned_traces(self) -> Iterator[None]:
        """Traces inside are the planned warm-up: not reported as unplanned, TF's retracing warning hidden."""
        tf_logger = logging.getLogger("tensorflow")
        with _PLANNED.lock:
            if _PLANNED.active == 0:
                tf_logger.addFilter(_PLANNED)
            _PLANNED.active += 1
        self._planning += 1
        try:
            yield
        finally:
            self._planning -= 1
            with _PLANNED.lock:
                _PLANNED.active -= 1
                if _PLANNED.active == 0:
                    tf_logger.removeFilter(_PLANNED)

    def info(self) -> BackboneInfo:
        assert self._info is not None, "load() first"
        return self._info

    @property
    def trace_count(self) -> int:
        return self._traces

    def keras_model(self):
        return self._model


class ImageBackbone(TracedKerasBackbone):
    """A Keras image model: decode + resize on the CPU, the model's own preprocessing in-graph.

    Subclasses implement ``build()`` returning a Keras model that takes raw RGB pixels as float32
    in [0, 255], shape (N, H, W, 3), applies its own preprocessing, and outputs a dict
    {layer_name: (N, *shape)}.
    """

    input_kind = "image"
    input_size: tuple[int, int] = (224, 224)
    default_layer: str = "pooled"
    preprocessing: str = ""

    def __init__(self, *, max_image_pixels: int = 50_000_000, batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS):
        super().__init__()
        self.max_image_pixels = max_image_pixels
        self.batch_buckets = tuple(sorted(batch_buckets))

    @abc.abstractmethod
    def build(self):
        """Return the Keras model (raw pixels in, dict of layer outputs out); load() freezes it."""

    def load(self) -> None:
        model = self.freeze(self.build())
        h, w = self.input_size
        self.trace(lambda x: model(x, training=False))
        probe = model(np.zeros((1, h, w, 3), np.float32), training=False)
        self._info = BackboneInfo(
            name=self.name,
            fingerprint=fingerprint_model(self.name, model.to_json(), model.get_weights(), self.preprocessing),
            input_kind="image",
            default_layer=self.default_layer,
            layers=layer_specs(probe),
            input_size=(h, w, 3),
            preprocessing=self.preprocessing,
        )

    def load_preprocessing(self, info: BackboneInfo) -> None:
        """Decode and resize need only the input size, known before the model is built.

        A subclass that overrides ``preprocess`` but not this hook may need its model there: its
        model workers preprocess.
        """
        cls = type(self)
        if (
            cls.preprocess is not ImageBackbone.preprocess
            and cls.load_preprocessing is ImageBackbone.load_preprocessing
        ):
            raise NotImplementedError(f"{cls.__name__} overrides preprocess() without load_preprocessing()")

    def preprocess(self, item: InputItem) -> np.ndarray:
        return image_input(item, self.name, self.max_image_pixels, self.input_size)

    def forward(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        return run_bucketed(lambda x: self._fn(tf.constant(x)), batch, (*self.input_size, 3), self.batch_buckets)

    def warmup(self) -> None:
        h, w = self.input_size
        with self.planned_traces():
            for b in self.batch_buckets:
                self.forward([np.zeros((h, w, 3), np.uint8)] * b)
