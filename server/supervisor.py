"""``--frontends N``: one supervisor process starts the engine, then N gRPC frontends on one shared port.

The pod's processes: the supervisor (this; holds the ports, serves /metrics, restarts children),
one engine process (batchers, single-flight, worker pools; engine_server.py), N frontend
processes (grpc.aio; hash, read the cache, answer hits, send misses to the engine) and the
engine's workers. The shape of vLLM V1's API servers in front of one EngineCore, with gRPC's
own multiprocessing example for the port: the supervisor binds it with SO_REUSEPORT without
listening (so ``--port 0`` picks one port for all, and a restarted frontend finds it again), and
each frontend binds the same port with ``grpc.so_reuseport=1``: the kernel spreads connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time

from featurebank.engine.processes import describe_exit
from featurebank.server.config import ServerConfig, is_loopback
from featurebank.server.limits import PodLimits
from featurebank.server.ports import PortInUseError, write_port_file

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
ENGINE_MAX_CRASHES = 3  # engine deaths within ENGINE_CRASH_WINDOW_S before the pod gives up (exit 1)
ENGINE_CRASH_WINDOW_S = 300.0
FRONTEND_RESTART_DELAY_S = 0.5
ENGINE_STOP_TIMEOUT_S = 30.0
LOG_FORMAT = "%(asctime)s %(levelname)s {role} %(name)s: %(message)s"


# ------------------------------------------------------------------------------------- children


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies (PR_SET_PDEATHSIG): no orphans, even after a SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _child_logging(config: ServerConfig, role: str) -> None:
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT.format(role=role))


def engine_main(config: ServerConfig, socket_path: str, parent_pid: int, cache_url: str = "") -> None:
    """The engine process (spawned): run the Engine on the Unix socket until SIGTERM."""
    die_with_parent(parent_pid)
    _child_logging(config, "engine")
    from featurebank.server.engine_server import serve_engine

    asyncio.run(serve_engine(config, socket_path, cache_url))


def frontend_main(
    config: ServerConfig,
    socket_path: str,
    index: int,
    parent_pid: int,
    cache_url: str = "",
    pod_limits: PodLimits | None = None,
) -> None:
    """One frontend process (spawned): a FeatureBankServer whose misses go to the engine."""
    die_with_parent(parent_pid)
    _child_logging(config, f"frontend-{index}")
    from featurebank.server.app import serve

    asyncio.run(serve(config, engine_socket=socket_path, cache_url=cache_url, pod_limits=pod_limits))


class Child:
    """One supervised process; ``exited`` is resolved with its exit code when it ends."""

    _ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: never fork gRPC's threads

    def __init__(self, role: str, index: int, target, args: tuple):
        self.role, self.index, self.target, self.args = role, index, target, args
        self.process: multiprocessing.process.BaseProcess | None = None
        self.exited: asyncio.Future | None = None

    @property
    def name(self) -> str:
        return self.role if self.index < 0 else f"{self.role}-{self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Not a daemon: the engine spawns workers of its own. Orphans are prevented by PDEATHSIG.
        self.process = self._ctx.Process(target=self.target, args=self.args, name=f"featurebank-{self.name}")
        self.process.start()
        self.exited = loop.create_future()
        sentinel = self.process.sentinel
        loop.add_reader(sentinel, self._on_exit, loop, sentinel)

    def _on_exit(self, loop: asyncio.AbstractEventLoop, sentinel: int) -> None:
        loop.remove_reader(sentinel)
        self.process.join()
        if not self.exited.done():
            self.exited.set_result(self.process.exitcode)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)

    async def stop(self, sig: int, timeout_s: float) -> int | None:
        """Signal it and wait for its exit; SIGKILL after timeout_s."""
        if self.exited is None:
            return None
        self.signal(sig)
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
        except asyncio.TimeoutError:
            logger.error("%s (pid %d) did not stop within %.0fs; killing it", self.name, self.pid, timeout_s)
            self.signal(signal.SIGKILL)
            return await self.exited


# ------------------------------------------------------------------------------------- ports


def reserve_port(what: str, host: str, port: int, flag: str) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT, not listening: the port is ours (0 = a free one) and the
    frontends bind it too. PortInUseError when another program holds it."""
    bind_host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bind_host or "::", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        s = socket.socket(family, kind, proto)
    except OSError as e:
        raise PortInUseError(what, host, port, flag, f"not bindable ({e})") from None
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(address)
    except OSError as e:
        s.close()
        raise PortInUseError(what, host, port, flag, "already in use" if port else f"not bindable ({e})") from None
    return s


# ------------------------------------------------------------------------------------- supervisor


class Supervisor:
    """Starts the engine (workers load first), then the frontends; restarts what dies; drains on SIGTERM.

    A frontend that dies is restarted at once (its port is still held here). An engine that dies
    takes every frontend to NOT_SERVING (misses answer UNAVAILABLE, hits are still served) and is
    restarted; after ENGINE_MAX_CRASHES within ENGINE_CRASH_WINDOW_S the pod drains and exits 1, so
    Kubernetes restarts it whole.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.count = config.frontend_count
        self.run_dir = tempfile.mkdtemp(prefix="featurebank-run-")  # 0700: the engine socket lives here
        self.socket_path = os.path.join(self.run_dir, "engine.sock")
        self.metrics_dir = os.path.join(self.run_dir, "metrics")
        os.mkdir(self.metrics_dir)
        self.port = self.health_port = self.metrics_port = -1
        self.engine: Child | None = None
        self.frontends: list[Child] = []
        self._reserved: list[socket.socket] = []
        self._metrics_http = None
        self._stopping = False
        self._ready = False  # every frontend served once: from then on, what dies is restarted
        self._done = asyncio.Event()
        self._exit_code = 0
        self._engine_crashes: collections.deque[float] = collections.deque()
        self._tasks: set[asyncio.Task] = set()
        self.embedded_cache = None  # the pod's embedded cache (--cache embedded), started by _with_shared_cache
        self.cache_url = ""  # ... and its unix:// URL, given to the engine and every frontend
        self._embedded_watch: asyncio.Future | None = None

    def _frontend_config(self, index: int) -> ServerConfig:
        return dataclasses.replace(
            self.config,
            frontends="1",
            port=self.port,
            health_port=self.health_port,
            metrics_port=-1,  # the supervisor serves the pod's one /metrics
            port_file=os.path.join(self.run_dir, f"frontend-{index}.json"),
        )

    def _new_engine(self) -> Child:
        return Child("engine", -1, engine_main, (self.config, self.socket_path, os.getpid(), self.cache_url))

    def _new_frontend(self, index: int) -> Child:
        cfg = self._frontend_config(index)
        # The tenants' limits hold for the pod: every frontend counts them in one file of the run dir.
        pod_limits = PodLimits(os.path.join(self.run_dir, "tenant-limits"), index, self.count)
        args = (cfg, self.socket_path, index, os.getpid(), self.cache_url, pod_limits)
        return Child("frontend", index, frontend_main, args)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit code 0) or until the engine keeps dying (1)."""
        c = self.config
        # Before any child starts, so each one's prometheus_client writes its values here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self.config = self._with_shared_cache(self.config)
            self._reserve_ports()
            self._start_metrics()
            self.engine = self._new_engine()
            self._start(self.engine)  # workers load while the frontends start
            self.frontends = [self._new_frontend(i) for i in range(self.count)]
            for f in self.frontends:
                self._start(f)
            self._write_port_file(ready=False)
            ready = asyncio.ensure_future(self._wait_ready())
            stopped = asyncio.ensure_future(self._done.wait())
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if not self._stopping:
                self._ready = True
                self._write_port_file(ready=True)
                logger.info(
                    "featurebank listening on %s:%d with %d frontends (pids %s) and an engine (pid %d), "
                    "metrics on :%d%s",
                    c.host,
                    self.port,
                    self.count,
                    ", ".join(str(f.pid) for f in self.frontends),
                    self.engine.pid,
                    self.metrics_port,
                    f", health-only on :{self.health_port}" if self.health_port >= 0 else "",
                )
            await self._done.wait()
        finally:
            await self._stop_all()
        return self._exit_code

    def _with_shared_cache(self, config: ServerConfig) -> ServerConfig:
        """Start the cache the frontends and the engine share, when it is the pod's own.

        With --redis-url every child connects there. With the embedded cache (the default) this
        process starts one valkey for the pod, before any child (a failure costs no model loading),
        restarts it if it dies while serving, and stops it after the engine (_stop_all); every child
        gets its unix:// URL. ServerConfig refuses N >= 2 with --cache memory.
        """
        if config.cache_kind == "embedded":
            from featurebank.server.embedded_cache import EmbeddedCache

            self.embedded_cache = EmbeddedCache.from_config(config)
            self.cache_url = self.embedded_cache.start()  # in the main thread: valkey dies with it
            self._embedded_watch = asyncio.ensure_future(self.embedded_cache.supervise())
        return config

    def _reserve_ports(self) -> None:
        c = self.config
        grpc_socket = reserve_port("gRPC", c.host, c.port, "--port")
        self._reserved.append(grpc_socket)
        self.port = grpc_socket.getsockname()[1]
        if c.health_port >= 0:
            health_socket = reserve_port("health", c.host, c.health_port, "--health-port")
            self._reserved.append(health_socket)
            self.health_port = health_socket.getsockname()[1]

    def _start_metrics(self) -> None:
        c = self.config
        if c.metrics_port < 0:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)  # sums every process's files on each scrape
        addr = "127.0.0.1" if is_loopback(c.host) else "0.0.0.0"
        try:
            self._metrics_http, _ = start_http_server(c.metrics_port, addr=addr, registry=registry)
        except OSError as e:
            raise PortInUseError("metrics", addr, c.metrics_port, "--metrics-port", f"not bindable ({e})") from None
        self.metrics_port = self._metrics_http.server_port

    def _start(self, child: Child) -> None:
        child.start()
        child.exited.add_done_callback(lambda fut, child=child: self._on_exit(child, fut.result()))

    async def _wait_ready(self) -> None:
        """Until every frontend's port file says ready (each has the engine's backbones, SERVING)."""
        while True:
            if all(self._frontend_ready(i) for i in range(self.count)):
                return
            await asyncio.sleep(0.05)

    def _frontend_ready(self, index: int) -> bool:
        try:
            with open(os.path.join(self.run_dir, f"frontend-{index}.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return False
        return bool(state.get("ready")) and state.get("pid") == self.frontends[index].pid

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stopping:
            logger.info(
                "%s: draining %d frontends, then the engine (grace %.0fs)",
                sig.name,
                self.count,
                self.config.grace_period_s,
            )
            self._stopping = True
            self._done.set()

    def _on_exit(self, child: Child, code: int | None) -> None:
        if self._stopping:
            return
        self._mark_dead(child.pid)
        if not self._ready:  # a bad backbone, a TLS file, ...: it said why; restarting would say it again
            logger.error(
                "%s (pid %d) exited during start-up (%s); stopping", child.name, child.pid, describe_exit(code)
            )
            self._exit_code = 1
            self._stopping = True
            self._done.set()
            return
        if child.role == "frontend":
            # Said by its exit code: -9 is a SIGKILL (the OOM killer?), 1 an exception it logged.
            logger.error("%s (pid %d) died (%s); restarting it", child.name, child.pid, describe_exit(code))
            self._spawn_later(self._restart_frontend(child.index))
            return
        now = time.monotonic()
        self._engine_crashes.append(now)
        while self._engine_crashes and now - self._engine_crashes[0] > ENGINE_CRASH_WINDOW_S:
            self._engine_crashes.popleft()
        if len(self._engine_crashes) > ENGINE_MAX_CRASHES:
            logger.error(
                "the engine (pid %d) died (%s), %d times in %.0fs: stopping the pod (exit 1) for Kubernetes to restart",
                child.pid,
                describe_exit(code),
                len(self._engine_crashes),
                ENGINE_CRASH_WINDOW_S,
            )
            self._exit_code = 1
            self._stopping = True
            self._done.set()
            return
        logger.error(
            "the engine (pid %d) died (%s); frontends are NOT_SERVING until it is back; restarting it",
            child.pid,
            describe_exit(code),
        )
        self.engine = self._new_engine()
        self._start(self.engine)
        self._write_port_file(ready=True)

    async def _restart_frontend(self, index: int) -> None:
        await asyncio.sleep(FRONTEND_RESTART_DELAY_S)  # a frontend failing at start-up does not spin
        if self._stopping:
            return
        child = self._new_frontend(index)
        self.frontends[index] = child
        self._start(child)
        while not self._stopping and not self._frontend_ready(index):
            await asyncio.sleep(0.05)
        if not self._stopping:
            logger.info("frontend-%d is back (pid %d)", index, child.pid)
            self._write_port_file(ready=True)

    def _spawn_later(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _mark_dead(self, pid: int | None) -> None:
        """Its live gauges leave the scrape (prometheus-client's multiprocess clean-up for a dead pid)."""
        if pid is None:
            return
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.metrics_dir)

    async def _stop_all(self) -> None:
        """Drain in order: frontends (stop accepting, finish in-flight RPCs), then the engine (and its workers)."""
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        grace_s = self.config.grace_period_s + 10.0
        codes = await asyncio.gather(*(f.stop(signal.SIGTERM, grace_s) for f in self.frontends))
        for f, code in zip(self.frontends, codes):
            if code not in (0, None):
                logger.warning("%s (pid %d) exited %s while draining", f.name, f.pid, describe_exit(code))
        if self.engine is not None:
            code = await self.engine.stop(signal.SIGTERM, ENGINE_STOP_TIMEOUT_S)
            if code not in (0, None):
                logger.warning("the engine (pid %d) exited %s while stopping", self.engine.pid, describe_exit(code))
        if self._embedded_watch is not None:
            self._embedded_watch.cancel()  # before stopping valkey, or it would be restarted
        if self.embedded_cache is not None:
            await asyncio.to_thread(self.embedded_cache.stop)  # after the engine's last writes; it snapshots
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        for s in self._reserved:
            s.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _write_port_file(self, ready: bool) -> None:
        if self.config.port_file:
            write_port_file(
                self.config.port_file,
                {
                    "port": self.port,
                    "metrics_port": self.metrics_port,
                    "health_port": self.health_port,
                    "ready": ready,
                    "engine_pid": self.engine.pid if self.engine is not None else None,
                    "frontend_pids": [f.pid for f in self.frontends],
                },
            )
