"""The content key of an input: what a client computes locally to ask the store what it holds."""

from __future__ import annotations

import hashlib
import os
from typing import Union

import numpy as np

from featurebank.client import tensors
from featurebank.v1 import featurebank_pb2 as pb

InputLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray, pb.Input]


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


def image_key(data: bytes) -> str:
    return _digest(b"image\0", data)


def text_key(text: str) -> str:
    return _digest(b"text\0", text.encode("utf-8"))


def tensor_key(dtype_name: str, shape: tuple[int, ...] | list[int], data: bytes) -> str:
    return _digest(b"tensor\0", dtype_name.encode(), b"\0", ",".join(str(int(d)) for d in shape).encode(), b"\0", data)


def input_key(item: pb.Input) -> str:
    """The content key of one Input message (see the proto for the definition).

    Raises:
        ValueError: the Input has no payload or an unknown tensor dtype.
    """
    kind = item.WhichOneof("payload")
    if kind == "image":
        return image_key(item.image)
    if kind == "text":
        return text_key(item.text)
    if kind == "tensor":
        name = tensors.DTYPE_NAMES.get(item.tensor.dtype)
        if name is None:
            raise ValueError(f"tensor dtype {item.tensor.dtype} is not supported")
        return tensor_key(name, item.tensor.shape, item.tensor.data)
    raise ValueError("input has no payload (set one of image, text, tensor)")


def content_key(item: InputLike) -> str:
    """The content key the server will report for this input, computed locally.

    Args:
        item: encoded image ``bytes``, a file path (``pathlib.Path``; its bytes are an image),
            text ``str``, a numpy array (a tensor), or an ``Input`` message.

    Returns:
        32 lowercase hex characters (BLAKE2b, 16-byte digest).
    """
    from featurebank.client.inputs import to_input

    return input_key(to_input(item))
