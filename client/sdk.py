"""The Python SDK: FeatureBank (blocking) and AsyncFeatureBank over the featurebank.v1 API."""

from __future__ import annotations

import dataclasses
import json
import os
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
# Content keys per Lookup request: 32 bytes each, so 1,024 make a ~40 KB request.
LOOKUP_CHUNK = 1024
# A Lookup refused for these reasons (unknown backbone or layer, a server without Lookup) falls
# back to Extract, which then reports the problem per request as it always did; any other
# failure (overload, deadline, auth) is raised at once instead of costing a second call.
_LOOKUP_FALLBACK_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED})

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


def _place(outcomes: list[ItemOutcome], positions: Sequence[int], out: list) -> None:
    """Put the outcomes of a request carrying some of the inputs back at their input positions."""
    for o, i in zip(outcomes, positions):
        o.index = i
        if o.error is not None:
            o.error.index = i
        out[i] = o


def _lookup_plan(msgs: Sequence[pb.Input]) -> dict[str, list[int]]:
    """Content key -> input positions, for every input that has one (duplicates looked up once).

    An input without a key (no payload, an unknown tensor dtype) is left out: it goes to Extract,
    which answers it with its own error, as without lookup-first.
    """
    from featurebank.client.keys import input_key

    positions: dict[str, list[int]] = {}
    for i, m in enumerate(msgs):
        try:
            key = input_key(m)
        except ValueError:
            continue
        positions.setdefault(key, []).append(i)
    return positions


def _lookup_requests(positions: dict[str, list[int]], backbone: str, layer: str,
                     output_dtype: int) -> Iterator[tuple[list[str], pb.LookupRequest]]:
    keys = list(positions)
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[start:start + LOOKUP_CHUNK]
        yield chunk, pb.LookupRequest(backbone=backbone, layer=layer, keys=chunk, output_dtype=output_dtype)


def _take_hits(keys: list[str], response: pb.ExtractResponse, positions: dict[str, list[int]], out: list) -> None:
    """Fill ``out`` with the Lookup hits (NOT_FOUND and anything else is left for Extract)."""
    for key, r in zip(keys, response.results):
        if r.HasField("error"):
            continue
        features = tensors.from_proto(r.features)
        for i in positions[key]:
            out[i] = ItemOutcome(i, key, True, features, None)


def _stack(outcomes: list[ItemOutcome]) -> np.ndarray:
    for o in outcomes:
        if o.error is not None:
            raise o.error
    if not outcomes:
        return np.zeros((0, 0), np.float32)
    return np.stack([o.features for o in outcomes])


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def make_channel(target: str, *, aio: bool = False, tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, tls: bool = False):
    """A channel to the server: TLS when any TLS option is given (mutual TLS with a client
    certificate and key), plaintext otherwise."""
    module = grpc.aio if aio else grpc
    if tls or tls_ca_file or tls_cert_file:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca_file), private_key=_read(tls_key_file),
                                             certificate_chain=_read(tls_cert_file))
        return module.secure_channel(target, creds, options=channel_options())
    return module.insecure_channel(target, options=channel_options())


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    token = token if token is not None else os.environ.get("FEATUREBANK_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else None


class FeatureBank:
    """A blocking client. Use as a context manager.

    Args:
        target: ``host:port``, or ``dns:///name:port`` to spread calls over every replica.
        timeout_s: deadline of each RPC.
        max_request_bytes: inputs are split into requests no larger than this.
        token: bearer token of your tenant (default: env FEATUREBANK_TOKEN).
        tls_ca_file, tls_cert_file, tls_key_file: TLS to the server (CA to trust; client
            certificate and key for mutual TLS). ``tls=True`` uses the system's CAs.
    """

    def __init__(self, target: str, *, timeout_s: float = 300.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST, channel: grpc.Channel | None = None,
                 token: str | None = None, tls: bool = False, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_items_per_request = max_items_per_request
        self._metadata = _auth_metadata(token)
        self._channel = channel or make_channel(target, tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
                                                tls_key_file=tls_key_file)
        self._stub = pb_grpc.FeatureBankStub(self._channel)

    def __enter__(self) -> "FeatureBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None

    def extract_items(self, inputs: Iterable, *, backbone: str = "", layer: str = "", output_dtype: int = pb.FLOAT32,
                      cache_policy: int = pb.USE, lookup_first: bool = True) -> list[ItemOutcome]:
        """Per-input outcomes (features or error), in input order; never raises for one bad item.

        Args:
            inputs: encoded image ``bytes``, ``pathlib.Path`` to image files, text ``str``, numpy
                arrays (raw pixels for image backbones), or ``Input`` messages.
            backbone, layer: empty for the server's defaults.
            output_dtype: ``FLOAT32`` or ``FLOAT16``.
            cache_policy: ``USE``, ``BYPASS`` or ``REFRESH``.
            lookup_first: with ``USE`` and a named ``backbone``, compute the content keys here,
                ``Lookup`` them (1,024 per request) and send only the inputs not found to
                ``Extract``: cached inputs never travel nor cost the server a hash. Hits come back
                with ``cache_hit=True``. (Without a backbone name the server picks one by input
                kind, which only ``Extract`` does: everything is sent.)

        Raises:
            FeatureBankError: the request as a whole failed (unknown backbone or layer, overload, ...).
        """
        msgs = [to_input(x) for x in inputs]
        out: list[ItemOutcome | None] = [None] * len(msgs)
        if lookup_first and cache_policy == pb.USE and backbone and msgs:
            positions = _lookup_plan(msgs)
            for keys, request in _lookup_requests(positions, backbone, layer, output_dtype):
                try:
                    response = self._call(self._stub.Lookup, request)
                except FeatureBankError as e:
                    if e.code not in _LOOKUP_FALLBACK_CODES:
                        raise  # overload, deadline, auth: Extract would fail the same way
                    break  # e.g. an unknown backbone or layer: Extract reports it as it always did
                _take_hits(keys, response, positions, out)
        rest = [i for i, o in enumerate(out) if o is None]
        for offset, chunk in _chunks([msgs[i] for i in rest], self.max_items_per_request, self.max_request_bytes):
            request = pb.ExtractRequest(backbone=backbone, layer=layer, inputs=chunk, output_dtype=output_dtype,
                                        cache_policy=cache_policy)
            _place(_outcomes(self._call(self._stub.Extract, request), 0), rest[offset:offset + len(chunk)], out)
        return out  # type: ignore[return-value]

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
        for start in range(0, len(keys), LOOKUP_CHUNK):
            request = pb.LookupRequest(backbone=backbone, layer=layer, keys=keys[start:start + LOOKUP_CHUNK],
                                       output_dtype=output_dtype)
            out.extend(_outcomes(self._call(self._stub.Lookup, request), start))
        return out

    def backbones(self) -> list[pb.BackboneInfo]:
        """The served backbones with their layers, shapes and fingerprints."""
        return list(self._call(self._stub.ListBackbones, pb.ListBackbonesRequest()).backbones)

    # ------------------------------------------------------------------------ streaming, datasets

    def _stream(self, inputs: Iterable, *, backbone: str, layer: str, output_dtype: int, cache_policy: int,
                lookup_first: bool) -> Iterator[tuple[pb.ExtractResponse, list[ItemOutcome]]]:
        """(response, outcomes) per chunk of inputs over one ExtractStream, in input order.

        Inputs are read lazily, chunk by chunk, as gRPC's flow control lets requests go out, so
        a dataset of any size is never all in memory. With ``lookup_first`` each chunk's content
        keys are looked up first and only the misses are uploaded (resuming a job re-sends
        nothing the store already holds).
        """
        import queue

        # Chunks in order, as the request thread prepared them; bounded, so reading ahead stops.
        chunks: queue.Queue = queue.Queue(maxsize=8)
        resolved: dict[str, str] = {}

        def requests():
            try:
                offset, batch, size = 0, [], 0
                for item in inputs:
                    msg = to_input(item)
                    n = msg.ByteSize() + 8
                    if batch and (len(batch) >= self.max_items_per_request or size + n > self.max_request_bytes):
                        yield from self._stream_chunk(offset, batch, chunks, backbone, layer, output_dtype,
                                                      cache_policy, lookup_first, resolved)
                        offset, batch, size = offset + len(batch), [], 0
                    batch.append(msg)
                    size += n
                if batch:
                    yield from self._stream_chunk(offset, batch, chunks, backbone, layer, output_dtype, cache_policy,
                                                  lookup_first, resolved)
                chunks.put(None)
            except Exception as e:  # an unreadable input: end the stream and tell the reader why
                chunks.put(e)

        responses = self._stub.ExtractStream(requests(), metadata=self._metadata)
        try:
            while True:
                item = chunks.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                offset, known, index = item
                if index is None:  # answered entirely by Lookup: no request was sent
                    yield pb.ExtractResponse(**resolved), known
                    continue
                response = next(responses)
                merged = list(known)
                for j, o in zip(index, _outcomes(response, 0)):
                    o.index = offset + j
                    if o.error is not None:
                        o.error.index = offset + j
                    merged[j] = o
                resolved.update(backbone=response.backbone, layer=response.layer,
                                backbone_fingerprint=response.backbone_fingerprint)
                yield response, merged
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None
        finally:
            responses.cancel()

    def _stream_chunk(self, offset, batch, chunks, backbone, layer, output_dtype, cache_policy, lookup_first, resolved):
        """Yield the request for one chunk (only its misses with lookup_first) and queue its bookkeeping."""
        from featurebank.client.keys import input_key

        known: list[ItemOutcome | None] = [None] * len(batch)
        if lookup_first and cache_policy == pb.USE and (backbone or resolved.get("backbone")):
            keys = [input_key(m) if m.WhichOneof("payload") else "" for m in batch]
            response = self._call(self._stub.Lookup, pb.LookupRequest(
                backbone=backbone or resolved["backbone"], layer=layer or resolved.get("layer", ""), keys=keys,
                output_dtype=output_dtype))
            resolved.update(backbone=response.backbone, layer=response.layer,
                            backbone_fingerprint=response.backbone_fingerprint)
            for j, o in enumerate(_outcomes(response, offset)):
                if o.error is None:
                    known[j] = o
        index = [j for j, k in enumerate(known) if k is None]
        if not index:
            chunks.put((offset, known, None))
            return
        chunks.put((offset, known, index))
        yield pb.ExtractRequest(backbone=backbone, layer=layer, inputs=[batch[j] for j in index],
                                output_dtype=output_dtype, cache_policy=cache_policy)

    def extract_stream(self, inputs: Iterable, *, backbone: str = "", layer: str = "", output_dtype: int = pb.FLOAT32,
                       cache_policy: int = pb.USE, lookup_first: bool = False, progress: bool = False,
                       total: int | None = None) -> Iterator[ItemOutcome]:
        """Outcomes for an iterable of any length, streamed in order with bounded memory.

        Args:
            inputs: as ``extract_items``; may be a generator.
            lookup_first: look each chunk up by content key first and upload only the misses.
            progress: show a progress bar (items/s, hit ratio) on stderr.
            total: the number of inputs, for the progress bar, when ``inputs`` has no len().

        Yields:
            ItemOutcome per input, in input order.
        """
        from tqdm import tqdm

        if total is None and hasattr(inputs, "__len__"):
            total = len(inputs)
        hits = seen = 0
        with tqdm(total=total, unit="item", disable=not progress, smoothing=0.1) as bar:
            for _, outcomes in self._stream(inputs, backbone=backbone, layer=layer, output_dtype=output_dtype,
                                            cache_policy=cache_policy, lookup_first=lookup_first):
                for o in outcomes:
                    seen += 1
                    hits += o.cache_hit
                    yield o
                bar.update(len(outcomes))
                bar.set_postfix(hit_ratio=f"{hits / max(1, seen):.2f}", refresh=False)

    def features(self, data, labels=None, *, backbone: str = "", layer: str = "", text_column: str | None = None,
                 label_column: str | None = None, progress: bool = False, lookup_first: bool = True):
        """Features of a whole dataset through the store (streamed, cached, resumable).

        Args:
            data: a list of inputs, a folder of images in class sub-folders (labels from the
                folder names), a ``.txt`` file (one text a line) or a ``.csv`` (``text_column``,
                optional ``label_column``).
            labels: labels for a list (ints or strings).

        Returns:
            featurebank.client.datasets.FeatureSet (features, labels, class names, keys, and the
            backbone, fingerprint and layer they came from).

        Raises:
            FeatureBankError: the stream failed, or an item failed (``.index`` says which).
        """
        from featurebank.client import datasets

        from tqdm import tqdm

        inputs, labels, class_names = datasets.resolve(data, labels, text_column=text_column, label_column=label_column)
        rows, keys, hits = [], [], 0
        meta = pb.ExtractResponse()
        with tqdm(total=len(inputs), unit="item", disable=not progress, smoothing=0.1) as bar:
            for response, outcomes in self._stream(inputs, backbone=backbone, layer=layer, output_dtype=pb.FLOAT32,
                                                   cache_policy=pb.USE, lookup_first=lookup_first):
                if response.backbone_fingerprint:
                    meta = response
                for o in outcomes:
                    if o.error is not None:
                        raise o.error
                    rows.append(o.features)
                    keys.append(o.key)
                    hits += o.cache_hit
                bar.update(len(outcomes))
                bar.set_postfix(hit_ratio=f"{hits / max(1, len(rows)):.2f}", refresh=False)
        return datasets.FeatureSet(features=np.stack(rows) if rows else np.zeros((0, 0), np.float32), labels=labels,
                                   class_names=class_names, keys=keys, backbone=meta.backbone,
                                   fingerprint=meta.backbone_fingerprint, layer=meta.layer, hits=hits)

    def as_tf_dataset(self, data, labels=None, *, batch_size: int = 32, shuffle: bool = True, seed: int = 0, **kwargs):
        """A ``tf.data.Dataset`` of (features, label) batches for ``model.fit`` (needs featurebank[train])."""
        import tensorflow as tf

        fs = self.features(data, labels, **kwargs)
        if fs.labels is None:
            raise ValueError("as_tf_dataset needs labels")
        ds = tf.data.Dataset.from_tensor_slices((fs.features, fs.labels))
        if shuffle:
            ds = ds.shuffle(len(fs), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def fit_head(self, data, labels=None, *, backbone: str = "", layer: str = "", head: str = "logistic",
                 validation_split: float = 0.2, epochs: int = 200, progress: bool = False, text_column: str | None = None,
                 label_column: str | None = None, **train_options):
        """Train a head on features from the store.

        Args:
            data, labels: as ``features``.
            head: "logistic" or "mlp".
            validation_split: fraction held out (fixed seed) for early stopping and metrics.

        Returns:
            featurebank.client.heads.Head (``predict``, ``evaluate``, ``save``, ``load``).
        """
        from featurebank.client.heads import Head

        fs = self.features(data, labels, backbone=backbone, layer=layer, text_column=text_column,
                           label_column=label_column, progress=progress)
        return Head.train(fs, head=head, validation_split=validation_split, epochs=epochs, **train_options)

    # ------------------------------------------------------------------------ served heads

    def put_head(self, head, name: str, version: int = 0) -> pb.HeadInfo:
        """Upload a trained Head (or a .keras head file) under a name; version 0 = the next one."""
        from featurebank.client.heads import Head

        if not isinstance(head, Head):
            head = Head.load(head)
        return self._call(self._stub.PutHead, pb.PutHeadRequest(head=head.to_proto(name, version)))

    def list_heads(self, name: str = "") -> list[pb.HeadInfo]:
        """Served heads (every version), optionally of one name."""
        return list(self._call(self._stub.ListHeads, pb.ListHeadsRequest(name=name)).heads)

    def delete_head(self, name: str, version: int = 0) -> int:
        """Delete one version (or all with 0); returns how many were deleted."""
        return self._call(self._stub.DeleteHead, pb.DeleteHeadRequest(name=name, version=version)).deleted

    def predict(self, head: str, inputs: Iterable, *, version: int = 0, cache_policy: int = pb.USE) -> list[pb.Prediction]:
        """Class probabilities and labels from a served head, per input (errors per item)."""
        msgs = [to_input(x) for x in inputs]
        out: list[pb.Prediction] = []
        for _, chunk in _chunks(msgs, self.max_items_per_request, self.max_request_bytes):
            response = self._call(self._stub.Predict, pb.PredictRequest(head=head, version=version, inputs=chunk,
                                                                        cache_policy=cache_policy))
            out.extend(response.predictions)
        return out


class AsyncFeatureBank:
    """The asyncio twin of FeatureBank (same methods, awaitable)."""

    def __init__(self, target: str, *, timeout_s: float = 300.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST, token: str | None = None,
                 tls: bool = False, tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_items_per_request = max_items_per_request
        self._metadata = _auth_metadata(token)
        self._channel = make_channel(target, aio=True, tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
                                     tls_key_file=tls_key_file)
        self._stub = pb_grpc.FeatureBankStub(self._channel)

    async def __aenter__(self) -> "AsyncFeatureBank":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None

    async def extract_items(self, inputs: Iterable, *, backbone: str = "", layer: str = "",
                            output_dtype: int = pb.FLOAT32, cache_policy: int = pb.USE,
                            lookup_first: bool = True) -> list[ItemOutcome]:
        """See FeatureBank.extract_items."""
        msgs = [to_input(x) for x in inputs]
        out: list[ItemOutcome | None] = [None] * len(msgs)
        if lookup_first and cache_policy == pb.USE and backbone and msgs:
            positions = _lookup_plan(msgs)
            for keys, request in _lookup_requests(positions, backbone, layer, output_dtype):
                try:
                    response = await self._call(self._stub.Lookup, request)
                except FeatureBankError as e:
                    if e.code not in _LOOKUP_FALLBACK_CODES:
                        raise
                    break  # e.g. an unknown backbone or layer: Extract reports it as it always did
                _take_hits(keys, response, positions, out)
        rest = [i for i, o in enumerate(out) if o is None]
        for offset, chunk in _chunks([msgs[i] for i in rest], self.max_items_per_request, self.max_request_bytes):
            request = pb.ExtractRequest(backbone=backbone, layer=layer, inputs=chunk, output_dtype=output_dtype,
                                        cache_policy=cache_policy)
            _place(_outcomes(await self._call(self._stub.Extract, request), 0), rest[offset:offset + len(chunk)], out)
        return out  # type: ignore[return-value]

    async def extract(self, inputs: Iterable, **kwargs) -> np.ndarray:
        """See FeatureBank.extract."""
        return _stack(await self.extract_items(inputs, **kwargs))

    async def lookup(self, keys: Sequence[str], *, backbone: str, layer: str = "", output_dtype: int = pb.FLOAT32) -> list[ItemOutcome]:
        """See FeatureBank.lookup."""
        out: list[ItemOutcome] = []
        for start in range(0, len(keys), LOOKUP_CHUNK):
            request = pb.LookupRequest(backbone=backbone, layer=layer, keys=keys[start:start + LOOKUP_CHUNK],
                                       output_dtype=output_dtype)
            out.extend(_outcomes(await self._call(self._stub.Lookup, request), start))
        return out

    async def backbones(self) -> list[pb.BackboneInfo]:
        """See FeatureBank.backbones."""
        return list((await self._call(self._stub.ListBackbones, pb.ListBackbonesRequest())).backbones)
