"""Assembles and runs one server process: workers first, then gRPC (+health, reflection), metrics."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from featurebank.common.cache import FeatureCache, LRUCache, RedisCache
from featurebank.common.metrics import Metrics
from featurebank.server.auth import TokenAuthenticator, server_credentials
from featurebank.server.config import ServerConfig, is_loopback
from featurebank.server.embedded_cache import EmbeddedCache
from featurebank.server.engine_client import EngineClient, RemotePool
from featurebank.server.engine_core import Engine, batch_buckets  # noqa: F401 (batch_buckets: re-exported)
from featurebank.server.head_store import open_head_store
from featurebank.server.heads import HeadLimits
from featurebank.server.interceptors import StatusInterceptor
from featurebank.server.limits import PodLimits
from featurebank.server.ports import PortInUseError, check_free, write_port_file
from featurebank.server.servicer import FeatureBankServicer, ServedBackbone
from featurebank.v1 import featurebank_pb2, featurebank_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = featurebank_pb2.DESCRIPTOR.services_by_name["FeatureBank"].full_name
# Responses carry features of up to max_items_per_request inputs: tens of MiB at most.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# The health-only port: a health check is a few bytes, and probes come a few at a time.
HEALTH_MAX_MESSAGE_BYTES = 64 * 1024
HEALTH_MAX_CONCURRENT_RPCS = 16


def make_cache(config: ServerConfig, metrics: Metrics, url: str = "") -> FeatureCache:
    """The cache config.cache_kind selects; ``url`` is an embedded cache's (EmbeddedCache.url),
    for every process of a pod that did not start it itself."""
    if config.cache_kind == "memory":
        return LRUCache(config.cache_max_bytes, config.cache_ttl_seconds)
    kind = config.cache_kind
    return RedisCache(
        config.redis_url if kind == "redis" else url or EmbeddedCache.from_config(config).url,
        ttl_seconds=config.cache_ttl_seconds,
        timeout_s=config.redis_timeout_ms / 1000.0,
        metrics=metrics,
        name=kind,
    )


class FeatureBankServer:
    """One server process: worker pools, cache, gRPC server, health and metrics endpoints.

    With ``engine_socket`` it is one frontend of ``--frontends N`` (supervisor.py): it hashes,
    reads the cache and answers hits itself, and sends misses to the engine process through an
    EngineClient; its gRPC port is shared with the other frontends (SO_REUSEPORT).
    """

    def __init__(
        self, config: ServerConfig, *, engine_socket: str = "", cache_url: str = "", pod_limits: PodLimits | None = None
    ):
        """``cache_url``: an embedded cache another process of the pod runs (the supervisor's);
        without it, this server runs its own (with --cache embedded). ``pod_limits``: where the
        frontends of the pod count the tenants' limits together."""
        self.config = config
        self.pod_limits = pod_limits
        self.metrics = Metrics()
        own = config.cache_kind == "embedded" and not cache_url
        self.embedded_cache = EmbeddedCache.from_config(config) if own else None
        self._embedded_watch: asyncio.Future | None = None  # restarts valkey if it dies while serving
        self.cache = make_cache(config, self.metrics, cache_url)
        self.heads = open_head_store(config)
        self.health = health.aio.HealthServicer()
        self.backbone_names = [name for name, _ in config.backbone_specs]
        self.engine: Engine | None = None
        self.engine_client: EngineClient | None = None
        if engine_socket:  # a frontend: the engine is another process
            self.engine_client = EngineClient(engine_socket, on_state=lambda: self._on_ready_change("", 0))
            self.pools, self.batchers = {}, {}
        else:  # the batchers, worker pools and MissPath in this process: one process serves everything
            self.engine = Engine(config, self.metrics, self.cache, on_ready_change=self._on_ready_change)
            self.pools = self.engine.pools
            self.batchers = self.engine.batchers
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port = 0
        self.health_port = -1
        self.metrics_port = -1
        self._metrics_http = None
        self._stopped = asyncio.Event()
        self._serving = False  # start-up finished: health follows the workers from then on
        self._health_lock = asyncio.Lock()
        self._health_tasks: set[asyncio.Task] = set()
        self._sampler: asyncio.Task | None = None

    def _on_ready_change(self, backbone: str, ready_workers: int) -> None:
        """Health follows the workers once started: NOT_SERVING while any backbone has no ready worker."""
        if self._serving:
            task = asyncio.ensure_future(self._update_health())
            self._health_tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._health_tasks.discard)

    async def _update_health(self) -> None:
        """Per backbone ("featurebank.v1.FeatureBank/NAME") and overall, from the pools' state now."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        async with self._health_lock:  # updates apply in order, each reading the latest state
            ready = {name: n > 0 for name, n in self._ready_counts().items()}
            for name, ok in ready.items():
                await self.health.set(f"{SERVICE_NAME}/{name}", serving if ok else not_serving)
            overall = serving if all(ready.values()) else not_serving
            await self.health.set("", overall)
            await self.health.set(SERVICE_NAME, overall)

    def _ready_counts(self) -> dict[str, int]:
        if self.engine is not None:
            return self.engine.ready_counts()
        return {name: self.engine_client.ready_count(name) for name in self.backbone_names}

    async def start(self) -> None:
        """Start everything (see _start_serving); a failed start stops the embedded cache again."""
        try:
            await self._start_serving()
        except BaseException:
            await self._stop_embedded_cache()
            raise

    async def _stop_embedded_cache(self) -> None:
        if self._embedded_watch is not None:
            self._embedded_watch.cancel()  # before stopping valkey, or it would be restarted
        if self.embedded_cache is not None:
            await self.cache.close()
            await asyncio.to_thread(self.embedded_cache.stop)  # waits for its final snapshot

    async def _start_serving(self) -> None:
        """Spawn the workers, open the ports (health NOT_SERVING), wait for every worker, SERVING."""
        c = self.config
        await self.heads.start()  # refuses a heads Redis that evicts, before workers take minutes to load
        metrics_addr = "127.0.0.1" if is_loopback(c.host) else "0.0.0.0"  # metrics follow the gRPC port
        if self.engine is not None:  # a frontend's port is held by its supervisor (SO_REUSEPORT)
            check_free("gRPC", c.host, c.port, "--port")  # before any worker is spawned for nothing
        if c.metrics_port > 0:
            check_free("metrics", metrics_addr, c.metrics_port, "--metrics-port")
        if self.embedded_cache is not None:  # before the workers: a failure costs no model loading
            self.embedded_cache.start()  # in the loop's (main) thread: valkey stops when that thread ends
            self._embedded_watch = asyncio.ensure_future(self.embedded_cache.supervise())
        if self.engine is not None:
            self.engine.spawn()  # workers load their backbones while the rest starts
        else:
            self.engine_client.start()  # connects (and reconnects) to the engine process
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.backbone_names:
            await self.health.set(f"{SERVICE_NAME}/{name}", health_pb2.HealthCheckResponse.NOT_SERVING)
        options = [
            # Requests are bounded to what the SDK sends (it splits under 3 MiB): gRPC itself answers
            # RESOURCE_EXHAUSTED ("Received message larger than max (N vs. M)") without buffering the
            # message. Responses (features of up to max_items_per_request inputs) may be larger.
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", max(c.max_message_bytes, MAX_RESPONSE_BYTES)),
            # Per client connection: further calls wait in the client (HTTP/2 flow control), so one
            # connection cannot take every slot of maximum_concurrent_rpcs.
            ("grpc.max_concurrent_streams", c.max_concurrent_streams),
            # A stream stops counting against that limit when it closes, as the client counts it:
            # gRPC's default keeps counting it until its memory is freed, so a client at the limit
            # had its next stream refused (UNAVAILABLE, RST_STREAM 7: 54 of 400 calls in
            # test_a_connection_kept_at_its_stream_limit_gets_no_refused_streams). Memory stays
            # bounded by maximum_concurrent_rpcs and the message size limits.
            ("grpc.http.overload_protection", 0),
            # Frontends of --frontends N share the port; one process alone must find it free.
            ("grpc.so_reuseport", 0 if self.engine is not None else 1),
            ("grpc.keepalive_permit_without_calls", 1),
            # Long-lived clients reconnect every few minutes, so a scale-up behind a headless
            # Service gets traffic; in-flight RPCs (long ExtractStreams too) get an hour to finish.
            ("grpc.max_connection_age_ms", int(c.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 3_600_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        authenticator = TokenAuthenticator.from_file(c.tokens_file) if c.tokens_file else None
        if authenticator is None and not is_loopback(c.host):
            logger.warning(
                "serving %s without tokens (--insecure): every caller may use every backbone and head", c.host
            )
        # Bounds the request messages held at once (each at most max_message_bytes); over it gRPC
        # answers RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!". Unauthenticated calls are
        # refused before their message is read (interceptors.py), so they cost no message memory.
        self.server = grpc.aio.server(
            interceptors=[StatusInterceptor(self.metrics, authenticator, self.pod_limits)],
            options=options,
            maximum_concurrent_rpcs=c.max_concurrent_rpcs,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{c.host}:{c.port}"
        try:  # a port taken since check_free: the same one-line error, and no workers left behind
            if c.tls_cert_file:
                self.port = self.server.add_secure_port(
                    address, server_credentials(c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file)
                )
            else:
                self.port = self.server.add_insecure_port(address)
            if self.port == 0:
                raise RuntimeError(f"could not bind {address}")
        except RuntimeError:
            await self._close_pools()
            raise PortInUseError("gRPC", c.host, c.port, "--port") from None
        if c.health_port >= 0:
            await self._start_health_server()
        if c.metrics_port >= 0:
            try:
                self._metrics_http, _ = start_http_server(
                    c.metrics_port, addr=metrics_addr, registry=self.metrics.registry
                )
            except OSError as e:
                await self._close_pools()
                reason = "already in use" if e.errno == errno.EADDRINUSE else f"not bindable ({e.strerror})"
                raise PortInUseError("metrics", metrics_addr, c.metrics_port, "--metrics-port", reason) from None
            self.metrics_port = self._metrics_http.server_port
        # The port opens before the workers are warm, so probes can see NOT_SERVING meanwhile;
        # FeatureBank RPCs answer UNAVAILABLE until then.
        self.servicer = FeatureBankServicer(
            {},
            self.cache,
            self.metrics,
            storage_dtype=c.cache_dtype,
            max_items_per_request=c.max_items_per_request,
            stream_window=c.stream_window,
            heads=self.heads,
            claim_ttl_ms=c.claim_ttl_ms,
            head_limits=HeadLimits(c.head_parameters_limit, c.max_head_width),
            heads_cache_bytes=c.heads_cache_bytes,
            max_text_bytes=c.max_text_bytes,
            shared_cache_backbones=[b for b in c.shared_cache_backbones.split(",") if b],
            misses=self.engine.misses if self.engine is not None else self.engine_client,
            read_key_version_1=c.read_key_version_1,
        )
        featurebank_pb2_grpc.add_FeatureBankServicer_to_server(self.servicer, self.server)
        await self.server.start()
        if self.engine_client is not None:
            self._sampler = asyncio.ensure_future(self._sample_requests())
        self._write_port_file(ready=False)
        if self.engine is not None:
            ready = await self.engine.wait_ready()  # closes the pools if a backbone fails to load
            served = {name: ServedBackbone(info=b.info, batcher=b.batcher, pool=b.pool) for name, b in ready.items()}
        else:
            remote = await self.engine_client.wait_ready()
            served = {
                name: ServedBackbone(info=info, batcher=None, pool=RemotePool(self.engine_client, name))
                for name, info in remote.items()
            }
        infos = [b.info for b in served.values()]
        self.servicer.set_backbones(served)
        gc.freeze()  # start-up's objects leave the GC's view: shorter collections, fewer pauses in the p99 tail
        self._serving = True
        await self._update_health()
        for info in infos:
            logger.info(
                "serving %s (fingerprint %s, layers %s)",
                info.name,
                info.fingerprint[:12],
                ", ".join(l.name for l in info.layers),
            )
        logger.info(
            "%s listening on %s:%d, metrics on :%d%s, cache %s%s",
            "featurebank" if self.engine is not None else "frontend",  # a frontend's /metrics: the supervisor's
            c.host,
            self.port,
            self.metrics_port,
            f", health-only on :{self.health_port}" if self.health_port >= 0 else "",
            self.cache.name,
            f" ({self.embedded_cache.url})" if self.embedded_cache is not None else "",
        )
        self._write_port_file(ready=True)

    async def _sample_requests(self) -> None:
        """A frontend's RPC count, as its own series (pid label) of featurebank_frontend_requests.

        Sampled off the hot path: the interceptor already counts every RPC (featurebank_requests_total,
        summed over the frontends); this says which process answered how many.
        """
        while True:
            total = sum(
                s.value for m in self.metrics.requests.collect() for s in m.samples if s.name.endswith("_total")
            )
            self.metrics.frontend_requests.set(total)
            await asyncio.sleep(1.0)

    async def _start_health_server(self) -> None:
        """A plaintext port serving grpc.health.v1 alone (the same statuses as the gRPC port).

        The kubelet's gRPC probe speaks no TLS, and on the main port probes would count against
        maximum_concurrent_rpcs: a busy server would fail its liveness probe and be restarted.
        """
        c = self.config
        self.health_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", HEALTH_MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", HEALTH_MAX_CONCURRENT_RPCS),
            ],
            maximum_concurrent_rpcs=HEALTH_MAX_CONCURRENT_RPCS,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = self.health_server.add_insecure_port(f"{c.host}:{c.health_port}")
        if self.health_port == 0:
            raise OSError(f"could not bind the health port {c.host}:{c.health_port}")
        await self.health_server.start()

    def _write_port_file(self, ready: bool) -> None:
        if self.config.port_file:
            write_port_file(
                self.config.port_file,
                {"port": self.port, "metrics_port": self.metrics_port, "health_port": self.health_port, "ready": ready},
            )

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace period."""
        grace = self.config.grace_period_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self._sampler is not None:
            self._sampler.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self._close_pools()
        await self.cache.close()
        await self._stop_embedded_cache()  # after the drain: in-flight requests still wrote their features
        await self.heads.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self._stopped.set()

    async def _close_pools(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        else:
            await self.engine_client.close()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve(
    config: ServerConfig, *, engine_socket: str = "", cache_url: str = "", pod_limits: PodLimits | None = None
) -> int:
    """Run until SIGTERM/SIGINT, then drain and return the exit code (0).

    With ``--frontends N`` (N >= 2) this process is the supervisor of an engine process and N
    frontend processes (supervisor.py); ``engine_socket`` makes it one of those frontends.
    """
    if not engine_socket and config.frontend_count > 1:
        from featurebank.server.supervisor import Supervisor

        code = await Supervisor(config).run()
        # The last line: every process drained and gone.
        logger.info("featurebank stopped" + ("" if code == 0 else " (exit %d)"), *([code] if code else []))
        return code
    server = FeatureBankServer(config, engine_socket=engine_socket, cache_url=cache_url, pod_limits=pod_limits)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def _on_signal(sig: signal.Signals) -> None:
        if not stopping:
            logger.info("%s: draining (grace %.0fs)", sig.name, config.grace_period_s)
            stopping.append(loop.create_task(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig)
    try:
        await server.start()
    except Exception:
        if not stopping:
            raise
        # SIGTERM while the workers load (a rollout replacing a starting pod): the drain stopped
        # them, which ended the start-up; that is a requested stop, not a failure.
        logger.info("stopped while starting")
    await server.wait_closed()
    # The last line: drained, workers and ports closed (a frontend's is "frontend stopped").
    logger.info("frontend stopped" if engine_socket else "featurebank stopped")
    return 0
