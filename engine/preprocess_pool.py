"""A pool of spawned preprocessing processes for one backbone: decode + resize + tokenize on every core."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import grpc

from featurebank.common.errors import FeatureBankError
from featurebank.common.framing import frame, unframe
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import PendingItem
from featurebank.engine.crashes import CrashLedger
from featurebank.engine.processes import ChildProcess, WorkerDied, WorkerState
from featurebank.workers import preprocessing
from featurebank.workers.backbones.base import BackboneInfo
from featurebank.workers.messages import (
    PREPROCESSED,
    InputItem,
    PreprocessChunk,
    PreprocessReady,
    PreprocessResult,
    PreprocessSetup,
    out_of_band_item,
)

logger = logging.getLogger(__name__)

# Most items one process takes at once: bounds what one crash sends back for retries, and keeps a
# burst spread over the processes rather than on the first one free.
MAX_CHUNK_ITEMS = 64


class PreprocessProcess(ChildProcess):
    """One spawned preprocessing process; each chunk's round trip runs in its ``thread``."""

    ready_type = PreprocessReady

    def __init__(self, setup: PreprocessSetup):
        super().__init__(
            setup,
            target=preprocessing.main,
            name=f"preprocess-{setup.backbone}-{setup.process_index}",
            label=f"preprocessing {setup.backbone}-{setup.process_index}",
            description=f"preprocessing of {setup.backbone!r}",
        )

    def _write(self, msg: Any) -> None:
        preprocessing.send(self.conn, msg)

    def _read(self) -> Any:
        return preprocessing.receive(self.conn)

    def _state_when_ready(self, ready: PreprocessReady) -> WorkerState:
        return WorkerState.READY if ready.supported else WorkerState.DEAD

    async def roundtrip(self, chunk: PreprocessChunk) -> PreprocessResult:
        """Send one chunk and wait for its result, from the event loop (LoopChannel); raises
        WorkerDied if the process exits meanwhile."""
        channel = self.channel()
        try:
            await channel.send(frame(chunk))
            data = await channel.receive()
        except EOFError:
            raise await self.died() from None
        return unframe(data)  # its arrays are views of ``data``: no copy out of the message


@dataclasses.dataclass(eq=False)
class _Job:
    """One item to preprocess for its owner; ``future`` gets the preprocessed InputItem."""

    item: PendingItem
    future: asyncio.Future
    attempts: int = 0  # chunks holding it that killed a process


class PreprocessPool:
    """``num_processes`` processes preprocessing one backbone's raw inputs, beside its model workers.

    ``preprocess(item)`` returns the item as model input (an InputItem of kind PREPROCESSED).
    Items submitted in the same event-loop turn travel together: each free process takes its
    share of what is waiting as one chunk (one pipe round trip), so a request of 32 images is
    decoded on every process at once. A bad item fails alone (INVALID_ARGUMENT). A process that
    dies is restarted; every item of the chunk it held is retried alone, and an item that kills
    a process on its second try fails with INTERNAL; crashes are counted in the backbone's
    ``CrashLedger``, shared with its model workers, so a poison input is refused at once
    afterwards. A chunk running past ``max(watchdog_floor_s, watchdog_multiple x the slowest item
    seen x its items)`` gets its process killed, handled like a crash. A backbone whose
    preprocessing needs its model (``load_preprocessing`` not implemented) leaves the pool
    disabled: its model workers preprocess, as with no pool.
    """

    def __init__(
        self,
        backbone: str,
        *,
        options: dict[str, Any],
        num_processes: int,
        metrics: Metrics,
        crashes: CrashLedger,
        memory_limit_mb: int = 0,
        start_timeout_s: float = 120.0,
        watchdog_floor_s: float = 60.0,
        watchdog_multiple: float = 10.0,
        on_ready_change: Callable[[str, int], None] | None = None,
    ):
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        self.backbone = backbone
        self.options = options
        self.num_processes = num_processes
        self.metrics = metrics
        self.crashes = crashes
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = start_timeout_s
        self.watchdog_floor_s = watchdog_floor_s
        self.watchdog_multiple = watchdog_multiple
        self.slowest_item_s = 0.0
        self.on_ready_change = on_ready_change or (lambda backbone, ready: None)
        self.enabled = False  # set by start(): the processes are up and the backbone supports it
        self.tensorflow_loaded = False  # what the processes reported (never, for the built-in backbones)
        self.processes: list[PreprocessProcess] = []
        self._waiting: collections.deque[_Job] = collections.deque()  # submitted, not yet in a chunk
        self._alone: collections.deque[_Job] = collections.deque()  # held by a crashed process: one per chunk
        self._work = asyncio.Event()
        self._free = 0  # processes ready and holding no chunk: the ones a turn's items are spread over
        self._chunk_ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._waiting_gauge = metrics.preprocess_waiting.labels(backbone)

    @property
    def ready_count(self) -> int:
        return sum(p.state in (WorkerState.READY, WorkerState.BUSY) for p in self.processes)

    async def start(self, info: BackboneInfo) -> bool:
        """Spawn the processes and wait for them; True if they preprocess (else the pool stays disabled)."""
        self.processes = [
            PreprocessProcess(
                PreprocessSetup(self.backbone, self.options, info, i, memory_limit_mb=self.memory_limit_mb)
            )
            for i in range(self.num_processes)
        ]
        for p in self.processes:
            p.spawn()
        loop = asyncio.get_running_loop()
        readies = await asyncio.gather(
            *(loop.run_in_executor(p.thread, p.wait_ready, self.start_timeout_s) for p in self.processes)
        )
        if not all(r.supported for r in readies):
            logger.info("%s: preprocessing stays in the model workers (%s)", self.backbone, readies[0].reason)
            await loop.run_in_executor(None, self._stop_all)
            self.processes = []
            return False
        self.tensorflow_loaded = any(r.tensorflow_loaded for r in readies)
        if self.tensorflow_loaded:  # a user's backbone module imports it: memory per process, nothing worse
            logger.warning("%s: its preprocessing processes imported TensorFlow", self.backbone)
        self.enabled = True
        self._free = len(self.processes)
        self._update_ready()
        self._tasks = [
            asyncio.create_task(self._feed(p), name=f"preprocess-{self.backbone}-{i}")
            for i, p in enumerate(self.processes)
        ]
        logger.info("%s: %d preprocessing processes ready", self.backbone, len(self.processes))
        return True

    def preprocess(self, item: PendingItem) -> asyncio.Future:
        """A future of ``item`` as model input; a bad input's future raises FeatureBankError."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Job(item, future))
        self._waiting_gauge.set(len(self._waiting))
        self._work.set()  # the free processes take it after this turn: with the rest of the turn's items
        return future

    def _update_ready(self) -> None:
        ready = self.ready_count
        self.metrics.preprocess_ready.labels(self.backbone).set(ready)
        self.on_ready_change(self.backbone, ready)

    def _take_chunk(self) -> list[_Job]:
        """What this free process takes: a job to retry alone, else its share of the waiting jobs."""
        if self._alone:
            return [self._alone.popleft()]
        share = min(MAX_CHUNK_ITEMS, math.ceil(len(self._waiting) / max(1, self._free)))
        jobs = [self._waiting.popleft() for _ in range(min(share, len(self._waiting)))]
        self._waiting_gauge.set(len(self._waiting))
        return jobs

    def _runnable(self, jobs: list[_Job]) -> list[_Job]:
        """Drop jobs nobody waits for any more (counted as dropped, as the batcher counts its own);
        refuse poison inputs without a process."""
        keep = []
        now = asyncio.get_running_loop().time()
        for job in jobs:
            if job.future.done():
                reason = job.item.abandoned(now) or "cancelled"
                self.metrics.dropped_items.labels(self.backbone, reason).inc()
                continue
            error = self.crashes.refusal(job.item, "preprocessing processes") if self.crashes else None
            if error is None:
                keep.append(job)
            else:
                job.future.set_exception(error)
        return keep

    async def _feed(self, p: PreprocessProcess) -> None:
        """Give one process chunks, one at a time; notice its death (busy or idle) and restart it."""
        self._watch(p)
        try:
            while not self._closing:
                if p.exited:
                    p.unwatch_exit()
                    self._on_death(p, [], p.death_reason())
                    await self._restart_counted(p)
                    self._watch(p)
                    continue
                if not self._alone and not self._waiting:
                    self._work.clear()
                    await self._work.wait()
                    continue
                jobs = self._runnable(self._take_chunk())
                if not jobs:
                    continue
                chunk = PreprocessChunk(
                    next(self._chunk_ids),
                    [out_of_band_item(j.item.payload) for j in jobs],
                )
                p.state = WorkerState.BUSY
                self._free -= 1
                started = time.monotonic()
                try:
                    result = await self._watched(p, asyncio.ensure_future(p.roundtrip(chunk)), len(jobs))
                except WorkerDied as e:
                    p.unwatch_exit()
                    self._on_death(p, jobs, str(e))
                    await self._restart(p)
                    self._watch(p)
                    continue
                finally:
                    self._free += 1
                p.state = WorkerState.READY
                self._resolve(jobs, result, time.monotonic() - started)
        finally:
            p.unwatch_exit()

    async def _restart_counted(self, p: PreprocessProcess) -> None:
        """Restart an idle process; meanwhile it is not counted among the free ones."""
        self._free -= 1
        try:
            await self._restart(p)
        finally:
            self._free += 1

    async def _watched(self, p: PreprocessProcess, done: asyncio.Future, items: int) -> PreprocessResult:
        """The chunk's result; its process is killed (a crash) if it runs far past the slowest item seen."""
        try:
            if self.watchdog_floor_s <= 0:
                return await done
            limit_s = max(self.watchdog_floor_s, self.watchdog_multiple * self.slowest_item_s * items)
            finished, _ = await asyncio.wait({done}, timeout=limit_s)
            if not finished:
                p.killed_because = f"stuck: its chunk of {items} ran past the watchdog's {limit_s:.1f}s; killed"
                logger.error("preprocessing %s-%d %s", self.backbone, p.setup.process_index, p.killed_because)
                self.metrics.watchdog_kills.labels(self.backbone).inc()
                p.process.kill()
            return await done
        finally:
            done.cancel()  # closing: the round trip stops with its feeder (a no-op once it is done)

    def _watch(self, p: PreprocessProcess) -> None:
        """Wake the feeders when the process exits (``p.exited``): an idle death counts too."""
        p.watch_exit(self._work.set)

    def _resolve(self, jobs: list[_Job], result: PreprocessResult, chunk_s: float) -> None:
        histogram = self.metrics.preprocess_duration.labels(self.backbone)
        for job, value, error, seconds in zip(jobs, result.values, result.errors, result.seconds):
            histogram.observe(seconds)
            self.slowest_item_s = max(self.slowest_item_s, seconds)
            if job.attempts:  # preprocessed after a crash: it was a bystander
                self.crashes.forget(job.item)
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(FeatureBankError(error[1], grpc.StatusCode[error[0]]))
            else:
                job.future.set_result(InputItem(PREPROCESSED, value))

    def _on_death(self, p: PreprocessProcess, jobs: list[_Job], reason: str) -> None:
        logger.error(
            "preprocessing %s-%d died (%s) %s; restarting it",
            self.backbone,
            p.setup.process_index,
            reason,
            f"with a chunk of {len(jobs)}" if jobs else "while idle",
        )
        self.metrics.preprocess_crashes.labels(self.backbone).inc()
        self._update_ready()
        for job in jobs:
            job.attempts += 1
            error = self.crashes.crashed(job.item, job.attempts, f"{self.backbone} preprocessing processes", reason)
            if job.future.done():
                continue
            if error is None:
                self._alone.append(job)
            else:
                job.future.set_exception(error)
        if self._alone:
            self._work.set()

    async def _restart(self, p: PreprocessProcess) -> None:
        if await p.restart(self.start_timeout_s, lambda: self._closing):
            self._update_ready()

    def _stop_all(self) -> None:
        for p in self.processes:
            p.stop()

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in [*self._alone, *self._waiting]:
            if not job.future.done():
                job.future.set_exception(FeatureBankError("the server is shutting down", grpc.StatusCode.UNAVAILABLE))
        self._alone.clear()
        self._waiting.clear()
        self._waiting_gauge.set(0)
        await asyncio.get_running_loop().run_in_executor(None, self._stop_all)
        self.enabled = False
        self.metrics.preprocess_ready.labels(self.backbone).set(0)
