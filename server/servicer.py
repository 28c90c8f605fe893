"""The FeatureBank RPCs: hash inputs, read the cache in one round trip, batch the misses, answer."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import re
from typing import Any

import grpc
import numpy as np

from featurebank.common import codec, tensors
from featurebank.common import keys as content_keys
from featurebank.common.cache import FeatureCache
from featurebank.common.errors import (
    FeatureBankError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import DynamicBatcher
from featurebank.engine.misses import MissPath
from featurebank.server.auth import current_tenant
from featurebank.server.head_rpcs import HeadRPCs
from featurebank.server.head_store import DirectoryHeadStore, HeadStore
from featurebank.server.heads import CompiledHeadCache, HeadLimits
from featurebank.server.keys import cache_key, cache_keys
from featurebank.server.limits import current_gate, items_in_flight
from featurebank.server.wire import ResponseWriter
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from featurebank.workers.backbones.base import BackboneInfo, InputItem

logger = logging.getLogger(__name__)

_CONTENT_KEY = re.compile(r"^[0-9a-f]{32}$")
_OUTPUT_DTYPES = {pb.DTYPE_UNSPECIFIED: np.dtype("<f4"), pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2")}
# The Tensor dtype each requested output_dtype answers with, and the Tensor dtype a cached value's
# bytes already are (by codec header code): when the two agree, a hit is passed on byte for byte.
_OUTPUT_TENSOR_DTYPES = {pb.DTYPE_UNSPECIFIED: pb.FLOAT32, pb.FLOAT32: pb.FLOAT32, pb.FLOAT16: pb.FLOAT16}
_STORED_TENSOR_DTYPES = {code: tensors.NUMPY_TO_DTYPE[name] for code, name in codec.DTYPE_NAMES.items()}
# Which Input payloads each backbone input kind accepts (an image backbone takes raw pixel tensors).
_ACCEPTS = {"image": ("image", "tensor"), "text": ("text",), "tensor": ("tensor",)}
# A request carrying more than this much input is hashed in threads, beside the event loop
# (hashlib and blake3 release the GIL on large inputs; a 100 KB image was ~0.13 ms of BLAKE2b,
# is ~0.03 ms of BLAKE3). Below it, the
# hand-off and the extra loop wake-ups cost more than hashing inline: single-image requests
# hashed in a thread ran ~25 % fewer hits/s in the benchmark.
HASH_OFFLOAD_BYTES = 64 * 1024  # inputs this large go to the threads...
HASH_OFFLOAD_REQUEST_BYTES = 1024 * 1024  # ...when the request's large inputs add up to this
HASH_THREADS = min(4, os.cpu_count() or 1)


@dataclasses.dataclass
class ServedBackbone:
    """A backbone as the frontend sees it: its description and its batch queue."""

    info: BackboneInfo
    batcher: DynamicBatcher
    pool: Any = None  # a featurebank.engine.pool.WorkerPool

    @property
    def layers(self) -> dict[str, tuple[int, ...]]:
        return {l.name: l.shape for l in self.info.layers}


class ItemFailure(Exception):
    """Carries a per-item status; never leaves the servicer."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _set_error(result: pb.ItemResult, code: grpc.StatusCode, message: str) -> None:
    result.error.code = code.value[0]
    result.error.message = message


def _run_jobs(jobs: list) -> list[str]:
    """Content keys of a group of inputs (in a hashing thread)."""
    return [hash_key(*args) for hash_key, args in jobs]


def _cached_to_proto(value: bytes, header: codec.Header, want: int, out_dtype: np.dtype, out: pb.Tensor) -> None:
    """Fill ``out`` from a cached value that passed ``codec.check``.

    In the stored dtype (the common case) the value's data already is the Tensor's wire format,
    little-endian and C order, so it is copied over as is: no numpy array, no dtype lookups, no
    conversion (this was ~40 % of a batch Lookup's time). Any other dtype is converted.
    """
    if _STORED_TENSOR_DTYPES[header.code] == want:
        out.dtype = want
        out.shape.extend(header.shape)  # ``out`` is a fresh Tensor: extend, not a slice assignment
        out.data = bytes(value[header.offset :])  # bytes(...) of a bytes slice is that slice: one copy
    else:
        tensors.to_proto(codec.to_array(value, header).astype(out_dtype, copy=False), out)


class FeatureBankServicer(HeadRPCs, pb_grpc.FeatureBankServicer):
    """Extract / Lookup / ListBackbones over the served backbones, the cache and the batchers."""

    def __init__(
        self,
        backbones: dict[str, ServedBackbone],
        cache: FeatureCache,
        metrics: Metrics,
        *,
        storage_dtype: str,
        max_items_per_request: int,
        max_tensor_elements: int = 50_000_000,
        stream_window: int = 4,
        heads: HeadStore | None = None,
        shared_cache_backbones=(),
        claim_ttl_ms: int = 30_000,
        head_limits: HeadLimits | None = None,
        heads_cache_bytes: int = 256 << 20,
        max_text_bytes: int = 64 * 1024,
        misses: Any = None,
        read_key_version_1: bool = True,
    ):
        self.cache = cache
        self.max_text_bytes = max_text_bytes  # largest text input in UTF-8 bytes, checked before tokenizing
        # Extract misses are also looked up under their BLAKE2b (version 1) keys: entries cached
        # before content-key versions stay readable (off once those entries' TTL has passed).
        self.read_key_version_1 = read_key_version_1
        self.metrics = metrics
        self.storage_dtype = np.dtype(storage_dtype)
        self._storage_dtype_name = self.storage_dtype.name  # a numpy property: not per key
        self.max_items_per_request = max_items_per_request
        self.max_tensor_elements = max_tensor_elements
        self.stream_window = stream_window
        self.shared_cache_backbones = frozenset(shared_cache_backbones)
        # Cross-replica single-flight: how long a claim on a key lasts before others compute it too.
        self.claim_ttl_ms = claim_ttl_ms
        self._hasher: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first large input
        self.heads = heads if heads is not None else DirectoryHeadStore(os.path.join(os.getcwd(), "featurebank-heads"))
        self.head_limits = head_limits if head_limits is not None else HeadLimits()
        self._compiled_heads = CompiledHeadCache(heads_cache_bytes)
        self._head_threads: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first head RPC
        # Single-flight: one owner task per cache key in flight, shared by every request. ``misses``:
        # the engine's MissPath (in-process) or an EngineClient (a frontend of --frontends N).
        if misses is None:
            misses = MissPath(cache, metrics, storage_dtype=storage_dtype, claim_ttl_ms=claim_ttl_ms)
        self.misses = misses
        self.inflight = self.misses.flights
        self.recent = self.misses.recent  # computed a moment ago: see MissPath.recent
        self.default_for_kind: dict[str, str] = {}
        # Metric children by labels: ``.labels()`` takes a lock and builds a tuple per call.
        self._item_counters: dict[tuple[str, str, str], Any] = {}
        self._not_found_counters: dict[tuple[str, str], Any] = {}
        self.set_backbones(backbones)

    def set_backbones(self, backbones: dict[str, ServedBackbone]) -> None:
        """Serve these backbones; the first of each input kind is the default for that kind."""
        self.backbones = backbones
        self.default_for_kind = {}
        for name, b in backbones.items():  # native kinds first: a text backbone never defaults for tensors
            self.default_for_kind.setdefault(b.info.input_kind, name)
        for name, b in backbones.items():
            for kind in _ACCEPTS[b.info.input_kind]:
                self.default_for_kind.setdefault(kind, name)

    # ----------------------------------------------------------------------------- resolution

    def _resolve(self, backbone: str, layer: str, first_kind: str | None) -> tuple[ServedBackbone, str]:
        if not self.backbones:
            raise UnavailableError("the server is starting: backbones are still loading")
        if not backbone:
            backbone = self.default_for_kind.get(first_kind or "", "")
            if not backbone:
                raise InvalidArgumentError(
                    f"no backbone named and none is the default for {first_kind or 'these'} inputs; "
                    f"served: {', '.join(sorted(self.backbones))}"
                )
        tenant = current_tenant.get()
        if tenant is not None:
            tenant.check_backbone(backbone)
        served = self.backbones.get(backbone)
        if served is None:
            raise NotFoundError(f"unknown backbone {backbone!r}; served: {', '.join(sorted(self.backbones))}")
        layer = layer or served.info.default_layer
        if layer not in served.layers:
            raise NotFoundError(f"backbone {backbone!r} has no layer {layer!r}; layers: {', '.join(served.layers)}")
        return served, layer

    def _cache_key(self, served: ServedBackbone, layer: str, content_key: str) -> str:
        return cache_key(
            content_key,
            fingerprint=served.info.fingerprint,
            layer=layer,
            storage_dtype=self._storage_dtype_name,
            namespace=self._namespace(served.info.name),
        )

    def _cache_keys(
        self, served: ServedBackbone, layer: str, ckeys, key_version: int = content_keys.KEY_VERSION
    ) -> list[str]:
        """``_cache_key`` of each content key (of ``key_version``), resolving the caller's namespace once."""
        return cache_keys(
            ckeys,
            fingerprint=served.info.fingerprint,
            layer=layer,
            storage_dtype=self._storage_dtype_name,
            namespace=self._namespace(served.info.name),
            key_version=key_version,
        )

    def _namespace(self, backbone: str) -> str:
        """The caller's cache-key salt: tenants cannot read, or learn about, each other's entries,
        except for backbones configured as one shared pool (public data)."""
        tenant = current_tenant.get()
        if tenant is None or backbone in self.shared_cache_backbones:
            return ""
        return tenant.namespace

    def _parse_input(self, served: ServedBackbone, item: pb.Input) -> tuple[str, InputItem]:
        """Content key and worker payload of one input; ItemFailure for a bad one."""
        payload = self._parse_payload(served, item)
        hash_key, args = self._key_job(item, payload)
        return hash_key(*args), payload

    @staticmethod
    def _key_job(item: pb.Input, payload: InputItem):
        """(function, arguments) computing the content key of a parsed input, as
        ``content_keys.input_key`` defines it; touches no protobuf message, so it can run in a thread."""
        if payload.kind == "image":
            return content_keys.image_key, (payload.payload,)
        if payload.kind == "text":
            return content_keys.text_key, (payload.payload,)
        t = item.tensor  # dtype already checked by tensors.from_proto
        return content_keys.tensor_key, (tensors.DTYPE_NAMES[t.dtype], tuple(t.shape), t.data)

    async def _content_keys(self, jobs: list) -> list[str]:
        """Run key jobs: inline, or for a request with over 1 MiB of large inputs, those in the
        hashing threads (in a few groups: a few event-loop wake-ups, not one per image)."""
        out: list[str | None] = [None] * len(jobs)
        big = [j for j, (_, args) in enumerate(jobs) if len(args[-1]) > HASH_OFFLOAD_BYTES]
        if sum(len(jobs[j][1][-1]) for j in big) < HASH_OFFLOAD_REQUEST_BYTES:
            big = []
        offloaded = set(big)
        for j, (hash_key, args) in enumerate(jobs):
            if j not in offloaded:
                out[j] = hash_key(*args)
        if big:
            if self._hasher is None:
                self._hasher = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="fb-hash")
            loop = asyncio.get_running_loop()
            n = min(len(big), HASH_THREADS)
            groups = [big[g::n] for g in range(n)]
            done = await asyncio.gather(
                *(loop.run_in_executor(self._hasher, _run_jobs, [jobs[j] for j in g]) for g in groups)
            )
            for g, keys in zip(groups, done):
                for j, key in zip(g, keys):
                    out[j] = key
        return out  # type: ignore[return-value]

    def _parse_payload(self, served: ServedBackbone, item: pb.Input) -> InputItem:
        """The worker payload of one input; ItemFailure for a bad one."""
        kind = item.WhichOneof("payload")
        if kind is None:
            raise ItemFailure(grpc.StatusCode.INVALID_ARGUMENT, "empty input: set one of image, text, tensor")
        if kind not in _ACCEPTS[served.info.input_kind]:
            raise ItemFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"backbone {served.info.name!r} takes {served.info.input_kind} inputs, not {kind}",
            )
        if kind == "image":
            payload: Any = item.image  # once: each read of a bytes field is a copy
            if not payload:
                raise ItemFailure(grpc.StatusCode.INVALID_ARGUMENT, "empty image: no bytes")
        elif kind == "text":
            payload = item.text
            # Bounded in UTF-8 bytes before a worker tokenizes it; a text of at most a quarter of the
            # bound in characters fits whatever it holds, so short texts are never encoded here.
            if len(payload) * 4 > self.max_text_bytes and (n := len(payload.encode("utf-8"))) > self.max_text_bytes:
                raise ItemFailure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"text is {n} bytes, over max_text_bytes={self.max_text_bytes}: "
                    "send a shorter text (or raise --max-text-bytes)",
                )
        else:
            try:
                payload = tensors.from_proto(item.tensor, self.max_tensor_elements)
            except tensors.TensorError as e:
                raise ItemFailure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return InputItem(kind, payload)

    # ----------------------------------------------------------------------------- RPCs

    async def Extract(self, request: pb.ExtractRequest, context: grpc.aio.ServicerContext) -> bytes:
        return await self.extract(request, context, encoded=True)

    async def ExtractStream(self, request_iterator, context: grpc.aio.ServicerContext):
        """Answer each request message in order, working on at most ``stream_window`` at a time.

        Request messages are read only while fewer than the window are in progress, so gRPC's
        flow control holds a fast sender back and memory stays bounded on both sides.
        """
        in_progress: collections.deque[asyncio.Task] = collections.deque()
        try:
            async for request in request_iterator:
                in_progress.append(
                    asyncio.ensure_future(self.extract(request, context, wait_for_room=True, encoded=True))
                )
                while in_progress and (in_progress[0].done() or len(in_progress) >= self.stream_window):
                    yield await in_progress.popleft()
            while in_progress:
                yield await in_progress.popleft()
        finally:
            for task in in_progress:
                task.cancel()

    async def extract(
        self,
        request: pb.ExtractRequest,
        context: grpc.aio.ServicerContext | None,
        *,
        wait_for_room: bool = False,
        encoded: bool = False,
    ) -> pb.ExtractResponse | bytes:
        """The Extract pipeline for one request message (also used by ExtractStream and Predict).

        Its inputs count against the tenant's ``max_inflight_items`` while it runs: over the limit
        a unary call is refused at once, a stream's message waits for room (``wait_for_room``).
        ``encoded``: answer with the response's wire bytes, hits written from the cached bytes
        (server/wire.py), for gRPC to send as they are; otherwise with the message.
        """
        if current_gate.get() is None:  # no tenant limits: no context manager on the hot path
            return await self._extract(request, context, wait_for_room, encoded)
        async with items_in_flight(len(request.inputs), wait=wait_for_room):
            return await self._extract(request, context, wait_for_room, encoded)

    async def _extract(
        self,
        request: pb.ExtractRequest,
        context: grpc.aio.ServicerContext | None,
        wait_for_room: bool = False,
        encoded: bool = False,
    ) -> pb.ExtractResponse | bytes:
        n = len(request.inputs)
        if n == 0:
            raise InvalidArgumentError("no inputs: send at least one Input")
        if n > self.max_items_per_request:
            raise InvalidArgumentError(
                f"{n} inputs in one request, over max_items_per_request={self.max_items_per_request}; split the request"
            )
        out_dtype = _OUTPUT_DTYPES.get(request.output_dtype)
        if out_dtype is None:
            raise InvalidArgumentError("output_dtype must be FLOAT32 or FLOAT16")
        served, layer = self._resolve(request.backbone, request.layer, request.inputs[0].WhichOneof("payload"))
        name = served.info.name
        if encoded:  # results stand alone until they are written out in order (step 4)
            response = None
            results = [pb.ItemResult() for _ in range(n)]
        else:
            response = pb.ExtractResponse(backbone_fingerprint=served.info.fingerprint, backbone=name, layer=layer)
            results = [response.results.add() for _ in range(n)]

        # 1. content keys (a bad item fails alone, here or in the worker)
        parsed: list[tuple[int, InputItem]] = []
        jobs = []
        for i, item in enumerate(request.inputs):
            try:
                payload = self._parse_payload(served, item)
            except ItemFailure as f:
                _set_error(results[i], f.code, f.message)
                continue
            parsed.append((i, payload))
            jobs.append(self._key_job(item, payload))
        ckeys = await self._content_keys(jobs)
        todo: dict[str, list[int]] = {}  # cache key -> item indices (identical inputs share one)
        payloads: dict[str, InputItem] = {}
        job_of: dict[str, tuple] = {}  # cache key -> its key job (for the version-1 read of misses)
        for (i, payload), job, ckey, key in zip(parsed, jobs, ckeys, self._cache_keys(served, layer, ckeys)):
            results[i].key = ckey
            todo.setdefault(key, []).append(i)
            payloads[key] = payload
            job_of[key] = job

        # 2. one cache round trip for all of them
        features: dict[str, np.ndarray] = {}
        cached: dict[str, tuple[bytes, codec.Header]] = {}  # hits, checked but still raw bytes
        corrupt: set[str] = set()  # recomputed and rewritten, never answered from memory
        if request.cache_policy == pb.USE and todo:
            keys = list(todo)
            for key, value in zip(keys, await self.cache.get_many(keys)):
                if value is None:
                    continue
                try:
                    cached[key] = (value, codec.check(value))
                except codec.CorruptValueError as e:
                    self.metrics.cache_corrupt.inc()
                    logger.warning("corrupt cache value for %s (%s); recomputing", key, e)
                    corrupt.add(key)
            for key in todo:
                # Finished a moment ago by another request whose cache write raced our read.
                if key not in cached and key not in corrupt and key in self.recent:
                    features[key] = self.recent[key]
            if self.read_key_version_1:
                absent = [k for k in todo if k not in cached and k not in corrupt and k not in features]
                if absent:
                    await self._read_version_1(served, layer, absent, job_of, cached)
        for hits in (cached, features):
            for key in hits:
                for i in todo[key]:
                    results[i].cache_hit = True

        # 3. the misses, single-flight across requests (one owner task per key, which also writes
        # the cache), batched across requests
        misses = [k for k in todo if k not in features and k not in cached]
        if misses:
            remaining = context.time_remaining() if context is not None else None
            tenant = current_tenant.get()
            computed = await self.misses.compute(
                served,
                layer,
                misses,
                payloads,
                deadline=None if remaining is None else asyncio.get_running_loop().time() + remaining,
                tenant=tenant.name if tenant is not None else "",
                claim=request.cache_policy == pb.USE,
                write=request.cache_policy != pb.BYPASS,
                wait_for_room=wait_for_room,
            )
            for key, outcome in computed.items():
                if isinstance(outcome, BaseException):
                    code = outcome.code if isinstance(outcome, FeatureBankError) else grpc.StatusCode.INTERNAL
                    for i in todo[key]:
                        _set_error(results[i], code, str(outcome))
                    continue
                features[key] = outcome.features
                if outcome.from_cache:  # another replica computed and stored it
                    for i in todo[key]:
                        results[i].cache_hit = True

        # 4. answer in input order
        want = _OUTPUT_TENSOR_DTYPES[request.output_dtype]
        counts = {"hit": 0, "miss": 0, "error": 0}
        as_stored: dict[int, tuple[bytes, codec.Header]] = {}  # hits written from their cached bytes
        for key, idx in todo.items():
            t = results[idx[0]].features
            hit = cached.get(key)
            if hit is not None:
                if encoded and _STORED_TENSOR_DTYPES[hit[1].code] == want:
                    for i in idx:
                        as_stored[i] = hit
                    continue
                _cached_to_proto(hit[0], hit[1], want, out_dtype, t)
            else:
                arr = features.get(key)
                if arr is None:
                    continue
                tensors.to_proto(arr.astype(out_dtype, copy=False), t)
            for i in idx[1:]:
                results[i].features.CopyFrom(t)
        for r in results:
            counts["error" if r.HasField("error") else "hit" if r.cache_hit else "miss"] += 1
        for result_kind, c in counts.items():
            if c:
                self._count_items(name, layer, result_kind, c)
        if not encoded:
            return response
        writer = ResponseWriter()
        for i, r in enumerate(results):
            hit = as_stored.get(i)
            if hit is None:
                writer.message(r)
            else:
                value, header = hit
                writer.hit(r.key, want, header.shape, memoryview(value)[header.offset :])
        return writer.finish(served.info.fingerprint, name, layer)

    async def _read_version_1(
        self, served: ServedBackbone, layer: str, absent: list[str], job_of: dict, cached: dict
    ) -> None:
        """Entries written before content-key versions (BLAKE2b keys, version 1) stay readable: the
        inputs not found under their version-2 key are hashed the old way and read again, in one
        round trip for all of them. A hit is answered and copied under its version-2 key, so the
        next read of it is one round trip. Only misses pay for this, and a miss is about to be
        computed by a model anyway."""
        jobs = [(functools.partial(job_of[k][0], version=1), job_of[k][1]) for k in absent]
        old_keys = self._cache_keys(served, layer, await self._content_keys(jobs), 1)
        copies = []
        for key, value in zip(absent, await self.cache.get_many(old_keys)):
            if value is None:
                continue
            try:
                cached[key] = (value, codec.check(value))
            except codec.CorruptValueError:
                continue  # recomputed like any miss, and written under its version-2 key
            copies.append((key, value))
        if copies:
            await self.cache.set_many(copies)

    def _count_items(self, backbone: str, layer: str, result: str, n: int) -> None:
        """``featurebank_items_total{backbone,layer,result} += n`` through a kept child."""
        key = (backbone, layer, result)
        child = self._item_counters.get(key)
        if child is None:
            child = self._item_counters[key] = self.metrics.items.labels(backbone, layer, result)
        child.inc(n)

    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> bytes:
        n = len(request.keys)
        if n == 0:
            raise InvalidArgumentError("no keys: send at least one content key")
        if n > self.max_items_per_request:
            raise InvalidArgumentError(
                f"{n} keys in one request, over max_items_per_request={self.max_items_per_request}"
            )
        out_dtype = _OUTPUT_DTYPES.get(request.output_dtype)
        if out_dtype is None:
            raise InvalidArgumentError("output_dtype must be FLOAT32 or FLOAT16")
        if not request.backbone:
            raise InvalidArgumentError("Lookup needs a backbone name")
        if request.key_version and request.key_version not in content_keys.KEY_VERSIONS:
            raise InvalidArgumentError(
                f"key_version {request.key_version} is not one of {content_keys.KEY_VERSIONS} (0: either)"
            )
        served, layer = self._resolve(request.backbone, request.layer, None)
        async with items_in_flight(n):
            return await self._lookup(request, served, layer, out_dtype)

    async def _lookup(self, request: pb.LookupRequest, served: ServedBackbone, layer: str, out_dtype) -> bytes:
        """The response's wire bytes: hits written from their cached bytes (server/wire.py)."""
        keys = list(request.keys)  # once: each read of a repeated string field builds new str objects
        n = len(keys)
        valid = [i for i, k in enumerate(keys) if _CONTENT_KEY.match(k)]
        failed: dict[int, pb.ItemResult] = {}  # every result that is not a hit in the stored dtype
        for i in () if len(valid) == n else sorted(set(range(n)) - set(valid)):
            failed[i] = pb.ItemResult(key=keys[i])
            _set_error(
                failed[i],
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{keys[i][:64]!r} is not a content key (32 lowercase hex characters)",
            )
        asked = [keys[i] for i in valid]
        version = request.key_version or content_keys.KEY_VERSION
        values = await self.cache.get_many(self._cache_keys(served, layer, asked, version))
        if not request.key_version and None in values:
            # An SDK from before key versions computed these keys with BLAKE2b (version 1): what
            # was not found as version 2 is looked up as version 1, in one more round trip for the
            # absent ones only (a hit as version 2 costs nothing more).
            absent = [j for j, v in enumerate(values) if v is None]
            old = await self.cache.get_many(self._cache_keys(served, layer, [asked[j] for j in absent], 1))
            for j, v in zip(absent, old):
                values[j] = v
        want = _OUTPUT_TENSOR_DTYPES[request.output_dtype]
        hits = 0
        found: dict[int, tuple[bytes, codec.Header]] = {}
        for i, value in zip(valid, values):
            try:
                if value is None:
                    raise codec.CorruptValueError("absent")
                # A corrupt value is NOT_FOUND too: the client then sends the input to Extract,
                # which counts it, recomputes it and rewrites it.
                header = codec.check(value)
                hits += 1
                if _STORED_TENSOR_DTYPES[header.code] == want:
                    found[i] = (value, header)
                else:
                    failed[i] = pb.ItemResult(key=keys[i], cache_hit=True)
                    _cached_to_proto(value, header, want, out_dtype, failed[i].features)
            except codec.CorruptValueError:
                failed[i] = pb.ItemResult(key=keys[i])
                _set_error(failed[i], grpc.StatusCode.NOT_FOUND, "not in the cache: send the input to Extract")
        writer = ResponseWriter()
        for i, key in enumerate(keys):
            hit = found.get(i)
            if hit is None:
                writer.message(failed[i])
            else:
                value, header = hit
                writer.hit(key, want, header.shape, memoryview(value)[header.offset :])
        if hits:
            self._count_items(served.info.name, layer, "hit", hits)
        if len(valid) > hits:
            key = (served.info.name, layer)
            child = self._not_found_counters.get(key)
            if child is None:
                child = self._not_found_counters[key] = self.metrics.lookup_not_found.labels(*key)
            child.inc(len(valid) - hits)
        return writer.finish(served.info.fingerprint, served.info.name, layer)

    async def ListBackbones(self, request: pb.ListBackbonesRequest, context) -> pb.ListBackbonesResponse:
        response = pb.ListBackbonesResponse()
        for name, b in sorted(self.backbones.items()):
            i = b.info
            response.backbones.add(
                name=name,
                fingerprint=i.fingerprint,
                input_kind=i.input_kind,
                default_layer=i.default_layer,
                layers=[pb.LayerInfo(name=l.name, shape=l.shape) for l in i.layers],
                input_size=i.input_size,
                preprocessing=i.preprocessing,
                workers_ready=b.pool.ready_count if b.pool is not None else 0,
            )
        return response
