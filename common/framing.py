"""One message as a frame of pickle protocol 5 with out-of-band buffers: arrays and large bytes
are written as they are (no copy into the pickle) and read back as views of what was received.

Frame: ``!I`` buffer count n, ``!Q`` x (n + 1) lengths (the pickle, then each buffer), the pickle,
the buffers. Used on the frontends' socket to the engine (server/engine_messages.py) and on the
engine's pipes to its preprocessing processes and model workers. Pickling large bytes or arrays
in-band costs ~1 ms per MB here (the pickler grows its output as it goes); out of band they cost a
copy into the socket, and none on the way out of it.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

COUNT = struct.Struct("!I")
MAX_BUFFERS = 1 << 20  # a frame claiming more is not ours: the stream is out of step
OUT_OF_BAND_BYTES = 16 * 1024  # bytes this large travel beside the pickle; smaller ones cost less in it


def out_of_band(payload: Any) -> Any:
    """``payload`` as a PickleBuffer when it is large bytes (it then travels beside the pickle and
    arrives as a read-only memoryview), else unchanged."""
    if isinstance(payload, bytes) and len(payload) >= OUT_OF_BAND_BYTES:
        return pickle.PickleBuffer(payload)
    return payload


def frame(message: Any) -> list:
    """The parts of one frame, to be written one after the other (buffers are not copied)."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    header = COUNT.pack(len(raws)) + struct.pack(f"!{len(raws) + 1}Q", len(body), *(r.nbytes for r in raws))
    return [header, body, *raws]


def unframe(data: bytes | bytearray | memoryview) -> Any:
    """The message of one whole frame; its arrays and buffers are views of ``data`` (writable when
    ``data`` is a bytearray). ValueError when ``data`` is not a frame."""
    view = memoryview(data)
    (n,) = COUNT.unpack_from(view)
    if n > MAX_BUFFERS:
        raise ValueError(f"bad frame: {n} buffers")
    lengths = struct.unpack_from(f"!{n + 1}Q", view, COUNT.size)
    offset = COUNT.size + 8 * (n + 1)
    if offset + sum(lengths) != len(view):
        raise ValueError(f"bad frame: {len(view)} bytes, its header says {offset + sum(lengths)}")
    parts = []
    for length in lengths:
        parts.append(view[offset : offset + length])
        offset += length
    return pickle.loads(parts[0], buffers=parts[1:])
