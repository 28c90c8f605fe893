"""Per-tenant limits (featurebank.server.limits): the token bucket and the in-flight bound."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from featurebank.server.limits import Limits, TenantGate, TenantLimitError


def test_rate_allows_the_burst_then_refuses_then_refills():
    gate = TenantGate("t", Limits(requests_per_s=20, burst=3))
    for _ in range(3):
        gate.admit()
    with pytest.raises(TenantLimitError) as e:
        gate.admit()
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "20 requests/s" in e.value.message
    time.sleep(0.06)  # > one token at 20/s
    gate.admit()


def test_burst_defaults_to_one_second_of_rate_and_no_limits_admit_everything():
    assert TenantGate("t", Limits(requests_per_s=2.5)).burst == 3
    gate = TenantGate("t", Limits())
    for _ in range(1000):
        gate.admit()
    gate.acquire(10**6)


def test_inflight_bound_refuses_over_it_but_admits_an_oversized_request_alone():
    limited: list = []
    seen: list = []
    gate = TenantGate(
        "t",
        Limits(max_inflight_items=4),
        on_limited=lambda t, w: limited.append(w),
        on_inflight=lambda t, n: seen.append(n),
    )
    gate.acquire(3)
    with pytest.raises(TenantLimitError, match="max_inflight_items=4"):
        gate.acquire(2)
    gate.acquire(1)
    gate.release(4)
    gate.acquire(9)  # alone: admitted
    with pytest.raises(TenantLimitError):
        gate.acquire(1)
    gate.release(9)
    assert limited == ["inflight_items", "inflight_items"]
    assert seen == [3, 4, 0, 9, 0]


async def test_acquire_wait_waits_for_room_instead_of_failing():
    gate = TenantGate("t", Limits(max_inflight_items=4))
    gate.acquire(4)
    waiter = asyncio.ensure_future(gate.acquire_wait(2))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    gate.release(4)
    await asyncio.wait_for(waiter, 5)
    assert gate.inflight == 2


@pytest.mark.parametrize("bad", [dict(max_inflight_items=-1), dict(requests_per_s=-0.5), dict(burst=-2)])
def test_negative_limits_are_invalid(bad):
    with pytest.raises(ValueError):
        Limits(**bad)
