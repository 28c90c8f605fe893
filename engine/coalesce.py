"""Calls made in one event-loop turn sent together as one batched call (one round trip), the DataLoader way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


class Coalescer:
    """``await coalescer(arg)`` queues ``arg``; at the end of the loop turn every queued argument
    goes to ``call_many(args)`` at once, and each caller gets its own item of the answer (or the
    exception). A caller that leaves does not cancel the batch: the others still get theirs."""

    def __init__(self, call_many: Callable[[Sequence[Any]], Awaitable[Sequence[Any]]]):
        self._call_many = call_many
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._running: set[asyncio.Task] = set()

    def __call__(self, arg: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((arg, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self._call_many([arg for arg, _ in batch])
        except BaseException as e:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(e, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(e)
                    future.exception()  # retrieved: its caller may have left
            if not isinstance(e, Exception):
                raise
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
