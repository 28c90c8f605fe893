"""Assembles and runs one server process: workers first, then gRPC (+health, reflection), metrics."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from featurebank.server.auth import TokenAuthenticator, server_credentials
from featurebank.server.batching import DynamicBatcher
from featurebank.server.cache import FeatureCache, LRUCache, RedisCache
from featurebank.server.config import ServerConfig
from featurebank.server.heads import DirectoryHeadStore, RedisHeadStore
from featurebank.server.interceptors import StatusInterceptor
from featurebank.server.metrics import Metrics
from featurebank.server.servicer import FeatureBankServicer, ServedBackbone
from featurebank.v1 import featurebank_pb2, featurebank_pb2_grpc
from featurebank.workers.pool import WorkerPool

logger = logging.getLogger(__name__)

SERVICE_NAME = featurebank_pb2.DESCRIPTOR.services_by_name["FeatureBank"].full_name


def make_cache(config: ServerConfig, metrics: Metrics) -> FeatureCache:
    if config.redis_url:
        return RedisCache(config.redis_url, ttl_seconds=config.cache_ttl_seconds,
                          timeout_s=config.redis_timeout_ms / 1000.0, metrics=metrics)
    return LRUCache(config.lru_max_bytes, config.cache_ttl_seconds)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, and max_batch_size: the shapes workers trace at warm-up."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != max_batch_size:
        buckets.append(max_batch_size)
    return tuple(buckets)


class FeatureBankServer:
    """One server process: worker pools, cache, gRPC server, health and metrics endpoints."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.cache = make_cache(config, self.metrics)
        self.heads = (RedisHeadStore(config.redis_url, config.redis_timeout_ms / 1000.0) if config.redis_url
                      else DirectoryHeadStore(config.heads_path))
        self.health = health.aio.HealthServicer()
        self.pools: dict[str, WorkerPool] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = -1
        self._metrics_http = None
        self._stopped = asyncio.Event()

    def _make_pools(self) -> None:
        c = self.config
        for name, options in c.backbone_specs:
            if name in self.pools:
                raise ValueError(f"backbone {name!r} listed twice")
            options = {"max_image_pixels": c.max_image_pixels, "batch_buckets": batch_buckets(c.max_batch_size), **options}
            batcher = DynamicBatcher(
                max_batch_size=c.max_batch_size, max_batch_delay_ms=c.max_batch_delay_ms, max_queue_size=c.max_queue_size,
                max_queue_share=c.max_queue_share if c.tokens_file else 1.0,
                on_drop=lambda item, reason, n=name: self.metrics.dropped_items.labels(n, reason).inc(),
                on_depth=lambda depth, n=name: self.metrics.queue_depth.labels(n).set(depth),
            )
            self.batchers[name] = batcher
            self.pools[name] = WorkerPool(
                name, options=options, num_workers=c.num_workers, batcher=batcher, metrics=self.metrics,
                gpus=c.gpu_list, intra_op_threads=c.intra_op_threads, inter_op_threads=c.inter_op_threads,
                warmup=c.warmup, pipeline_depth=c.pipeline_depth,
            )

    async def start(self) -> None:
        """Spawn the workers, open the ports (health NOT_SERVING), wait for every worker, SERVING."""
        c = self.config
        self._make_pools()
        for pool in self.pools.values():
            pool.spawn()  # workers load their backbones while the rest starts
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # Long-lived clients reconnect every few minutes, so a scale-up behind a headless
            # Service gets traffic; in-flight RPCs (long ExtractStreams too) get an hour to finish.
            ("grpc.max_connection_age_ms", int(c.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 3_600_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        authenticator = TokenAuthenticator.from_file(c.tokens_file) if c.tokens_file else None
        self.server = grpc.aio.server(interceptors=[StatusInterceptor(self.metrics, authenticator)], options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{c.host}:{c.port}"
        if c.tls_cert_file:
            self.port = self.server.add_secure_port(
                address, server_credentials(c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {c.host}:{c.port}")
        if c.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(c.metrics_port, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        # The port opens before the workers are warm, so probes can see NOT_SERVING meanwhile;
        # FeatureBank RPCs answer UNAVAILABLE until then.
        self.servicer = FeatureBankServicer({}, self.cache, self.metrics, storage_dtype=c.cache_dtype,
                                            max_items_per_request=c.max_items_per_request,
                                            stream_window=c.stream_window, heads=self.heads, claim_ttl_ms=c.claim_ttl_ms,
                                            shared_cache_backbones=[b for b in c.shared_cache_backbones.split(",") if b])
        featurebank_pb2_grpc.add_FeatureBankServicer_to_server(self.servicer, self.server)
        await self.server.start()
        self._write_port_file(ready=False)
        try:
            infos = await asyncio.gather(*(pool.wait_ready() for pool in self.pools.values()))
        except BaseException:
            await self._close_pools()
            raise
        self.servicer.set_backbones({
            name: ServedBackbone(info=info, batcher=self.batchers[name], pool=self.pools[name])
            for name, info in zip(self.pools, infos)
        })
        gc.freeze()  # start-up's objects leave the GC's view: shorter collections, fewer pauses in the p99 tail
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        for info in infos:
            logger.info("serving %s (fingerprint %s, layers %s)", info.name, info.fingerprint[:12],
                        ", ".join(l.name for l in info.layers))
        logger.info("featurebank listening on %s:%d, metrics on :%d, cache %s", c.host, self.port, self.metrics_port,
                    self.cache.name)
        self._write_port_file(ready=True)

    def _write_port_file(self, ready: bool) -> None:
        if not self.config.port_file:
            return
        tmp = self.config.port_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid(), "ready": ready}, f)
        os.replace(tmp, self.config.port_file)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace period."""
        grace = self.config.grace_period_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        await self._close_pools()
        await self.cache.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self._stopped.set()

    async def _close_pools(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain and return (the process exits 0)."""
    server = FeatureBankServer(config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def _on_signal(sig: signal.Signals) -> None:
        if not stopping:
            logger.info("%s: draining (grace %.0fs)", sig.name, config.grace_period_s)
            stopping.append(loop.create_task(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig)
    await server.start()
    await server.wait_closed()
