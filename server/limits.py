"""Per-tenant limits: a request rate (token bucket) and a bound on items in flight, per pod."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time

import grpc

from featurebank.common.errors import FeatureBankError


class TenantLimitError(FeatureBankError):
    """A tenant is over one of its limits; other tenants are not affected."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one tenant may use at once; 0 means unlimited."""

    max_inflight_items: int = 0  # inputs (or keys) of this tenant's RPCs being worked on
    requests_per_s: float = 0.0  # sustained RPC rate
    burst: int = 0  # RPCs allowed at once above the rate (default: one second's worth)

    def __post_init__(self) -> None:
        if self.max_inflight_items < 0 or self.requests_per_s < 0 or self.burst < 0:
            raise ValueError(f"limits must be >= 0, got {self}")

    @classmethod
    def from_dict(cls, spec: dict) -> Limits:
        return cls(
            int(spec.get("max_inflight_items", 0)), float(spec.get("requests_per_s", 0.0)), int(spec.get("burst", 0))
        )


logger = logging.getLogger(__name__)


class _Counters:
    """One tenant's token bucket and items in flight, in this process."""

    def __init__(self, burst: int):
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self.inflight = 0

    def take_token(self, rate: float, burst: int) -> bool:
        now = time.monotonic()
        self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def try_add(self, n: int, cap: int) -> int | None:
        """Add ``n`` if it fits under ``cap`` (or nothing else is in flight); the new total, or None."""
        if cap and self.inflight and self.inflight + n > cap:
            return None
        self.inflight += n
        return self.inflight

    def add(self, n: int) -> int:
        self.inflight += n
        return self.inflight


@dataclasses.dataclass(frozen=True)
class PodLimits:
    """Where the frontends of one pod (--frontends N) keep the tenants' counters they share."""

    path: str  # a file in the pod's private run dir
    index: int  # this frontend's
    frontends: int


class SharedCounters:
    """Every tenant's counters for all frontends of a pod: a small file, mapped in each, updated under flock.

    Without it each of N frontends would enforce the limits alone: a tenant would get N times its
    rate and N times its items in flight. One slot per tenant holds the token bucket (tokens and
    when they were last refilled, CLOCK_MONOTONIC, one clock for the whole machine) and one
    in-flight count per frontend, so a frontend that dies takes its items with it: the frontend
    restarted in its place zeroes its column. The file is made by the first frontend to open it
    and remade when the tenants change (a tokens file edited between restarts).
    """

    _HEADER = struct.Struct("<8s8sI")  # magic, hash of the tenants' names and limits, frontends
    _MAGIC = b"fblimit1"

    def __init__(self, pod: PodLimits, tenants: dict[str, Limits], bursts: dict[str, int]):
        self.index = pod.index
        self.frontends = pod.frontends
        self._slot_of = {name: i for i, name in enumerate(sorted(tenants))}
        self._slot = struct.Struct(f"<dd{pod.frontends}q")
        signature = hashlib.blake2b(repr(sorted(tenants.items())).encode(), digest_size=8).digest()
        size = self._HEADER.size + self._slot.size * max(1, len(tenants))
        self._fd = os.open(pod.path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            header = os.pread(self._fd, self._HEADER.size, 0)
            if header != self._HEADER.pack(self._MAGIC, signature, pod.frontends):
                if header:
                    logger.warning("tenant limits changed since the pod started: their counters start again")
                os.ftruncate(self._fd, 0)
                os.ftruncate(self._fd, size)
                os.pwrite(self._fd, self._HEADER.pack(self._MAGIC, signature, pod.frontends), 0)
                now = time.monotonic()
                for name, slot in self._slot_of.items():
                    self._write(slot, bursts[name], now, [0] * pod.frontends)
            self._map = mmap.mmap(self._fd, size)
            for slot in self._slot_of.values():  # this frontend's predecessor's items died with it
                tokens, refilled, *inflight = self._read(slot)
                inflight[self.index] = 0
                self._pack(slot, tokens, refilled, inflight)

    def _write(self, slot: int, tokens: float, refilled: float, inflight: list[int]) -> None:
        os.pwrite(self._fd, self._slot.pack(tokens, refilled, *inflight), self._offset(slot))

    def _offset(self, slot: int) -> int:
        return self._HEADER.size + slot * self._slot.size

    def _read(self, slot: int) -> list:
        return list(self._slot.unpack_from(self._map, self._offset(slot)))

    def _pack(self, slot: int, tokens: float, refilled: float, inflight: list[int]) -> None:
        self._slot.pack_into(self._map, self._offset(slot), tokens, refilled, *inflight)

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # microseconds: held for one read-modify-write
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def counters(self, tenant: str) -> _SharedTenantCounters:
        return _SharedTenantCounters(self, self._slot_of[tenant])

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class _SharedTenantCounters:
    """``_Counters``' operations on one tenant's slot of a ``SharedCounters``."""

    def __init__(self, shared: SharedCounters, slot: int):
        self._shared = shared
        self._slot = slot

    def take_token(self, rate: float, burst: int) -> bool:
        s = self._shared
        with s._locked():
            tokens, refilled, *inflight = s._read(self._slot)
            now = time.monotonic()
            tokens = min(burst, tokens + max(0.0, now - refilled) * rate)
            taken = tokens >= 1.0
            s._pack(self._slot, tokens - 1.0 if taken else tokens, now, inflight)
        return taken

    def try_add(self, n: int, cap: int) -> int | None:
        s = self._shared
        with s._locked():
            tokens, refilled, *inflight = s._read(self._slot)
            total = sum(inflight)
            if cap and total and total + n > cap:
                return None
            inflight[s.index] += n
            s._pack(self._slot, tokens, refilled, inflight)
        return total + n

    def add(self, n: int) -> int:
        s = self._shared
        with s._locked():
            tokens, refilled, *inflight = s._read(self._slot)
            inflight[s.index] += n
            s._pack(self._slot, tokens, refilled, inflight)
        return sum(inflight)

    @property
    def inflight(self) -> int:
        return sum(self._shared._read(self._slot)[2:])


class TenantGate:
    """One tenant's limits at run time (the event loop's thread only: no locks).

    Over the rate, an RPC is refused at once. Over the in-flight bound a unary RPC is refused at
    once; a stream's next message waits instead (backpressure), since failing a long job halfway
    would throw away the work already done. A request larger than the bound is admitted only when
    the tenant has nothing else in flight, so it cannot starve but never runs beside others.
    """

    # With counters shared by several frontends, room freed by another process wakes no event
    # here: a waiting stream also looks again this often.
    SHARED_RECHECK_S = 0.05

    def __init__(
        self, tenant: str, limits: Limits, on_limited=None, on_inflight=None, shared: SharedCounters | None = None
    ):
        self.tenant = tenant
        self.limits = limits
        self.burst = burst_of(limits)
        self._counters = shared.counters(tenant) if shared is not None else _Counters(self.burst)
        self._shared = shared is not None
        self._freed = asyncio.Event()
        self._on_limited = on_limited or (lambda tenant, limit: None)
        self._on_inflight = on_inflight or (lambda tenant, n: None)

    @property
    def inflight(self) -> int:
        """The tenant's items in flight (in every frontend of the pod, when shared)."""
        return self._counters.inflight

    def admit(self) -> None:
        """Take one RPC from the bucket; TenantLimitError when it is empty."""
        rate = self.limits.requests_per_s
        if not rate:
            return
        if not self._counters.take_token(rate, self.burst):
            self._on_limited(self.tenant, "rate")
            raise TenantLimitError(
                f"tenant {self.tenant!r} is over its rate of {rate:g} requests/s "
                f"(burst {self.burst}); retry with backoff"
            )

    def acquire(self, n: int) -> None:
        """Count ``n`` items in flight now, or raise TenantLimitError."""
        total = self._counters.try_add(n, self.limits.max_inflight_items)
        if total is None:
            self._on_limited(self.tenant, "inflight_items")
            raise TenantLimitError(
                f"tenant {self.tenant!r} has {self.inflight} items in flight; {n} more would exceed its "
                f"max_inflight_items={self.limits.max_inflight_items}; retry with backoff"
            )
        if n:
            self._on_inflight(self.tenant, total)

    async def acquire_wait(self, n: int) -> None:
        """Count ``n`` items in flight once they fit (for streams)."""
        while (total := self._counters.try_add(n, self.limits.max_inflight_items)) is None:
            self._freed.clear()
            if self._shared:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.SHARED_RECHECK_S):
                        await self._freed.wait()
            else:
                await self._freed.wait()
        if n:
            self._on_inflight(self.tenant, total)

    def release(self, n: int) -> None:
        if n:
            self._on_inflight(self.tenant, self._counters.add(-n))
        self._freed.set()


def burst_of(limits: Limits) -> int:
    """A tenant's burst: as configured, or one second's worth of its rate."""
    return limits.burst or max(1, int(limits.requests_per_s + 0.999))


# The gate of the tenant whose RPC is being handled (None: no tokens, or a tenant without limits).
current_gate: contextvars.ContextVar[TenantGate | None] = contextvars.ContextVar("featurebank_gate", default=None)


@contextlib.asynccontextmanager
async def items_in_flight(n: int, *, wait: bool = False):
    """Count ``n`` items of the current tenant as in flight for the duration of the block."""
    gate = current_gate.get()
    if gate is None or not gate.limits.max_inflight_items:
        yield
        return
    if wait:
        await gate.acquire_wait(n)
    else:
        gate.acquire(n)
    try:
        yield
    finally:
        gate.release(n)
