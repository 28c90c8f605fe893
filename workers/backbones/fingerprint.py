"""Backbone fingerprints: a hash of everything that determines a backbone's output."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

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
