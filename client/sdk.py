"""The Python SDK: FeatureBank (blocking) and AsyncFeatureBank over the featurebank.v1 API."""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np

from featurebank.client import tensors
from featurebank.client.errors import FeatureBankError, status_code
from featurebank.client.inputs import to_input
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

# Stay well under gRPC's 4 MiB default message limit, whatever the server allows.
DEFAULT_MAX_REQUEST_BYTES = 3 * 1024 * 1024
DEFAULT_MAX_ITEMS_PER_REQUEST = 256
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# gRPC's own retry machinery: UNAVAILABLE (a restarting or draining server) is retried with
# exponential backoff; everything else is the caller's decision.
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "featurebank.v1.FeatureBank"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
    "loadBalancingConfig": [{"round_robin": {}}],
})


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    """Channel options: retries, message limits, and keepalive for long-lived connections."""
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclasses.dataclass
class ItemOutcome:
    """One input's answer: features or an error, the content key, and whether it was a hit."""

    index: int
    key: str
    cache_hit: bool
    features: np.ndarray | None
    error: FeatureBankError | None


def _chunks(inputs: Sequence[pb.Input], max_items: int, max_bytes: int) -> Iterator[tuple[int, list[pb.Input]]]:
    """Consecutive slices of inputs whose encoded size stays under max_bytes."""
    start, size, chunk = 0, 0, []
    for i, item in enumerate(inputs):
        n = item.ByteSize() + 8
        if chunk and (len(chunk) >= max_items or size + n > max_bytes):
            yield start, chunk
            start, size, chunk = i, 0, []
        chunk.append(item)
        size += n
    if chunk:
        yield start, chunk


def _outcomes(response: pb.ExtractResponse, offset: int) -> list[ItemOutcome]:
    out = []
    for j, r in enumerate(response.results):
        err = None
        feats = None
        if r.HasField("error"):
            err = FeatureBankError(status_code(r.error.code), r.error.message, offset + j)
        else:
            feats = tensors.from_proto(r.features)
        out.append(ItemOutcome(offset + j, r.key, r.cache_hit, feats, err))
    return out


def _stack(outcomes: list[ItemOutcome]) -> np.ndarray:
    for o in outcomes:
        if o.error is not None:
            raise o.error
    if not outcomes:
        return np.zeros((0, 0), np.float32)
    return np.stack([o.features for o in outcomes])


class FeatureBank:
    """A blocking client. Use as a context manager.

    Args:
        target: ``host:port``, or ``dns:///name:port`` to spread calls over every replica.
        timeout_s: deadline of each RPC.
        max_request_bytes: inputs are split into requests no larger than this.
    """

    def __init__(self, target: str, *, timeout_s: float = 300.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST, channel: grpc.Channel | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_items_per_request = max_items_per_request
        self._channel = channel or grpc.insecure_channel(target, options=channel_options())
        self._stub = pb_grpc.FeatureBankStub(self._channel)

    def __enter__(self) -> "FeatureBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None

    def extract_items(self, inputs: Iterable, *, backbone: str = "", layer: str = "", output_dtype: int = pb.FLOAT32,
                      cache_policy: int = pb.USE) -> list[ItemOutcome]:
        """Per-input outcomes (features or error), in input order; never raises for one bad item.

        Args:
            inputs: encoded image ``bytes``, ``pathlib.Path`` to image files, text ``str``, numpy
                arrays (raw pixels for image backbones), or ``Input`` messages.
            backbone, layer: empty for the server's defaults.
            output_dtype: ``FLOAT32`` or ``FLOAT16``.
            cache_policy: ``USE``, ``BYPASS`` or ``REFRESH``.

        Raises:
            FeatureBankError: the request as a whole failed (unknown backbone or layer, overload, ...).
        """
        msgs = [to_input(x) for x in inputs]
        out: list[ItemOutcome] = []
        for offset, chunk in _chunks(msgs, self.max_items_per_request, self.max_request_bytes):
            request = pb.ExtractRequest(backbone=backbone, layer=layer, inputs=chunk, output_dtype=output_dtype,
                                        cache_policy=cache_policy)
            out.extend(_outcomes(self._call(self._stub.Extract, request), offset))
        return out

    def extract(self, inputs: Iterable, **kwargs) -> np.ndarray:
        """Features of every input as one (N, *shape) array.

        Args: as ``extract_items``.

        Returns:
            numpy array, one row per input, in input order.

        Raises:
            FeatureBankError: the request failed, or an item failed (``.index`` says which).
        """
        return _stack(self.extract_items(inputs, **kwargs))

    def lookup(self, keys: Sequence[str], *, backbone: str, layer: str = "", output_dtype: int = pb.FLOAT32) -> list[ItemOutcome]:
        """Cached features by content key; a key not cached has a NOT_FOUND error.

        Returns:
            one ItemOutcome per key, in order.
        """
        out: list[ItemOutcome] = []
        for start in range(0, len(keys), 1024):
            request = pb.LookupRequest(backbone=backbone, layer=layer, keys=keys[start:start + 1024], output_dtype=output_dtype)
            out.extend(_outcomes(self._call(self._stub.Lookup, request), start))
        return out

    def backbones(self) -> list[pb.BackboneInfo]:
        """The served backbones with their layers, shapes and fingerprints."""
        return list(self._call(self._stub.ListBackbones, pb.ListBackbonesRequest()).backbones)


class AsyncFeatureBank:
    """The asyncio twin of FeatureBank (same methods, awaitable)."""

    def __init__(self, target: str, *, timeout_s: float = 300.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST):
        self.target = target
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_items_per_request = max_items_per_request
        self._channel = grpc.aio.insecure_channel(target, options=channel_options())
        self._stub = pb_grpc.FeatureBankStub(self._channel)

    async def __aenter__(self) -> "AsyncFeatureBank":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None

    async def extract_items(self, inputs: Iterable, *, backbone: str = "", layer: str = "",
                            output_dtype: int = pb.FLOAT32, cache_policy: int = pb.USE) -> list[ItemOutcome]:
        """See FeatureBank.extract_items."""
        msgs = [to_input(x) for x in inputs]
        out: list[ItemOutcome] = []
        for offset, chunk in _chunks(msgs, self.max_items_per_request, self.max_request_bytes):
            request = pb.ExtractRequest(backbone=backbone, layer=layer, inputs=chunk, output_dtype=output_dtype,
                                        cache_policy=cache_policy)
            out.extend(_outcomes(await self._call(self._stub.Extract, request), offset))
        return out

    async def extract(self, inputs: Iterable, **kwargs) -> np.ndarray:
        """See FeatureBank.extract."""
        return _stack(await self.extract_items(inputs, **kwargs))

    async def lookup(self, keys: Sequence[str], *, backbone: str, layer: str = "", output_dtype: int = pb.FLOAT32) -> list[ItemOutcome]:
        """See FeatureBank.lookup."""
        out: list[ItemOutcome] = []
        for start in range(0, len(keys), 1024):
            request = pb.LookupRequest(backbone=backbone, layer=layer, keys=keys[start:start + 1024], output_dtype=output_dtype)
            out.extend(_outcomes(await self._call(self._stub.Lookup, request), start))
        return out

    async def backbones(self) -> list[pb.BackboneInfo]:
        """See FeatureBank.backbones."""
        return list((await self._call(self._stub.ListBackbones, pb.ListBackbonesRequest())).backbones)
