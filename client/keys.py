"""The content key of an input: what a client computes locally to ask the store what it holds.

The key itself is defined in ``featurebank.common.keys``, which the server uses too; this module adds
what the SDK accepts as an input and keeps the SDK's import path.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from featurebank.common.keys import KEY_VERSION, KEY_VERSIONS, image_key, input_key, tensor_key, text_key
from featurebank.v1 import featurebank_pb2 as pb

__all__ = [
    "KEY_VERSION",
    "KEY_VERSIONS",
    "InputLike",
    "content_key",
    "image_key",
    "input_key",
    "tensor_key",
    "text_key",
]

InputLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray, pb.Input]


def content_key(item: InputLike, version: int = KEY_VERSION) -> str:
    """The content key the server will report for this input, computed locally.

    Args:
        item: encoded image ``bytes``, a file path (``pathlib.Path``; its bytes are an image),
            text ``str``, a numpy array (a tensor), or an ``Input`` message.
        version: the key version (``KEY_VERSION``, BLAKE3; 1 for the BLAKE2b keys of servers and
            SDKs before key versions).

    Returns:
        32 lowercase hex characters (a 16-byte digest).
    """
    from featurebank.client.inputs import to_input

    return input_key(to_input(item), version)
