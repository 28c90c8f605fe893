"""The engine: one pod's dynamic batchers, worker pools and miss path (single-flight), in one object."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from featurebank.common.cache import FeatureCache
from featurebank.common.metrics import Metrics
from featurebank.engine.batching import DynamicBatcher
from featurebank.engine.misses import MissPath
from featurebank.engine.pool import WorkerPool
from featurebank.engine.preprocess_pool import PreprocessPool
from featurebank.server.config import ServerConfig
from featurebank.workers.backbones.base import BackboneInfo

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, and max_batch_size: the shapes workers trace at warm-up."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != max_batch_size:
        buckets.append(max_batch_size)
    return tuple(buckets)


@dataclasses.dataclass
class EngineBackbone:
    """A backbone as the engine serves it: what ``MissPath.compute`` needs (info, batcher, pool)."""

    info: BackboneInfo
    batcher: DynamicBatcher
    pool: WorkerPool


class Engine:
    """Owns what must be one per pod: a batcher and a worker pool per backbone, and the MissPath.

    The single-process server uses it in-process; with ``--frontends N`` it runs alone in the
    engine process (engine_server.py) and frontends reach it through an ``EngineClient``. Either
    way misses of every request form one batch stream per backbone, and a key in flight is
    computed once (``MissPath``'s single-flight Group).
    """

    def __init__(
        self,
        config: ServerConfig,
        metrics: Metrics,
        cache: FeatureCache,
        *,
        on_ready_change: Callable[[str, int], None] | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.cache = cache
        self.pools: dict[str, WorkerPool] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.preprocessing: dict[str, PreprocessPool] = {}  # started once the backbone's workers are ready
        self.backbones: dict[str, EngineBackbone] = {}  # filled once every worker is ready
        self.misses = MissPath(cache, metrics, storage_dtype=config.cache_dtype, claim_ttl_ms=config.claim_ttl_ms)
        self._on_ready_change = on_ready_change or (lambda backbone, ready: None)
        self._make_pools()

    def _make_pools(self) -> None:
        c = self.config
        for name, options in c.backbone_specs:
            if name in self.pools:
                raise ValueError(f"backbone {name!r} listed twice")
            options = {
                "max_image_pixels": c.max_image_pixels,
                "batch_buckets": batch_buckets(c.max_batch_size),
                **options,
            }
            batcher = DynamicBatcher(
                max_batch_size=c.max_batch_size,
                max_batch_delay_ms=c.max_batch_delay_ms,
                max_queue_size=c.max_queue_size,
                max_queue_share=c.max_queue_share if c.tokens_file else 1.0,
                on_drop=lambda item, reason, n=name: self.metrics.dropped_items.labels(n, reason).inc(),
                on_depth=lambda depth, n=name: self.metrics.queue_depth.labels(n).set(depth),
            )
            self.batchers[name] = batcher
            self.pools[name] = WorkerPool(
                name,
                options=options,
                num_workers=c.num_workers,
                batcher=batcher,
                metrics=self.metrics,
                gpus=c.gpu_list,
                intra_op_threads=c.intra_op_threads,
                inter_op_threads=c.inter_op_threads,
                warmup=c.warmup,
                pipeline_depth=c.pipeline_depth,
                memory_limit_mb=c.worker_memory_limit_mb,
                watchdog_floor_s=c.watchdog_floor_s,
                watchdog_multiple=c.watchdog_multiple,
                on_ready_change=lambda backbone, ready: self._on_ready_change(backbone, ready),
            )
            if c.num_preprocess_workers > 0:
                self.preprocessing[name] = PreprocessPool(
                    name,
                    options=options,
                    num_processes=c.num_preprocess_workers,
                    metrics=self.metrics,
                    crashes=self.pools[name].crashes,  # one poison ledger per backbone, whichever process dies
                    memory_limit_mb=c.worker_memory_limit_mb,
                    watchdog_floor_s=c.watchdog_floor_s,
                    watchdog_multiple=c.watchdog_multiple,
                    on_ready_change=lambda backbone, ready: self._on_ready_change(backbone, ready),
                )

    def spawn(self) -> None:
        """Start every worker process (non-blocking): they load their backbones meanwhile."""
        for pool in self.pools.values():
            pool.spawn()

    async def wait_ready(self) -> dict[str, EngineBackbone]:
        """Wait for every worker of every backbone; on failure the pools are closed and it raises."""
        try:
            infos = await asyncio.gather(*(pool.wait_ready() for pool in self.pools.values()))
            # Preprocessing processes need what the workers report (a model file's input shape).
            await asyncio.gather(
                *(pre.start(infos[list(self.pools).index(n)]) for n, pre in self.preprocessing.items())
            )
        except BaseException:
            await self.close()
            raise
        self.misses.preprocessing.update({n: pre for n, pre in self.preprocessing.items() if pre.enabled})
        self.backbones = {
            name: EngineBackbone(info=info, batcher=self.batchers[name], pool=self.pools[name])
            for name, info in zip(self.pools, infos)
        }
        return self.backbones

    def ready_counts(self) -> dict[str, int]:
        """Ready workers per backbone, now; 0 while its preprocessing pool has no ready process."""
        return {name: pool.ready_count if self._preprocessing_ready(name) else 0 for name, pool in self.pools.items()}

    def _preprocessing_ready(self, backbone: str) -> bool:
        pre = self.preprocessing.get(backbone)
        return pre is None or not pre.enabled or pre.ready_count > 0

    async def close(self) -> None:
        """Stop feeding and stop the workers (in-flight items fail; callers drain first)."""
        pools = [*self.preprocessing.values(), *self.pools.values()]
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
