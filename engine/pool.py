"""A pool of spawned worker processes for one backbone, fed by a dynamic batcher."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from featurebank.common.errors import FeatureBankError
from featurebank.common.framing import frame
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import DynamicBatcher, PendingItem
from featurebank.engine.crashes import CrashLedger
from featurebank.engine.processes import ChildProcess, WorkerDied, WorkerSetupError, WorkerState
from featurebank.workers import worker as worker_main
from featurebank.workers.backbones.base import BackboneInfo
from featurebank.workers.messages import Batch, BatchResult, WorkerReady, WorkerSetup, out_of_band_item

logger = logging.getLogger(__name__)


class WorkerProcess(ChildProcess):
    """One spawned model worker. Batches are written from its own send thread and results read in ``thread``."""

    ready_type = WorkerReady

    def __init__(self, setup: WorkerSetup):
        name = f"worker-{setup.backbone}-{setup.worker_index}"
        super().__init__(
            setup,
            target=worker_main.main,
            name=name,
            label=f"worker {setup.backbone}-{setup.worker_index}",
            description=f"backbone {setup.backbone!r}",
        )
        self.busy_since: float | None = None  # time.monotonic() when its current batch started computing
        # One thread writes batches and one reads results, so a batch can be on its way while the
        # previous one computes; each is a single thread, so order is kept.
        self.send_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-send")

    def spawn(self) -> None:
        self.busy_since = None
        super().spawn()

    def _write(self, msg: Any) -> None:
        # One frame (common/framing.py): pixel arrays and raw inputs beside the pickle, not in it.
        self.conn.send_bytes(b"".join(frame(msg)))

    def send(self, batch: Batch) -> None:
        """Write one batch to the worker's pipe; raises WorkerDied if the process is gone."""
        self.state = WorkerState.BUSY
        self.write(batch)

    def stop(self, timeout_s: float = 5.0) -> None:
        super().stop(timeout_s)
        self.send_thread.shutdown(wait=False)


class WorkerPool:
    """``num_workers`` processes holding one backbone; each takes batches from the shared batcher.

    Workers are spawned and warmed before the pool reports ready. A worker that dies is noticed
    by its exit, counted, restarted, and its batch re-sent item by item; an item that kills a
    worker twice gets an INTERNAL error of its own, and is refused at once afterwards. A worker
    whose batch runs past ``max(watchdog_floor_s, watchdog_multiple x the slowest batch seen)``
    is killed by the watchdog, and its batch handled like a crash. ``on_ready_change(backbone,
    ready_workers)`` is called whenever the number of ready workers may have changed (health).
    """

    def __init__(
        self,
        backbone: str,
        *,
        options: dict[str, Any],
        num_workers: int,
        batcher: DynamicBatcher,
        metrics: Metrics,
        gpus: list[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        warmup: bool = True,
        start_timeout_s: float = 600.0,
        pipeline_depth: int = 2,
        memory_limit_mb: int = 0,
        watchdog_floor_s: float = 60.0,
        watchdog_multiple: float = 10.0,
        on_ready_change: Callable[[str, int], None] | None = None,
        crashes: CrashLedger | None = None,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.backbone = backbone
        self.batcher = batcher
        self.metrics = metrics
        self.start_timeout_s = start_timeout_s
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, got {pipeline_depth}")
        self.pipeline_depth = pipeline_depth
        self.watchdog_floor_s = watchdog_floor_s
        self.watchdog_multiple = watchdog_multiple
        self.slowest_batch_s = 0.0
        self.on_ready_change = on_ready_change or (lambda backbone, ready: None)
        self.crashes = crashes if crashes is not None else CrashLedger(backbone, metrics)  # shared with preprocessing
        self.workers = [
            WorkerProcess(
                WorkerSetup(
                    backbone=backbone,
                    options=options,
                    worker_index=i,
                    gpu=gpus[i % len(gpus)] if gpus else None,
                    intra_op_threads=intra_op_threads,
                    inter_op_threads=inter_op_threads,
                    warmup=warmup,
                    memory_limit_mb=memory_limit_mb,
                )
            )
            for i in range(num_workers)
        ]
        self.info: BackboneInfo | None = None
        self._batch_ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    @property
    def ready_count(self) -> int:
        return sum(w.state in (WorkerState.READY, WorkerState.BUSY) for w in self.workers)

    def spawn(self) -> None:
        """Start every worker process (non-blocking); ``wait_ready`` waits for them."""
        for w in self.workers:
            w.spawn()

    async def wait_ready(self) -> BackboneInfo:
        """Wait until every worker is warmed up, then start feeding them batches."""
        loop = asyncio.get_running_loop()
        readies = await asyncio.gather(
            *(loop.run_in_executor(w.thread, w.wait_ready, self.start_timeout_s) for w in self.workers)
        )
        fingerprints = {r.info.fingerprint for r in readies}
        if len(fingerprints) != 1:
            raise WorkerSetupError(f"workers of {self.backbone} disagree on the fingerprint: {fingerprints}")
        self.info = readies[0].info
        for w in self.workers:
            self.metrics.traces.labels(self.backbone, str(w.setup.worker_index)).set(w.ready.trace_count)
        self._update_ready()
        self._tasks = [
            asyncio.create_task(self._feed(w), name=f"feed-{self.backbone}-{i}") for i, w in enumerate(self.workers)
        ]
        if self.watchdog_floor_s > 0:
            self._tasks.append(asyncio.create_task(self._watchdog(), name=f"watchdog-{self.backbone}"))
        return self.info

    def _update_ready(self) -> None:
        ready = self.ready_count
        self.metrics.workers_ready.labels(self.backbone).set(ready)
        self.on_ready_change(self.backbone, ready)

    @property
    def watchdog_limit_s(self) -> float:
        """How long one batch may compute before its worker is killed."""
        return max(self.watchdog_floor_s, self.watchdog_multiple * self.slowest_batch_s)

    async def _watchdog(self) -> None:
        """Kill a worker whose batch runs far past the slowest seen; its feeder sees it die and recovers."""
        interval_s = min(1.0, self.watchdog_floor_s / 4)
        while not self._closing:
            await asyncio.sleep(interval_s)
            now, limit_s = time.monotonic(), self.watchdog_limit_s
            for w in self.workers:
                since = w.busy_since
                if since is None or now - since <= limit_s or w.killed_because or w.process is None:
                    continue
                w.killed_because = (
                    f"stuck: its batch ran {now - since:.1f}s, past the watchdog's {limit_s:.1f}s "
                    f"(max of {self.watchdog_floor_s:g}s and {self.watchdog_multiple:g} x the slowest batch, "
                    f"{self.slowest_batch_s:.2f}s); killed by the watchdog"
                )
                logger.error("worker %s-%d %s", self.backbone, w.setup.worker_index, w.killed_because)
                self.metrics.watchdog_kills.labels(self.backbone).inc()
                w.process.kill()  # the receive thread sees the exit: handled like any crash

    async def _feed(self, w: WorkerProcess) -> None:
        """Keep up to ``pipeline_depth`` batches in flight on one worker.

        With two in flight the next full batch is formed, pickled and written to the pipe while
        the worker computes the current one, so under load the worker never waits for the
        frontend between batches (and TensorFlow's thread pool stays warm). The worker answers in order, so the
        oldest batch in flight is the one it was computing when it died: only that batch's items
        are counted as having crashed it; the others go back to the queue unblamed.
        """
        inflight: collections.deque[tuple[list[PendingItem], asyncio.Future]] = collections.deque()
        next_batch: asyncio.Task | None = None
        exited = self._exit_future(w)  # an idle worker's death is noticed too (health follows it)
        ahead = False  # next_batch waits for a full batch, to queue behind one in flight
        try:
            while not self._closing:
                if next_batch is not None and ahead and not inflight and not next_batch.done():
                    next_batch.cancel()  # the worker is idle now: a partial batch may go
                    next_batch = None
                if next_batch is None and len(inflight) < self.pipeline_depth:
                    # Behind a batch in flight only a full batch goes ahead: a partial one would
                    # leave the items arriving meanwhile for a batch later (smaller batches, more
                    # calls); it waits for the worker to finish instead, as with one in flight.
                    ahead = bool(inflight)
                    next_batch = asyncio.ensure_future(self.batcher.wait_for_batch(full_only=ahead))
                waits = [f for f in (next_batch, inflight[0][1] if inflight else exited) if f is not None]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if exited.done() and not inflight:
                    self._unwatch(w, exited)
                    self._on_death(w, [], w.death_reason())
                    await self._restart(w)
                    exited = self._exit_future(w)
                    continue
                if next_batch is not None and next_batch.done():
                    items, next_batch = self.crashes.refuse_poison(next_batch.result()), None
                    if items:
                        if not inflight:
                            w.busy_since = time.monotonic()
                        inflight.append((items, self._send(w, items)))
                    continue
                items, received = inflight.popleft()
                try:
                    result = received.result()
                except WorkerDied as e:
                    w.busy_since = None
                    self._unwatch(w, exited)
                    self._on_death(w, items, str(e))
                    await self._drain_dead(inflight)
                    await self._restart(w)
                    exited = self._exit_future(w)
                    continue
                w.busy_since = time.monotonic() if inflight else None  # the next one computes now
                if not inflight:
                    w.state = WorkerState.READY
                self._resolve(items, result)
                self.slowest_batch_s = max(self.slowest_batch_s, result.inference_seconds)
                self.metrics.inference_duration.labels(self.backbone).observe(result.inference_seconds)
                self.metrics.worker_idle.labels(self.backbone).inc(result.idle_seconds)
                self.metrics.worker_read.labels(self.backbone).inc(result.read_seconds)
                self.metrics.traces.labels(self.backbone, str(w.setup.worker_index)).set(result.trace_count)
        finally:
            self._unwatch(w, exited)
            if next_batch is not None:
                next_batch.cancel()
            for _, received in inflight:  # closing: the worker is being stopped under them
                received.add_done_callback(lambda f: f.cancelled() or f.exception())

    @staticmethod
    def _exit_future(w: WorkerProcess) -> asyncio.Future:
        """Done when the worker's process exits (its sentinel becomes readable)."""
        exited = asyncio.get_running_loop().create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        w.watch_exit(on_exit)
        return exited

    @staticmethod
    def _unwatch(w: WorkerProcess, exited: asyncio.Future) -> None:
        w.unwatch_exit()
        exited.cancel()

    def _send(self, w: WorkerProcess, items: list[PendingItem]) -> asyncio.Future:
        """Write a batch to the worker (in its send thread); the future is its result."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for it in items:
            self.metrics.queue_delay.labels(self.backbone).observe(now - it.enqueued_at)
        self.metrics.batch_size.labels(self.backbone).observe(len(items))
        batch = Batch(
            next(self._batch_ids),
            [out_of_band_item(it.payload) for it in items],
            [it.layer for it in items],
        )
        sent = loop.run_in_executor(w.send_thread, w.send, batch)
        received = loop.run_in_executor(w.thread, w.receive)

        async def result() -> BatchResult:
            try:
                await sent
            finally:
                msg = await received  # raises WorkerDied when the process exits
            return msg

        return asyncio.ensure_future(result())

    async def _drain_dead(self, inflight: collections.deque) -> None:
        """After a worker died: batches behind the one it was computing go back to the queue."""
        retry = []
        while inflight:
            items, received = inflight.popleft()
            try:
                result = await received
            except WorkerDied:
                pass
            else:  # the worker answered this one before it died: keep the answer
                self._resolve(items, result)
                continue
            retry.extend(it for it in items if not it.future.done())
        if retry:
            self.batcher.requeue_front(retry)

    def _resolve(self, items: list[PendingItem], result: BatchResult) -> None:
        for item, feats, err in zip(items, result.features, result.errors):
            if item.attempts:  # computed after a crash: it was a bystander
                self.crashes.forget(item)
            if item.future.done():
                continue
            if err is not None:
                item.future.set_exception(FeatureBankError(err[1], grpc.StatusCode[err[0]]))
            else:
                item.future.set_result(feats)

    def _on_death(self, w: WorkerProcess, items: list[PendingItem], reason: str) -> None:
        logger.error(
            "worker %s-%d died (%s) %s; restarting it",
            self.backbone,
            w.setup.worker_index,
            reason,
            f"with a batch of {len(items)}" if items else "while idle",
        )
        self.metrics.worker_restarts.labels(self.backbone).inc()
        self._update_ready()
        retry = []
        for item in items:
            item.attempts += 1
            error = self.crashes.crashed(item, item.attempts, f"the {self.backbone} worker", reason)
            if item.future.done():
                continue
            if error is None:
                retry.append(item)
            else:
                item.future.set_exception(error)
        self.batcher.requeue(retry)

    async def _restart(self, w: WorkerProcess) -> None:
        if await w.restart(self.start_timeout_s, lambda: self._closing):
            self._update_ready()

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, w.stop) for w in self.workers))
        self.metrics.workers_ready.labels(self.backbone).set(0)
