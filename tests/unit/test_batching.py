"""The dynamic batcher (featurebank.engine.batching): batch size/delay, a bounded queue, drops and requeues."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from featurebank.common.errors import DeadlineExceededError, QueueFullError
from featurebank.engine.batching import DynamicBatcher, PendingItem

# Generous bound for "returns promptly" on a noisy shared machine; every delay that must NOT elapse is far longer.
PROMPT_S = 5.0
NEVER_MS = 600_000.0  # a batch delay no test may wait out


def pending(payload, *, deadline: float | None = None, waiters: int = 1) -> PendingItem:
    return PendingItem(
        payload=payload,
        layer="pooled",
        future=asyncio.get_running_loop().create_future(),
        deadline=deadline,
        waiters=waiters,
    )


def payloads(batch: list[PendingItem]) -> list:
    return [item.payload for item in batch]


async def next_batch(batcher: DynamicBatcher) -> list[PendingItem]:
    return await asyncio.wait_for(batcher.wait_for_batch(), PROMPT_S)


class Drops:
    """Records on_drop calls."""

    def __init__(self):
        self.calls: list[tuple[object, str]] = []

    def __call__(self, item: PendingItem, reason: str) -> None:
        self.calls.append((item.payload, reason))


# ----------------------------------------------------------------------------- size and delay


async def test_full_batch_does_not_wait_for_the_delay():
    """A queue holding max_batch_size items yields a full batch at once, even with a very long delay."""
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=NEVER_MS, max_queue_size=16)
    for i in range(4):
        b.submit(pending(i))
    assert payloads(await next_batch(b)) == [0, 1, 2, 3]
    assert len(b) == 0


async def test_batch_filling_while_waiting_is_returned_when_full():
    """A consumer waiting out the delay on a partial batch gets the batch as soon as it fills up."""
    b = DynamicBatcher(max_batch_size=3, max_batch_delay_ms=NEVER_MS, max_queue_size=16)
    consumer = asyncio.create_task(b.wait_for_batch())
    b.submit(pending("a"))
    await asyncio.sleep(0)  # let the consumer see the first item and start waiting for more
    assert not consumer.done()
    b.submit(pending("b"))
    b.submit(pending("c"))
    assert payloads(await asyncio.wait_for(consumer, PROMPT_S)) == ["a", "b", "c"]


async def test_partial_batch_is_returned_after_the_delay():
    """A batch that never fills is returned after about max_batch_delay_ms (not before, and not much later)."""
    delay_ms = 50.0
    b = DynamicBatcher(max_batch_size=8, max_batch_delay_ms=delay_ms, max_queue_size=16)
    loop = asyncio.get_running_loop()
    b.submit(pending("a"))
    b.submit(pending("b"))
    start = loop.time()
    batch = await next_batch(b)
    elapsed = loop.time() - start
    assert payloads(batch) == ["a", "b"]
    assert elapsed >= 0.9 * delay_ms / 1000  # timers may fire a hair early, never a tenth of the delay early
    assert elapsed < PROMPT_S


async def test_zero_delay_returns_partial_batch_at_once():
    """With max_batch_delay_ms=0 whatever is queued is returned immediately."""
    b = DynamicBatcher(max_batch_size=8, max_batch_delay_ms=0, max_queue_size=16)
    b.submit(pending("only"))
    assert payloads(await next_batch(b)) == ["only"]


async def test_max_batch_size_is_respected_in_fifo_order():
    """Ten queued items come out as batches of at most max_batch_size, in submission order."""
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=16)
    for i in range(10):
        b.submit(pending(i))
    batches = [payloads(await next_batch(b)) for _ in range(3)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_waits_for_a_first_item():
    """wait_for_batch blocks while the queue is empty and returns once an item is submitted."""
    b = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=0, max_queue_size=4)
    consumer = asyncio.create_task(b.wait_for_batch())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not consumer.done()
    b.submit(pending("x"))
    assert payloads(await asyncio.wait_for(consumer, PROMPT_S)) == ["x"]


async def test_concurrent_consumers_never_share_an_item():
    """Two consumers (two workers) split the queued items: every item is in exactly one batch."""
    b = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=0, max_queue_size=8)
    consumers = [asyncio.create_task(b.wait_for_batch()) for _ in range(2)]
    await asyncio.sleep(0)
    for i in range(4):
        b.submit(pending(i))
    batches = await asyncio.wait_for(asyncio.gather(*consumers), PROMPT_S)
    got = [p for batch in batches for p in payloads(batch)]
    assert sorted(got) == [0, 1, 2, 3]
    assert all(1 <= len(batch) <= 2 for batch in batches)


# ----------------------------------------------------------------------------- bounded queue


async def test_submit_beyond_max_queue_size_is_resource_exhausted():
    """The (max_queue_size+1)-th waiting item raises QueueFullError (RESOURCE_EXHAUSTED) and is not queued."""
    b = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=0, max_queue_size=4)
    for i in range(4):
        b.submit(pending(i))
    with pytest.raises(QueueFullError, match="max_queue_size=4") as exc:
        b.submit(pending("overflow"))
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(b) == 4
    await next_batch(b)  # taking a batch frees room
    b.submit(pending(4))
    b.submit(pending(5))
    with pytest.raises(QueueFullError):
        b.submit(pending("overflow"))


async def test_requeued_items_count_against_the_bound_but_are_never_refused():
    """Requeued items occupy queue slots (new submits are refused) yet requeue itself never raises."""
    b = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=0, max_queue_size=2)
    b.submit(pending("a"))
    b.submit(pending("b"))
    batch = await next_batch(b)
    b.submit(pending("c"))
    b.submit(pending("d"))
    b.requeue(batch)  # already admitted: must not be lost
    assert len(b) == 4
    with pytest.raises(QueueFullError):
        b.submit(pending("e"))


async def test_on_depth_reports_queue_depth():
    """on_depth is called with the number of waiting items after submits and after a batch is taken."""
    depths: list[int] = []
    b = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=0, max_queue_size=8, on_depth=depths.append)
    for i in range(3):
        b.submit(pending(i))
    assert depths[-1] == 3
    await next_batch(b)
    assert depths[-1] == 1


# ----------------------------------------------------------------------------- drops


async def test_abandoned_items_are_dropped_not_batched():
    """Items nobody waits for (waiters 0, future cancelled or done) or past their deadline never reach a batch."""
    loop = asyncio.get_running_loop()
    drops = Drops()
    b = DynamicBatcher(max_batch_size=8, max_batch_delay_ms=0, max_queue_size=16, on_drop=drops)
    live = pending("live", deadline=loop.time() + 3600)
    left = pending("left", waiters=0)
    cancelled = pending("cancelled")
    cancelled.future.cancel()
    done = pending("done")
    done.future.set_result("computed elsewhere")
    late = pending("late", deadline=loop.time() - 1)
    for item in (left, cancelled, live, done, late):
        b.submit(item)

    assert payloads(await next_batch(b)) == ["live"]
    assert sorted(drops.calls) == sorted(
        [("left", "cancelled"), ("cancelled", "cancelled"), ("done", "cancelled"), ("late", "deadline")]
    )
    assert isinstance(late.future.exception(), DeadlineExceededError)
    assert isinstance(left.future.exception(), DeadlineExceededError)  # nobody waits, but the future is settled
    assert cancelled.future.cancelled()
    assert done.future.result() == "computed elsewhere"
    assert not live.future.done()


async def test_deadline_passing_during_the_delay_drops_the_item():
    """An item whose deadline passes while the batch waits out its delay is dropped with reason "deadline"."""
    loop = asyncio.get_running_loop()
    drops = Drops()
    b = DynamicBatcher(max_batch_size=8, max_batch_delay_ms=200, max_queue_size=16, on_drop=drops)
    short = pending("short", deadline=loop.time() + 0.01)  # far shorter than the 200 ms delay
    b.submit(short)
    b.submit(pending("long"))
    assert payloads(await next_batch(b)) == ["long"]
    assert drops.calls == [("short", "deadline")]
    with pytest.raises(DeadlineExceededError):
        short.future.result()


async def test_only_abandoned_items_keep_the_consumer_waiting():
    """When every queued item is dropped, wait_for_batch does not return an empty batch; it waits for a live one."""
    drops = Drops()
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=8, on_drop=drops)
    b.submit(pending("gone", waiters=0))
    consumer = asyncio.create_task(b.wait_for_batch())
    for _ in range(5):
        await asyncio.sleep(0)
    assert drops.calls == [("gone", "cancelled")]
    assert not consumer.done()
    b.submit(pending("live"))
    assert payloads(await asyncio.wait_for(consumer, PROMPT_S)) == ["live"]


async def test_last_waiter_leaving_drops_a_shared_item():
    """A single-flight item whose waiters drop from 2 to 0 before batching is dropped as "cancelled"."""
    drops = Drops()
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=8, on_drop=drops)
    shared = pending("shared", waiters=2)
    b.submit(shared)
    b.submit(pending("other"))
    shared.waiters -= 1
    shared.waiters -= 1
    assert payloads(await next_batch(b)) == ["other"]
    assert drops.calls == [("shared", "cancelled")]


def test_abandoned_reasons():
    """PendingItem.abandoned: "cancelled" for done futures or no waiters, "deadline" at/after the deadline, else None."""
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        item = PendingItem(payload=None, layer="l", future=fut, deadline=10.0)
        assert item.abandoned(9.99) is None
        assert item.abandoned(10.0) == "deadline"
        item.waiters = 0
        assert item.abandoned(0.0) == "cancelled"
        item.waiters = 1
        fut.cancel()
        assert item.abandoned(0.0) == "cancelled"
        assert PendingItem(payload=None, layer="l", future=loop.create_future()).abandoned(1e18) is None
    finally:
        loop.close()


# ----------------------------------------------------------------------------- requeue


async def test_requeued_items_come_back_alone_before_new_items():
    """Items of a failed batch come back one per batch, ahead of items submitted before and after the requeue."""
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=16)
    for p in ("a", "b"):
        b.submit(pending(p))
    failed = await next_batch(b)
    b.submit(pending("c"))
    b.requeue(failed)
    b.submit(pending("d"))
    for p in ("e", "f"):
        b.submit(pending(p))  # c, d, e, f: a full batch of new items is waiting too
    assert payloads(await next_batch(b)) == ["a"]
    assert payloads(await next_batch(b)) == ["b"]
    assert payloads(await next_batch(b)) == ["c", "d", "e", "f"]


async def test_requeued_item_wakes_an_idle_consumer():
    """requeue into an empty batcher wakes a waiting consumer with that item."""
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=NEVER_MS, max_queue_size=16)
    b.submit(pending("p"))
    b.submit(pending("q"))
    b.submit(pending("r"))
    b.submit(pending("s"))
    failed = await next_batch(b)
    consumer = asyncio.create_task(b.wait_for_batch())
    await asyncio.sleep(0)
    assert not consumer.done()
    b.requeue(failed[:1])
    assert payloads(await asyncio.wait_for(consumer, PROMPT_S)) == ["p"]


async def test_abandoned_requeued_items_are_dropped():
    """A requeued item that was cancelled or whose deadline passed is dropped; the next requeued item is sent."""
    loop = asyncio.get_running_loop()
    drops = Drops()
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=16, on_drop=drops)
    late = pending("late", deadline=loop.time() - 1)
    gone = pending("gone", waiters=0)
    keep = pending("keep")
    b.requeue([late, gone, keep])
    assert payloads(await next_batch(b)) == ["keep"]
    assert drops.calls == [("late", "deadline"), ("gone", "cancelled")]
    assert isinstance(late.future.exception(), DeadlineExceededError)


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(max_batch_size=0, max_batch_delay_ms=5, max_queue_size=10), "max_batch_size"),
        (dict(max_batch_size=-3, max_batch_delay_ms=5, max_queue_size=10), "max_batch_size"),
        (dict(max_batch_size=4, max_batch_delay_ms=-1, max_queue_size=10), "max_batch_delay_ms"),
        (dict(max_batch_size=4, max_batch_delay_ms=5, max_queue_size=3), "max_queue_size"),
    ],
)
def test_constructor_validation_names_the_parameter(kwargs, name):
    """Invalid sizes or delays raise ValueError whose message starts with the offending parameter's name."""
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        DynamicBatcher(**kwargs)


def test_constructor_accepts_boundary_values():
    """max_batch_size=1, max_batch_delay_ms=0 and max_queue_size == max_batch_size are valid."""
    b = DynamicBatcher(max_batch_size=1, max_batch_delay_ms=0, max_queue_size=1)
    assert (b.max_batch_size, b.max_batch_delay_s, b.max_queue_size, len(b)) == (1, 0.0, 1, 0)


def test_split_into_buckets_covers_every_item_and_pads_at_most_a_quarter():
    """Batches are cut into traced sizes so no piece pads more than a quarter of its bucket."""
    from featurebank.workers.backbones.base import split_into_buckets

    buckets = (1, 2, 4, 8, 16, 32)
    for n in range(1, 100):
        pieces = split_into_buckets(n, buckets)
        assert sum(size for size, _ in pieces) == n
        for size, b in pieces:
            assert b in buckets and size <= b and (b - size) <= b // 4


async def test_requeue_front_puts_unblamed_items_back_first_in_their_order_and_batched():
    """Items of a batch queued behind a crash come back at the head, in order, still batched together."""
    b = DynamicBatcher(max_batch_size=3, max_batch_delay_ms=0, max_queue_size=3)
    for p in ("a", "b", "c"):
        b.submit(pending(p))
    behind = await next_batch(b)
    b.submit(pending("d"))
    b.submit(pending("e"))
    b.submit(pending("f"))
    b.requeue_front(behind)  # already admitted: never refused, even over the bound
    assert len(b) == 6
    assert payloads(await next_batch(b)) == ["a", "b", "c"]
    assert payloads(await next_batch(b)) == ["d", "e", "f"]


async def test_full_only_waits_for_a_full_batch_and_cancelling_takes_nothing():
    """A batch sent ahead (full_only) waits past the delay for a full batch; cancelled, it leaves the
    queue as it was; once max_batch_size items are queued it returns them at once."""
    b = DynamicBatcher(max_batch_size=3, max_batch_delay_ms=1, max_queue_size=8)
    b.submit(pending("a"))
    b.submit(pending("b"))
    ahead = asyncio.ensure_future(b.wait_for_batch(full_only=True))
    await asyncio.sleep(0.05)  # fifty times the delay
    assert not ahead.done()
    ahead.cancel()
    await asyncio.gather(ahead, return_exceptions=True)
    assert len(b) == 2
    ahead = asyncio.ensure_future(b.wait_for_batch(full_only=True))
    await asyncio.sleep(0)
    b.submit(pending("c"))
    assert payloads(await asyncio.wait_for(ahead, PROMPT_S)) == ["a", "b", "c"]


async def test_held_items_count_against_the_queue_until_queued_or_let_go():
    """Room held for admitted items (being claimed or preprocessed) is not offered to others; queueing the item
    hands its room over (no double count) and letting it go gives the room back, once."""
    batcher = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=NEVER_MS, max_queue_size=4)
    items = [pending(i) for i in range(3)]
    for it in items:
        batcher.hold(it)
        batcher.hold(it)  # holding twice holds once
    assert batcher.room_for("") == 1
    batcher.submit(items[0])
    assert batcher.room_for("") == 1 and len(batcher) == 1
    batcher.let_go(items[1])
    batcher.let_go(items[1])  # once
    assert batcher.room_for("") == 2
    batcher.submit(pending(9))
    batcher.submit(pending(10))
    with pytest.raises(QueueFullError):  # items[2] still holds the last place
        batcher.submit(pending(11))
    batcher.submit(items[2])
    assert len(batcher) == 4 and batcher.room_for("") == 0


async def test_a_tenants_held_items_count_toward_its_share():
    """A tenant's items held in preprocessing count toward its share of the queue, as queued ones do."""
    batcher = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=NEVER_MS, max_queue_size=8, max_queue_share=0.5)
    for i in range(4):
        it = pending(i)
        it.tenant = "flood"
        batcher.hold(it)
    assert batcher.room_for("flood") == 0
    assert batcher.room_for("other") > 0
