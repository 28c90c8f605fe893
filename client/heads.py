"""Heads: small Keras classifiers trained on features from the store (needs featurebank[train])."""

from __future__ import annotations

import json
import os
import time
import warnings
import zipfile

import numpy as np

from featurebank.client.datasets import FeatureSet
from featurebank.common import tensors
from featurebank.v1 import featurebank_pb2 as pb

HEAD_KINDS = ("logistic", "mlp")
_META_FILE = "featurebank_head.json"


class HeadMismatchError(ValueError):
    """Features from another backbone, fingerprint or layer than the head was trained on."""


class SmallDataWarning(UserWarning):
    """Too few labels to hold out a validation split: the head trained on all of them, and its
    metrics are training metrics."""


def _keras():
    try:
        import keras
    except ImportError as e:  # the SDK's base install has no TensorFlow
        raise ImportError("training heads needs TensorFlow: pip install 'featurebank[train]'") from e
    return keras


def _is_raw(x) -> bool:
    """Raw inputs (text, encoded images, paths) rather than features."""
    if isinstance(x, (str, bytes, bytearray, os.PathLike)):
        return True
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USOV"
    if isinstance(x, (list, tuple)) and x:
        return isinstance(x[0], (str, bytes, bytearray, os.PathLike, pb.Input))
    return False


def build_model(
    kind: str,
    input_dim: int,
    num_classes: int,
    *,
    hidden_units: int = 256,
    l2: float = 1e-4,
    dropout: float = 0.2,
    mean: np.ndarray | None = None,
    variance: np.ndarray | None = None,
):
    """A standardising input layer, then softmax regression ("logistic") or one hidden ReLU layer ("mlp")."""
    keras = _keras()
    if kind not in HEAD_KINDS:
        raise ValueError(f"head must be one of {HEAD_KINDS}, got {kind!r}")
    inputs = keras.Input((input_dim,), name="features")
    x = keras.layers.Normalization(mean=mean, variance=variance, name="standardize")(inputs)
    reg = keras.regularizers.L2(l2)
    if kind == "mlp":
        x = keras.layers.Dense(hidden_units, activation="relu", kernel_regularizer=reg, name="hidden")(x)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg, name="classes")(x)
    return keras.Model(inputs, outputs, name=f"featurebank_{kind}_head")


class Head:
    """A trained head and what it was trained on.

    Attributes:
        model: the Keras model (features in, class probabilities out).
        backbone, fingerprint, layer: the features it takes; others are refused.
        class_names, kind, history (per epoch).
        metrics: at training time, ``val_*`` on the held-out split, or ``train_*`` (training
            metrics, not an estimate for new data) when there were too few labels to hold any out;
            ``validation_examples`` says how many were held out (0: none).
    """

    def __init__(
        self,
        model,
        *,
        backbone: str,
        fingerprint: str,
        layer: str,
        class_names: list[str],
        kind: str,
        metrics: dict[str, float] | None = None,
        history: dict[str, list[float]] | None = None,
    ):
        self.model = model
        self.backbone = backbone
        self.fingerprint = fingerprint
        self.layer = layer
        self.class_names = list(class_names)
        self.kind = kind
        self.metrics = dict(metrics or {})
        self.history = dict(history or {})

    @property
    def input_dim(self) -> int:
        return int(self.model.input_shape[-1])

    @property
    def validated(self) -> bool:
        """Whether ``metrics`` were measured on held-out examples (``val_*``) rather than training ones."""
        return self.metrics.get("validation_examples", 0) > 0 or any(k.startswith("val_") for k in self.metrics)

    @classmethod
    def train(
        cls,
        data: FeatureSet,
        *,
        head: str = "logistic",
        validation_split: float = 0.2,
        epochs: int = 200,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        seed: int = 0,
        patience: int = 10,
        min_validation_per_class: int = 20,
        small_data_steps: int = 300,
        verbose: int = 0,
        **model_options,
    ) -> Head:
        """Train on a labelled FeatureSet.

        With enough labels, ``validation_split`` of them (seeded) are held out: training stops
        early on their loss and keeps the best weights, and ``metrics`` reports them. When the
        holdout would leave fewer than ``min_validation_per_class`` examples per class, every
        label is used for training instead (``small_data_steps`` full-batch Adam steps at a
        learning rate of at least 1e-2): a handful of validation examples would only make the
        head worse, so ``metrics`` then has training accuracy only, and a SmallDataWarning says
        so (unless ``validation_split=0`` asked for no validation).

        Warns:
            SmallDataWarning: validation was asked for but skipped.

        Raises:
            ValueError: no labels, fewer than two classes, or a bad option.
        """
        keras = _keras()
        if data.labels is None:
            raise ValueError("training a head needs labels")
        num_classes = max(len(data.class_names), int(data.labels.max()) + 1)
        if num_classes < 2:
            raise ValueError("training a head needs at least two classes")
        keras.utils.set_random_seed(seed)
        small = not validation_split or len(data) * validation_split / num_classes < min_validation_per_class
        if small and validation_split:
            warnings.warn(
                f"validation skipped: {len(data)} labelled examples for {num_classes} classes leave fewer than "
                f"{min_validation_per_class} a class to hold out with validation_split={validation_split:g}; trained "
                f"on all {len(data)}, so head.metrics (train_accuracy, train_loss) are training metrics, not an "
                f"estimate for new data. Label at least {int(np.ceil(min_validation_per_class * num_classes / validation_split))} "
                f"examples, or measure on labelled data kept apart with head.evaluate(...)",
                SmallDataWarning,
                stacklevel=2,
            )
        train, val = (data, None) if small else data.split(validation_split, seed)
        x = train.features.reshape(len(train), -1).astype(np.float32)
        variance = x.var(0)
        variance[variance < 1e-8] = 1.0  # a feature constant in training is not blown up at prediction
        model = build_model(head, x.shape[1], num_classes, mean=x.mean(0), variance=variance, **model_options)
        lr = max(learning_rate, 1e-2) if small else learning_rate
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        if small:
            # One epoch of full-batch steps over a repeated array: Keras' per-epoch overhead would
            # otherwise dominate training on a few dozen examples.
            history = model.fit(
                np.tile(x, (small_data_steps, 1)),
                np.tile(train.labels, small_data_steps),
                batch_size=len(x),
                epochs=1,
                shuffle=False,
                verbose=verbose,
            )
        else:
            validation = (val.features.reshape(len(val), -1).astype(np.float32), val.labels)
            stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
            history = model.fit(
                x,
                train.labels,
                validation_data=validation,
                epochs=epochs,
                batch_size=batch_size,
                callbacks=[stop],
                verbose=verbose,
            )
        result = cls(
            model,
            backbone=data.backbone,
            fingerprint=data.fingerprint,
            layer=data.layer,
            class_names=data.class_names or [str(i) for i in range(num_classes)],
            kind=head,
            history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        )
        evaluated = result.evaluate(train if small else val)
        result.metrics = {f"{'train' if small else 'val'}_{k}": v for k, v in evaluated.items()}
        result.metrics["train_examples"] = float(len(train))
        result.metrics["validation_examples"] = 0.0 if small else float(len(val))
        result.metrics["feature_cache_hit_ratio"] = float(data.hit_ratio)
        return result

    def _check(self, x) -> np.ndarray:
        if not isinstance(x, FeatureSet) and _is_raw(x):
            what = (
                type(x).__name__
                if isinstance(x, (str, bytes, os.PathLike, np.ndarray))
                else f"a list of {type(next(iter(x))).__name__}"
            )
            raise TypeError(
                f"Head.predict takes features ({self.input_dim}-d from {self.backbone}/{self.layer}), not raw inputs "
                f"({what}). Pass bank= to fetch them: head.predict(inputs, bank=bank); or serve the head and call "
                f"bank.predict(name, inputs); or fetch them first: bank.features(inputs, backbone={self.backbone!r}, "
                f"layer={self.layer!r})"
            )
        if isinstance(x, FeatureSet):
            for what, mine, theirs in (
                ("backbone", self.backbone, x.backbone),
                ("fingerprint", self.fingerprint, x.fingerprint),
                ("layer", self.layer, x.layer),
            ):
                if mine != theirs:
                    raise HeadMismatchError(
                        f"this head was trained on {self.backbone}/{self.layer} (fingerprint {self.fingerprint[:16]}); "
                        f"these features come from {x.backbone}/{x.layer} (fingerprint {x.fingerprint[:16]}): {what} differs"
                    )
            x = x.features
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        if x.shape[1] != self.input_dim:
            raise HeadMismatchError(
                f"this head takes {self.input_dim} features ({self.backbone}/{self.layer}), got {x.shape[1]}"
            )
        return x

    def predict(self, x, *, bank=None) -> np.ndarray:
        """Class probabilities (N, C), in the order of ``class_names``.

        Args:
            x: a FeatureSet or an (N, D) array of this head's features; or, with ``bank``, raw
                inputs (text ``str``, image ``bytes``, ``pathlib.Path``, a folder or file as
                ``bank.features`` takes them).
            bank: a FeatureBank to fetch the features of raw inputs from, with this head's
                backbone and layer (the fingerprint is checked as for a FeatureSet).

        Raises:
            TypeError: raw inputs without ``bank`` (the message says what to pass instead).
            HeadMismatchError: features of another backbone, fingerprint, layer or size.
        """
        if bank is not None and not isinstance(x, FeatureSet) and _is_raw(x):
            x = bank.features(x, backbone=self.backbone, layer=self.layer)
        return np.asarray(self.model.predict(self._check(x), verbose=0, batch_size=1024))

    def evaluate(self, data: FeatureSet) -> dict[str, float]:
        """Accuracy and cross-entropy on a labelled FeatureSet."""
        probs = self.predict(data)
        labels = data.labels
        accuracy = float((probs.argmax(1) == labels).mean())
        loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())
        return {"accuracy": accuracy, "loss": loss}

    def _meta(self) -> dict:
        return {
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "class_names": self.class_names,
            "kind": self.kind,
            "metrics": self.metrics,
            "history": self.history,
        }

    def save(self, path: str | os.PathLike) -> None:
        """One ``.keras`` file; what the head was trained on is stored inside it."""
        path = str(path)
        if not path.endswith(".keras"):
            raise ValueError(f"save heads as .keras files, got {path!r}")
        self.model.save(path)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr(_META_FILE, json.dumps(self._meta()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Head:
        """Read a head written by ``save``."""
        keras = _keras()
        with zipfile.ZipFile(path) as z:
            if _META_FILE not in z.namelist():
                raise ValueError(f"{path} is a Keras file but not a featurebank head (no {_META_FILE})")
            meta = json.loads(z.read(_META_FILE))
        return cls(keras.saving.load_model(path, compile=False), **meta)

    def to_proto(self, name: str, version: int = 0) -> pb.Head:
        """The head as dense layers for the server, with the standardisation folded into the first."""
        layers: list[tuple[np.ndarray, np.ndarray, str]] = []
        mean = variance = None
        for layer in self.model.layers:
            cls_name = type(layer).__name__
            if cls_name == "Normalization":
                mean = np.asarray(layer.mean, np.float64).reshape(-1)
                variance = np.asarray(layer.variance, np.float64).reshape(-1)
            elif cls_name == "Dense":
                kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
                layers.append((kernel, bias, layer.activation.__name__))
            elif cls_name not in ("InputLayer", "Dropout"):
                raise ValueError(f"cannot serve a head with a {cls_name} layer")
        if mean is not None:
            std = np.maximum(np.sqrt(variance), 1e-7)  # Keras' Normalization divides by max(sqrt(var), epsilon)
            kernel, bias, act = layers[0]
            layers[0] = (kernel / std[:, None], bias - (mean / std) @ kernel, act)
        head = pb.Head(
            name=name,
            version=version,
            backbone=self.backbone,
            backbone_fingerprint=self.fingerprint,
            layer=self.layer,
            class_names=self.class_names,
            kind=self.kind,
            metrics={k: float(v) for k, v in self.metrics.items()},
            created_unix_ms=int(time.time() * 1000),
        )
        for kernel, bias, act in layers:
            d = head.layers.add(activation=act)
            tensors.to_proto(kernel.astype(np.float32), d.kernel)
            tensors.to_proto(bias.astype(np.float32), d.bias)
        return head
