"""A real Kubernetes node for the local control plane: containerd, kubelet, kube-proxy, the controllers.

With ``ControlPlane(node=True)`` the test cluster runs real pods: kube-controller-manager and
kube-scheduler make Deployments into scheduled pods, kubelet runs them through Debian's containerd
1.6 + runc with the CNI bridge, kube-proxy programs Services, and CoreDNS answers ``*.svc`` names.
Every binary but containerd/runc/CNI comes from ``hack/build-controlplane.sh`` (Go module proxy).

Choices worth knowing:

- **Addresses.** Pods cannot reach 127.0.0.1 of the host, so the node gets ``NODE_ADDRESS`` on ``lo``:
  the API server binds there (and only there), kubelet serves there (its InternalIP), and CoreDNS
  answers there on port 53. The address is host-local (nothing routes it from outside).
- **DNS.** CoreDNS (``hack/controlplane/coredns``: only the plugins used here) runs as a host process,
  not as a pod: it needs no image and is up before the first pod. Pods get it as their nameserver
  (kubelet ``clusterDNS: [NODE_ADDRESS]``), so there is no ``kube-dns`` Service to DNAT through.
- **Images.** No registry: containerd's ``sandbox_image`` is ``capgate.local/pause:3.10`` and tests use
  ``capgate.local/busybox:e2e``, both made by :mod:`e2e.node_images` and imported into the ``k8s.io``
  namespace. containerd's root (images and snapshots) lives in ``CAPGATE_CACHE/node/containerd`` and is
  kept between runs, so an import is paid once; :meth:`Node.import_image` adds others (the capgate
  image), skipped when the same archive was imported before.
- **cgroup v1 and this VM.** kubelet 1.35 needs ``failCgroupV1: false``; ``cgroupfs`` driver; no swap
  check. root here lacks CAP_SYS_RESOURCE, so containerd's CRI runs with ``restrict_oom_score_adj`` and
  kubelet with ``oomScoreAdj: 0``. dockerd, when it runs, sets FORWARD to DROP: the CNI chain has the
  ``firewall`` plugin.
- **Identities.** Each daemon has its own client certificate from the control plane's CA, the one
  Kubernetes' bootstrap RBAC expects (``system:node:<name>`` in ``system:nodes`` for kubelet, with the
  Node authorizer and NodeRestriction on; ``system:kube-proxy``, ``system:kube-controller-manager``,
  ``system:kube-scheduler``); CoreDNS gets ``system:coredns`` and a read-only ClusterRole.
- **One node per machine.** Ports 10248/10249/10250/10256, ``/kubepods`` cgroups, the bridge and the
  pod CIDR are global. A lock (``/run/capgate-node.lock``) makes a second node fail at once.
- **No orphans.** The daemons get ``PR_SET_PDEATHSIG`` like the control plane; shims, pods, mounts,
  iptables chains, sysctls, the bridge and the address are undone by :mod:`e2e.node_host`, by
  ``stop()`` or, if the test process was killed, by its janitor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client as k8s

from e2e import node_host, node_images, pki
from e2e.processes import Child, answers_ok, free_ports, spawn, tail

if TYPE_CHECKING:
    from e2e.controlplane import ControlPlane

NODE_NAME = "capgate-node"
NODE_ADDRESS = "10.200.0.1"  # on lo: routable from pods, not from outside the host
CLUSTER_CIDR = "10.244.0.0/16"
POD_CIDR = "10.244.0.0/24"
BRIDGE = "capgate0"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap", "firewall")
NODE_BINARIES = ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler", "coredns")
KUBE_PROXY_HEALTHZ = "http://127.0.0.1:10256/healthz"
KUBELET_HEALTHZ = "http://127.0.0.1:10248/healthz"
STOP_GRACE_SECONDS = 5.0
LOCK_TIMEOUT_SECONDS = 15.0  # a janitor still cleaning up after the previous run releases it soon
# Seconds to queue behind another running node (worktrees sharing a machine); 0: refuse at once.
NODE_WAIT_SECONDS = float(os.environ.get("CAPGATE_NODE_WAIT_S", "0"))
HOST_PACKAGES = "containerd runc containernetworking-plugins iptables iproute2 busybox-static gcc libc6-dev"

Progress = Callable[[str], None]


class NodeError(RuntimeError):
    """The node could not start; the message says why, with log tails."""


def _cache_dir() -> Path:
    return Path(os.environ.get("CAPGATE_CACHE", Path.home() / ".cache" / "capgate")) / "node"


class Node:
    """The node of a :class:`~e2e.controlplane.ControlPlane`; started and stopped by it."""

    def __init__(
        self,
        plane: ControlPlane,
        progress: Progress,
        timeout: float = 120.0,
        kubelet_config: Mapping[str, object] | None = None,
    ) -> None:
        """``kubelet_config``: KubeletConfiguration fields that replace the defaults here (for example
        ``syncFrequency``, which bounds how soon a changed Secret reaches a pod's volume)."""
        self.plane = plane
        self.timeout = timeout
        self._kubelet_overrides = dict(kubelet_config or {})
        self._progress = progress
        self._children: list[Child] = []
        self._lock_fd: int | None = None
        self._janitor: subprocess.Popen[bytes] | None = None
        self.state_dir = node_host.STATE_DIR
        self.containerd_root = _cache_dir() / "containerd"
        self.timings: dict[str, float] = {}
        self._ready_port = 0
        self._health_port = 0

    # ---- paths

    @property
    def containerd_socket(self) -> Path:
        return self.state_dir / "containerd" / "containerd.sock"

    @property
    def _config_dir(self) -> Path:
        return self.state_dir / "config"

    @property
    def children(self) -> list[Child]:
        return list(self._children)

    # ---- host preparation (before the API server starts: it binds NODE_ADDRESS)

    def check_prerequisites(self, bin_dir: Path) -> None:
        problems = [f"{tool} (not on PATH)" for tool in HOST_TOOLS if shutil.which(tool, path=_path()) is None]
        problems += [f"{CNI_BIN_DIR / p}" for p in CNI_PLUGINS if not os.access(CNI_BIN_DIR / p, os.X_OK)]
        problems += [str(bin_dir / name) for name in NODE_BINARIES if not os.access(bin_dir / name, os.X_OK)]
        if os.geteuid() != 0:
            problems.append("root (a node changes cgroups, mounts, iptables and sysctls)")
        if problems:
            raise NodeError(
                "the local node needs: " + ", ".join(problems) + f"\n(Debian packages: {HOST_PACKAGES}; "
                "the rest comes from hack/build-controlplane.sh)"
            )

    def prepare_host(self, bin_dir: Path) -> None:
        """Take the node lock, clean leftovers, record the host state, start the janitor, add the address."""
        self.check_prerequisites(bin_dir)
        try:
            self._lock_fd = node_host.acquire_lock(LOCK_TIMEOUT_SECONDS, NODE_WAIT_SECONDS)
        except node_host.NodeBusyError as error:
            raise NodeError(str(error)) from None
        node_host.clean(self._progress)  # whatever a killed run (and its killed janitor) left
        node_host.record(
            node_host.HostState(
                address=NODE_ADDRESS,
                bridge=BRIDGE,
                sysctls=node_host.read_sysctls(),
                kube_proxy=str(bin_dir / "kube-proxy"),
            )
        )
        self._janitor = node_host.start_janitor(self._lock_fd, self.plane.workdir / "logs" / "node-janitor.log")
        result = subprocess.run(
            ["ip", "address", "add", f"{NODE_ADDRESS}/32", "dev", "lo"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise NodeError(f"cannot add {NODE_ADDRESS}/32 to lo: {result.stderr.strip()}")

    # ---- start

    def start(self, bin_dir: Path) -> None:
        """Start every node process and return once the node is Ready and Services and DNS work."""
        started = time.monotonic()
        deadline = started + self.timeout
        self._write_configs()
        self._apply_rbac()
        self._spawn(
            "containerd", ["containerd", "--log-level=warn", "--config", str(self._config_dir / "containerd.toml")]
        )
        self._spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self._kubeconfig('kube-controller-manager')}",
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--root-ca-file={self.plane.ca_path}",
                f"--service-account-private-key-file={self.plane.workdir / 'pki' / 'sa.key'}",
                f"--cluster-cidr={CLUSTER_CIDR}",
                "--allocate-node-cidrs=false",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={self._kubeconfig('kube-scheduler')}",
                "--secure-port=0",
                "--leader-elect=false",
            ],
        )
        self._spawn("coredns", [str(bin_dir / "coredns"), "-conf", str(self._config_dir / "Corefile")])
        self._wait(deadline, "containerd", self.containerd_socket.exists)
        self.timings["containerd"] = time.monotonic() - started
        self._import_images()
        self.timings["images"] = time.monotonic() - started
        self._spawn(
            "kubelet",
            [
                str(bin_dir / "kubelet"),
                f"--config={self._config_dir / 'kubelet.json'}",
                f"--kubeconfig={self._kubeconfig('kubelet')}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_ADDRESS}",
                f"--root-dir={self.state_dir / 'kubelet'}",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-proxy", [str(bin_dir / "kube-proxy"), f"--config={self._config_dir / 'kube-proxy.json'}", "--v=1"]
        )
        node_host.record(self._host_state(bin_dir))
        self._wait(deadline, "kubelet", self._node_ready)
        self.timings["node-ready"] = time.monotonic() - started
        self._wait(deadline, "kube-proxy", lambda: answers_ok(KUBE_PROXY_HEALTHZ))
        self._wait(deadline, "coredns", lambda: answers_ok(f"http://127.0.0.1:{self._ready_port}/ready"))
        self.timings["ready"] = time.monotonic() - started

    def _host_state(self, bin_dir: Path) -> node_host.HostState:
        state = node_host.HostState(
            address=NODE_ADDRESS, bridge=BRIDGE, kube_proxy=str(bin_dir / "kube-proxy"), sysctls={}
        )
        with contextlib.suppress(OSError, ValueError):
            state.sysctls = json.loads(node_host.STATE_FILE.read_text())["sysctls"]
        state.daemons = {child.name: child.process.pid for child in self._children}
        return state

    def _spawn(self, name: str, argv: Sequence[str]) -> Child:
        env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
        env["PATH"] = _path()
        child = spawn(name, argv, self.plane.workdir / "logs", env=env, grace_seconds=STOP_GRACE_SECONDS)
        self._children.append(child)
        return child

    def _child(self, name: str) -> Child:
        return next(child for child in self._children if child.name == name)

    def _wait(self, deadline: float, name: str, ready: Callable[[], bool]) -> None:
        while True:
            for child in self._children:
                if child.process.poll() is not None:
                    raise NodeError(child.describe_exit() + self._log_tails(exclude=child.name))
            if ready():
                return
            if time.monotonic() > deadline:
                raise NodeError(f"{name} not ready after {self.timeout:.0f}s" + self._log_tails())
            time.sleep(0.2)  # polling local daemons; nothing to wait on instead

    def _log_tails(self, exclude: str = "") -> str:
        return "".join(
            f"\n--- {child.log_path}\n{tail(child.log_path)}" for child in self._children if child.name != exclude
        )

    def wait_pods_ready(self, namespace: str, *selector: str, timeout: float = 90.0) -> None:
        """``kubectl wait`` until the pods are Ready (``selector``: ``pod/NAME``, ``-l k=v``, ``pods --all``).

        On timeout the error carries ``kubectl describe pods`` and the node's log tails: why a pod is
        not Ready is nearly always in one of them (image missing, probe failing, CNI, kubelet).
        """
        result = self.plane.kubectl(
            "wait", "-n", namespace, "--for=condition=Ready", f"--timeout={timeout:.0f}s", *selector, check=False
        )
        if result.returncode != 0:
            described = self.plane.kubectl("describe", "pods", "-n", namespace, check=False).stdout
            raise NodeError(
                f"pods not Ready in {namespace}: {result.stderr.strip()}\n{described[-4000:]}" + self._log_tails()
            )

    def _node_ready(self) -> bool:
        with contextlib.closing(self.plane.client()) as api:
            try:
                node = k8s.CoreV1Api(api).read_node(NODE_NAME)
            except k8s.ApiException:
                return False
        conditions = node.status.conditions or [] if node.status else []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    # ---- stop

    def stop(self) -> None:
        """Stop the daemons, undo every host change, dismiss the janitor and release the lock."""
        self.stop_daemons()
        self.release_host()

    def stop_daemons(self) -> None:
        """Stop the node's processes (TERM all at once, then KILL), leaving the host as it is."""
        for child in self._children:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, 15)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.0, deadline - time.monotonic()))
        while self._children:
            self._children.pop().stop()  # SIGKILLs what is left

    def release_host(self) -> None:
        """Undo every host change (pods, mounts, chains, bridge, address, sysctls) and release the lock.

        After the API server has stopped: it binds the node address, and would otherwise spend its
        shutdown timing out on a request to itself.
        """
        if self._lock_fd is None:
            return
        node_host.clean(self._progress)
        if self._janitor is not None:
            node_host.dismiss_janitor(self._janitor)
            self._janitor = None
        os.close(self._lock_fd)
        self._lock_fd = None

    # ---- images

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env={**os.environ, "PATH": _path()})
        if check and result.returncode != 0:
            raise NodeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def import_image(self, archive: Path, reference: str) -> bool:
        """Import a ``docker save`` archive into containerd's ``k8s.io`` namespace, unless it already was.

        Returns whether an import happened. The marker is the archive's SHA-256, stored beside
        containerd's root, and the image must still be listed (a wiped root re-imports).
        """
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        marker = self._import_marker(reference)
        listed = reference in self.ctr("images", "list", "--quiet").stdout.split()
        if listed and marker.is_file() and marker.read_text() == digest:
            return False
        started = time.monotonic()
        self.ctr("images", "import", str(archive))
        pki.write(marker, digest.encode())
        self._progress(f"node: imported {reference} in {time.monotonic() - started:.1f}s")
        return True

    def import_docker_image(self, reference: str) -> bool:
        """Import an image from the local dockerd (``make image`` builds there) into the node's containerd.

        Skipped when the same image ID was imported before and is still listed; returns whether an
        import happened. ``docker save`` streams straight into ``ctr images import``.
        """
        argv = ["docker", "image", "inspect", "--format", "{{.Id}}", reference]
        inspect = subprocess.run(argv, capture_output=True, text=True, check=False)
        if inspect.returncode != 0:
            raise NodeError(f"docker has no image {reference}: {inspect.stderr.strip()}")
        image_id = inspect.stdout.strip()
        marker = self._import_marker(reference)
        listed = reference in self.ctr("images", "list", "--quiet").stdout.split()
        if listed and marker.is_file() and marker.read_text() == image_id:
            return False
        started = time.monotonic()
        ctr = ["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", "images", "import", "-"]
        env = {**os.environ, "PATH": _path()}
        with subprocess.Popen(["docker", "save", reference], stdout=subprocess.PIPE) as save:
            imported = subprocess.run(ctr, stdin=save.stdout, capture_output=True, text=True, check=False, env=env)
        if save.returncode != 0 or imported.returncode != 0:
            raise NodeError(f"importing {reference} from docker failed: {imported.stderr.strip()}")
        pki.write(marker, image_id.encode())
        self._progress(f"node: imported {reference} from docker in {time.monotonic() - started:.1f}s")
        return True

    def _import_marker(self, reference: str) -> Path:
        return self.containerd_root.parent / "imported" / hashlib.sha256(reference.encode()).hexdigest()[:16]

    def _import_images(self) -> None:
        for reference, archive in node_images.build(self.state_dir / "images").items():
            self.import_image(archive, reference)

    # ---- configuration

    def _kubeconfig(self, name: str) -> Path:
        return self._config_dir / f"{name}.kubeconfig"

    def _write_configs(self) -> None:
        config = self._config_dir
        self._ready_port, self._health_port = free_ports(2)
        identities = {
            "kubelet": (f"system:node:{NODE_NAME}", ("system:nodes",)),
            "kube-proxy": ("system:kube-proxy", ()),
            "kube-controller-manager": ("system:kube-controller-manager", ()),
            "kube-scheduler": ("system:kube-scheduler", ()),
            "coredns": ("system:coredns", ()),
        }
        for name, (user, groups) in identities.items():
            self.plane.write_client_kubeconfig(self._kubeconfig(name), user, groups)
        key, cert = self.plane.issue_pem("kubelet-serving", hosts=(NODE_ADDRESS, NODE_NAME), server=True)
        pki.write(config / "kubelet-serving.key", key, private=True)
        pki.write(config / "kubelet-serving.crt", cert)
        pki.write(config / "containerd.toml", self._containerd_config().encode())
        pki.write(self.state_dir / "cni" / "net.d" / "10-capgate.conflist", json.dumps(_cni_config()).encode())
        kubelet = {**self._kubelet_config(), **self._kubelet_overrides}
        pki.write(config / "kubelet.json", json.dumps(kubelet).encode())
        pki.write(config / "kube-proxy.json", json.dumps(self._kube_proxy_config()).encode())
        pki.write(config / "Corefile", self._corefile().encode())

    def _containerd_config(self) -> str:
        state = self.state_dir / "containerd"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{self.containerd_root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{state}/containerd.sock.ttrpc"

[metrics]
  address = ""

[{cri}]
  sandbox_image = "{node_images.PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: runc would fail to lower the shim's oom_score_adj.
  restrict_oom_score_adj = true
  # the state directory is private to this node: network namespaces are bind-mounted under it.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{state}/runc"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{self.state_dir / "cni" / "net.d"}"
"""

    def _kubelet_config(self) -> dict[str, object]:
        config = self._config_dir
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # this host is cgroup v1
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE, see containerd's restrict_oom_score_adj
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": NODE_ADDRESS,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "tlsCertFile": str(config / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(config / "kubelet-serving.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.ca_path)},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [NODE_ADDRESS],
            "clusterDomain": CLUSTER_DOMAIN,
            "podLogsDir": str(self.state_dir / "pod-logs"),
            "registerNode": True,
            "serializeImagePulls": False,
            # Never evict or garbage-collect images on a shared dev disk: the images cannot be pulled back.
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "2s",
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }

    def _kube_proxy_config(self) -> dict[str, object]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self._kubeconfig("kube-proxy"))},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": CLUSTER_CIDR,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # Not localhost: kube-proxy would then set route_localnet, one more sysctl to restore.
            "nodePortAddresses": [f"{NODE_ADDRESS}/32"],
            # Zero leaves the host's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
        }

    def _corefile(self) -> str:
        kubeconfig = self._kubeconfig("coredns")
        return f""".:53 {{
    bind {NODE_ADDRESS}
    errors
    health 127.0.0.1:{self._health_port}
    ready 127.0.0.1:{self._ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} capgate-e2e
        pods insecure
        ttl 5
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 5
    loop
}}
"""

    def _apply_rbac(self) -> None:
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        }
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}],
        }
        manifest = {"apiVersion": "v1", "kind": "List", "items": [role, binding]}
        self.plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def _cni_config() -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "capgate",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # pods talk to the host and to each other only
                "hairpinMode": True,  # a pod reaching itself through its own Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node_host.STATE_DIR / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "firewall"},  # dockerd's FORWARD DROP would otherwise drop pod-to-pod traffic
        ],
    }


def _path() -> str:
    """PATH for the node's daemons: Debian puts runc and iptables in sbin."""
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
