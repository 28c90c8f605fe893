"""Backbones by name: built-in ones, and any Backbone class named as "package.module:Class"."""

from __future__ import annotations

import importlib
from typing import Any

from featurebank.workers.backbones.base import Backbone

# name -> (module, class, default options). Modules are imported only in the worker that needs them.
BUILTIN: dict[str, tuple[str, str, dict[str, Any]]] = {
    "efficientnet_lite0": ("featurebank.workers.backbones.efficientnet_lite", "EfficientNetLite0", {}),
    "minilm": ("featurebank.workers.backbones.minilm", "MiniLM", {}),
    "toy": ("featurebank.workers.backbones.toy", "ToyBackbone", {}),
    "mobilenet_v2": ("featurebank.workers.backbones.keras_apps", "KerasApplication", {"application": "MobileNetV2"}),
    "efficientnet_b0": (
        "featurebank.workers.backbones.keras_apps",
        "KerasApplication",
        {"application": "EfficientNetB0"},
    ),
    "resnet50": ("featurebank.workers.backbones.keras_apps", "KerasApplication", {"application": "ResNet50"}),
}

DEFAULT_BACKBONES = ("efficientnet_lite0", "minilm")


def resolve(name: str, file_backbone: bool = False) -> tuple[type[Backbone], dict[str, Any]]:
    """The Backbone class and default options for a registry name, a "module:Class" path, or (with
    ``file_backbone``) any name for a user's model file.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name in BUILTIN:
        module, cls, options = BUILTIN[name]
    elif file_backbone:
        module, cls, options = "featurebank.workers.backbones.keras_file", "KerasFileBackbone", {}
    elif ":" in name:
        module, cls = name.split(":", 1)
        options = {}
    else:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(BUILTIN))}, or 'package.module:Class'")
    return getattr(importlib.import_module(module), cls), dict(options)


def create(name: str, **options: Any) -> Backbone:
    """Instantiate a backbone (not yet loaded); ``options`` override the registry defaults."""
    cls, defaults = resolve(name, file_backbone="path" in options)
    defaults.update(options)
    backbone = cls(**defaults)
    backbone.name = name  # the name clients ask for; one class may serve several (keras_apps)
    return backbone
