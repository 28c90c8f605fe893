"""Coalescing concurrent small extract calls of one client into one keys-first Lookup/Extract (DataLoader pattern).

Design. Calls that share (backbone, layer, output_dtype, cache_policy, lookup_first, timeout, metadata)
join one open *batch*; the first caller to open a batch leads it. A leader lingers only when another
call of the same client is already in flight: a lone caller (one thread or task calling back-to-back)
finds nothing in flight and sends at once, so it pays no linger at all; under concurrency a batch
waits at most ``linger_s`` (less once it holds ``max_items`` inputs), is then closed to joiners and run
through the one planning core (``planning.extract``, via the client's ``dispatch``) as a single
merged input list. Its outcomes are scattered back: each caller gets exactly its own slice, re-indexed
to its own list (errors' ``.index`` too); a request-level error (UNAVAILABLE, an unknown layer, ...)
is raised in every caller of the batch. A caller's inputs are converted (``to_input``) in the caller,
so an unreadable input raises there and never reaches a batch. The merged RPCs carry the client's
timeout less the time the batch lingered, so no caller waits longer than its own deadline.

Threads (``Coalescer``): the leader thread runs the batch; followers block on an Event. Tasks
(``AsyncCoalescer``): each batch runs in its own task and every caller awaits its own future, so a
cancelled caller cancels only itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

from featurebank.client.errors import FeatureBankError
from featurebank.client.results import ItemOutcome
from featurebank.v1 import featurebank_pb2 as pb

DEFAULT_LINGER_MS = 1.0

# dispatch(msgs, timeout_s) -> outcomes in msgs order; raises FeatureBankError for the request.
Dispatch = Callable[[Sequence[pb.Input], float], list[ItemOutcome]]
AsyncDispatch = Callable[[Sequence[pb.Input], float], Awaitable[list[ItemOutcome]]]


@dataclasses.dataclass(eq=False)
class _Batch:
    """Inputs of the callers that joined, and each caller's (start, count) in them."""

    key: Hashable
    opened_s: float
    msgs: list[pb.Input] = dataclasses.field(default_factory=list)
    slots: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    result: list[ItemOutcome] | None = None
    error: BaseException | None = None
    full: Any = None  # threading.Event / asyncio.Event: max_items reached, stop lingering
    done: Any = None  # threading.Event (threads only)

    def join(self, msgs: Sequence[pb.Input]) -> int:
        self.slots.append((len(self.msgs), len(msgs)))
        self.msgs.extend(msgs)
        return len(self.slots) - 1


def _slice(outcomes: list[ItemOutcome], start: int, count: int) -> list[ItemOutcome]:
    """One caller's outcomes, indices made relative to its own list."""
    mine = outcomes[start : start + count]
    for o in mine:
        o.index -= start
        if o.error is not None:  # a new error: its message names the index too
            o.error = FeatureBankError(o.error.code, o.error.message, o.index)
    return mine


def _own(error: BaseException) -> BaseException:
    """The batch's failure as this caller's own exception (one object raised in many threads would
    share one traceback)."""
    if isinstance(error, FeatureBankError):
        return FeatureBankError(error.code, error.message, error.index)
    return error


class _Base:
    def __init__(self, linger_s: float, max_items: int):
        if linger_s < 0:
            raise ValueError(f"coalesce linger must be >= 0 ms, got {linger_s * 1000:g}")
        self.linger_s = linger_s
        self.max_items = max_items
        self._open: dict[Hashable, _Batch] = {}
        self._in_flight = 0  # calls of this client between entering and returning

    def _fits(self, batch: _Batch, n: int) -> bool:
        return len(batch.msgs) + n <= self.max_items

    def _budget_s(self, batch: _Batch, timeout_s: float) -> float:
        return max(0.0, timeout_s - (time.monotonic() - batch.opened_s))


class Coalescer(_Base):
    """Coalescing for a blocking client's threads (see the module docstring)."""

    def __init__(self, linger_s: float, max_items: int):
        super().__init__(linger_s, max_items)
        self._lock = threading.Lock()

    def run(self, key: Hashable, msgs: Sequence[pb.Input], timeout_s: float, dispatch: Dispatch) -> list[ItemOutcome]:
        """This caller's outcomes for ``msgs``, computed alone or merged with concurrent callers of ``key``."""
        if len(msgs) >= self.max_items or not msgs:
            return dispatch(msgs, timeout_s)
        with self._lock:
            self._in_flight += 1
            batch = self._open.get(key)
            if batch is not None and self._fits(batch, len(msgs)):
                slot = batch.join(msgs)
                if not self._fits(batch, 1):
                    batch.full.set()
                leader = False
            else:
                if batch is not None:
                    batch.full.set()  # no room for this caller: send it now, this caller opens the next
                # Linger only if another call is in flight to merge with; alone, send at once.
                linger = self.linger_s if self._in_flight > 1 else 0.0
                batch = _Batch(key, time.monotonic(), full=threading.Event(), done=threading.Event())
                slot = batch.join(msgs)
                leader = True
                if linger > 0:
                    self._open[key] = batch
        try:
            if leader:
                self._lead(batch, linger, timeout_s, dispatch)
            else:
                batch.done.wait()
            if batch.error is not None:
                raise _own(batch.error)
            return _slice(batch.result, *batch.slots[slot])  # type: ignore[arg-type]
        finally:
            with self._lock:
                self._in_flight -= 1

    def _lead(self, batch: _Batch, linger_s: float, timeout_s: float, dispatch: Dispatch) -> None:
        try:
            if linger_s > 0:
                batch.full.wait(linger_s)
                with self._lock:
                    if self._open.get(batch.key) is batch:
                        del self._open[batch.key]  # closed: later callers open the next batch
            batch.result = dispatch(batch.msgs, self._budget_s(batch, timeout_s))
        except BaseException as e:  # every caller of the batch sees the request's failure
            batch.error = e
        finally:
            batch.done.set()


class AsyncCoalescer(_Base):
    """Coalescing for an asyncio client's tasks (see the module docstring); one event loop."""

    def __init__(self, linger_s: float, max_items: int):
        super().__init__(linger_s, max_items)
        self._tasks: set[asyncio.Task] = set()  # batches running (the loop keeps only weak references)

    async def run(
        self, key: Hashable, msgs: Sequence[pb.Input], timeout_s: float, dispatch: AsyncDispatch
    ) -> list[ItemOutcome]:
        """This caller's outcomes for ``msgs``, computed alone or merged with concurrent callers of ``key``."""
        if len(msgs) >= self.max_items or not msgs:
            return await dispatch(msgs, timeout_s)
        self._in_flight += 1
        try:
            batch = self._open.get(key)
            if batch is not None and self._fits(batch, len(msgs)):
                slot = batch.join(msgs)
                if not self._fits(batch, 1):
                    batch.full.set()
            else:
                if batch is not None:
                    batch.full.set()  # no room for this caller: send it now, this caller opens the next
                if self._in_flight == 1:  # nothing to merge with: no linger, no extra task
                    return await dispatch(msgs, timeout_s)
                batch = _Batch(key, time.monotonic(), full=asyncio.Event())
                batch.done = asyncio.get_running_loop().create_future()
                slot = batch.join(msgs)
                self._open[key] = batch
                task = asyncio.get_running_loop().create_task(self._lead(batch, timeout_s, dispatch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            # shield: a cancelled caller stops waiting; the batch and the other callers carry on.
            await asyncio.shield(batch.done)
            if batch.error is not None:
                raise _own(batch.error)
            return _slice(batch.result, *batch.slots[slot])  # type: ignore[arg-type]
        finally:
            self._in_flight -= 1

    async def _lead(self, batch: _Batch, timeout_s: float, dispatch: AsyncDispatch) -> None:
        try:
            try:
                await asyncio.wait_for(batch.full.wait(), self.linger_s)
            except asyncio.TimeoutError:
                pass
            if self._open.get(batch.key) is batch:
                del self._open[batch.key]
            batch.result = await dispatch(batch.msgs, self._budget_s(batch, timeout_s))
        except BaseException as e:
            batch.error = e
            if not isinstance(e, Exception):
                raise
        finally:
            batch.done.set_result(None)
