"""The in-process LRU feature cache (featurebank.common.cache.LRUCache): byte bound, LRU order, TTL."""

from __future__ import annotations

import asyncio
import collections
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurebank.common import cache as cache_module
from featurebank.common.cache import LRUCache

DAY = 24 * 3600.0


class FakeClock:
    """A monotonic clock the test moves by hand (patched into the cache module only, not into asyncio)."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(cache_module, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


async def get(cache: LRUCache, key: str):
    (value,) = await cache.get_many([key])
    return value


class ModelLRU:
    """A reference LRU with the same contract: size = len(key) + len(value); an oversized value is not
    stored, and the key's previous value is dropped (never left behind, stale)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.data: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    @property
    def bytes_used(self) -> int:
        return sum(len(k) + len(v) for k, v in self.data.items())

    def set(self, key: str, value: bytes) -> None:
        self.data.pop(key, None)
        if len(key) + len(value) > self.max_bytes:
            return
        self.data[key] = value
        while self.bytes_used > self.max_bytes:
            self.data.popitem(last=False)

    def get(self, key: str):
        if key not in self.data:
            return None
        self.data.move_to_end(key)
        return self.data[key]


keys = st.sampled_from(["a", "bb", "ccc", "d", "eeee", "f"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.lists(st.tuples(keys, st.binary(max_size=24)), min_size=1, max_size=3)),
        st.tuples(st.just("get"), st.lists(keys, min_size=1, max_size=4)),
    ),
    max_size=30,
)


@given(st.integers(min_value=0, max_value=64), ops)
@settings(max_examples=300, deadline=None)
def test_matches_reference_lru_and_respects_byte_bound(max_bytes, operations):
    """Under any sequence of set_many/get_many, bytes_used <= max_bytes always and gets match a reference LRU."""

    async def run() -> None:
        cache = LRUCache(max_bytes=max_bytes, ttl_seconds=DAY)
        model = ModelLRU(max_bytes)
        for op, arg in operations:
            if op == "set":
                await cache.set_many(arg)
                for k, v in arg:
                    model.set(k, v)
            else:
                assert await cache.get_many(arg) == [model.get(k) for k in arg]
            assert cache.bytes_used <= max_bytes
            assert cache.bytes_used == model.bytes_used
        every = sorted({"a", "bb", "ccc", "d", "eeee", "f"})
        assert await cache.get_many(every) == [model.get(k) for k in every]

    loop = asyncio.new_event_loop()  # a private loop: leaves the test session's event loop alone
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


async def test_least_recently_used_is_evicted_first():
    """When a write goes over the budget, the entries written (or read) longest ago are evicted first."""
    cache = LRUCache(max_bytes=3 * (1 + 9), ttl_seconds=DAY)  # room for three 1-char keys with 9-byte values
    await cache.set_many([("a", b"A" * 9), ("b", b"B" * 9), ("c", b"C" * 9)])
    assert cache.bytes_used == 30
    await cache.set_many([("d", b"D" * 9)])
    assert await cache.get_many(["a", "b", "c", "d"]) == [None, b"B" * 9, b"C" * 9, b"D" * 9]
    assert cache.bytes_used == 30


async def test_get_refreshes_recency():
    """A get makes an entry most recently used, so the next eviction takes another one."""
    cache = LRUCache(max_bytes=30, ttl_seconds=DAY)
    await cache.set_many([("a", b"A" * 9), ("b", b"B" * 9), ("c", b"C" * 9)])
    assert await get(cache, "a") == b"A" * 9
    await cache.set_many([("d", b"D" * 9)])
    assert await cache.get_many(["a", "b", "c", "d"]) == [b"A" * 9, None, b"C" * 9, b"D" * 9]


async def test_one_write_may_evict_several_entries():
    """A large value evicts as many old entries as needed to fit, oldest first."""
    cache = LRUCache(max_bytes=30, ttl_seconds=DAY)
    await cache.set_many([("a", b"1" * 9), ("b", b"2" * 9), ("c", b"3" * 9)])
    await cache.set_many([("big", b"x" * 17)])  # 20 bytes: two 10-byte entries must go
    assert await cache.get_many(["a", "b", "c", "big"]) == [None, None, b"3" * 9, b"x" * 17]
    assert cache.bytes_used == 30


async def test_overwrite_replaces_value_and_accounting():
    """Writing an existing key replaces its value and its bytes (no double counting)."""
    cache = LRUCache(max_bytes=100, ttl_seconds=DAY)
    await cache.set_many([("k", b"12345")])
    await cache.set_many([("k", b"1")])
    assert cache.bytes_used == 2
    assert await get(cache, "k") == b"1"


async def test_oversized_value_is_not_stored_and_evicts_nothing():
    """A value whose key + bytes exceed max_bytes is skipped: not stored, nothing else evicted, bytes_used unchanged."""
    cache = LRUCache(max_bytes=20, ttl_seconds=DAY)
    await cache.set_many([("a", b"small")])
    await cache.set_many([("huge", b"x" * 64), ("b", b"fits")])
    assert await cache.get_many(["a", "huge", "b"]) == [b"small", None, b"fits"]
    assert cache.bytes_used == len("a") + 5 + len("b") + 4


async def test_value_that_exactly_fits_is_stored():
    """An entry of exactly max_bytes (key + value) is stored, evicting everything else."""
    cache = LRUCache(max_bytes=10, ttl_seconds=DAY)
    await cache.set_many([("a", b"1"), ("b", b"2")])
    await cache.set_many([("k", b"x" * 9)])
    assert await cache.get_many(["a", "b", "k"]) == [None, None, b"x" * 9]
    assert cache.bytes_used == 10


async def test_zero_budget_stores_nothing():
    """max_bytes=0 caches nothing and never goes over budget."""
    cache = LRUCache(max_bytes=0, ttl_seconds=DAY)
    await cache.set_many([("a", b""), ("b", b"x")])
    assert await cache.get_many(["a", "b"]) == [None, None]
    assert cache.bytes_used == 0


async def test_get_many_keeps_order_and_reports_misses():
    """get_many returns one value per key in order, None for misses, and [] for no keys."""
    cache = LRUCache(max_bytes=1000, ttl_seconds=DAY)
    await cache.set_many([("x", b"X"), ("y", b"Y")])
    assert await cache.get_many(["y", "missing", "x", "y"]) == [b"Y", None, b"X", b"Y"]
    assert await cache.get_many([]) == []


# ----------------------------------------------------------------------------- TTL (fake clock, no sleeping)


async def test_entry_expires_after_ttl(clock):
    """An entry is served until its TTL has passed, then it is a miss and its bytes are released."""
    ttl = 0.001
    cache = LRUCache(max_bytes=100, ttl_seconds=ttl)
    await cache.set_many([("k", b"value")])
    clock.now += ttl / 2
    assert await get(cache, "k") == b"value"
    clock.now += ttl  # now 1.5 * ttl after the write
    assert await get(cache, "k") is None
    assert cache.bytes_used == 0


async def test_reads_do_not_extend_ttl(clock):
    """The TTL counts from the write: reading an entry does not keep it alive (like Redis SET EX)."""
    cache = LRUCache(max_bytes=100, ttl_seconds=10)
    await cache.set_many([("k", b"v")])
    clock.now += 9
    assert await get(cache, "k") == b"v"
    clock.now += 2
    assert await get(cache, "k") is None


async def test_rewrite_restarts_ttl(clock):
    """Writing a key again gives it a fresh TTL."""
    cache = LRUCache(max_bytes=100, ttl_seconds=10)
    await cache.set_many([("k", b"old")])
    clock.now += 9
    await cache.set_many([("k", b"new")])
    clock.now += 9
    assert await get(cache, "k") == b"new"
    clock.now += 2
    assert await get(cache, "k") is None


async def test_expired_entries_are_misses_for_each_key(clock):
    """With entries of different ages, only those past their TTL are misses."""
    cache = LRUCache(max_bytes=100, ttl_seconds=10)
    await cache.set_many([("old", b"1")])
    clock.now += 5
    await cache.set_many([("new", b"2")])
    clock.now += 6
    assert await cache.get_many(["old", "new"]) == [None, b"2"]
    assert cache.bytes_used == len("new") + 1


async def test_oversized_rewrite_drops_the_old_value():
    """Writing a too-big value under an existing key removes the old value instead of leaving it stale."""
    cache = LRUCache(max_bytes=10, ttl_seconds=60)
    await cache.set_many([("k", b"old")])
    await cache.set_many([("k", b"x" * 20)])
    assert await cache.get_many(["k"]) == [None] and cache.bytes_used == 0
