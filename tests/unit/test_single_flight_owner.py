"""Single-flight (engine/singleflight.py, engine/misses.py): one owner per key that outlives its callers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from featurebank.common import codec
from featurebank.common.cache import LRUCache
from featurebank.common.errors import QueueFullError
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import DynamicBatcher
from featurebank.engine.coalesce import Coalescer
from featurebank.engine.misses import MissPath
from featurebank.engine.singleflight import Group
from featurebank.workers.backbones.base import BackboneInfo, LayerSpec

PROMPT_S = 5.0  # generous bound for "at once" on a noisy machine


async def until(condition, what: str = "the condition") -> None:
    """Let the loop run until ``condition()`` holds (a loaded machine may need many turns)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PROMPT_S
    while not condition():
        assert loop.time() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


class Owner:
    """An owner coroutine whose progress the test controls with events."""

    def __init__(self):
        self.started = 0
        self.release = asyncio.Event()
        self.cleaned = asyncio.Event()
        self.value: object = "value"

    async def __call__(self, flight):
        self.started += 1
        try:
            await self.release.wait()
            if isinstance(self.value, BaseException):
                raise self.value
            return self.value
        finally:
            self.cleaned.set()


async def test_one_owner_per_key_and_every_waiter_gets_its_result():
    """Three callers of one key share one owner run and its result; the key is free afterwards."""
    group, owner = Group(), Owner()
    flights = [group.join("k", owner)[0] for _ in range(3)]
    assert [group.join("other", Owner())[1], flights[0] is flights[1] is flights[2]] == [True, True]
    waits = [asyncio.ensure_future(group.wait(f)) for f in flights]
    await asyncio.sleep(0)
    owner.release.set()
    assert await asyncio.wait_for(asyncio.gather(*waits), PROMPT_S) == ["value"] * 3
    assert owner.started == 1 and "k" not in group


async def test_a_caller_leaving_never_cancels_the_owner_while_others_wait():
    """The caller that started the work is cancelled; the owner goes on and the other caller gets the result."""
    group, owner = Group(), Owner()
    first, started = group.join("k", owner)
    second, joined = group.join("k", Owner())
    assert started and not joined and first is second
    leader, joiner = asyncio.ensure_future(group.wait(first)), asyncio.ensure_future(group.wait(second))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    assert not owner.cleaned.is_set() and "k" in group
    owner.release.set()
    assert await asyncio.wait_for(joiner, PROMPT_S) == "value"


async def test_last_caller_leaving_cancels_the_owner_and_frees_the_key_at_once():
    """When every caller has left, the owner is cancelled and cleans up; the key is free for a new
    owner even before that clean-up ends."""
    group = Group()
    cleanup_done = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_cleanup(flight):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            await cleanup_done.wait()  # e.g. giving a claim back over the network
            raise

    flight, _ = group.join("k", slow_cleanup)
    caller = asyncio.ensure_future(group.wait(flight))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.wait_for(cancelled.wait(), PROMPT_S)
    assert "k" not in group
    fresh = Owner()
    fresh.release.set()
    new_flight, started = group.join("k", fresh)
    assert started and await asyncio.wait_for(group.wait(new_flight), PROMPT_S) == "value"
    cleanup_done.set()
    await asyncio.wait_for(group.close(), PROMPT_S)


async def test_the_owners_error_reaches_every_caller_and_frees_the_key():
    """An owner that raises answers every caller with its exception; the next join starts afresh."""
    group, owner = Group(), Owner()
    owner.value = ValueError("bad input")
    flights = [group.join("k", owner)[0] for _ in range(2)]
    owner.release.set()
    for f in flights:
        with pytest.raises(ValueError, match="bad input"):
            await asyncio.wait_for(group.wait(f), PROMPT_S)
    assert "k" not in group


async def test_a_resolved_flight_is_joinable_until_its_owner_ends():
    """An owner that answered early and is still finishing up is joined (answered at once), not restarted."""
    group = Group()
    finish = asyncio.Event()

    async def answers_then_writes(flight):
        flight.resolve("value")
        await finish.wait()
        return "ignored"

    flight, _ = group.join("k", answers_then_writes)
    assert await asyncio.wait_for(group.wait(flight), PROMPT_S) == "value"
    again, started = group.join("k", Owner())
    assert not started and await asyncio.wait_for(group.wait(again), PROMPT_S) == "value"
    finish.set()
    await until(lambda: "k" not in group, "the finished owner to leave the group")


async def test_a_failed_owner_frees_the_key_while_it_cleans_up():
    """An owner that failed and forgets its flight answers its callers with the error, while a
    caller arriving during its clean-up starts a new flight instead of getting a stale error."""
    group = Group()
    cleanup = asyncio.Event()

    async def fails_then_cleans_up(flight):
        try:
            raise QueueFullError("queue full")
        except QueueFullError as e:
            flight.fail(e)
            group.forget(flight)
            await cleanup.wait()  # e.g. giving its claim back
            raise

    flight, _ = group.join("k", fails_then_cleans_up)
    with pytest.raises(QueueFullError):
        await asyncio.wait_for(group.wait(flight), PROMPT_S)
    fresh = Owner()
    fresh.release.set()
    again, started = group.join("k", fresh)
    assert started and await asyncio.wait_for(group.wait(again), PROMPT_S) == "value"
    cleanup.set()


async def test_coalescer_sends_one_call_per_loop_turn_and_survives_a_caller_leaving():
    """Calls made in one loop turn go to one batched call; a caller that leaves does not cancel the others'."""
    calls: list[list[int]] = []
    gate = asyncio.Event()

    async def double_many(args):
        calls.append(list(args))
        await gate.wait()
        return [a * 2 for a in args]

    c = Coalescer(double_many)
    futures = [asyncio.ensure_future(c(i)) for i in range(4)]
    await until(lambda: calls, "the batched call")
    futures[0].cancel()
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*futures[1:]), PROMPT_S) == [2, 4, 6]
    assert calls == [[0, 1, 2, 3]]


# ----------------------------------------------------------------------------- the miss path, in process


class Served:
    def __init__(self, batcher):
        self.batcher = batcher
        self.info = BackboneInfo(
            name="b",
            fingerprint="f" * 32,
            input_kind="image",
            default_layer="pooled",
            layers=(LayerSpec("pooled", (4,)),),
            input_size=(8, 8, 3),
            preprocessing="none",
        )


def _miss_path(max_queue_size: int = 8):
    cache = LRUCache(1 << 20, 60)
    batcher = DynamicBatcher(max_batch_size=1, max_batch_delay_ms=0, max_queue_size=max_queue_size)
    return MissPath(cache, Metrics(), storage_dtype="float32", claim_ttl_ms=1000), Served(batcher), cache


async def _worker(batcher: DynamicBatcher, go: asyncio.Event) -> None:
    """Computes each queued item once ``go`` is set: features = [len(payload)] * 4."""
    while True:
        batch = await batcher.wait_for_batch()
        await go.wait()
        for item in batch:
            if not item.future.done():
                item.future.set_result(np.full(4, len(item.payload), np.float32))


async def test_a_cancelled_leader_still_answers_the_joiner_and_writes_the_cache():
    """The request that started a key is cancelled while another waits on it: the other gets the
    features and the cache is written by the owner."""
    misses, served, cache = _miss_path()
    go = asyncio.Event()
    worker = asyncio.ensure_future(_worker(served.batcher, go))
    try:
        leader = asyncio.ensure_future(misses.compute(served, "pooled", ["k"], {"k": b"abc"}, deadline=None))
        await until(lambda: "k" in misses.flights, "the leader's flight")
        joiner = asyncio.ensure_future(misses.compute(served, "pooled", ["k"], {"k": b"abc"}, deadline=None))
        await until(lambda: misses.flights.get("k").waiters == 2, "the joiner to join")
        leader.cancel()
        go.set()
        result = (await asyncio.wait_for(joiner, PROMPT_S))["k"]
        np.testing.assert_array_equal(result.features, [3, 3, 3, 3])
        await until(lambda: "k" not in misses.flights, "the owner to write and leave")
        np.testing.assert_array_equal(codec.decode((await cache.get_many(["k"]))[0]), [3, 3, 3, 3])
        assert "k" not in misses.flights
    finally:
        worker.cancel()


async def test_every_caller_leaving_drops_the_queued_item_and_frees_the_key():
    """When the only request for a queued key leaves, its item never reaches a worker and the key
    can be computed afresh by the next request."""
    misses, served, _ = _miss_path()
    first = asyncio.ensure_future(misses.compute(served, "pooled", ["k"], {"k": b"abc"}, deadline=None))
    await until(lambda: len(served.batcher) == 1, "the item queued")
    first.cancel()
    await until(lambda: "k" not in misses.flights, "the key freed")
    go = asyncio.Event()
    go.set()
    worker = asyncio.ensure_future(_worker(served.batcher, go))
    try:
        again = await asyncio.wait_for(misses.compute(served, "pooled", ["k"], {"k": b"abcd"}, deadline=None), PROMPT_S)
        np.testing.assert_array_equal(again["k"].features, [4, 4, 4, 4])  # the new payload, computed anew
    finally:
        worker.cancel()


async def test_a_full_queue_refuses_the_request_and_leaves_nothing_behind():
    """More new items than the queue holds: QueueFullError at once, and no key stays in flight."""
    misses, served, _ = _miss_path(max_queue_size=2)
    keys = ["a", "b", "c"]
    with pytest.raises(QueueFullError):
        await misses.compute(served, "pooled", keys, {k: b"x" for k in keys}, deadline=None)
    assert len(misses.flights) == 0 and len(served.batcher) == 0
