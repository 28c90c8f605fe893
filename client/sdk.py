"""The Python SDK: FeatureBank (blocking) and AsyncFeatureBank over the featurebank.v1 API."""

from __future__ import annotations

import json
import os
import queue
import warnings
from collections.abc import Iterable, Iterator, Sequence

import grpc
import numpy as np

from featurebank.client import planning
from featurebank.client.coalesce import DEFAULT_LINGER_MS, AsyncCoalescer, Coalescer
from featurebank.client.errors import FeatureBankError
from featurebank.client.inputs import to_input
from featurebank.client.planning import LOOKUP_CHUNK, Call, Limits, drive, drive_async  # noqa: F401 (re-exported)
from featurebank.client.results import HeadInfo, ItemOutcome, Prediction, outcomes, stack
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

# Stay well under gRPC's 4 MiB default message limit, whatever the server allows.
DEFAULT_MAX_REQUEST_BYTES = 3 * 1024 * 1024
DEFAULT_MAX_ITEMS_PER_REQUEST = 256
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# gRPC's own retry machinery: UNAVAILABLE (a restarting or draining server) is retried with
# exponential backoff; everything else is the caller's decision.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "featurebank.v1.FeatureBank"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "loadBalancingConfig": [{"round_robin": {}}],
    }
)


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


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def make_channel(
    target: str,
    *,
    aio: bool = False,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    tls: bool = False,
):
    """A channel to the server: TLS when any TLS option is given (mutual TLS with a client
    certificate and key), plaintext otherwise."""
    module = grpc.aio if aio else grpc
    if tls or tls_ca_file or tls_cert_file:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca_file),
            private_key=_read(tls_key_file),
            certificate_chain=_read(tls_cert_file),
        )
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
        coalesce_linger_ms: concurrent ``extract``/``extract_items`` calls of this client (from
            several threads) with the same options are merged into one keys-first Lookup/Extract;
            a batch waits up to this long for company, and only while another call is in flight
            (a lone caller never waits). 0 turns coalescing off. See client/coalesce.py.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 300.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        coalesce_linger_ms: float = DEFAULT_LINGER_MS,
    ):
        self._coalescer = Coalescer(coalesce_linger_ms / 1000, max_items_per_request) if coalesce_linger_ms else None
        self.target = target
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_items_per_request = max_items_per_request
        self._metadata = _auth_metadata(token)
        self._channel = channel or make_channel(
            target, tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file
        )
        self._stub = pb_grpc.FeatureBankStub(self._channel)

    def __enter__(self) -> FeatureBank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def _limits(self) -> Limits:
        return Limits(self.max_items_per_request, self.max_request_bytes)

    def _send(self, call: Call, timeout_s: float | None = None):
        """Make one unary RPC of a plan (see planning.py)."""
        try:
            return getattr(self._stub, call.method)(
                call.request, timeout=self.timeout_s if timeout_s is None else timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None

    def extract_items(
        self,
        inputs: Iterable,
        *,
        backbone: str = "",
        layer: str = "",
        output_dtype: int = pb.FLOAT32,
        cache_policy: int = pb.USE,
        lookup_first: bool = True,
    ) -> list[ItemOutcome]:
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

        Returns:
            one ItemOutcome (index, key, cache_hit, features, error) per input.

        Raises:
            FeatureBankError: the request as a whole failed (unknown backbone or layer, overload, ...).
        """
        options = dict(
            backbone=backbone,
            layer=layer,
            output_dtype=output_dtype,
            cache_policy=cache_policy,
            lookup_first=lookup_first,
        )
        if self._coalescer is None:
            return drive(planning.extract(inputs, self._limits, **options), self._send)

        def dispatch(msgs, timeout_s):
            return drive(planning.extract(msgs, self._limits, **options), lambda call: self._send(call, timeout_s))

        return self._coalescer.run(
            (*options.values(), self.timeout_s, self._metadata), [to_input(x) for x in inputs], self.timeout_s, dispatch
        )

    def extract(self, inputs: Iterable, **kwargs) -> np.ndarray:
        """Features of every input as one (N, *shape) array.

        Args: as ``extract_items``.

        Returns:
            numpy array, one row per input, in input order.

        Raises:
            FeatureBankError: the request failed, or an item failed (``.index`` says which).
        """
        return stack(self.extract_items(inputs, **kwargs))

    def lookup(
        self, keys: Sequence[str], *, backbone: str, layer: str = "", output_dtype: int = pb.FLOAT32
    ) -> list[ItemOutcome]:
        """Cached features by content key; a key not cached has a NOT_FOUND error.

        Returns:
            one ItemOutcome per key, in order.
        """
        return drive(planning.lookup(keys, backbone=backbone, layer=layer, output_dtype=output_dtype), self._send)

    def backbones(self) -> list[pb.BackboneInfo]:
        """The served backbones with their layers, shapes and fingerprints."""
        return drive(planning.backbones(), self._send)

    # ------------------------------------------------------------------------ streaming, datasets

    def _stream(
        self, inputs: Iterable, *, backbone: str, layer: str, output_dtype: int, cache_policy: int, lookup_first: bool
    ) -> Iterator[tuple[pb.ExtractResponse, list[ItemOutcome]]]:
        """(response, outcomes) per chunk of inputs over one ExtractStream, in input order.

        Inputs are read lazily, chunk by chunk (planning.chunks), as gRPC's flow control lets
        requests go out, so a dataset of any size is never all in memory. With ``lookup_first``
        each chunk's content keys are looked up first (planning.lookup_hits, as ``extract_items``
        does) and only the misses are uploaded: resuming a job re-sends nothing the store holds.
        """
        # Chunks in order, as the request thread prepared them; bounded, so reading ahead stops.
        prepared: queue.Queue = queue.Queue(maxsize=8)
        resolved: dict[str, str] = {}  # the backbone and layer the server picked, once known

        def requests():
            try:
                for offset, batch in planning.chunks((to_input(x) for x in inputs), self._limits):
                    known: list[ItemOutcome | None] = [None] * len(batch)
                    named = backbone or resolved.get("backbone", "")
                    if planning.uses_lookup(lookup_first, cache_policy, named):
                        last = drive(
                            planning.lookup_hits(
                                batch,
                                known,
                                backbone=named,
                                layer=layer or resolved.get("layer", ""),
                                output_dtype=output_dtype,
                                base=offset,
                            ),
                            self._send,
                        )
                        if last is not None:
                            resolved.update(
                                backbone=last.backbone, layer=last.layer, backbone_fingerprint=last.backbone_fingerprint
                            )
                    if known[0] is None and len(batch) == 1 and batch[0].ByteSize() + 8 > self._limits.max_bytes:
                        # Too large to share a request: sent alone, unary, so a size refusal fails
                        # this input (planning.too_large_alone) and not the whole stream.
                        known = drive(
                            planning.extract(
                                batch,
                                self._limits,
                                backbone=backbone,
                                layer=layer,
                                output_dtype=output_dtype,
                                cache_policy=cache_policy,
                                lookup_first=False,
                            ),
                            self._send,
                        )
                        planning.place(known, [0], known, base=offset)
                    misses = [j for j, k in enumerate(known) if k is None]
                    prepared.put((offset, known, misses))
                    if misses:
                        yield planning.extract_request(
                            [batch[j] for j in misses],
                            backbone=backbone,
                            layer=layer,
                            output_dtype=output_dtype,
                            cache_policy=cache_policy,
                        )
                prepared.put(None)
            except Exception as e:  # an unreadable input or a failed Lookup: end the stream, tell the reader why
                prepared.put(e)

        responses = self._stub.ExtractStream(requests(), metadata=self._metadata)
        try:
            while True:
                item = prepared.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                offset, known, misses = item
                if not misses:  # answered entirely by Lookup: no request was sent
                    yield pb.ExtractResponse(**resolved), known
                    continue
                response = next(responses)
                planning.place(outcomes(response), misses, known, base=offset)
                resolved.update(
                    backbone=response.backbone, layer=response.layer, backbone_fingerprint=response.backbone_fingerprint
                )
                yield response, known
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None
        finally:
            responses.cancel()

    def extract_stream(
        self,
        inputs: Iterable,
        *,
        backbone: str = "",
        layer: str = "",
        output_dtype: int = pb.FLOAT32,
        cache_policy: int = pb.USE,
        lookup_first: bool = False,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[ItemOutcome]:
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
            for _, items in self._stream(
                inputs,
                backbone=backbone,
                layer=layer,
                output_dtype=output_dtype,
                cache_policy=cache_policy,
                lookup_first=lookup_first,
            ):
                for o in items:
                    seen += 1
                    hits += o.cache_hit
                    yield o
                bar.update(len(items))
                bar.set_postfix(hit_ratio=f"{hits / max(1, seen):.2f}", refresh=False)

    def features(
        self,
        data,
        labels=None,
        *,
        backbone: str = "",
        layer: str = "",
        text_column: str | None = None,
        label_column: str | None = None,
        progress: bool = False,
        lookup_first: bool = True,
    ):
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
        from tqdm import tqdm

        from featurebank.client import datasets

        inputs, labels, class_names = datasets.resolve(data, labels, text_column=text_column, label_column=label_column)
        rows, keys, hits = [], [], 0
        meta = pb.ExtractResponse()
        with tqdm(total=len(inputs), unit="item", disable=not progress, smoothing=0.1) as bar:
            for response, items in self._stream(
                inputs,
                backbone=backbone,
                layer=layer,
                output_dtype=pb.FLOAT32,
                cache_policy=pb.USE,
                lookup_first=lookup_first,
            ):
                if response.backbone_fingerprint:
                    meta = response
                for o in items:
                    if o.error is not None:
                        raise o.error
                    rows.append(o.features)
                    keys.append(o.key)
                    hits += o.cache_hit
                bar.update(len(items))
                bar.set_postfix(hit_ratio=f"{hits / max(1, len(rows)):.2f}", refresh=False)
        return datasets.FeatureSet(
            features=np.stack(rows) if rows else np.zeros((0, 0), np.float32),
            labels=labels,
            class_names=class_names,
            keys=keys,
            backbone=meta.backbone,
            fingerprint=meta.backbone_fingerprint,
            layer=meta.layer,
            hits=hits,
        )

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

    def fit_head(
        self,
        data,
        labels=None,
        *,
        backbone: str = "",
        layer: str = "",
        head: str = "logistic",
        validation_split: float = 0.2,
        epochs: int = 200,
        progress: bool = False,
        text_column: str | None = None,
        label_column: str | None = None,
        **train_options,
    ):
        """Train a head on features from the store.

        Args:
            data, labels: as ``features``.
            head: "logistic" or "mlp".
            validation_split: fraction held out (fixed seed) for early stopping and metrics. With
                fewer than 20 held-out examples a class, every label trains instead, ``metrics``
                are training metrics (``train_*``) and a SmallDataWarning says so.

        Returns:
            featurebank.client.heads.Head (``predict``, ``evaluate``, ``save``, ``load``).

        Warns:
            featurebank.client.heads.SmallDataWarning: validation was skipped.
        """
        from featurebank.client.heads import Head

        fs = self.features(
            data,
            labels,
            backbone=backbone,
            layer=layer,
            text_column=text_column,
            label_column=label_column,
            progress=progress,
        )
        # Head.train's warnings (SmallDataWarning) are re-issued at the caller's fit_head line.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trained = Head.train(fs, head=head, validation_split=validation_split, epochs=epochs, **train_options)
        for w in caught:
            warnings.warn(w.message, w.category, stacklevel=2)
        return trained

    # ------------------------------------------------------------------------ served heads

    def put_head(self, head, name: str, version: int = 0) -> HeadInfo:
        """Upload a trained Head (or a .keras head file) to serve under a name.

        Args:
            head: featurebank.client.heads.Head, or the path of a head saved with ``Head.save``.
            name: the name to serve it under.
            version: 0 for the next version of this name.

        Returns:
            HeadInfo of the stored version.
        """
        return drive(planning.put_head(_head_proto(head, name, version)), self._send)

    def list_heads(self, name: str = "") -> list[HeadInfo]:
        """Served heads (every version), optionally of one name, as HeadInfo."""
        return drive(planning.list_heads(name), self._send)

    def delete_head(self, name: str, version: int = 0) -> int:
        """Delete one version (or all with 0); returns how many were deleted."""
        return drive(planning.delete_head(name, version), self._send)

    def predict(self, head: str, inputs: Iterable, *, version: int = 0, cache_policy: int = pb.USE) -> list[Prediction]:
        """Labels and class probabilities from a served head, one per input (errors per item).

        Args:
            head: the served head's name.
            inputs: as ``extract_items``.
            version: 0 for the latest.

        Returns:
            one Prediction (index, label, label_index, probabilities as numpy, cache_hit, key,
            error) per input, in input order.

        Raises:
            FeatureBankError: the request failed (unknown head, a head whose backbone changed, ...).
        """
        return drive(
            planning.predict(head, inputs, self._limits, version=version, cache_policy=cache_policy), self._send
        )


def _head_proto(head, name: str, version: int) -> pb.Head:
    from featurebank.client.heads import Head

    if not isinstance(head, Head):
        head = Head.load(head)
    return head.to_proto(name, version)


class AsyncFeatureBank:
    """The asyncio twin of FeatureBank (same methods, awaitable); ``coalesce_linger_ms`` merges
    concurrent tasks' calls as FeatureBank's merges threads'."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 300.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        token: str | None = None,
        tls: bool = False,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        coalesce_linger_ms: float = DEFAULT_LINGER_MS,
    ):
        self._coalescer = (
            AsyncCoalescer(coalesce_linger_ms / 1000, max_items_per_request) if coalesce_linger_ms else None
        )
        self.target = target
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_items_per_request = max_items_per_request
        self._metadata = _auth_metadata(token)
        self._channel = make_channel(
            target, aio=True, tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file
        )
        self._stub = pb_grpc.FeatureBankStub(self._channel)

    async def __aenter__(self) -> AsyncFeatureBank:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @property
    def _limits(self) -> Limits:
        return Limits(self.max_items_per_request, self.max_request_bytes)

    async def _send(self, call: Call, timeout_s: float | None = None):
        """Make one unary RPC of a plan (see planning.py)."""
        try:
            return await getattr(self._stub, call.method)(
                call.request, timeout=self.timeout_s if timeout_s is None else timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise FeatureBankError.from_rpc_error(e) from None

    async def extract_items(
        self,
        inputs: Iterable,
        *,
        backbone: str = "",
        layer: str = "",
        output_dtype: int = pb.FLOAT32,
        cache_policy: int = pb.USE,
        lookup_first: bool = True,
    ) -> list[ItemOutcome]:
        """See FeatureBank.extract_items."""
        options = dict(
            backbone=backbone,
            layer=layer,
            output_dtype=output_dtype,
            cache_policy=cache_policy,
            lookup_first=lookup_first,
        )
        if self._coalescer is None:
            return await drive_async(planning.extract(inputs, self._limits, **options), self._send)

        async def dispatch(msgs, timeout_s):
            return await drive_async(
                planning.extract(msgs, self._limits, **options), lambda call: self._send(call, timeout_s)
            )

        return await self._coalescer.run(
            (*options.values(), self.timeout_s, self._metadata), [to_input(x) for x in inputs], self.timeout_s, dispatch
        )

    async def extract(self, inputs: Iterable, **kwargs) -> np.ndarray:
        """See FeatureBank.extract."""
        return stack(await self.extract_items(inputs, **kwargs))

    async def lookup(
        self, keys: Sequence[str], *, backbone: str, layer: str = "", output_dtype: int = pb.FLOAT32
    ) -> list[ItemOutcome]:
        """See FeatureBank.lookup."""
        return await drive_async(
            planning.lookup(keys, backbone=backbone, layer=layer, output_dtype=output_dtype), self._send
        )

    async def backbones(self) -> list[pb.BackboneInfo]:
        """See FeatureBank.backbones."""
        return await drive_async(planning.backbones(), self._send)

    async def put_head(self, head, name: str, version: int = 0) -> HeadInfo:
        """See FeatureBank.put_head."""
        return await drive_async(planning.put_head(_head_proto(head, name, version)), self._send)

    async def list_heads(self, name: str = "") -> list[HeadInfo]:
        """See FeatureBank.list_heads."""
        return await drive_async(planning.list_heads(name), self._send)

    async def delete_head(self, name: str, version: int = 0) -> int:
        """See FeatureBank.delete_head."""
        return await drive_async(planning.delete_head(name, version), self._send)

    async def predict(
        self, head: str, inputs: Iterable, *, version: int = 0, cache_policy: int = pb.USE
    ) -> list[Prediction]:
        """See FeatureBank.predict."""
        return await drive_async(
            planning.predict(head, inputs, self._limits, version=version, cache_policy=cache_policy), self._send
        )
