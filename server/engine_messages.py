"""Typed messages between frontends and the engine, grouped by direction, and their framing on a stream.

One frame is one message pickled with protocol 5 (common/framing.py): numpy arrays travel as
out-of-band buffers, written to the socket as they are (no copy into the pickle) and read back as
the arrays' memory (one copy, the socket read). Large image bytes travel the same way (the
frontend wraps them in a PickleBuffer: engine_client.py); small ones are in the pickle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import struct
from typing import Any

import grpc
import numpy as np

from featurebank.common import errors
from featurebank.common.framing import COUNT, MAX_BUFFERS, frame
from featurebank.workers.backbones.base import BackboneInfo, InputItem

# Frontend -> engine


@dataclasses.dataclass(frozen=True)
class ComputeRequest:
    """``MissPath.compute`` of one request's missed keys; the answer is a ComputeResult."""

    request_id: int
    backbone: str
    layer: str
    keys: list[str]
    payloads: list[InputItem]  # payloads[i] is keys[i]'s input
    timeout_s: float | None  # what is left of the RPC's deadline; None = no deadline
    tenant: str
    claim: bool
    write: bool
    wait_for_room: bool


@dataclasses.dataclass(frozen=True)
class CancelCompute:
    """The request left (client gone, deadline): stop waiting; its keys' owners stay while others wait."""

    request_id: int


# Engine -> frontend


@dataclasses.dataclass(frozen=True)
class EngineState:
    """Sent on connect and whenever workers come or go: the served backbones (None until every
    worker loaded) and the ready workers per backbone (health, ListBackbones' workers_ready)."""

    backbones: list[BackboneInfo] | None
    ready_workers: dict[str, int]


@dataclasses.dataclass(frozen=True)
class ComputeResult:
    """Per key (in the request's order): features, or an error; ``error`` refuses the whole request."""

    request_id: int
    features: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    from_cache: list[bool] = dataclasses.field(default_factory=list)
    errors: list[tuple[str, str, str] | None] = dataclasses.field(default_factory=list)
    error: tuple[str, str, str] | None = None  # e.g. QueueFullError: raised in the frontend as is


# ------------------------------------------------------------------------------------- errors


def encode_error(e: BaseException) -> tuple[str, str, str]:
    """(exception class, status code name, message) of an outcome, to rebuild on the other side."""
    if isinstance(e, asyncio.CancelledError):
        return ("CancelledError", "CANCELLED", "")
    code = e.code if isinstance(e, errors.FeatureBankError) else grpc.StatusCode.INTERNAL
    return (type(e).__name__, code.name, str(e))


def decode_error(encoded: tuple[str, str, str]) -> BaseException:
    """The same domain exception (QueueFullError, DeadlineExceededError, ...) on this side."""
    name, code, message = encoded
    if name == "CancelledError":
        return asyncio.CancelledError()
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.FeatureBankError)):
        cls = errors.FeatureBankError
    return cls(message, grpc.StatusCode[code])


# ------------------------------------------------------------------------------------- framing


async def write_message(writer: asyncio.StreamWriter, message: Any) -> None:
    """Write one frame (in one call, so concurrent writers never interleave) and wait for room."""
    writer.writelines(frame(message))
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message; asyncio.IncompleteReadError when the other side closed."""
    (n,) = COUNT.unpack(await reader.readexactly(COUNT.size))
    if n > MAX_BUFFERS:
        raise ConnectionError(f"bad frame: {n} buffers")
    lengths = struct.unpack(f"!{n + 1}Q", await reader.readexactly(8 * (n + 1)))
    body = await reader.readexactly(lengths[0])
    buffers = [await reader.readexactly(length) for length in lengths[1:]]
    return pickle.loads(body, buffers=buffers)
