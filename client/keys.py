"""The content key of an input: what a client computes locally to ask the store what it holds."""

from __future__ import annotations

import hashlib
import os
from typing import Union

import blake3
import numpy as np

from featurebank.client import tensors
from featurebank.v1 import featurebank_pb2 as pb

InputLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray, pb.Input]

# Content keys are versioned (LookupRequest.key_version): 2, the default, is BLAKE3 (SIMD: ~4x
# cheaper than BLAKE2b on an 88 KB image, and the server hashes every input of every request);
# 1 is BLAKE2b, what servers and SDKs before key versions computed. Both are 16-byte digests over
# the same bytes (see the proto), so a key's version cannot be read off the key itself.
KEY_VERSION = 2
KEY_VERSIONS = (1, 2)


def _digest(parts: tuple[bytes, ...], version: int) -> str:
    if version == 2:
        h = blake3.blake3(parts[0])
    elif version == 1:
        h = hashlib.blake2b(parts[0], digest_size=16)
    else:
        raise ValueError(f"content key version {version} is not one of {KEY_VERSIONS}")
    for p in parts[1:]:
        h.update(p)
    return h.hexdigest(16) if version == 2 else h.hexdigest()


def image_key(data: bytes, version: int = KEY_VERSION) -> str:
    return _digest((b"image\0", data), version)


def text_key(text: str, version: int = KEY_VERSION) -> str:
    return _digest((b"text\0", text.encode("utf-8")), version)


def tensor_key(dtype_name: str, shape: tuple[int, ...] | list[int], data: bytes, version: int = KEY_VERSION) -> str:
    meta = b"tensor\0" + dtype_name.encode() + b"\0" + ",".join(str(int(d)) for d in shape).encode() + b"\0"
    return _digest((meta, data), version)


def input_key(item: pb.Input, version: int = KEY_VERSION) -> str:
    """The content key of one Input message (see the proto for the definition), of a key version.

    Raises:
        ValueError: the Input has no payload or an unknown tensor dtype.
    """
    kind = item.WhichOneof("payload")
    if kind == "image":
        return image_key(item.image, version)
    if kind == "text":
        return text_key(item.text, version)
    if kind == "tensor":
        name = tensors.DTYPE_NAMES.get(item.tensor.dtype)
        if name is None:
            raise ValueError(f"tensor dtype {item.tensor.dtype} is not supported")
        return tensor_key(name, item.tensor.shape, item.tensor.data, version)
    raise ValueError("input has no payload (set one of image, text, tensor)")


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
