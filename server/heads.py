"""Served heads: validated stacks of dense layers run in numpy, and where they persist."""

from __future__ import annotations

import abc
import math
import os
import pathlib
import re

import numpy as np

from featurebank.client import tensors
from featurebank.server.errors import InvalidArgumentError, NotFoundError, UnavailableError
from featurebank.v1 import featurebank_pb2 as pb

HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_HEAD_PARAMETERS = 50_000_000


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, Keras' default."""
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)


ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "softmax": _softmax,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "gelu": _gelu,
}


class CompiledHead:
    """A head ready to run: float32 (kernel, bias, activation) per layer.

    A head is small (a logistic regression or an MLP on a few thousand features), so numpy runs it
    in the frontend in microseconds, and the server never loads user-supplied model code.
    """

    def __init__(self, head: pb.Head):
        self.head = head
        self.layers: list[tuple[np.ndarray, np.ndarray, str]] = []
        if not head.layers:
            raise InvalidArgumentError("a head needs at least one dense layer")
        params = 0
        prev = None
        for i, layer in enumerate(head.layers):
            try:
                kernel = tensors.from_proto(layer.kernel).astype(np.float32)
                bias = tensors.from_proto(layer.bias).astype(np.float32)
            except tensors.TensorError as e:
                raise InvalidArgumentError(f"head layer {i}: {e}") from None
            if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
                raise InvalidArgumentError(f"head layer {i}: kernel must be (in, out) and bias (out,), got {kernel.shape}, {bias.shape}")
            if prev is not None and kernel.shape[0] != prev:
                raise InvalidArgumentError(f"head layer {i} takes {kernel.shape[0]} inputs but layer {i - 1} gives {prev}")
            if layer.activation not in ACTIVATIONS:
                raise InvalidArgumentError(f"head layer {i}: activation {layer.activation!r} is not one of {sorted(ACTIVATIONS)}")
            if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
                raise InvalidArgumentError(f"head layer {i} has NaN or Inf weights")
            params += kernel.size + bias.size
            prev = kernel.shape[1]
            self.layers.append((kernel, bias, layer.activation))
        if params > MAX_HEAD_PARAMETERS:
            raise InvalidArgumentError(f"head has {params} parameters, over the limit of {MAX_HEAD_PARAMETERS}")
        self.input_dim = self.layers[0][0].shape[0]
        self.num_outputs = prev
        if head.class_names and len(head.class_names) != self.num_outputs and not (self.num_outputs == 1 and len(head.class_names) == 2):
            raise InvalidArgumentError(f"head has {len(head.class_names)} class names but {self.num_outputs} outputs")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for features (N, input_dim); a sigmoid unit gives (N, 2)."""
        for kernel, bias, activation in self.layers:
            x = ACTIVATIONS[activation](x @ kernel + bias)
        if x.shape[1] == 1:  # one sigmoid unit: P(class 1)
            x = np.concatenate([1.0 - x, x], axis=1)
        return x.astype(np.float32)

    def info(self) -> pb.HeadInfo:
        h = self.head
        return pb.HeadInfo(name=h.name, version=h.version, backbone=h.backbone, backbone_fingerprint=h.backbone_fingerprint,
                           layer=h.layer, class_names=h.class_names, metrics=h.metrics, kind=h.kind,
                           created_unix_ms=h.created_unix_ms, input_dim=self.input_dim)


def check_name(name: str) -> None:
    if not HEAD_NAME.match(name or ""):
        raise InvalidArgumentError(f"head name {name!r} must be 1-64 of letters, digits, '_', '.', '-', starting alphanumeric")


class HeadStore(abc.ABC):
    """Where heads persist across restarts: every version of every name, as serialised Head."""

    @abc.abstractmethod
    async def versions(self, name: str) -> list[int]: ...

    @abc.abstractmethod
    async def names(self) -> list[str]: ...

    @abc.abstractmethod
    async def read(self, name: str, version: int) -> bytes | None: ...

    @abc.abstractmethod
    async def write(self, name: str, version: int, data: bytes) -> None: ...

    @abc.abstractmethod
    async def remove(self, name: str, version: int) -> bool: ...

    async def get(self, name: str, version: int) -> pb.Head:
        """The head (version 0: the latest). Raises NotFoundError."""
        check_name(name)
        if version == 0:
            versions = await self.versions(name)
            if not versions:
                raise NotFoundError(f"no head named {name!r}")
            version = max(versions)
        data = await self.read(name, version)
        if data is None:
            raise NotFoundError(f"no head {name!r} version {version}")
        return pb.Head.FromString(data)

    async def put(self, head: pb.Head) -> pb.Head:
        """Store a head, numbering it after the latest version when its version is 0."""
        check_name(head.name)
        if head.version < 0:
            raise InvalidArgumentError("head version must be >= 0 (0: the next one)")
        if head.version == 0:
            head.version = max(await self.versions(head.name), default=0) + 1
        await self.write(head.name, head.version, head.SerializeToString())
        return head


class DirectoryHeadStore(HeadStore):
    """Heads as files: DIR/NAME/VERSION.head (a serialised featurebank.v1.Head)."""

    def __init__(self, root: str):
        self.root = pathlib.Path(root)

    async def versions(self, name: str) -> list[int]:
        d = self.root / name
        return sorted(int(p.stem) for p in d.glob("*.head") if p.stem.isdigit()) if d.is_dir() else []

    async def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.head"))) if self.root.is_dir() else []

    async def read(self, name: str, version: int) -> bytes | None:
        p = self.root / name / f"{version}.head"
        return p.read_bytes() if p.exists() else None

    async def write(self, name: str, version: int, data: bytes) -> None:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{version}.head.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / f"{version}.head")

    async def remove(self, name: str, version: int) -> bool:
        p = self.root / name / f"{version}.head"
        if not p.exists():
            return False
        p.unlink()
        return True


class RedisHeadStore(HeadStore):
    """Heads in Redis, shared by every replica: hash ``fbheads:NAME`` maps version -> Head, no TTL."""

    def __init__(self, url: str, timeout_s: float):
        from featurebank.server.cache import redis_client

        self._redis = redis_client(url, timeout_s)

    async def _do(self, coro):
        try:
            return await coro
        except Exception as e:  # the head store is not optional for head RPCs: say so
            raise UnavailableError(f"head store (Redis) unavailable: {type(e).__name__}: {e}") from None

    async def versions(self, name: str) -> list[int]:
        return sorted(int(v) for v in await self._do(self._redis.hkeys(f"fbheads:{name}")))

    async def names(self) -> list[str]:
        keys = [k async for k in self._redis.scan_iter(match="fbheads:*", count=1000)]
        return sorted(k.decode().split(":", 1)[1] for k in keys)

    async def read(self, name: str, version: int) -> bytes | None:
        return await self._do(self._redis.hget(f"fbheads:{name}", str(version)))

    async def write(self, name: str, version: int, data: bytes) -> None:
        await self._do(self._redis.hset(f"fbheads:{name}", str(version), data))

    async def remove(self, name: str, version: int) -> bool:
        return bool(await self._do(self._redis.hdel(f"fbheads:{name}", str(version))))

    async def close(self) -> None:
        await self._redis.aclose()
