"""capgate on the local control plane: the operator as a local process, and "pods" without a kubelet.

There is no kubelet here, so :class:`PodSidecar` plays its part for the one container that matters:
it reads the *mutated* pod back from the API server, lays out the Secret files exactly where the
pod spec mounts them (re-syncing them like the kubelet does, atomically), resolves the downward-API
env, and starts the injected sidecar's own command with the pod spec's args. Two things differ, both
because there is no cluster network: the listen addresses are free loopback ports, and each upstream
URL (a ``*.svc`` name) is pointed at a loopback test server with ``--upstream-url``. The sidecar talks
to the API server with a token of the pod's ServiceAccount, so it has exactly the pod's RBAC.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from capgate import injection
from e2e.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_NAMESPACE = "capgate-system"
SECRET_SYNC_SECONDS = 0.25


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s:\n{tail}")


class Operator:
    """``capgate-operator`` as a local process against the control plane, webhooks on 127.0.0.1."""

    def __init__(self, plane: ControlPlane, workdir: Path, namespace: str = OPERATOR_NAMESPACE) -> None:
        self.plane = plane
        self.namespace = namespace
        self.workdir = workdir
        self.webhook_port = free_port()
        self.metrics_port = free_port()
        self.log = workdir / "operator.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 60) -> None:
        self.plane.create_namespace(self.namespace)
        env = dict(os.environ, KUBECONFIG=str(self.plane.kubeconfig), PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "capgate.operator", "--namespace", self.namespace,
                "--webhook-listen", f"127.0.0.1:{self.webhook_port}",
                "--webhook-url", f"https://127.0.0.1:{self.webhook_port}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--webhook-configs", "create"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            start_new_session=True)
        wait_http(f"{self.metrics_url}/readyz", timeout, self.process, self.log)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers run, as when a node dies mid-rotation."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as response:
            return str(response.read().decode())


def install_crds(plane: ControlPlane) -> None:
    plane.kubectl("apply", "-f", str(ROOT / "crds"))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/agentcapabilities.capgate.dev", "crd/revocationlists.capgate.dev",
                  "crd/agentcapabilityusages.capgate.dev")


class SecretSync:
    """Keeps Secret keys as files under a directory, swapping them atomically like the kubelet."""

    def __init__(self, core: k8s.CoreV1Api, namespace: str, files: list[injection.SecretFile], root: Path) -> None:
        self.core = core
        self.namespace = namespace
        self.files = files
        self.root = root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def local(self, mount_path: str) -> Path:
        return self.root / mount_path.lstrip("/")

    def sync_once(self) -> None:
        for item in self.files:
            try:
                secret = self.core.read_namespaced_secret(item.secret, self.namespace)
            except k8s.ApiException as exc:
                if exc.status == 404:
                    continue  # a deleted Secret: the kubelet keeps the last files too
                raise
            data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
            target = self.local(item.directory)
            target.mkdir(parents=True, exist_ok=True)
            wanted = {item.path or "": data.get(item.key or "", b"")} if item.key else data
            for name, value in wanted.items():
                path = target / name
                if path.exists() and path.read_bytes() == value:
                    continue
                temporary = path.with_name(f".{name}.tmp")
                temporary.write_bytes(value)
                temporary.replace(path)

    def _loop(self) -> None:
        while not self._stop.wait(SECRET_SYNC_SECONDS):
            try:
                self.sync_once()
            except Exception:  # noqa: BLE001 - the API server may be down in fault tests; keep the files
                continue

    def start(self) -> None:
        self.sync_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class PodSidecar:
    """The injected sidecar of one pod, run locally with the pod's args, env, Secret files and RBAC."""

    def __init__(self, plane: ControlPlane, namespace: str, pod_name: str, upstream_urls: dict[str, str],
                 workdir: Path) -> None:
        self.plane = plane
        self.namespace = namespace
        self.pod_name = pod_name
        self.workdir = workdir
        self.upstream_urls = upstream_urls
        self.port = free_port()
        self.admin_port = free_port()
        self.log = workdir / f"sidecar-{pod_name}.log"
        self.audit = workdir / f"audit-{pod_name}.jsonl"
        self.process: subprocess.Popen[bytes] | None = None
        self.sync: SecretSync | None = None
        self.pod: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _read_pod(self) -> dict[str, Any]:
        api = self.plane.client()
        try:
            raw: Any = k8s.CoreV1Api(api).read_namespaced_pod(self.pod_name, self.namespace, _preload_content=False)
            return dict(json.loads(raw.data))
        finally:
            api.close()  # type: ignore[no-untyped-call]

    def command(self, root: Path) -> tuple[list[str], dict[str, str]]:
        invocation = injection.sidecar_invocation(self.pod, field_values={"spec.nodeName": "local"})
        args = list(invocation.args)
        for mount in invocation.mounts.values():
            args = [str(root / mount.lstrip("/")) if arg == mount else arg for arg in args]
        args = _replace_flag(args, "--listen", f"127.0.0.1:{self.port}")
        args = _replace_flag(args, "--admin-listen", f"127.0.0.1:{self.admin_port}")
        if "--outbound-listen" in args:  # no network namespace here: nothing is redirected to it
            args = _replace_flag(args, "--outbound-listen", f"127.0.0.1:{free_port()}")
        for mount in invocation.mounts.values():  # emptyDirs (the pod CA) exist before the container starts
            (root / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for name, url in self.upstream_urls.items():
            args += ["--upstream-url", f"{name}={url}"]
        args += ["--audit-log", str(self.audit)]
        service_account = self.pod["spec"].get("serviceAccountName", "default")
        kubeconfig = self.plane.kubeconfig_for_service_account(self.namespace, service_account)
        env = {**invocation.env, "KUBECONFIG": str(kubeconfig), "CAPGATE_KUBECONFIG": str(kubeconfig)}
        return args, env

    def start(self, timeout: float = 30) -> None:
        self.pod = self._read_pod()
        root = Path(tempfile.mkdtemp(prefix="pod-", dir=self.workdir))
        api = self.plane.client()
        self.sync = SecretSync(k8s.CoreV1Api(api), self.namespace, injection.sidecar_secret_files(self.pod), root)
        self.sync.start()
        args, env = self.command(root)
        container = next(c for c in self.pod["spec"]["initContainers"] if c["name"] == injection.DEFAULT_CONTAINER_NAME)
        argv = [*container["command"], *args]
        argv[0] = shutil.which(argv[0]) or str(Path(sys.executable).with_name(argv[0]))
        full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **env}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_http(f"{self.admin_url}/readyz", timeout, self.process, self.log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        if self.sync is not None:
            self.sync.stop()
            self.sync = None


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    for index, arg in enumerate(out):
        if arg == flag and index + 1 < len(out):
            out[index + 1] = value
            return out
        if arg.startswith(flag + "="):
            out[index] = f"{flag}={value}"
            return out
    return [*out, flag, value]


@contextmanager
def pod_sidecar(plane: ControlPlane, namespace: str, pod_name: str, upstream_urls: dict[str, str],
                workdir: Path) -> Iterator[PodSidecar]:
    sidecar = PodSidecar(plane, namespace, pod_name, upstream_urls, workdir)
    try:
        sidecar.start()
        yield sidecar
    finally:
        sidecar.stop()


def agent_pod(name: str, namespace: str, capability: str, service_account: str) -> dict[str, Any]:
    """An agent pod as a user would write it: a label opts in, nothing else about capgate."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"capgate.dev/capability": capability}},
            "spec": {"serviceAccountName": service_account,
                     # A stated UID other than the sidecar's: enforce mode refuses agents whose UID is unknown.
                     "securityContext": {"runAsUser": 1000},
                     "containers": [{"name": "agent", "image": "python:3.12-slim",
                                     "command": ["python", "-m", "my_agent"]}]}}


# ---------------------------------------------------------------------------------------- test environments

EXAMPLE_PATH = ROOT / "examples" / "booking-agent.yaml"


def example_capability(name: str, namespace: str, **spec_changes: Any) -> dict[str, Any]:
    """examples/booking-agent.yaml renamed; its own Datalog check (ending on 2027-01-01) left out."""
    import yaml

    obj: dict[str, Any] = yaml.safe_load(EXAMPLE_PATH.read_text())
    obj["metadata"].update(name=name, namespace=namespace)
    obj["spec"].pop("datalog", None)
    obj["spec"].update(spec_changes)
    return obj


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll another process until ``predicate`` is truthy (there is no event to wait on across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def call(sidecar: PodSidecar, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One agent request to a sidecar: status, JSON body, headers (never through an HTTP proxy)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{sidecar.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


class Environment:
    """capgate installed on a control plane: CRDs, the operator, a namespace with an agent account,
    the payments API key Secret and a recording upstream; pods' sidecars run locally."""

    def __init__(self, plane: ControlPlane, operator: Operator, upstream: Any, workdir: Path, namespace: str) -> None:
        self.plane = plane
        self.operator = operator
        self.upstream = upstream
        self.workdir = workdir
        self.namespace = namespace
        self.sidecars: list[PodSidecar] = []

    def apply(self, obj: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl("apply", "-f", "-", input=json.dumps(obj), check=check)

    def get_capability(self, name: str) -> dict[str, Any]:
        result = self.plane.kubectl("get", "acap", name, "-n", self.namespace, "-o", "json")
        return dict(json.loads(result.stdout))

    def ready(self, name: str) -> dict[str, Any] | None:
        """The status when Ready=True for the current generation, else None."""
        obj = self.get_capability(name)
        status = obj.get("status") or {}
        cond = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)
        if cond and cond["status"] == "True" and status.get("observedGeneration") == obj["metadata"]["generation"]:
            return dict(status)
        return None

    def wait_ready(self, name: str, timeout: float = 30) -> dict[str, Any]:
        return dict(wait_for(lambda: self.ready(name), timeout, f"AgentCapability {name} Ready"))

    def secret(self, name: str) -> dict[str, bytes] | None:
        api = self.plane.client()
        try:
            secret = k8s.CoreV1Api(api).read_namespaced_secret(name, self.namespace)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        finally:
            api.close()  # type: ignore[no-untyped-call]
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def create_pod(self, name: str, capability: str,
                   service_account: str = "booking-agent") -> subprocess.CompletedProcess[str]:
        return self.apply(agent_pod(name, self.namespace, capability, service_account), check=False)

    def sidecar(self, pod: str) -> PodSidecar:
        """Start the injected sidecar of ``pod``; stopped with the environment (or earlier by the caller)."""
        sidecar = PodSidecar(self.plane, self.namespace, pod, {"flights": self.upstream.url,
                                                               "payments": self.upstream.url}, self.workdir)
        sidecar.start()
        self.sidecars.append(sidecar)
        return sidecar


@contextmanager
def environment(plane: ControlPlane, workdir: Path, namespace: str, api_key: str) -> Iterator[Environment]:
    from e2e.upstream import RecordingUpstream

    install_crds(plane)
    plane.create_namespace(namespace)
    plane.kubectl("create", "serviceaccount", "booking-agent", "-n", namespace, check=False)
    # Applied, not created: a Secret another module left in this namespace must not keep its key.
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "payments-api-key"},
         "stringData": {"token": api_key}}))
    operator = Operator(plane, workdir)
    operator.start()
    upstream = RecordingUpstream()
    upstream.start()
    env = Environment(plane, operator, upstream, workdir, namespace)
    try:
        yield env
    finally:
        for sidecar in env.sidecars:
            sidecar.stop()
        upstream.stop()
        operator.stop()
        # Leave no webhook behind for other e2e modules: with failurePolicy Fail it would refuse their pods.
        plane.kubectl("delete", "mutatingwebhookconfiguration", "capgate-sidecar-injector", "--ignore-not-found")
        plane.kubectl("delete", "validatingwebhookconfiguration", "capgate-capability-validator", "--ignore-not-found")
