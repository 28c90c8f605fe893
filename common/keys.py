"""The content key of an input: the store's address for it, computed the same way by the server and by clients."""

from __future__ import annotations

import hashlib

from featurebank.common import tensors
from featurebank.v1 import featurebank_pb2 as pb


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
