"""One owner task per key: callers only wait on it, and it is cancelled only when the last of them leaves.

The shape of Go's ``golang.org/x/sync/singleflight`` ``Group.DoChan``, for asyncio: the first
caller for a key starts the work as a task of its own; later callers join it. A caller that
leaves (cancelled, past its deadline) never takes the work down with it, unless it was the last
one waiting: then the owner is cancelled and runs its own clean-up. The key is free for a new
owner as soon as the work has ended or been abandoned, never while a dead entry could be joined.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Flight(Generic[T]):
    """The work in flight for one key: its owner task, its result, and how many callers wait on it."""

    __slots__ = ("key", "data", "result", "task", "waiters")

    def __init__(self, key: Hashable, data: Any):
        self.key = key
        self.data = data  # whatever the starter wants the owner and joiners to share
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task | None = None
        self.waiters = 0

    def resolve(self, value: T) -> None:
        """Answer every waiter now; the owner may go on (e.g. clean up) after this."""
        if not self.result.done():
            self.result.set_result(value)

    def fail(self, error: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(error)
            self.result.exception()  # retrieved: every waiter may have left already


class Group(Generic[T]):
    """Flights by key. ``join`` starts or joins one; ``wait`` waits on it and leaves cleanly."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, Flight[T]] = {}
        self._closing: set[asyncio.Task] = set()  # abandoned owners still cleaning up

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flights

    def get(self, key: Hashable) -> Flight[T] | None:
        return self._flights.get(key)

    def join(
        self, key: Hashable, start: Callable[[Flight[T]], Awaitable[T]], data: Any = None
    ) -> tuple[Flight[T], bool]:
        """The flight for ``key`` with one more waiter, and whether this call started it.

        A new flight runs ``start(flight)`` as its owner task; when that returns (or raises)
        without having resolved the flight, its return value (or exception) is the result.
        """
        flight = self._flights.get(key)
        started = flight is None
        if started:
            flight = Flight(key, data)
            self._flights[key] = flight
            flight.task = asyncio.ensure_future(self._own(flight, start))
        flight.waiters += 1
        return flight, started

    async def wait(self, flight: Flight[T]) -> T:
        """The flight's result. Leaving (cancelled) abandons the flight if nobody else waits."""
        try:
            return await asyncio.shield(flight.result)
        finally:
            flight.waiters -= 1
            if flight.waiters <= 0 and not flight.result.done():  # the last one left before the end
                self._abandon(flight)

    async def wait_all(self, flights: list[Flight[T]]) -> list[T | BaseException]:
        """``wait`` on several flights at once: each result or exception, in order (one wait, no
        task per flight). Leaving (cancelled) leaves every one of them."""
        try:
            await asyncio.wait([f.result for f in flights])
        finally:
            for f in flights:
                f.waiters -= 1
                if f.waiters <= 0 and not f.result.done():
                    self._abandon(f)
        out: list[T | BaseException] = []
        for f in flights:
            r = f.result
            out.append(asyncio.CancelledError() if r.cancelled() else (r.exception() or r.result()))
        return out

    def forget(self, flight: Flight[T]) -> None:
        """Free the key now (its owner still finishing): the next join starts a new flight."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def _abandon(self, flight: Flight[T]) -> None:
        """Nobody waits any more: free the key at once, and let the owner clean up."""
        self.forget(flight)
        task = flight.task
        if task is not None and not task.done():
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            task.cancel()
        flight.result.cancel()

    async def _own(self, flight: Flight[T], start: Callable[[Flight[T]], Awaitable[T]]) -> None:
        try:
            flight.resolve(await start(flight))
        except asyncio.CancelledError:
            flight.result.cancel()
            raise
        except Exception as e:  # the owner's error is every waiter's error
            flight.fail(e)
        finally:
            # The work has ended: the key is free (a finished flight stays joinable until now).
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]

    async def close(self) -> None:
        """Cancel every owner (server shutdown) and wait for their clean-up."""
        tasks = [f.task for f in self._flights.values() if f.task is not None] + list(self._closing)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
