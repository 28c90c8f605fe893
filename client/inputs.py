"""Turning what SDK callers hold (paths, bytes, str, arrays) into Input messages."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from featurebank.common import tensors
from featurebank.v1 import featurebank_pb2 as pb


def to_input(item) -> pb.Input:
    """Build one Input: bytes -> image, pathlib.Path/os.PathLike -> the file's bytes as an image,
    str -> text, numpy array -> tensor, Input -> itself.

    A plain ``str`` is always text; pass ``pathlib.Path`` for image files.
    """
    if isinstance(item, pb.Input):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        return pb.Input(image=bytes(item))
    if isinstance(item, str):
        return pb.Input(text=item)
    if isinstance(item, os.PathLike):
        return pb.Input(image=pathlib.Path(item).read_bytes())
    if isinstance(item, np.ndarray):
        msg = pb.Input()
        tensors.to_proto(item, msg.tensor)
        return msg
    raise TypeError(f"cannot send a {type(item).__name__} as an input; use bytes, str, pathlib.Path or numpy.ndarray")
