"""The dynamic batcher: misses from all requests queue here until a worker takes a batch."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from typing import Any

from featurebank.common.errors import DeadlineExceededError, QueueFullError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class PendingItem:
    """One input waiting for features; several requests may wait on it (single-flight)."""

    payload: Any  # a featurebank.workers.messages.InputItem
    layer: str
    future: asyncio.Future
    deadline: float | None = None  # loop.time(); None = no deadline
    waiters: int = 1  # requests still interested; 0 = everyone left, do not compute
    attempts: int = 0  # times a batch holding this item killed a worker
    enqueued_at: float = 0.0
    from_cache: bool = False  # another replica computed it; it was read from the shared cache
    key: str = ""  # the cache key it computes (poison inputs are counted per key, across requests)
    tenant: str = ""  # the tenant whose request started it ("" without tokens)
    reserved: bool = False  # holds room in its batcher (DynamicBatcher.reserve) until it is queued

    def abandoned(self, now: float) -> str | None:
        """Why this item should not reach a worker ("cancelled", "deadline"), or None."""
        if self.future.done() or self.waiters <= 0:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "deadline"
        return None


class DynamicBatcher:
    """Collects items up to ``max_batch_size`` or ``max_batch_delay_ms``, whichever comes first.

    The queue is bounded: ``submit`` raises QueueFullError (RESOURCE_EXHAUSTED) instead of letting
    memory grow. With tenants, each may hold only its share of the queue (``room_for``), and
    batches take items from the tenants in turn. Items whose requests were cancelled or are past their deadline are dropped when
    a batch is formed, so they never cost a worker anything. Items that were in a batch that
    killed a worker come back through ``requeue`` and are then sent alone, so one poisonous input
    cannot take its neighbours down with it.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        max_queue_size: int,
        max_queue_share: float = 1.0,
        on_drop=None,
        on_depth=None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0, got {max_batch_delay_ms}")
        if max_queue_size < max_batch_size:
            raise ValueError(f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})")
        if not 0 < max_queue_share <= 1:
            raise ValueError(f"max_queue_share must be in (0, 1], got {max_queue_share}")
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_queue_share = max_queue_share
        self.queued_by_tenant: collections.Counter[str] = collections.Counter()
        # Room held for items admitted but not queued yet (being claimed or preprocessed): admission
        # counts them, so a flood is refused at once instead of after its items were decoded.
        self.reserved_by_tenant: collections.Counter[str] = collections.Counter()
        self._reserved = 0
        self._room = asyncio.Event()  # set whenever items leave the queue
        # One FIFO per tenant, in round-robin order (a dict keeps it: the tenant served last
        # moves to the end), so a batch takes turns between tenants: one tenant's flood never
        # stands in front of another's few items. Without tokens there is one tenant, "": FIFO.
        self._queues: dict[str, collections.deque[PendingItem]] = {}
        self._queued = 0
        self._retry: collections.deque[PendingItem] = collections.deque()
        self._nonempty = asyncio.Event()
        self._full = asyncio.Event()
        self._on_drop = on_drop or (lambda item, reason: None)
        self._on_depth = on_depth or (lambda depth: None)

    def __len__(self) -> int:
        return self._queued + len(self._retry)

    def room_for(self, tenant: str) -> int:
        """How many more items ``tenant`` may queue now.

        Without tenants ("") the whole free queue. A tenant's share is ``max_queue_size`` divided
        by one more than the number of tenants with items queued (itself included), and at most
        ``max_queue_share`` of it: a lone flooder holds half the queue, n flooders settle at
        1/(n+1) each, always leaving a share's worth of room for a newcomer. (Tenants admitted
        under a larger share keep what they hold until it drains; they are refused meanwhile.)
        """
        free = self.max_queue_size - len(self) - self._reserved
        if not tenant or self.max_queue_share >= 1:
            return max(0, free)
        mine = self.queued_by_tenant[tenant] + self.reserved_by_tenant[tenant]
        holding = set(self.queued_by_tenant) | set(self.reserved_by_tenant)
        active = len(holding) - (1 if "" in holding else 0) + (0 if mine else 1)
        share = int(self.max_queue_size * min(self.max_queue_share, 1.0 / (active + 1)))
        return max(0, min(free, share - mine))

    def full_error(self, tenant: str, n: int) -> QueueFullError:
        """The refusal of ``n`` items of ``tenant`` that do not fit ``room_for(tenant)``."""
        if tenant and self.max_queue_share < 1 and len(self) < self.max_queue_size:
            return QueueFullError(
                f"tenant {tenant!r} has {self.queued_by_tenant[tenant]} items queued; {n} more would exceed its "
                f"share of the queue (max_queue_size={self.max_queue_size} over {len(self.queued_by_tenant) + 1} "
                f"(tenants queued + 1), at most max_queue_share={self.max_queue_share:g} of it); retry with backoff"
            )
        return QueueFullError(
            f"server overloaded: {len(self)} items queued (max_queue_size={self.max_queue_size}); retry with backoff"
        )

    async def wait_for_room(self, tenant: str, n: int = 1) -> None:
        """Return once ``n`` items of ``tenant`` fit (backpressure for streams)."""
        while self.room_for(tenant) < n:
            self._room.clear()
            await self._room.wait()

    def reserve(self, tenant: str, n: int = 1) -> None:
        """Hold room for ``n`` items of ``tenant`` that will be submitted (or let go) later."""
        self._reserved += n
        self.reserved_by_tenant[tenant] += n

    def unreserve(self, tenant: str, n: int = 1) -> None:
        """Give back room held by ``reserve`` (the item was submitted, or will not be)."""
        self._reserved -= n
        left = self.reserved_by_tenant[tenant] - n
        if left > 0:
            self.reserved_by_tenant[tenant] = left
        else:
            del self.reserved_by_tenant[tenant]
        self._room.set()

    def hold(self, item: PendingItem) -> None:
        """Hold room for an admitted item until ``submit`` (or ``let_go``): it is being claimed or preprocessed."""
        if not item.reserved:
            item.reserved = True
            self.reserve(item.tenant)

    def let_go(self, item: PendingItem) -> None:
        """Give back the room an item held, if it still holds it (it was never queued)."""
        if item.reserved:
            item.reserved = False
            self.unreserve(item.tenant)

    def submit(self, item: PendingItem) -> None:
        """Queue one item; QueueFullError when the queue (or its tenant's share) is full.

        An item that held room (``hold``) hands it over first.
        """
        self.let_go(item)
        if self.room_for(item.tenant) < 1:
            raise self.full_error(item.tenant, 1)
        item.enqueued_at = asyncio.get_running_loop().time()
        queue = self._queues.get(item.tenant)
        if queue is None:
            queue = self._queues[item.tenant] = collections.deque()
        queue.append(item)
        self._queued += 1
        self.queued_by_tenant[item.tenant] += 1
        self._signal()

    def _left(self, item: PendingItem) -> None:
        """Account for an item taken off the queue (to a batch, or dropped)."""
        n = self.queued_by_tenant[item.tenant] - 1
        if n > 0:
            self.queued_by_tenant[item.tenant] = n
        else:
            del self.queued_by_tenant[item.tenant]
        self._room.set()

    def requeue(self, items: list[PendingItem]) -> None:
        """Put items of a failed batch back at the front; they will be sent one per batch."""
        self._retry.extend(items)
        self.queued_by_tenant.update(it.tenant for it in items)
        self._signal()

    def requeue_front(self, items: list[PendingItem]) -> None:
        """Put items that were not at fault back at the head of the queue, in their order."""
        by_tenant: dict[str, list[PendingItem]] = {}
        for it in items:
            by_tenant.setdefault(it.tenant, []).append(it)
        for tenant, its in by_tenant.items():
            queue = self._queues.pop(tenant, collections.deque())
            queue.extendleft(reversed(its))
            self._queues = {tenant: queue, **self._queues}  # their turn first (rare: after a worker died)
        self._queued += len(items)
        self.queued_by_tenant.update(it.tenant for it in items)
        self._signal()

    def _signal(self) -> None:
        self._nonempty.set()
        if self._queued >= self.max_batch_size:
            self._full.set()
        self._on_depth(len(self))

    async def wait_for_batch(self, *, full_only: bool = False) -> list[PendingItem]:
        """The next non-empty batch: waits for a first item, then up to the delay for a full batch.

        ``full_only``: wait (without the delay) until a full batch is queued, for a batch sent
        ahead while another computes; cancelling that wait takes nothing from the queue.
        """
        loop = asyncio.get_running_loop()
        while True:
            while not len(self):
                self._nonempty.clear()
                await self._nonempty.wait()
            if full_only:
                while self._queued < self.max_batch_size:
                    self._full.clear()
                    await self._full.wait()
                batch = self._take(loop.time())
            elif self._retry:
                batch = self._take_retry(loop.time())
            else:
                if self._queued < self.max_batch_size and self.max_batch_delay_s > 0:
                    self._full.clear()
                    try:
                        await asyncio.wait_for(self._full.wait(), self.max_batch_delay_s)
                    except asyncio.TimeoutError:
                        pass
                batch = self._take(loop.time())
            self._on_depth(len(self))
            if batch:
                return batch

    def _take_retry(self, now: float) -> list[PendingItem]:
        while self._retry:
            item = self._retry.popleft()
            self._left(item)
            if not self._dropped(item, now):
                return [item]
        return []

    def _take(self, now: float) -> list[PendingItem]:
        batch: list[PendingItem] = []
        while self._queued and len(batch) < self.max_batch_size:
            item = self._pop_next()
            self._left(item)
            if not self._dropped(item, now):
                batch.append(item)
        return batch

    def _pop_next(self) -> PendingItem:
        """The first item of the tenant whose turn it is; that tenant goes to the back of the line."""
        tenant, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._queued -= 1
        del self._queues[tenant]
        if queue:
            self._queues[tenant] = queue
        return item

    def _dropped(self, item: PendingItem, now: float) -> bool:
        reason = item.abandoned(now)
        if reason is None:
            return False
        if not item.future.done():
            item.future.set_exception(DeadlineExceededError(f"item dropped before compute: {reason}"))
            item.future.exception()  # mark retrieved: nobody may be waiting any more
        self._on_drop(item, reason)
        return True
