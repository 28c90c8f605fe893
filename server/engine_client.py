"""A frontend's link to the engine process: ``MissPath.compute`` over a Unix socket, engine state pushed back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from featurebank.common.errors import UnavailableError
from featurebank.engine.misses import Computed
from featurebank.server import engine_messages as msgs
from featurebank.workers.backbones.base import BackboneInfo
from featurebank.workers.messages import out_of_band_item

logger = logging.getLogger(__name__)

RECONNECT_S = (0.05, 0.1, 0.25, 0.5, 1.0)  # between tries while the engine starts or restarts


class EngineClient:
    """The interface the servicer has from an in-process MissPath (``compute``, ``flights``,
    ``recent``), answered by the engine process.

    Exceptions arrive as the same domain exceptions (QueueFullError refuses the request; per-key
    DeadlineExceededError, INVALID_ARGUMENT, INTERNAL come back as outcomes). A request cancelled
    here (client gone, deadline) sends CancelCompute: the engine stops waiting for it, and a key's
    owner stays while other requests, from any frontend, wait on it. While the engine is away
    (restarting), ``connected`` is False, compute raises UnavailableError and ``on_state`` is called,
    so health says NOT_SERVING.
    """

    def __init__(self, socket_path: str, *, on_state: Callable[[], None] | None = None, recent_max_items: int = 1024):
        self.socket_path = socket_path
        self.on_state = on_state or (lambda: None)
        self.flights: dict[int, asyncio.Future] = {}  # request id -> its answer, while in flight
        self.recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.recent_max_items = recent_max_items
        self.backbones: dict[str, BackboneInfo] = {}
        self.ready_workers: dict[str, int] = {}
        self.connected = False
        self._ids = itertools.count()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()  # the engine said every backbone is loaded
        self._closing = False

    def start(self) -> None:
        """Connect (and reconnect whenever the engine goes away) in the background."""
        self._task = asyncio.ensure_future(self._run())

    async def wait_ready(self) -> dict[str, BackboneInfo]:
        """The served backbones, once the engine has every worker ready."""
        await self._ready.wait()
        return self.backbones

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError, OSError):
                await asyncio.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
                attempt += 1
                continue
            attempt = 0
            self._writer = writer
            self.connected = True
            logger.info("connected to the engine")
            try:
                await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self.connected = False
                self._writer = None
                writer.close()
                self.ready_workers = {}
                for fut in self.flights.values():
                    if not fut.done():
                        fut.set_exception(UnavailableError("the engine process went away (it is restarting): retry"))
                if not self._closing:
                    logger.error("lost the engine; NOT_SERVING until it is back")
                    self.on_state()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            message = await msgs.read_message(reader)
            if isinstance(message, msgs.ComputeResult):
                fut = self.flights.get(message.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(message)
            elif isinstance(message, msgs.EngineState):
                if message.backbones is not None:
                    self.backbones = {b.name: b for b in message.backbones}
                self.ready_workers = dict(message.ready_workers)
                if message.backbones is not None:
                    self._ready.set()
                self.on_state()

    def ready_count(self, backbone: str) -> int:
        return self.ready_workers.get(backbone, 0) if self.connected else 0

    async def compute(
        self,
        served: Any,
        layer: str,
        keys: Sequence[str],
        payloads: dict,
        *,
        deadline: float | None,
        tenant: str = "",
        claim: bool = False,
        write: bool = True,
        wait_for_room: bool = False,
    ) -> dict[str, Computed | BaseException]:
        """``MissPath.compute`` in the engine process: {key: Computed | exception}."""
        if not keys:
            return {}
        writer = self._writer
        if writer is None:
            raise UnavailableError("the engine process is not reachable (starting or restarting): retry")
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        request = msgs.ComputeRequest(
            request_id=rid,
            backbone=served.info.name,
            layer=layer,
            keys=list(keys),
            payloads=[out_of_band_item(payloads[k]) for k in keys],  # large images beside the pickle
            timeout_s=None if deadline is None else max(0.0, deadline - loop.time()),
            tenant=tenant,
            claim=claim,
            write=write,
            wait_for_room=wait_for_room,
        )
        fut = loop.create_future()
        self.flights[rid] = fut
        try:
            await msgs.write_message(writer, request)
            result: msgs.ComputeResult = await fut
        except asyncio.CancelledError:
            # Our cancellation cancelled ``fut`` too: the engine is told unless its answer came first.
            if self._writer is writer and (fut.cancelled() or not fut.done()):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    writer.writelines(msgs.frame(msgs.CancelCompute(rid)))  # no await: we are leaving
            raise
        except (ConnectionError, RuntimeError) as e:
            raise UnavailableError(f"the engine process went away ({e}): retry") from None
        finally:
            self.flights.pop(rid, None)
        if result.error is not None:
            raise msgs.decode_error(result.error)
        out: dict[str, Computed | BaseException] = {}
        for key, features, from_cache, error in zip(keys, result.features, result.from_cache, result.errors):
            if error is not None:
                out[key] = msgs.decode_error(error)
            else:
                out[key] = Computed(features, from_cache=from_cache)
                self._remember(key, features)
        return out

    def _remember(self, key: str, features: np.ndarray) -> None:
        self.recent[key] = features
        if len(self.recent) > self.recent_max_items:
            self.recent.popitem(last=False)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()


class RemotePool:
    """Stands in for a WorkerPool in a frontend's ServedBackbone: its ready workers, as the engine said."""

    def __init__(self, client: EngineClient, backbone: str):
        self._client = client
        self._backbone = backbone

    @property
    def ready_count(self) -> int:
        return self._client.ready_count(self._backbone)
