"""Per-tenant limits (featurebank.server.limits): the token bucket and the in-flight bound."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from featurebank.server.limits import Limits, PodLimits, SharedCounters, TenantGate, TenantLimitError, burst_of


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


# ----------------------------------------------------------------------------- one pod, several frontends


def _frontend(path, index: int, tenants: dict[str, Limits], frontends: int = 2) -> dict[str, TenantGate]:
    """The gates one frontend of a pod builds (each opens and maps the pod's file itself, as a
    process would: flock excludes between separate opens in one process as between processes)."""
    shared = SharedCounters(
        PodLimits(str(path), index, frontends), tenants, {n: burst_of(l) for n, l in tenants.items()}
    )
    return {name: TenantGate(name, limits, shared=shared) for name, limits in tenants.items()}


def test_two_frontends_share_one_rate_and_one_inflight_bound(tmp_path):
    """A tenant's burst and its items in flight are the pod's, not each frontend's; another
    tenant's counters are its own."""
    tenants = {
        "t": Limits(max_inflight_items=4, requests_per_s=0.01, burst=3),
        "u": Limits(requests_per_s=0.01, burst=1),
    }
    a, b = _frontend(tmp_path / "limits", 0, tenants), _frontend(tmp_path / "limits", 1, tenants)
    a["t"].admit()
    b["t"].admit()
    a["t"].admit()
    for gate in (a["t"], b["t"]):
        with pytest.raises(TenantLimitError, match="requests/s"):
            gate.admit()
    b["u"].admit()  # u's own bucket
    with pytest.raises(TenantLimitError):
        a["u"].admit()
    a["t"].acquire(3)
    with pytest.raises(TenantLimitError, match="has 3 items in flight"):
        b["t"].acquire(2)
    b["t"].acquire(1)
    assert a["t"].inflight == b["t"].inflight == 4
    a["t"].release(3)
    b["t"].acquire(3)
    assert a["t"].inflight == 4


async def test_a_stream_waiting_in_one_frontend_gets_room_freed_in_another(tmp_path):
    """acquire_wait sees room another frontend frees (no event crosses processes: it looks again)."""
    tenants = {"t": Limits(max_inflight_items=4)}
    a, b = _frontend(tmp_path / "limits", 0, tenants), _frontend(tmp_path / "limits", 1, tenants)
    a["t"].acquire(4)
    waiter = asyncio.ensure_future(b["t"].acquire_wait(2))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    a["t"].release(4)
    await asyncio.wait_for(waiter, 2)
    assert a["t"].inflight == 2


def test_a_restarted_frontend_drops_its_predecessors_items_and_changed_tenants_start_afresh(tmp_path):
    """Items in flight in a frontend that died are not counted once it is restarted; a tokens
    file with other limits remakes the counters instead of misreading them."""
    tenants = {"t": Limits(max_inflight_items=4)}
    a, b = _frontend(tmp_path / "limits", 0, tenants), _frontend(tmp_path / "limits", 1, tenants)
    a["t"].acquire(1)
    b["t"].acquire(3)
    b = _frontend(tmp_path / "limits", 1, tenants)  # frontend-1 died and is back
    assert a["t"].inflight == 1
    b["t"].acquire(3)
    changed = {"t": Limits(max_inflight_items=8), "v": Limits(requests_per_s=1)}
    c = _frontend(tmp_path / "limits", 0, changed)
    assert c["t"].inflight == 0
    c["v"].admit()
