"""The cpu overlay's featurebank pod, rendered, as container-engine arguments (for smoke.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class PodSpecError(RuntimeError):
    """The pod spec asks for something the smoke run cannot provide."""


def render_overlay(overlay: str) -> list[dict]:
    """The overlay's objects, rendered by kubectl/kustomize; without either, the base plus the overlay's env."""
    import yaml

    path = REPO / "deploy" / "k8s" / overlay
    for command in (["kubectl", "kustomize"], ["kustomize", "build"]):
        if shutil.which(command[0]):
            rendered = subprocess.run([*command, str(path)], check=True, capture_output=True, text=True).stdout
            return list(yaml.safe_load_all(rendered))
    base = REPO / "deploy" / "k8s" / "base"
    deployment = yaml.safe_load((base / "deployment.yaml").read_text())
    data = dict(
        line.split("=", 1)
        for line in (base / "featurebank.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
    for generator in kustomization.get("configMapGenerator", []):
        data.update(literal.split("=", 1) for literal in generator.get("literals", []))
    return [deployment, {"kind": "ConfigMap", "metadata": {"name": "featurebank-config"}, "data": data}]


class PodSpec:
    """The server container of the rendered Deployment, turned into `ENGINE run` arguments."""

    def __init__(self, objects: list[dict]):
        deployment = next(
            o for o in objects if o and o.get("kind") == "Deployment" and o["metadata"]["name"] == "featurebank"
        )
        self.pod = deployment["spec"]["template"]["spec"]
        self.container = next(c for c in self.pod["containers"] if c["name"] == "featurebank")
        self.configmaps = {
            o["metadata"]["name"]: o.get("data", {}) for o in objects if o and o.get("kind") == "ConfigMap"
        }
        self.grace_s = float(self.pod.get("terminationGracePeriodSeconds", 30))

    def port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)

    def port_names(self) -> list[str]:
        return [p["name"] for p in self.container["ports"]]

    def port_name(self, port: int | str) -> str:
        """The name of a container port given by number or name (as a probe may give it)."""
        for p in self.container["ports"]:
            if port in (p["containerPort"], p["name"]):
                return p["name"]
        raise PodSpecError(f"a probe uses port {port!r}, which the container does not declare in `ports`")

    def probes(self) -> list[tuple[int | str, str]]:
        """The (port, gRPC health service) pairs the probes ask ("" is the server as a whole)."""
        probes = [self.container.get(p, {}).get("grpc") for p in ("startupProbe", "readinessProbe", "livenessProbe")]
        if not any(probes):
            raise PodSpecError("the container has no gRPC probe: smoke.py waits for SERVING the way they ask")
        return sorted({(p["port"], p.get("service", "")) for p in probes if p}, key=str)

    def env(self, secret_values: dict[str, dict[str, str]]) -> dict[str, str]:
        env: dict[str, str] = {}
        for ref in self.container.get("envFrom", []):
            if "configMapRef" in ref:
                env.update(self.configmaps[ref["configMapRef"]["name"]])
            elif "secretRef" in ref:
                env.update(self._secret(secret_values, ref["secretRef"]["name"]))
        for e in self.container.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                values = self._secret(secret_values, ref["name"])
                if ref["key"] not in values:
                    raise PodSpecError(
                        f"the pod reads key {ref['key']!r} of Secret {ref['name']!r}, which smoke.py does not fill"
                    )
                env[e["name"]] = values[ref["key"]]
            elif "configMapKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["configMapKeyRef"]
                env[e["name"]] = self.configmaps[ref["name"]][ref["key"]]
        return env

    @staticmethod
    def _secret(secret_values: dict[str, dict[str, str]], name: str) -> dict[str, str]:
        if name not in secret_values:
            raise PodSpecError(
                f"the pod needs Secret {name!r}, which smoke.py does not create: add it to secret_values()"
            )
        return secret_values[name]

    def fs_group(self) -> int | None:
        return self.pod.get("securityContext", {}).get("fsGroup")

    def volumes(self) -> list[tuple[dict, dict]]:
        """(volume, mount) for each volumeMount of the container."""
        by_name = {v["name"]: v for v in self.pod.get("volumes", [])}
        return [(by_name[m["name"]], m) for m in self.container.get("volumeMounts", [])]

    def security_args(self) -> list[str]:
        pod_sc, sc = self.pod.get("securityContext", {}), self.container.get("securityContext", {})
        uid, gid = sc.get("runAsUser", pod_sc.get("runAsUser")), sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        if uid in (None, 0) or not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            raise PodSpecError("the pod must run as a numeric non-root user (runAsNonRoot, runAsUser)")
        args = ["--user", f"{uid}:{gid if gid is not None else uid}"]
        if "fsGroup" in pod_sc:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        limits = self.container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", kubernetes_bytes(limits["memory"])]
        if "cpu" in limits:
            args += ["--cpus", str(min(float(limits["cpu"]), os.cpu_count() or 1))]
        return args


def kubernetes_bytes(quantity: str) -> str:
    """A Kubernetes memory quantity (6Gi, 512Mi, 1G) as a byte count."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity))
    if not match:
        raise PodSpecError(f"cannot read the quantity {quantity!r}")
    return str(int(match[1]) * units.get(match[2] or "", 1))
