"""The real-pod suite against a cluster that already runs: ``CAPGATE_E2E_KUBECONFIG=/path``.

``e2e/test_pods.py``, ``e2e/test_demo.py`` and ``e2e/test_helm_install.py`` drive a cluster only through
kubectl, helm and the API: with ``CAPGATE_E2E_KUBECONFIG`` set they use that cluster (kind, a managed one,
or this repository's own ``python -m e2e.controlplane up``) instead of starting the local one. The image
is then ``CAPGATE_E2E_IMAGE``, which the cluster's nodes must already hold (``kind load docker-image``) or
be able to pull (a registry you name; ``CAPGATE_E2E_PULL_POLICY``, default ``Never``).

Tests that stop the API server, play the kubelet or touch the node (``containerd``, host iptables) keep
needing the local cluster: their ``control_plane`` and ``node`` fixtures fail, never skip, and say why.
kubectl and helm come from ``CAPGATE_CONTROLPLANE_BIN``, else ``PATH``, else the binaries
``hack/build-controlplane.sh`` cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from e2e import images
from e2e.controlplane import ControlPlane

KUBECONFIG_ENV = "CAPGATE_E2E_KUBECONFIG"
IMAGE_ENV = "CAPGATE_E2E_IMAGE"
PULL_POLICY_ENV = "CAPGATE_E2E_PULL_POLICY"
REPO_ROOT = Path(__file__).resolve().parent.parent
NEEDS_LOCAL = (f"{KUBECONFIG_ENV} names an existing cluster, and this test needs the local one "
               "(it stops the API server, plays the kubelet or acts on the node's containerd): "
               f"unset {KUBECONFIG_ENV} to run it")


class ExternalClusterError(RuntimeError):
    """The named cluster cannot be used; the message says why."""


class Cluster(Protocol):
    """What the real-pod suite needs of a cluster: a local :class:`ControlPlane` or an :class:`ExternalCluster`."""

    @property
    def kubeconfig(self) -> Path: ...

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]: ...

    def kubectl_command(self, *args: str) -> list[str]: ...

    def helm(self, *args: str, kubeconfig: Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]: ...

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None: ...

    def kubeconfig_for_service_account(self, namespace: str, name: str) -> Path: ...

    def client(self) -> k8s.ApiClient: ...

    def log_tails(self) -> str: ...


def from_env() -> ExternalCluster | None:
    """The cluster ``CAPGATE_E2E_KUBECONFIG`` names, or None (the suite starts the local one)."""
    path = os.environ.get(KUBECONFIG_ENV)
    if not path:
        return None
    return ExternalCluster(Path(path), image=os.environ.get(IMAGE_ENV) or None,
                           pull_policy=os.environ.get(PULL_POLICY_ENV) or "Never")


def _tool(name: str) -> Path:
    prebuilt = os.environ.get("CAPGATE_CONTROLPLANE_BIN")
    candidates = [Path(prebuilt) / name] if prebuilt else []
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    script = REPO_ROOT / "hack" / "build-controlplane.sh"
    printed = subprocess.run(["bash", str(script), "--print-dir"], capture_output=True, text=True, check=False)
    if printed.returncode == 0 and printed.stdout.strip():
        candidates.append(Path(printed.stdout.strip()) / name)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise ExternalClusterError(f"{name} not found (CAPGATE_CONTROLPLANE_BIN, PATH, or bash {script})")


class ExternalCluster:
    """An existing cluster, reached with the admin kubeconfig it was given; creates only what tests ask for."""

    def __init__(self, kubeconfig: Path, *, image: str | None, pull_policy: str = "Never") -> None:
        if not kubeconfig.is_file():
            raise ExternalClusterError(f"{KUBECONFIG_ENV}={kubeconfig}: no such file")
        self._kubeconfig = kubeconfig.resolve()
        self.image = image
        self.pull_policy = pull_policy
        self._kubectl = _tool("kubectl")
        self._helm = _tool("helm")
        self.workdir = Path(tempfile.mkdtemp(prefix="capgate-external-"))

    def check(self) -> None:
        """Fail with the API server's answer unless it is reachable and ready."""
        ready = self.kubectl("get", "--raw", "/readyz", check=False)
        if ready.returncode != 0 or ready.stdout.strip() != "ok":
            raise ExternalClusterError(f"the cluster of {self._kubeconfig} is not ready: "
                                       f"{(ready.stderr or ready.stdout).strip()[:2000]}")

    def stop(self) -> None:
        """Remove this session's helm home and kubeconfigs; the cluster itself is not ours to stop."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def kubeconfig(self) -> Path:
        return self._kubeconfig

    def _run(self, argv: list[str], *, input: str | None = None, check: bool,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, check=False,
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            raise ExternalClusterError(f"{Path(argv[0]).name} {' '.join(argv[2:])} exited with "
                                       f"{result.returncode}:\n{result.stderr}")
        return result

    def kubectl_command(self, *args: str) -> list[str]:
        return [str(self._kubectl), f"--kubeconfig={self._kubeconfig}", *args]

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self._kubectl), f"--kubeconfig={kubeconfig or self._kubeconfig}", *args]
        return self._run(argv, input=input, check=check)

    def helm(self, *args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        home = self.workdir / "helm"
        env = {"HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
               "HELM_DATA_HOME": str(home / "data")}
        return self._run([str(self._helm), f"--kubeconfig={kubeconfig or self._kubeconfig}", *args], check=check,
                         env=env)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """The namespace (kept if it exists); the cluster's own controller makes its ``default`` account."""
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        self.kubectl("apply", "-f", "-", input=json.dumps(namespace))
        self.kubectl("wait", "-n", name, "--for=create", "serviceaccount/default", "--timeout=60s")

    def kubeconfig_for_service_account(self, namespace: str, name: str) -> Path:
        """The same cluster as ServiceAccount ``namespace/name`` (a TokenRequest token, one hour)."""
        token = self.kubectl("create", "token", "-n", namespace, name, "--duration=1h").stdout.strip()
        config = json.loads(self.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
        user = f"{namespace}.{name}"
        config["users"] = [{"name": user, "user": {"token": token}}]
        for context in config["contexts"]:
            context["context"]["user"] = user
        path = self.workdir / "kubeconfigs" / f"{user}.kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(config))
        return path

    def client(self) -> k8s.ApiClient:
        return k8s_config.new_client_from_config(config_file=str(self._kubeconfig))

    def log_tails(self) -> str:
        """What the cluster says when a test fails: its latest events (there are no local logs)."""
        events = self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False)
        return "--- kubectl get events -A (latest)\n" + "\n".join(events.stdout.splitlines()[-40:])


def capgate_image(cluster: Cluster) -> tuple[str, str]:
    """(reference, pull policy) of the capgate image for the suite's pods on ``cluster``.

    Local: built by ``make image`` (cached by content hash) and imported into the node, never pulled.
    External: ``CAPGATE_E2E_IMAGE``, which is required.
    """
    if isinstance(cluster, ExternalCluster):
        if not cluster.image:
            raise ExternalClusterError(f"{KUBECONFIG_ENV} is set: {IMAGE_ENV} must name the capgate image the "
                                       "cluster's nodes hold (kind load docker-image) or can pull")
        return cluster.image, cluster.pull_policy
    if not isinstance(cluster, ControlPlane):
        raise TypeError(f"not a cluster: {cluster!r}")
    ref = images.build().images["capgate"].ref
    cluster.node.import_docker_image(ref)
    return ref, "Never"
