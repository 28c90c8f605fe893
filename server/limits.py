"""Per-tenant limits: a request rate (token bucket) and a bound on items in flight."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
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


class TenantGate:
    """One tenant's limits at run time (the event loop's thread only: no locks).

    Over the rate, an RPC is refused at once. Over the in-flight bound a unary RPC is refused at
    once; a stream's next message waits instead (backpressure), since failing a long job halfway
    would throw away the work already done. A request larger than the bound is admitted only when
    the tenant has nothing else in flight, so it cannot starve but never runs beside others.
    """

    def __init__(self, tenant: str, limits: Limits, on_limited=None, on_inflight=None):
        self.tenant = tenant
        self.limits = limits
        self.burst = limits.burst or max(1, int(limits.requests_per_s + 0.999))
        self._tokens = float(self.burst)
        self._refilled = time.monotonic()
        self.inflight = 0
        self._freed = asyncio.Event()
        self._on_limited = on_limited or (lambda tenant, limit: None)
        self._on_inflight = on_inflight or (lambda tenant, n: None)

    def admit(self) -> None:
        """Take one RPC from the bucket; TenantLimitError when it is empty."""
        rate = self.limits.requests_per_s
        if not rate:
            return
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            self._on_limited(self.tenant, "rate")
            raise TenantLimitError(
                f"tenant {self.tenant!r} is over its rate of {rate:g} requests/s "
                f"(burst {self.burst}); retry with backoff"
            )
        self._tokens -= 1.0

    def _fits(self, n: int) -> bool:
        cap = self.limits.max_inflight_items
        return not cap or self.inflight == 0 or self.inflight + n <= cap

    def acquire(self, n: int) -> None:
        """Count ``n`` items in flight now, or raise TenantLimitError."""
        if not self._fits(n):
            self._on_limited(self.tenant, "inflight_items")
            raise TenantLimitError(
                f"tenant {self.tenant!r} has {self.inflight} items in flight; {n} more would exceed its "
                f"max_inflight_items={self.limits.max_inflight_items}; retry with backoff"
            )
        self._add(n)

    async def acquire_wait(self, n: int) -> None:
        """Count ``n`` items in flight once they fit (for streams)."""
        while not self._fits(n):
            self._freed.clear()
            await self._freed.wait()
        self._add(n)

    def release(self, n: int) -> None:
        self._add(-n)
        self._freed.set()

    def _add(self, n: int) -> None:
        if n:
            self.inflight += n
            self._on_inflight(self.tenant, self.inflight)


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
