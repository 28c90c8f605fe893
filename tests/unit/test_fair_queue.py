"""Tenants share the batch queue (engine/batching.py): bounded shares, room for newcomers, batches in turns."""

from __future__ import annotations

import asyncio

import pytest

from featurebank.common.errors import QueueFullError
from featurebank.engine.batching import DynamicBatcher, PendingItem

PROMPT_S = 5.0


def item(tenant: str, payload: object = None) -> PendingItem:
    return PendingItem(
        payload=payload, layer="pooled", future=asyncio.get_running_loop().create_future(), tenant=tenant
    )


def fill(batcher: DynamicBatcher, tenant: str) -> int:
    """Submit items of ``tenant`` until refused; how many went in."""
    n = 0
    while True:
        try:
            batcher.submit(item(tenant))
        except QueueFullError:
            return n
        n += 1


async def test_a_lone_tenant_holds_at_most_its_share_and_another_still_gets_room():
    """One tenant flooding an empty queue stops at max_queue_share of it; a second tenant then
    still gets room, and is refused past its own share (a third of the queue, with two tenants queued)."""
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=64, max_queue_share=0.5)
    assert fill(b, "flood") == 32
    with pytest.raises(QueueFullError, match="tenant 'flood'.*share of the queue"):
        b.submit(item("flood"))
    assert b.room_for("other") == 21
    assert fill(b, "other") == 21
    assert b.room_for("third") == 64 - 32 - 21


async def test_two_flooding_tenants_arriving_at_once_leave_room_for_a_third():
    """Two tenants flooding an empty queue one after the other, before anything drains, hold
    1/2 then 1/3 of it: a third tenant still gets room."""
    b = DynamicBatcher(max_batch_size=1, max_batch_delay_ms=0, max_queue_size=2048, max_queue_share=0.5)
    assert (fill(b, "t0"), fill(b, "t1")) == (1024, 682)
    assert b.room_for("newcomer") == 2048 - 1024 - 682


@pytest.mark.parametrize("tenants", [2, 20, 100])
async def test_flooding_tenants_that_keep_refilling_settle_with_room_for_a_newcomer(tenants):
    """Tenants refilling whenever a batch leaves settle at 1/(n+1) of the queue each: once what
    they were admitted under larger shares has drained, a newcomer always finds room."""
    b = DynamicBatcher(max_batch_size=64, max_batch_delay_ms=0, max_queue_size=2048, max_queue_share=0.5)
    rooms = []
    for _ in range(300):
        for t in range(tenants):
            fill(b, f"t{t}")
        rooms.append(b.room_for("newcomer"))
        await asyncio.wait_for(b.wait_for_batch(), PROMPT_S)
    assert min(rooms[-50:]) >= 2048 // (tenants + 2) - tenants  # about one share, give or take rounding
    assert len(b) < b.max_queue_size


async def test_without_tenants_the_whole_queue_is_one_pool():
    """Items of no tenant ("", no tokens) may fill the whole queue, as before shares existed."""
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=16, max_queue_share=0.5)
    assert fill(b, "") == 16
    with pytest.raises(QueueFullError, match="server overloaded"):
        b.submit(item(""))


async def test_batches_take_turns_between_tenants():
    """A batch takes one item from each tenant in turn, so a flood queued first does not stand in
    front of another tenant's items; each tenant's own items stay in order."""
    b = DynamicBatcher(max_batch_size=4, max_batch_delay_ms=0, max_queue_size=64)
    for i in range(8):
        b.submit(item("flood", f"f{i}"))
    b.submit(item("other", "o0"))
    b.submit(item("other", "o1"))
    batch = await asyncio.wait_for(b.wait_for_batch(), PROMPT_S)
    assert [it.payload for it in batch] == ["f0", "o0", "f1", "o1"]
    batch = await asyncio.wait_for(b.wait_for_batch(), PROMPT_S)
    assert [it.payload for it in batch] == ["f2", "f3", "f4", "f5"]


async def test_shares_are_given_back_when_items_leave_and_wake_a_waiting_stream():
    """Items taken to a batch or dropped no longer count against their tenant; a stream waiting
    for room wakes up as soon as there is some."""
    b = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=0, max_queue_size=8, max_queue_share=0.5)
    queued = [item("flood") for _ in range(4)]
    for it in queued:
        b.submit(it)
    waiting = asyncio.ensure_future(b.wait_for_room("flood"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    queued[0].future.cancel()  # its request left: dropped when the next batch is formed
    batch = await asyncio.wait_for(b.wait_for_batch(), PROMPT_S)
    assert batch == queued[1:3]
    await asyncio.wait_for(waiting, PROMPT_S)
    assert b.queued_by_tenant == {"flood": 1}


async def test_requeued_items_count_again_for_their_tenant():
    """Items put back after a worker died count against their tenant's share again."""
    b = DynamicBatcher(max_batch_size=2, max_batch_delay_ms=0, max_queue_size=8, max_queue_share=0.5)
    first, second = item("t"), item("t")
    b.submit(first)
    b.submit(second)
    batch = await asyncio.wait_for(b.wait_for_batch(), PROMPT_S)
    assert b.queued_by_tenant == {}
    b.requeue([batch[0]])
    b.requeue_front([batch[1]])
    assert b.queued_by_tenant == {"t": 2}


def test_share_is_validated():
    """A share outside (0, 1] is refused, naming the parameter."""
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="max_queue_share"):
            DynamicBatcher(max_batch_size=1, max_batch_delay_ms=0, max_queue_size=8, max_queue_share=bad)
