"""Missed inputs computed once: one owner task per cache key claims it, queues it, writes it and releases it."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from featurebank.common import codec
from featurebank.common.cache import CLAIM_CACHED, CLAIM_TAKEN, FeatureCache
from featurebank.common.errors import QueueFullError
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import PendingItem
from featurebank.engine.coalesce import Coalescer
from featurebank.engine.singleflight import Flight, Group

logger = logging.getLogger(__name__)

FIRST_POLL_S = 0.005  # polling the shared cache for a key another replica computes: first wait...
MAX_POLL_S = 0.1  # ...doubling up to this


@dataclasses.dataclass(frozen=True)
class Computed:
    """The features of one missed input, and whether another replica computed them (a shared-cache hit)."""

    features: np.ndarray
    from_cache: bool = False


class MissPath:
    """Computes missed inputs, each once however many requests (and replicas) ask for it.

    Every cache key in flight has one owner task (``singleflight.Group``), independent of the
    requests waiting on it: with a shared cache it claims the key (a lease with its own token:
    other replicas wait for the value instead of computing it), queues the item, keeps the claim
    alive while the item waits, writes the features, then gives the claim back by
    compare-and-delete. Requests only wait; the owner is cancelled, and cleans up (its item is
    dropped from the queue, its claim released), only when the last request waiting has left.
    Cache calls of owners running at the same time go to the cache together (``Coalescer``):
    one round trip per step, however many keys.
    """

    def __init__(
        self,
        cache: FeatureCache,
        metrics: Metrics,
        *,
        storage_dtype: str,
        claim_ttl_ms: int,
        recent_max_items: int = 1024,
    ):
        self.cache = cache
        self.metrics = metrics
        self.storage_dtype = np.dtype(storage_dtype)
        self.claim_ttl_ms = claim_ttl_ms
        self.claim_refresh_s = claim_ttl_ms / 3000.0  # three refreshes per TTL: one lost round trip is no loss
        self.flights: Group[Computed] = Group()
        # The last few results written to the cache: closes the window between an owner's cache
        # write and a concurrent request's cache read, so an input is computed once.
        self.recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.recent_max_items = recent_max_items
        # Backbone name -> its preprocessing pool (filled at start-up; absent: its workers preprocess).
        self.preprocessing: dict[str, Any] = {}
        self._claim = Coalescer(self._claim_many)
        self._release = Coalescer(self._release_many)
        self._read = Coalescer(cache.get_many)
        self._write = Coalescer(self._set_many)

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
        """Features (or the exception) per cache key, joining computations already in flight.

        A unary request whose new items do not fit the queue (or its tenant's share of it) is
        refused at once with QueueFullError; with ``wait_for_room`` (a stream) each new item
        waits for room instead. ``claim``: ask the shared cache who computes each new key;
        ``write``: store what is computed.
        """
        if not keys:
            return {}
        batcher = served.batcher
        name = served.info.name
        claim = claim and self.cache.has_claims
        new = [k for k in keys if k not in self.flights]
        if new and not wait_for_room:
            room = batcher.room_for(tenant)
            if len(new) > room:
                self._refused(name, tenant, len(new))
                raise batcher.full_error(tenant, len(new))
        loop = asyncio.get_running_loop()
        flights: list[Flight[Computed]] = []
        for key in keys:
            flight = self.flights.get(key)
            if flight is None:
                item = PendingItem(payloads[key], layer, loop.create_future(), deadline, key=key, tenant=tenant)
                if not wait_for_room:  # admitted above: its room is held until it is queued
                    batcher.hold(item)
                flight, _ = self.flights.join(
                    key,
                    lambda f, item=item: self._own(f, served, item, claim=claim, write=write, wait=wait_for_room),
                    data=item,
                )
                # Given back whenever the owner ends without queueing it (cached meanwhile, failed,
                # cancelled, even before it ran).
                flight.task.add_done_callback(lambda _, item=item: batcher.let_go(item))
            else:
                flight, _ = self.flights.join(key, None)  # type: ignore[arg-type]
                item = flight.data
                item.deadline = None if (item.deadline is None or deadline is None) else max(item.deadline, deadline)
                self.metrics.singleflight_joins.labels(name).inc()
            flights.append(flight)
        outcomes = await self.flights.wait_all(flights)
        for o in outcomes:
            if isinstance(o, QueueFullError):
                raise o  # some of these items could not be queued: the request is refused, as above
        return dict(zip(keys, outcomes))

    def _refused(self, backbone: str, tenant: str, n: int) -> None:
        self.metrics.rejected_items.labels(backbone).inc(n)
        if tenant:
            self.metrics.tenant_limited.labels(tenant, "queue_share").inc()

    async def _own(
        self, flight: Flight[Computed], served: Any, item: PendingItem, *, claim: bool, write: bool, wait: bool
    ) -> Computed:
        """The owner of one key: claim -> preprocess -> queue -> wait (refreshing the claim) -> write -> release."""
        key = item.key
        batcher = served.batcher
        token = self.cache.claim_token() if claim else ""
        claiming: asyncio.Future | None = None
        held = False
        try:
            if claim:
                delay = FIRST_POLL_S
                while True:
                    claiming = self._claim((key, token))
                    state = await asyncio.shield(claiming)
                    claiming = None
                    if state == CLAIM_TAKEN:
                        held = True
                        break
                    if state == CLAIM_CACHED:  # another replica computed it meanwhile
                        value = await self._read(key)
                        if value is not None:
                            try:
                                features = codec.decode(value)
                            except codec.CorruptValueError:
                                break  # compute it here (and overwrite it)
                            item.from_cache = True
                            computed = Computed(features, from_cache=True)
                            flight.resolve(computed)
                            return computed
                        continue  # gone again (evicted): claim it
                    await asyncio.sleep(delay)  # CLAIM_HELD: another replica computes it; it writes, then releases
                    delay = min(delay * 2, MAX_POLL_S)
            if wait:  # a stream's item: wait for room, then hold it while the item is preprocessed
                await batcher.wait_for_room(item.tenant)
                batcher.hold(item)
            pre = self.preprocessing.get(served.info.name)
            if pre is not None:  # decoded on another core while earlier batches compute
                item.payload = await pre.preprocess(item)
            try:
                batcher.submit(item)
            except QueueFullError:
                self._refused(served.info.name, item.tenant, 1)
                raise
            features = np.asarray(await self._features(item, token if held else ""), dtype=self.storage_dtype)
            if write:
                await self._write((key, codec.encode(features)))
                self._remember(key, features)
            computed = Computed(features)
            flight.resolve(computed)  # answered now: the claim is given back after
            return computed
        except Exception:
            # Failed (queue full, dropped past its deadline, a bad input): the requests waiting get
            # this error, but a request arriving during the clean-up starts afresh.
            self.flights.forget(flight)
            raise
        finally:
            if not item.future.done():
                item.future.cancel()  # nobody waits any more: the batcher drops it before a worker
            if claiming is not None:  # left while claiming: the claim may still be granted
                await asyncio.wait({claiming})
                held = not claiming.cancelled() and claiming.exception() is None and claiming.result() == CLAIM_TAKEN
            if held:
                await self._release((key, token))

    async def _features(self, item: PendingItem, token: str):
        """The item's features once a worker computed them, extending its claim meanwhile."""
        if not token:
            return await item.future
        while not item.future.done():
            await asyncio.wait({item.future}, timeout=self.claim_refresh_s)
            if not item.future.done():
                await self._claim((item.key, token))  # lost meanwhile: another replica may compute it too
        return item.future.result()

    def _remember(self, key: str, features: np.ndarray) -> None:
        self.recent[key] = features
        if len(self.recent) > self.recent_max_items:
            self.recent.popitem(last=False)

    async def _claim_many(self, claims: Sequence[tuple[str, str]]) -> list[int]:
        return await self.cache.claim_many([k for k, _ in claims], self.claim_ttl_ms, [t for _, t in claims])

    async def _release_many(self, claims: Sequence[tuple[str, str]]) -> list[None]:
        await self.cache.release_many([k for k, _ in claims], [t for _, t in claims])
        return [None] * len(claims)

    async def _set_many(self, items: Sequence[tuple[str, bytes]]) -> list[None]:
        await self.cache.set_many(items)
        return [None] * len(items)
