"""A real, local Kubernetes control plane (etcd + kube-apiserver) for capgate's e2e tests and demo.

Why not kind: CI and dev machines have no Docker, only package registries. So, like controller-runtime's
envtest, we run the two processes that make an API server real for what capgate relies on: CRD schema
validation, RBAC, watches, the TokenRequest API, and admission webhooks that the API server itself calls
over TLS. The binaries come from ``hack/build-controlplane.sh`` (built from the Go module proxy, cached).
There is no controller-manager, scheduler or kubelet: pods are admitted and stored, then stay Pending.

Choices worth knowing:

- The ServiceAccount admission plugin stays enabled, so capgate's webhook sees pods as a real cluster
  hands them over (``serviceAccountName`` defaulted, token volume projected). Without controller-manager
  nobody creates a namespace's ``default`` ServiceAccount, and that plugin rejects pods whose
  ServiceAccount does not exist: create namespaces with :meth:`ControlPlane.create_namespace`, which also
  creates ``default`` like the service-account controller would. ``start()`` does it for ``default``.
- ServiceAccount tokens come from the TokenRequest API, which the API server serves on its own
  (:meth:`ControlPlane.service_account_token`); no legacy token Secrets exist.
- Every key and certificate is made here with ``cryptography`` (no openssl): one CA signs the API
  server's serving certificate, the admin client certificate (``O=system:masters``) and, through
  :meth:`ControlPlane.issue_serving_cert`, the serving certificates of webhook servers run by tests.
- No orphans: each child runs in its own session (process group) and ``stop()`` terminates, then kills,
  each group; ``stop()`` is also registered with ``atexit``. On Linux the kernel additionally SIGKILLs
  the children if the starting thread dies without cleaning up (``PR_SET_PDEATHSIG``), e.g. when the
  test runner itself is killed. That is only armed when starting from the main thread, because a worker
  thread may legitimately exit long before the control plane should stop.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import FrameType, TracebackType

from kubernetes import client as k8s

from e2e import node_host, pki
from e2e.node import NODE_ADDRESS, NODE_NAME, Node, NodeError
from e2e.pki import ServingCert
from e2e.processes import Child, answers_ok, direct_opener, free_ports, spawn, tail

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-controlplane.sh"
BINARIES = ("kube-apiserver", "kubectl", "etcd", "helm")
# Set to a directory holding prebuilt BINARIES to skip the build script entirely.
BIN_DIR_ENV = "CAPGATE_CONTROLPLANE_BIN"

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"  # the node's kube-proxy programs it; unused elsewhere on the host
KUBERNETES_SERVICE_IP = "10.0.0.1"  # the first address of the range: the `kubernetes` Service
LOG_TAIL_LINES = 40
START_ATTEMPTS = 3  # free ports are picked, then bound by the children: another process may win a race

CLI_DESCRIPTION = "A local Kubernetes cluster (etcd, kube-apiserver and a real node) for capgate's e2e tests."

Progress = Callable[[str], None]


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used; the message says why, with log tails."""


class _PortInUseError(ControlPlaneError):
    """A child lost the race for a port we had picked; start() retries with new ports."""


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- processes


# -------------------------------------------------------------------------------------- control plane


class ControlPlane:
    """etcd and kube-apiserver in a temporary directory, with an admin kubeconfig.

    Use as a context manager (``with ControlPlane() as cp: ...``) or call ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        *,
        startup_timeout: float = 90.0,
        progress: Progress | None = None,
        extra_apiserver_flags: Sequence[str] = (),
        node: bool = False,
        kubelet_config: Mapping[str, object] | None = None,
    ) -> None:
        self.startup_timeout = startup_timeout
        self.extra_apiserver_flags = tuple(extra_apiserver_flags)
        self._progress = progress or _stderr_progress
        self._bin_dir: Path | None = None
        self._workdir: Path | None = None
        self._ca: pki.CertificateAuthority | None = None
        self._children: list[Child] = []
        self._port = 0
        self._atexit_registered = False
        self._node: Node | None = Node(self, self._progress, kubelet_config=kubelet_config) if node else None

    # ---- binaries

    def ensure_binaries(self) -> Path:
        """Build missing binaries (streaming the build's progress) and return their directory."""
        if self._bin_dir is not None:
            return self._bin_dir
        prebuilt = os.environ.get(BIN_DIR_ENV)
        if prebuilt:
            bin_dir = Path(prebuilt)
        else:
            self._run_build_script()
            bin_dir = Path(self._build_script_output("--print-dir").strip())
        missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
        if self._node is not None:
            try:
                self._node.check_prerequisites(bin_dir)
            except NodeError as error:
                raise ControlPlaneError(str(error)) from error
        if missing:
            raise ControlPlaneError(f"control plane binaries missing from {bin_dir}: {', '.join(missing)}")
        self._bin_dir = bin_dir
        return bin_dir

    def _run_build_script(self) -> None:
        if shutil.which("bash") is None:
            raise ControlPlaneError("bash is needed to run hack/build-controlplane.sh")
        last_lines: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        with subprocess.Popen(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
        ) as build:
            assert build.stdout is not None  # guaranteed by stdout=PIPE
            for line in build.stdout:
                line = line.rstrip("\n")
                last_lines.append(line)
                # go prints one "downloading" line per module; they are noise, except in the tail.
                if not line.startswith("go: downloading "):
                    self._progress(line)
        if build.returncode != 0:
            raise ControlPlaneError(
                f"building the control plane binaries failed ({BUILD_SCRIPT} exited with "
                f"{build.returncode}):\n" + "\n".join(last_lines)
            )

    def _build_script_output(self, *args: str) -> str:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, cwd=REPO_ROOT, check=False
        )
        if result.returncode != 0:
            raise ControlPlaneError(f"{BUILD_SCRIPT} {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    # ---- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        children = self._all_children()
        return bool(children) and all(child.process.poll() is None for child in children)

    def _all_children(self) -> list[Child]:
        return self._children + (self._node.children if self._node is not None else [])

    @property
    def has_node(self) -> bool:
        return self._node is not None

    @property
    def node(self) -> Node:
        """The real node (``ControlPlane(node=True)``): kubelet, containerd, kube-proxy, controllers, DNS."""
        if self._node is None:
            raise ControlPlaneError("this control plane has no node (ControlPlane(node=True))")
        return self._node

    def start(self) -> None:
        """Start etcd and kube-apiserver and return once ``/readyz`` answers ok."""
        if self._children:
            raise ControlPlaneError("control plane already started")
        bin_dir = self.ensure_binaries()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._workdir = Path(tempfile.mkdtemp(prefix="capgate-controlplane-"))
        try:
            if self._node is not None:
                self._node.prepare_host(bin_dir)  # the API server binds the node's address
            self._write_pki()
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self._launch(bin_dir)
                    break
                except _PortInUseError as error:
                    self._stop_children()
                    if attempt == START_ATTEMPTS:
                        raise ControlPlaneError(f"no free ports after {attempt} attempts: {error}") from error
                    self._progress(f"controlplane: port taken, retrying ({error.args[0].splitlines()[0]})")
            self.create_namespace("default")
            if self._node is not None:
                self._node.start(bin_dir)
        except NodeError as error:
            self.stop()
            raise ControlPlaneError(str(error)) from error
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the processes (TERM, then KILL, by process group) and remove the temporary directory.

        Idempotent, and registered with ``atexit`` by ``start()``. The node goes first, and with it every
        change it made to the host (see e2e/node_host.py).
        """
        if self._node is not None:
            self._node.stop_daemons()
        self._stop_children()
        if self._node is not None:
            self._node.release_host()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._ca = None
        self._port = 0

    def _stop_children(self) -> None:
        # kube-apiserver first: it would otherwise log etcd connection errors while shutting down.
        while self._children:
            self._children.pop().stop()

    def wait(self) -> Child:
        """Block until a child exits (for the ``up`` command) and return it."""
        while True:
            for child in self._all_children():
                if child.process.poll() is not None:
                    return child
            time.sleep(1.0)
            if not self._children:
                raise ControlPlaneError("control plane not started")

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only, keeping etcd and its data: for fault tests (see ``start_apiserver``)."""
        self._child("kube-apiserver").stop()

    def start_apiserver(self) -> None:
        """Start a stopped kube-apiserver again: same argv, so the same port, certificates and etcd data."""
        child = self._child("kube-apiserver")
        if child.process.poll() is None:
            return
        self._children.remove(child)
        restarted = self._spawn(child.name, [str(arg) for arg in child.process.args])  # type: ignore[union-attr]
        self._wait_until(time.monotonic() + self.startup_timeout, restarted, self._apiserver_ready)

    def _child(self, name: str) -> Child:
        for child in self._children:
            if child.name == name:
                return child
        raise ControlPlaneError(f"{name} is not part of this control plane (not started?)")

    def _write_pki(self) -> None:
        work = self._require_workdir()
        self._ca = ca = pki.CertificateAuthority("capgate-e2e-ca")
        pki.write(work / "pki" / "ca.crt", ca.cert_pem)
        # Pods reach the API server as the `kubernetes` Service (its IP and names), kube-proxy DNATs
        # that to the node address; the host uses the node address too when there is a node.
        hosts = ("127.0.0.1", "localhost", NODE_ADDRESS, KUBERNETES_SERVICE_IP, *_KUBERNETES_NAMES)
        key, cert = ca.issue("kube-apiserver", hosts=hosts, server=True)
        pki.write(work / "pki" / "apiserver.key", key, private=True)
        pki.write(work / "pki" / "apiserver.crt", cert)
        key, cert = ca.issue("admin", organizations=("system:masters",), client=True)
        pki.write(work / "pki" / "admin.key", key, private=True)
        pki.write(work / "pki" / "admin.crt", cert)
        # For kubectl logs/exec/port-forward: the API server's client certificate towards kubelet.
        key, cert = ca.issue("kube-apiserver-kubelet-client", organizations=("system:masters",), client=True)
        pki.write(work / "pki" / "apiserver-kubelet-client.key", key, private=True)
        pki.write(work / "pki" / "apiserver-kubelet-client.crt", cert)
        key, public = pki.service_account_key_pair()
        pki.write(work / "pki" / "sa.key", key, private=True)
        pki.write(work / "pki" / "sa.pub", public)

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = spawn(name, argv, self._require_workdir() / "logs")
        self._children.append(child)
        return child

    def _launch(self, bin_dir: Path) -> None:
        work = self._require_workdir()
        certs = work / "pki"
        etcd_client, etcd_peer, self._port = free_ports(3)
        etcd_url = f"http://127.0.0.1:{etcd_client}"
        data_dir = work / "etcd"
        shutil.rmtree(data_dir, ignore_errors=True)
        etcd = self._spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=capgate-e2e",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=capgate-e2e=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",  # throwaway data: trade durability for test speed, like envtest
                "--log-level=warn",
            ],
        )
        deadline = time.monotonic() + self.startup_timeout
        self._wait_until(deadline, etcd, lambda: self._etcd_healthy(etcd_url))
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self._host}",
                f"--advertise-address={self._host}",
                f"--secure-port={self._port}",
                f"--cert-dir={work / 'apiserver'}",
                f"--tls-cert-file={certs / 'apiserver.crt'}",
                f"--tls-private-key-file={certs / 'apiserver.key'}",
                f"--client-ca-file={certs / 'ca.crt'}",
                *self._authorization_flags(),
                f"--service-account-issuer={self.service_account_issuer}",
                f"--service-account-key-file={certs / 'sa.pub'}",
                f"--service-account-signing-key-file={certs / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--profiling=false",
                *self.extra_apiserver_flags,
            ],
        )
        self._write_admin_kubeconfig()
        self._wait_until(deadline, apiserver, self._apiserver_ready)

    def _authorization_flags(self) -> list[str]:
        if self._node is None:
            return ["--authorization-mode=RBAC"]
        certs = self._require_workdir() / "pki"
        return [
            # Replaced, not appended: a mode given twice is an error.
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={certs / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={certs / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={certs / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    @property
    def _host(self) -> str:
        return NODE_ADDRESS if self._node is not None else "127.0.0.1"

    def _wait_until(self, deadline: float, child: Child, ready: Callable[[], bool]) -> None:
        while True:
            if child.process.poll() is not None:
                message = child.describe_exit()
                if "address already in use" in message:
                    raise _PortInUseError(message)
                raise ControlPlaneError(message)
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{child.name} not ready after {self.startup_timeout:.0f}s; logs:\n"
                    + "\n".join(f"--- {c.log_path}\n{tail(c.log_path)}" for c in self._children)
                )
            time.sleep(0.1)  # polling a local port; nothing to wait on instead

    @staticmethod
    def _etcd_healthy(url: str) -> bool:
        try:
            with direct_opener().open(f"{url}/health", timeout=1) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _apiserver_ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        certs = self._require_workdir() / "pki"
        context.load_cert_chain(certs / "admin.crt", certs / "admin.key")
        return answers_ok(f"{self.server}/readyz", context=context, timeout=2)

    def _write_admin_kubeconfig(self) -> None:
        certs = self._require_workdir() / "pki"
        user = {"client-certificate": str(certs / "admin.crt"), "client-key": str(certs / "admin.key")}
        self._write_kubeconfig(self.kubeconfig, "admin", user)

    def _write_kubeconfig(self, path: Path, user_name: str, user: dict[str, str]) -> Path:
        # JSON is YAML: kubectl, helm and the kubernetes client all read it, and json is typed.
        cluster = {"server": self.server, "certificate-authority": str(self.ca_path)}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "capgate-e2e", "cluster": cluster}],
            "users": [{"name": user_name, "user": user}],
            "contexts": [{"name": "capgate-e2e", "context": {"cluster": "capgate-e2e", "user": user_name}}],
            "current-context": "capgate-e2e",
        }
        return pki.write(path, json.dumps(config, indent=2).encode(), private=True)

    # ---- where things are

    def _require_workdir(self) -> Path:
        if self._workdir is None:
            raise ControlPlaneError("control plane not started")
        return self._workdir

    @property
    def workdir(self) -> Path:
        """The temporary directory holding PKI, etcd data, logs and kubeconfigs."""
        return self._require_workdir()

    @property
    def bin_dir(self) -> Path:
        return self.ensure_binaries()

    @property
    def server(self) -> str:
        """The API server URL: ``https://127.0.0.1:<port>``, or the node address when there is a node."""
        self._require_workdir()
        return f"https://{self._host}:{self._port}"

    @property
    def service_account_issuer(self) -> str:
        """The ``iss`` of ServiceAccount tokens, and their default audience."""
        return self.server

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (client certificate in group ``system:masters``)."""
        return self._require_workdir() / "admin.kubeconfig"

    @property
    def ca_path(self) -> Path:
        """The CA certificate that signed the API server's (and the webhooks') serving certificates."""
        return self._require_workdir() / "pki" / "ca.crt"

    @property
    def logs(self) -> dict[str, Path]:
        """Log file per process name."""
        return {child.name: child.log_path for child in self._all_children()}

    def log_tails(self) -> str:
        """The last lines of every process's log, for failure messages."""
        return "\n".join(f"--- {name}: {path}\n{tail(path)}" for name, path in self.logs.items())

    # ---- clients and helpers

    def client(self, token: str | None = None) -> k8s.ApiClient:
        """A ``kubernetes`` ApiClient: admin by default, or authenticated with a bearer ``token``."""
        certs = self._require_workdir() / "pki"
        # no_proxy: the client reads HTTP(S)_PROXY from the environment, even for 127.0.0.1.
        configuration = k8s.Configuration(host=self.server, ssl_ca_cert=str(self.ca_path), no_proxy="*")
        if token is None:
            configuration.cert_file = str(certs / "admin.crt")
            configuration.key_file = str(certs / "admin.key")
        else:
            configuration.api_key = {"BearerToken": token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return k8s.ApiClient(configuration)

    def _admin(self) -> AbstractContextManager[k8s.ApiClient]:
        return contextlib.closing(self.client())

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create a namespace and its ``default`` ServiceAccount (the job of controller-manager).

        Existing objects are left as they are, so this is safe to call for ``default``.
        """
        with self._admin() as api:
            core = k8s.CoreV1Api(api)
            namespace = k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels))
            _create_or_keep(lambda: core.create_namespace(namespace))
            account = k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
            _create_or_keep(lambda: core.create_namespaced_service_account(name, account))

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: Sequence[str] = (),
        expiration_seconds: int = 3600,  # the API server's minimum is 600
    ) -> str:
        """A token for a ServiceAccount from the TokenRequest API (default audience: the API server)."""
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(
                audiences=list(audiences) or [self.service_account_issuer],
                expiration_seconds=expiration_seconds,
            )
        )
        with self._admin() as api:
            response = k8s.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, request)
        if response.status is None or not response.status.token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        return response.status.token

    def kubeconfig_for_token(self, token: str, name: str = "token") -> Path:
        """Write a kubeconfig that authenticates with ``token``; returns its path (mode 0600)."""
        path = self._require_workdir() / "kubeconfigs" / f"{name}.kubeconfig"
        return self._write_kubeconfig(path, name, {"token": token})

    def kubeconfig_for_service_account(self, namespace: str, name: str) -> Path:
        """A kubeconfig acting as ServiceAccount ``namespace/name`` (token via TokenRequest)."""
        token = self.service_account_token(namespace, name)
        return self.kubeconfig_for_token(token, f"{namespace}.{name}")

    def issue_pem(
        self, name: str, *, hosts: Sequence[str] = (), organizations: Sequence[str] = (), server: bool = False
    ) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) signed by this control plane's CA; a client certificate unless ``server``."""
        if self._ca is None:
            raise ControlPlaneError("control plane not started")
        return self._ca.issue(name, hosts=hosts, organizations=organizations, server=server, client=not server)

    def write_client_kubeconfig(self, path: Path, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig at ``path`` with a client certificate for ``user`` in ``groups`` (beside it)."""
        key, cert = self.issue_pem(user, organizations=groups)
        stem = path.with_suffix("")
        key_path = pki.write(stem.with_suffix(".key"), key, private=True)
        cert_path = pki.write(stem.with_suffix(".crt"), cert)
        return self._write_kubeconfig(path, user, {"client-certificate": str(cert_path), "client-key": str(key_path)})

    def issue_serving_cert(
        self, name: str = "webhook", hosts: Sequence[str] = ("127.0.0.1", "localhost")
    ) -> ServingCert:
        """A serving certificate for ``hosts`` signed by this control plane's CA, written to the workdir.

        The API server trusts it once the CA is in a webhook's ``caBundle`` (``ServingCert.ca_bundle``).
        """
        if self._ca is None:
            raise ControlPlaneError("control plane not started")
        key, cert = self._ca.issue(name, hosts=hosts, server=True)
        directory = self._require_workdir() / "serving" / name
        return ServingCert(
            cert_path=pki.write(directory / "tls.crt", cert),
            key_path=pki.write(directory / "tls.key", key, private=True),
            ca_pem=self._ca.cert_pem,
        )

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane (admin unless ``kubeconfig`` is given)."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        return self._run(argv, input=input, check=check)

    def kubectl_command(self, *args: str) -> list[str]:
        """The admin kubectl argv, for a process a test keeps running (``kubectl exec`` of a long call)."""
        return [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]

    def helm(self, *args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run helm against this control plane, with helm's cache/config/data kept in the workdir."""
        work = self._require_workdir()
        env = {
            "HELM_CACHE_HOME": str(work / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(work / "helm" / "config"),
            "HELM_DATA_HOME": str(work / "helm" / "data"),
        }
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        return self._run(argv, check=check, env=env)

    def _run(
        self, argv: list[str], *, input: str | None = None, check: bool, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"{Path(argv[0]).name} {' '.join(argv[2:])} exited with {result.returncode}:\n{result.stderr}"
            )
        return result


_KUBERNETES_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


def _create_or_keep(create: Callable[[], object]) -> None:
    try:
        create()
    except k8s.ApiException as error:
        if error.status != 409:  # AlreadyExists
            raise


# ---------------------------------------------------------------------------------------------- CLI


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _up(control_plane: ControlPlane, images: Sequence[str] = ()) -> int:
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then leaves it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    started = time.monotonic()
    try:
        control_plane.start()
        for image in images:
            control_plane.node.import_docker_image(image)
        what = "cluster (with node " + NODE_NAME + ")" if control_plane.has_node else "control plane"
        if control_plane.has_node:
            steps = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in control_plane.node.timings.items())
            print(f"node: {steps} (after the API server)", flush=True)
        print(
            f"{what} ready in {time.monotonic() - started:.1f}s: {control_plane.server}\n"
            f"  kubeconfig: {control_plane.kubeconfig}\n"
            f"  logs:       {control_plane.workdir / 'logs'}\n"
            f"\nexport KUBECONFIG={control_plane.kubeconfig}\n"
            f"export PATH={control_plane.bin_dir}:$PATH\n"
            "\nCtrl-C (or `python -m e2e.controlplane down`) stops it and deletes the directory.",
            flush=True,
        )
        child = control_plane.wait()
        print(child.describe_exit(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
        return 0
    finally:
        control_plane.stop()


def _down() -> int:
    """Stop the node that `up` (or a test session) runs on this machine, or clean what a dead one left."""
    holder = node_host.lock_holder()
    if holder is not None and holder > 0:
        print(f"stopping the cluster of pid {holder}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder, signal.SIGTERM)
        deadline = time.monotonic() + 60.0
        while node_host.alive(holder) and time.monotonic() < deadline:
            time.sleep(0.2)  # its stop() removes the node, then the control plane
    try:
        lock = node_host.acquire_lock(timeout=60.0)
    except node_host.NodeBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        node_host.clean(_stderr_progress)
    finally:
        os.close(lock)
    print("no node running; host clean", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.controlplane", description=CLI_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the missing binaries into the cache")
    up = commands.add_parser("up", help="start a cluster and keep it running until Ctrl-C")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    up.add_argument("--no-node", action="store_true", help="etcd + kube-apiserver only: pods stay Pending")
    up.add_argument(
        "--image", action="append", default=[], metavar="REF", help="import a docker image into the node (repeatable)"
    )
    commands.add_parser("down", help="stop the node running on this machine and undo its host changes")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(ControlPlane().ensure_binaries())
            return 0
        if args.command == "down":
            return _down()
        return _up(ControlPlane(startup_timeout=args.timeout, node=not args.no_node), images=args.image)
    except (ControlPlaneError, NodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
