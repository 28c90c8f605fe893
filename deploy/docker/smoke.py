"""Builds the CPU image, runs it the way deploy/k8s runs a pod, and checks it against a server outside it.

    python deploy/docker/smoke.py [--base-image IMAGE] [--gpu] [--no-build]

Run from the repository's venv (`pip install -e '.[server,test]'`: the SDK, the server that runs
outside the container for the comparison, and the bundled Redis-protocol server). Steps:

1. build deploy/docker/Dockerfile.cpu (with ``--gpu`` also Dockerfile.gpu, then ask its TensorFlow,
   on this CPU, what it sees);
2. render the cpu overlay (``kubectl kustomize``) and run the image as its pod spec says: the
   ConfigMap's env, the Secrets' values (two real Redis-protocol servers on the host, each with a
   password: the cache's, and the heads' with maxmemory-policy noeviction and appendonly as
   components/heads-redis; and the featurebank-tokens tenants file, mounted read-only with the
   volume's defaultMode as FEATUREBANK_TOKENS_FILE), the numeric
   non-root user, a read-only root filesystem, all capabilities dropped, no privilege
   escalation, the memory limit, and a writable volume only where the pod mounts one;
3. wait for gRPC health SERVING where the probes ask: each probe's port (the plaintext health
   port) and service;
4. extract features for images and texts with the SDK and the tenant's token, twice (the second
   call must be all cache hits), put a served head and predict with it (the head must land in the
   heads Redis), scrape /metrics, and check that only the pod's volumes are writable;
5. run the preStop hook, send SIGTERM, and check the drain: the log line, exit code 0, within
   terminationGracePeriodSeconds;
6. start a featurebank server outside the container, from this checkout, with the same settings,
   and compare: same backbone fingerprints, features equal bit for bit (float32), the same
   served head's probabilities equal.

Prints the image sizes, the build time and the time to SERVING. Exits non-zero on any failure.
The engine is $SMOKE_ENGINE (a command line, e.g. ``podman --root /var/tmp/podman``), else
``podman`` or ``docker``, whichever answers ``info``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import resource
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.support: the suite's own Redis-protocol server and server process
sys.path.insert(0, str(REPO / "tests"))  # head_protos: a hand-built served head (no Keras training here)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from podspec import PodSpec, PodSpecError, kubernetes_bytes, render_overlay  # noqa: E402

log = logging.getLogger("smoke")

CPU_TAG = "localhost/featurebank:smoke-cpu"
GPU_TAG = "localhost/featurebank:smoke-gpu"
IMAGES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.png")
TEXTS = ("a cat sleeping on a sofa", "the rocket lifts off at dawn", "freshly ground coffee beans")
# The Secrets the smoke plays the part of: the pod reads the Redis URLs from them (deploy/README.md, step 2).
REDIS_SECRET = "featurebank-redis"
HEADS_REDIS_SECRET = "featurebank-heads-redis"
# The heads Redis as components/heads-redis configures it: the server refuses heads in an
# allkeys-* Redis, and warns about one that neither appends nor snapshots.
HEAD_NAME = "smoke-head"
HEADS_REDIS_ARGS = ("--maxmemory", "512mb", "--maxmemory-policy", "noeviction", "--appendonly", "yes")
# Where the tenants file is mounted when the manifests do not mount one themselves.
DEFAULT_TOKENS_FILE = "/var/run/secrets/featurebank/tokens.json"
# podman asks the runtime for these limits; a host whose hard limits are lower (a sandboxed VM)
# refuses to start the container ("error setting rlimit"). There, runc was refused even some
# process limits below the hard limit (65536 of 96363), but not 32768.
PODMAN_DEFAULT_LIMITS = {"nofile": 1048576, "nproc": 4194304}
PODMAN_MAX_NPROC = 32768


class SmokeError(RuntimeError):
    """A check failed: the message says which and what was seen."""


# ---------------------------------------------------------------- the engine


def engine_command() -> tuple[list[str] | None, str]:
    """(engine command, "") if a container engine answers here, else (None, why not)."""
    configured = os.environ.get("SMOKE_ENGINE", "").strip()
    candidates = [shlex.split(configured)] if configured else [["podman"], ["docker"]]
    reasons = []
    for command in candidates:
        if not shutil.which(command[0]):
            reasons.append(f"{command[0]}: not installed")
            continue
        try:
            info = subprocess.run([*command, "info"], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            reasons.append(f"{command[0]} info: no answer in 120 s")
            continue
        if info.returncode == 0:
            return command, ""
        last = (info.stderr.strip().splitlines() or ["?"])[-1]
        reasons.append(f"{' '.join(command)} info: exit {info.returncode}: {last}")
    return None, "; ".join(reasons)


def is_podman(engine: list[str]) -> bool:
    return os.path.basename(engine[0]).startswith("podman")


def limit_args(engine: list[str]) -> list[str]:
    """--ulimit flags within this host's hard limits, where podman's defaults exceed them (a sandbox)."""
    if not is_podman(engine):
        return []
    args = []
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(limit)[1]
        if hard == resource.RLIM_INFINITY or hard >= PODMAN_DEFAULT_LIMITS[name]:
            continue
        value = min(hard, PODMAN_MAX_NPROC) if name == "nproc" else hard
        args += ["--ulimit", f"{name}={value}:{value}"]
    return args


def run(command: list[str], timeout_s: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise SmokeError(
            f"{shlex.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def build(engine: list[str], flavour: str, tag: str, base_image: str | None) -> float:
    """Build deploy/docker/Dockerfile.<flavour> from the repository root; returns the seconds it took."""
    command = [
        *engine,
        "build",
        "-f",
        f"deploy/docker/Dockerfile.{flavour}",
        "-t",
        tag,
        "--network",
        "host",
        *limit_args(engine),
    ]
    if is_podman(engine):
        # podman's default, the OCI format, drops HEALTHCHECK; docker's format keeps it, as `docker build` does.
        command += ["--format", "docker"]
    if base_image:
        command += ["--build-arg", f"BASE_IMAGE={base_image}"]
    log.info("building %s: %s", tag, shlex.join(command))
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        code = subprocess.run(
            [*command, str(REPO)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=3600
        ).returncode
        out.seek(0)
        text = out.read()
    if code != 0:
        raise SmokeError(f"building {tag} failed (exit {code}):\n{text[-6000:]}")
    seconds = time.monotonic() - start
    steps = [line for line in text.splitlines() if re.search(r"efficientnet_lite0 \w+ ->|^minilm \w+ ", line)]
    for line in steps:
        log.info("build: %s", line.strip())
    log.info("built %s in %.0f s, %s", tag, seconds, image_size(engine, tag))
    return seconds


def image_size(engine: list[str], tag: str) -> str:
    size = int(run([*engine, "image", "inspect", "--format", "{{.Size}}", tag]).stdout.strip())
    return f"{size / 1e9:.2f} GB ({size} bytes)"


# ---------------------------------------------------------------- the run


def tenants_json(token: str, secret: str) -> str:
    return json.dumps({"tenants": {"smoke": {"tokens": [token], "secret": secret, "backbones": ["*"], "heads": ["*"]}}})


def health(target: str, service: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as e:
            return e.code().name


def extract_twice(target: str, token: str) -> dict:
    """Fingerprints, then the images and texts extracted twice: misses, then hits (checked); then a served head."""
    from featurebank.client import FeatureBank

    data = REPO / "tests" / "data"
    images = [(data / name).read_bytes() for name in IMAGES]
    result: dict = {}
    with FeatureBank(target, token=token) as bank:
        result["fingerprints"] = {b.name: b.fingerprint for b in bank.backbones()}
        for call in ("first", "second"):
            for backbone, inputs in (("efficientnet_lite0", images), ("minilm", list(TEXTS))):
                outcomes = bank.extract_items(inputs, backbone=backbone)
                errors = [o.error for o in outcomes if o.error]
                if errors:
                    raise SmokeError(f"{backbone} {call} call: item errors {errors}")
                hits = sum(o.cache_hit for o in outcomes)
                expected = 0 if call == "first" else len(inputs)
                if hits != expected:
                    raise SmokeError(f"{backbone} {call} call: {hits} cache hits of {len(inputs)}, expected {expected}")
                import numpy as np

                result[(call, backbone)] = np.stack([o.features for o in outcomes])
        result["head"] = served_head(bank, target, token, result["fingerprints"]["efficientnet_lite0"], images)
    return result


def served_head(bank, target: str, token: str, fingerprint: str, images: list[bytes]):
    """PutHead (stored in the heads Redis, which the server checked at start) then Predict; the probabilities."""
    import numpy as np
    from head_protos import Stub, dense_head

    from featurebank.v1 import featurebank_pb2 as pb

    dim = bank.extract_items(images[:1], backbone="efficientnet_lite0")[0].features.shape[-1]
    head = dense_head(HEAD_NAME, fingerprint, widths=(dim, 3), backbone="efficientnet_lite0", layer="pooled")
    stub = Stub(target, token)
    try:
        version = stub.PutHead(pb.PutHeadRequest(head=head)).version
    finally:
        stub.channel.close()
    predictions = bank.predict(HEAD_NAME, images)
    errors = [p.error for p in predictions if p.error]
    if errors or version != 1:
        raise SmokeError(f"served head {HEAD_NAME!r}: PutHead version {version} (expected 1), item errors {errors}")
    return np.stack([p.probabilities for p in predictions])


def scrape(metrics_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{result=" + s.labels["result"] + "}" if "result" in s.labels else "")
            totals[key] = totals.get(key, 0.0) + s.value
    return totals


class Smoke:
    """One smoke run: the Redis-protocol server, the tenants file, the container and its checks."""

    def __init__(self, engine: list[str], workdir: pathlib.Path, overrides: dict[str, str]):
        from tests.support import RedisProcess

        self.engine = engine
        self.overrides = overrides  # env over the ConfigMap's, in the container and outside it alike
        self.workdir = workdir
        self.token, self.tenant_secret = secrets.token_hex(16), secrets.token_hex(16)
        # The pod's two Redis (the cache's and the heads'): real Redis-protocol servers, each with
        # its own password, reached from the container through the host's loopback (podman's
        # slirp4netns) or the host gateway (docker).
        bind = "127.0.0.1" if is_podman(engine) else "0.0.0.0"

        class PasswordRedis(RedisProcess):
            def __init__(self, extra_args: tuple[str, ...] = ()):
                self.password = secrets.token_hex(16)
                super().__init__(extra_args=("--requirepass", self.password, "--bind", bind, *extra_args))

            def ping(self) -> bool:
                import redis

                try:
                    return bool(redis.Redis(port=self.port, password=self.password, socket_timeout=0.5).ping())
                except Exception:
                    return False

            def client_with_password(self, db: int):
                import redis

                return redis.Redis(port=self.port, db=db, password=self.password, socket_timeout=5)

            def url_from(self, host: str, db: int) -> str:
                return f"redis://:{self.password}@{host}:{self.port}/{db}"

        self.redis = PasswordRedis().start()
        self.heads_redis = PasswordRedis(HEADS_REDIS_ARGS).start()
        self.name = f"featurebank-smoke-{os.getpid()}"
        self.results: dict = {}

    def secret_values(self, host: str | None = None, db: int = 0) -> dict[str, dict[str, str]]:
        """The Secrets' values, with the Redis URLs as seen from ``host`` (default: from the container)."""
        host = host or ("10.0.2.2" if is_podman(self.engine) else "host.docker.internal")
        return {
            REDIS_SECRET: {"url": self.redis.url_from(host, db), "password": self.redis.password},
            HEADS_REDIS_SECRET: {"url": self.heads_redis.url_from(host, db), "password": self.heads_redis.password},
        }

    def network_args(self, spec: PodSpec) -> tuple[list[str], dict[str, int]]:
        """A network namespace of its own (like a pod's), its ports published on free loopback ports."""
        from tests.support import free_port

        ports = {name: free_port() for name in spec.port_names()}
        if is_podman(self.engine):
            args = ["--network", "slirp4netns:allow_host_loopback=true"]
        else:
            args = ["--add-host", "host.docker.internal:host-gateway"]
        for name, host_port in ports.items():
            args += ["-p", f"127.0.0.1:{host_port}:{spec.port(name)}"]
        return args, ports

    def volume_args(self, spec: PodSpec, env: dict[str, str]) -> list[str]:
        """Writable emptyDirs, read-only Secrets (the tenants file where FEATUREBANK_TOKENS_FILE points)."""
        args: list[str] = []
        tokens_file = env.get("FEATUREBANK_TOKENS_FILE", "")
        for volume, mount in spec.volumes():
            target = mount["mountPath"]
            if "emptyDir" in volume:
                size = volume["emptyDir"].get("sizeLimit")
                options = "rw,exec,mode=1777" + (f",size={kubernetes_bytes(size)}" if size else "")
                args += ["--tmpfs", f"{target}:{options}"]
            elif "secret" in volume or "configMap" in volume:
                host_dir = self.workdir / volume["name"]
                host_dir.mkdir(mode=0o755)
                if "configMap" in volume:
                    for key, value in spec.configmaps[volume["configMap"]["name"]].items():
                        (host_dir / key).write_text(value)
                if tokens_file.startswith(target.rstrip("/") + "/"):
                    # As the kubelet writes a Secret volume: its defaultMode, group fsGroup.
                    mode = volume.get("secret", {}).get("defaultMode", 0o644)
                    self._write_tokens(host_dir / os.path.relpath(tokens_file, target), mode, spec.fs_group())
                args += ["-v", f"{host_dir}:{target}:ro"]
            else:
                raise SmokeError(f"volume {volume['name']!r}: smoke.py knows emptyDir, secret and configMap only")
        if not tokens_file:
            # Today's manifests serve without tokens; run as the README's "Security and tenants"
            # says to, with a tenants file mounted read-only, so tokens are exercised either way.
            host_dir = self.workdir / "tokens"
            host_dir.mkdir(mode=0o755)
            self._write_tokens(host_dir / os.path.basename(DEFAULT_TOKENS_FILE))
            args += ["-v", f"{host_dir}:{os.path.dirname(DEFAULT_TOKENS_FILE)}:ro"]
            env["FEATUREBANK_TOKENS_FILE"] = DEFAULT_TOKENS_FILE
        return args

    def _write_tokens(self, path: pathlib.Path, mode: int = 0o644, group: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_text(tenants_json(self.token, self.tenant_secret))
        if group is not None and os.geteuid() == 0:
            os.chown(path, 0, group)  # only root may give a file away; else the mode must allow "other"
        elif not mode & 0o004:
            mode |= 0o004
        path.chmod(mode)

    def run_container(self, spec: PodSpec, tag: str) -> None:
        env = {**spec.env(self.secret_values()), **self.overrides}
        self.cache_dtype = env.get("FEATUREBANK_CACHE_DTYPE", "float32")
        volumes = self.volume_args(spec, env)
        network, self.ports = self.network_args(spec)
        read_only_extra = (
            ["--read-only-tmpfs=false"] if is_podman(self.engine) else []
        )  # podman adds /tmp, /run otherwise
        env_file = self.workdir / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        env_file.chmod(0o600)
        command = [
            *self.engine,
            "run",
            "-d",
            "--name",
            self.name,
            *limit_args(self.engine),
            *spec.security_args(),
            *read_only_extra,
            *network,
            *volumes,
            "--env-file",
            str(env_file),
            tag,
        ]
        shown = {k: ("<secret>" if k.endswith("REDIS_URL") else v) for k, v in sorted(env.items())}
        log.info("env: %s", " ".join(f"{k}={v}" for k, v in shown.items()))
        log.info("running: %s", shlex.join(command))
        self.started = time.monotonic()
        run(command, timeout_s=300)

    def wait_serving(self, spec: PodSpec, timeout_s: float) -> float:
        """Until every probe's (port, service) answers SERVING, asked where the kubelet asks: the probe's port."""
        probes = spec.probes()
        deadline = self.started + timeout_s
        while True:
            status = {(port, s): health(f"127.0.0.1:{self.ports[spec.port_name(port)]}", s) for port, s in probes}
            if all(v == "SERVING" for v in status.values()):
                seconds = time.monotonic() - self.started
                log.info(
                    "health SERVING (probes %s) %.1f s after `run`",
                    ", ".join(f"{port}/{s or '(server)'}" for port, s in probes),
                    seconds,
                )
                return seconds
            state = run([*self.engine, "inspect", "--format", "{{.State.Status}}", self.name]).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                raise SmokeError(
                    f"not SERVING (container {state}, health {status}) after "
                    f"{time.monotonic() - self.started:.0f} s:\n{self.logs()[-6000:]}"
                )
            time.sleep(1)

    def check_heads_redis(self, db: int) -> None:
        """The head the container stored is in the heads Redis (the Secret's), not the cache's Redis."""
        heads = sorted(k.decode() for k in self.heads_redis.client_with_password(db).scan_iter("fbheads:*"))
        stray = list(self.redis.client_with_password(db).scan_iter("fbheads:*"))
        log.info("heads Redis (noeviction, password) db %d: %d fbheads keys, e.g. %s", db, len(heads), heads[:2])
        if not any(HEAD_NAME in k for k in heads) or stray:
            raise SmokeError(f"head {HEAD_NAME!r} not (only) in the heads Redis: heads {heads}, cache Redis {stray}")

    def check_docker_healthcheck(self) -> None:
        """The image's HEALTHCHECK (Docker's, not the kubelet's probes) passes in the pod's env, where podman can run it."""
        if not is_podman(self.engine):
            return
        out = run([*self.engine, "healthcheck", "run", self.name], check=False, timeout_s=60)
        answer = (out.stdout + out.stderr).strip() or "healthy"
        log.info("the image's HEALTHCHECK (podman healthcheck run): exit %d, %s", out.returncode, answer)
        if out.returncode != 0:
            raise SmokeError(f"the image's HEALTHCHECK failed on a SERVING container: exit {out.returncode}: {answer}")

    def logs(self) -> str:
        out = run([*self.engine, "logs", self.name], check=False)
        return out.stdout + out.stderr

    def check_metrics(self) -> None:
        totals = scrape(f"http://127.0.0.1:{self.ports['metrics']}/metrics")
        hits = totals.get("featurebank_items_total{result=hit}", 0.0)
        ready = totals.get("featurebank_workers_ready", 0.0)
        log.info(
            "/metrics: featurebank_items_total hit=%d miss=%d, featurebank_workers_ready=%d, "
            "featurebank_requests_total=%d",
            hits,
            totals.get("featurebank_items_total{result=miss}", 0.0),
            ready,
            totals.get("featurebank_requests_total", 0.0),
        )
        if hits < len(IMAGES) + len(TEXTS) or ready < 2:
            raise SmokeError(f"/metrics: expected >= {len(IMAGES) + len(TEXTS)} hits and 2 ready workers, saw {totals}")

    def check_writable_paths(self, spec: PodSpec) -> None:
        """As the pod's user, only the pod's volumes are writable: not /, $HOME, the venv, /var/tmp or /run."""
        writable = sorted(m["mountPath"] for v, m in spec.volumes() if "emptyDir" in v)
        seen = {}
        for path in ("/", "/home/featurebank", "/opt/featurebank/weights", "/var/tmp", "/run", *writable):
            probe = f"{path.rstrip('/')}/.smoke-write-probe"
            out = run([*self.engine, "exec", self.name, "sh", "-c", f"touch {probe} && rm {probe}"], check=False)
            seen[path] = out.returncode == 0
        log.info("writable as the pod's user: %s", ", ".join(f"{p} {'yes' if w else 'no'}" for p, w in seen.items()))
        wrong = [p for p, w in seen.items() if w != (p in writable)]
        if wrong:
            raise SmokeError(f"writability differs from the pod spec's (only {writable} writable) at {wrong}")

    def drain(self, spec: PodSpec) -> None:
        pre_stop = spec.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if pre_stop:
            log.info("preStop: %s", shlex.join(pre_stop))
            run([*self.engine, "exec", self.name, *pre_stop], timeout_s=spec.grace_s)
        start = time.monotonic()
        run([*self.engine, "kill", "--signal", "TERM", self.name])
        waited = run([*self.engine, "wait", self.name], timeout_s=spec.grace_s + 30, check=False)
        seconds = time.monotonic() - start
        code = waited.stdout.strip().splitlines()[-1] if waited.stdout.strip() else "?"
        logs = self.logs()
        log.info("container log (last 15 lines):\n%s", "\n".join(logs.strip().splitlines()[-15:]))
        if code != "0":
            raise SmokeError(f"exit code {code} after SIGTERM (expected 0):\n{logs[-4000:]}")
        if "SIGTERM: draining" not in logs:
            raise SmokeError("no 'SIGTERM: draining' line in the log")
        if seconds > spec.grace_s:
            raise SmokeError(f"took {seconds:.0f} s to exit, over terminationGracePeriodSeconds {spec.grace_s:.0f}")
        for bad in ("Read-only file system", "Permission denied", "Traceback"):
            if bad in logs:
                raise SmokeError(f"{bad!r} in the container's log:\n{logs[-4000:]}")
        log.info("SIGTERM: drained and exited 0 in %.1f s (grace %.0f s)", seconds, spec.grace_s)

    def remove(self) -> None:
        run([*self.engine, "rm", "-f", self.name], check=False)

    def host_server(self, spec: PodSpec) -> dict:
        """The same settings served outside the container, from this checkout; its features."""
        from tests.support import ServerProcess

        env = {**spec.env(self.secret_values("127.0.0.1", 1)), **self.overrides}
        tokens = self.workdir / "host-tokens.json"
        tokens.write_text(tenants_json(self.token, self.tenant_secret))
        env.update(FEATUREBANK_TOKENS_FILE=str(tokens))
        for name in ("FEATUREBANK_PORT", "FEATUREBANK_METRICS_PORT"):
            env.pop(name, None)  # ServerProcess picks free ports
        if "FEATUREBANK_HEALTH_PORT" in env:
            env["FEATUREBANK_HEALTH_PORT"] = "0"  # a free one: 50052 may be taken on this machine
        server = ServerProcess(env=env)
        try:
            server.start(timeout_s=900)
            log.info("host server SERVING on %s", server.target)
            features = extract_twice(server.target, self.token)
            self.check_heads_redis(1)
            return features
        finally:
            code = server.terminate()
            if code != 0:
                raise SmokeError(f"the host server exited {code}:\n{server.log()[-4000:]}")

    def close(self) -> None:
        self.remove()
        self.redis.stop()
        self.heads_redis.stop()


def versions(engine: list[str], tag: str) -> dict[str, str]:
    """TensorFlow, Keras, numpy and Python in the image (no TensorFlow import: metadata only)."""
    script = (
        "import importlib.metadata as m, json, platform; print(json.dumps({**{p: m.version(p) for p in "
        "('tensorflow', 'keras', 'numpy', 'keras-hub', 'tokenizers', 'pillow')}, 'python': platform.python_version()}))"
    )
    out = run(
        [*engine, "run", "--rm", *limit_args(engine), "--network", "none", "--entrypoint", "python", tag, "-c", script]
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def host_versions() -> dict[str, str]:
    import importlib.metadata as m
    import platform

    return {
        **{p: m.version(p) for p in ("tensorflow", "keras", "numpy", "keras-hub", "tokenizers", "pillow")},
        "python": platform.python_version(),
    }


def compare(container: dict, host: dict, cache_dtype: str) -> None:
    import numpy as np

    if container["fingerprints"] != host["fingerprints"]:
        raise SmokeError(f"fingerprints differ: container {container['fingerprints']} host {host['fingerprints']}")
    log.info("fingerprints equal: %s", {k: v[:12] for k, v in container["fingerprints"].items()})
    differences = []
    for key in sorted(k for k in container if isinstance(k, tuple)):
        a, b = container[key], host[key]
        same = (
            a.dtype == b.dtype == np.float32
            and a.shape == b.shape
            and np.array_equal(a.view(np.uint32), b.view(np.uint32))
        )
        diff = (
            float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.shape == b.shape else float("inf")
        )
        log.info(
            "%s call, %s: %s %s, bit-for-bit %s (max abs diff %.3g)",
            key[0],
            key[1],
            a.shape,
            a.dtype,
            "EQUAL" if same else "DIFFERENT",
            diff,
        )
        if not same:
            differences.append(f"{key}: max abs diff {diff:.3g}")
    for backbone in ("efficientnet_lite0", "minilm"):
        first, second = container[("first", backbone)], container[("second", backbone)]
        log.info(
            "%s: miss vs hit in the container: max abs diff %.3g (the cache stores %s)",
            backbone,
            float(np.max(np.abs(first - second))),
            cache_dtype,
        )
    a, b = container["head"], host["head"]
    head_diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.shape == b.shape else 1.0
    log.info(
        "served head %r on %d images: probabilities %s, identical to the host's: %s (max abs diff %.3g)",
        HEAD_NAME,
        len(a),
        a.dtype,
        "yes" if a.shape == b.shape and np.array_equal(a, b) else "no",
        head_diff,
    )
    if head_diff > 1e-5:  # the head runs on features equal above; numpy/BLAS may differ in the last bits
        differences.append(f"served head: max abs diff {head_diff:.3g}")
    if cache_dtype != "float32":
        log.info(
            "note: with FEATUREBANK_CACHE_DTYPE=%s every feature is rounded to %s before it is returned (misses "
            "too), so equality here is at that resolution; --cache-dtype float32 compares the computed values",
            cache_dtype,
            cache_dtype,
        )
    if differences:
        raise SmokeError("container and host features differ: " + "; ".join(differences))


def gpu_check(engine: list[str], tag: str) -> None:
    """The GPU image's TensorFlow, on a machine without a GPU, imports and says it sees none."""
    script = (
        "import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); "
        "print(f'TensorFlow {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()}, GPUs visible: {len(gpus)}')"
    )
    out = run(
        [
            *engine,
            "run",
            "--rm",
            *limit_args(engine),
            "--network",
            "none",
            "--user",
            "10001:10001",
            "--read-only",
            *(["--read-only-tmpfs=false"] if is_podman(engine) else []),
            "--tmpfs",
            "/tmp:rw,mode=1777",
            "--entrypoint",
            "python",
            tag,
            "-c",
            script,
        ],
        timeout_s=300,
    )
    log.info("GPU image on this CPU-only machine: %s", out.stdout.strip().splitlines()[-1])
    noise = [line for line in out.stderr.splitlines() if line.strip()]
    if noise:
        log.info("its stderr (%d lines), last: %s", len(noise), " | ".join(noise[-3:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base-image",
        default=os.environ.get("SMOKE_BASE_IMAGE", ""),
        help="BASE_IMAGE build argument (default: the Dockerfiles' own, python:3.11-slim-bookworm)",
    )
    parser.add_argument(
        "--gpu", action="store_true", help="also build Dockerfile.gpu and check its TensorFlow on this CPU"
    )
    parser.add_argument("--no-build", action="store_true", help=f"use the {CPU_TAG} image already built")
    parser.add_argument(
        "--cache-dtype",
        choices=("float32", "float16"),
        help="override the ConfigMap's FEATUREBANK_CACHE_DTYPE (float16: features come back "
        "float16-rounded, so the comparison is only as fine as that; float32 compares the "
        "computed values themselves)",
    )
    parser.add_argument("--startup-timeout-s", type=float, default=900.0, help="the startup probe's budget (90 x 10 s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s smoke: %(message)s", stream=sys.stdout)
    engine, why = engine_command()
    if engine is None:
        log.error("no usable container engine: %s", why)
        return 2
    log.info("engine: %s", shlex.join(engine))
    timings: dict[str, str] = {}
    if not args.no_build:
        timings["build cpu"] = f"{build(engine, 'cpu', CPU_TAG, args.base_image or None):.0f} s"
    if args.gpu:
        timings["build gpu"] = f"{build(engine, 'gpu', GPU_TAG, args.base_image or None):.0f} s"
        gpu_check(engine, GPU_TAG)
    spec = PodSpec(render_overlay("cpu"))
    image_versions = versions(engine, CPU_TAG)
    with tempfile.TemporaryDirectory(prefix="featurebank-smoke-", dir="/var/tmp") as tmp:
        workdir = pathlib.Path(tmp)
        workdir.chmod(0o755)  # the container's user reads the mounted tenants file
        overrides = {"FEATUREBANK_CACHE_DTYPE": args.cache_dtype} if args.cache_dtype else {}
        smoke = Smoke(engine, workdir, overrides)
        try:
            smoke.run_container(spec, CPU_TAG)
            timings["run to SERVING"] = f"{smoke.wait_serving(spec, args.startup_timeout_s):.1f} s"
            container = extract_twice(f"127.0.0.1:{smoke.ports['grpc']}", smoke.token)
            log.info(
                "SDK with the tenant's token: %d images, %d texts; second call all cache hits", len(IMAGES), len(TEXTS)
            )
            smoke.check_heads_redis(0)
            smoke.check_docker_healthcheck()
            smoke.check_metrics()
            smoke.check_writable_paths(spec)
            smoke.drain(spec)
            smoke.remove()
            host = smoke.host_server(spec)
        finally:
            smoke.close()
    log.info("versions: image %s; host %s", image_versions, host_versions())
    compare(container, host, smoke.cache_dtype)
    sizes = {CPU_TAG: image_size(engine, CPU_TAG)}
    if args.gpu:
        sizes[GPU_TAG] = image_size(engine, GPU_TAG)
    for tag, size in sizes.items():
        log.info("image %s: %s", tag, size)
    log.info("timings: %s", ", ".join(f"{k} {v}" for k, v in timings.items()))
    log.info("smoke passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SmokeError, PodSpecError) as e:
        log.error("FAILED: %s", e)
        sys.exit(1)
