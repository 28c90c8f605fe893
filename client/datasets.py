"""Datasets for the SDK: image folders, text files and CSV columns in; FeatureSets out (.npz)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

# The extensions keras.utils.image_dataset_from_directory accepts.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


@dataclasses.dataclass
class FeatureSet:
    """Features of a dataset with what produced them, so a head can refuse the wrong features.

    Attributes:
        features: (N, D) array, one row per input in order.
        labels: (N,) int labels or None.
        class_names: label index -> name.
        keys: content keys, one per input.
        backbone, fingerprint, layer: where the features came from.
        hits: how many came from the cache.
    """

    features: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    keys: list[str]
    backbone: str
    fingerprint: str
    layer: str
    hits: int = 0

    def __len__(self) -> int:
        return len(self.features)

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(1, len(self))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``.npz`` (features, labels, keys and metadata) or ``.npy`` (features only)."""
        path = str(path)
        if path.endswith(".npy"):
            np.save(path, self.features)
            return
        meta = {
            "class_names": self.class_names,
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "layer": self.layer,
        }
        np.savez(
            path,
            features=self.features,
            labels=self.labels if self.labels is not None else np.zeros(0, np.int64),
            has_labels=self.labels is not None,
            keys=np.asarray(self.keys),
            meta=json.dumps(meta),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a FeatureSet written by ``save`` to ``.npz``."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(
                features=z["features"],
                labels=z["labels"] if bool(z["has_labels"]) else None,
                class_names=meta["class_names"],
                keys=[str(k) for k in z["keys"]],
                backbone=meta["backbone"],
                fingerprint=meta["fingerprint"],
                layer=meta["layer"],
            )

    def split(self, validation_split: float, seed: int = 0) -> tuple[FeatureSet, FeatureSet]:
        """A shuffled (train, validation) split with a fixed seed."""
        if not 0 < validation_split < 1:
            raise ValueError(f"validation_split must be in (0, 1), got {validation_split}")
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = max(1, int(round(len(self) * validation_split)))
        return self.subset(order[n_val:]), self.subset(order[:n_val])

    def subset(self, index: Sequence[int]) -> FeatureSet:
        index = np.asarray(index)
        return dataclasses.replace(
            self,
            features=self.features[index],
            labels=None if self.labels is None else self.labels[index],
            keys=[self.keys[i] for i in index],
            hits=0,
        )


def image_directory(path: str | os.PathLike) -> tuple[list[pathlib.Path], np.ndarray, list[str]]:
    """Image files and labels from ``path/<class name>/*.jpg`` (the Keras
    ``image_dataset_from_directory`` convention: classes are the sorted sub-folder names).

    Raises:
        ValueError: no sub-folders, or no image files.
    """
    root = pathlib.Path(path)
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_names:
        raise ValueError(f"{root} has no sub-folders: expected {root}/<class name>/<image files>")
    files, labels = [], []
    for index, name in enumerate(class_names):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(index)
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} files under {root}")
    return files, np.asarray(labels, np.int64), class_names


def text_file(path: str | os.PathLike) -> list[str]:
    """One text per non-empty line."""
    return [line for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def csv_columns(
    path: str | os.PathLike, text_column: str, label_column: str | None = None
) -> tuple[list[str], np.ndarray | None, list[str]]:
    """Texts (and labels, mapped to sorted class names) from named CSV columns."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and text_column not in rows[0]:
        raise ValueError(f"{path} has no column {text_column!r}; columns: {', '.join(rows[0])}")
    texts = [r[text_column] for r in rows]
    if label_column is None:
        return texts, None, []
    raw = [r[label_column] for r in rows]
    class_names = sorted(set(raw))
    index = {c: i for i, c in enumerate(class_names)}
    return texts, np.asarray([index[v] for v in raw], np.int64), class_names


def resolve(
    data, labels=None, *, text_column: str | None = None, label_column: str | None = None
) -> tuple[list, np.ndarray | None, list[str]]:
    """(inputs, labels, class_names) from a list, an image folder, a .txt file or a .csv file.

    ``labels`` may be ints or strings (mapped to sorted class names); folders bring their own.
    """
    class_names: list[str] = []
    if isinstance(data, os.PathLike) or (isinstance(data, str) and os.path.exists(data)):
        p = pathlib.Path(data)
        if p.is_dir():
            inputs, labels, class_names = image_directory(p)
        elif p.suffix.lower() == ".csv":
            if text_column is None:
                raise ValueError("a CSV needs text_column= (and label_column= for labels)")
            inputs, csv_labels, class_names = csv_columns(p, text_column, label_column)
            labels = csv_labels if labels is None else labels
        else:
            inputs = text_file(p)
    else:
        inputs = list(data)
    if labels is not None and not class_names:
        labels = list(labels)
        if labels and isinstance(labels[0], str):
            class_names = sorted(set(labels))
            index = {c: i for i, c in enumerate(class_names)}
            labels = [index[v] for v in labels]
        labels = np.asarray(labels, np.int64)
        if not class_names:
            class_names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    return inputs, labels, class_names
