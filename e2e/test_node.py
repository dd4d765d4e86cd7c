"""The session cluster's node runs real pods, the way capgate's pods need them to run.

Each test makes objects in its own namespace and checks what a user would see with kubectl: the
node is Ready, a native sidecar starts before the main container, Secret volumes and projected
ServiceAccount tokens are mounted, ``kubectl logs``/``exec`` work, a Deployment gets its replicas
through controller-manager and scheduler, Services answer by ``*.svc`` name and ClusterIP (also when
the host drops forwarded traffic, as dockerd's FORWARD policy does), and a pod
reaches the API server through the ``kubernetes`` Service with its own token.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.controlplane import ControlPlane, ControlPlaneError
from e2e.node import BRIDGE, NODE_ADDRESS, NODE_NAME, Node, NodeError
from e2e.node_images import BUSYBOX_IMAGE


@pytest.fixture
def namespace(control_plane: ControlPlane) -> str:
    name = f"node-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    return name


def _apply(plane: ControlPlane, namespace: str, *objects: dict[str, Any]) -> None:
    manifest = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def _wait_ready(plane: ControlPlane, namespace: str, *selector: str) -> None:
    try:
        plane.node.wait_pods_ready(namespace, *selector)
    except NodeError as error:
        raise AssertionError(str(error)[-10000:]) from error


def _busybox(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        **extra,
    }


def _exec(plane: ControlPlane, namespace: str, pod: str, container: str, script: str) -> str:
    return plane.kubectl("exec", "-n", namespace, pod, "-c", container, "--", "sh", "-c", script).stdout


def test_the_node_is_ready_with_its_internal_address(control_plane: ControlPlane, node: Node) -> None:
    described = json.loads(control_plane.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in described["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    addresses = {a["type"]: a["address"] for a in described["status"]["addresses"]}
    assert addresses["InternalIP"] == NODE_ADDRESS
    assert described["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node.timings["node-ready"] < 120


def test_a_pod_with_a_native_sidecar_secret_and_token(control_plane: ControlPlane, namespace: str) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "credentials"},
        "stringData": {"key": "s3cr3t-value"},
    }
    # The pod's own token may read the pod: proves the projected token works against the real API.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "read-pods"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "read-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
    }
    sidecar = _busybox(
        "sidecar",
        "date +%s > /shared/sidecar-started; echo sidecar up; exec httpd -f -p 127.0.0.1:8081 -h /shared",
        restartPolicy="Always",  # a native sidecar: an init container that keeps running
        volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
        readinessProbe={"exec": {"command": ["test", "-f", "/shared/sidecar-started"]}, "periodSeconds": 1},
    )
    main = _busybox(
        "main",
        # The sidecar was started first; containers of a pod share 127.0.0.1.
        "test -f /shared/sidecar-started && echo sidecar-first;"
        " wget -q -O- http://127.0.0.1:8081/sidecar-started >/dev/null && echo loopback-shared;"
        " echo main up; exec sleep 3600",
        volumeMounts=[
            {"name": "shared", "mountPath": "/shared"},
            {"name": "credentials", "mountPath": "/credentials", "readOnly": True},
        ],
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent"},
        "spec": {
            "initContainers": [sidecar],
            "containers": [main],
            "volumes": [
                {"name": "shared", "emptyDir": {}},
                {"name": "credentials", "secret": {"secretName": "credentials"}},
            ],
            "terminationGracePeriodSeconds": 1,
        },
    }
    _apply(control_plane, namespace, secret, role, binding, pod)
    _wait_ready(control_plane, namespace, "pod/agent")

    logs = control_plane.kubectl("logs", "-n", namespace, "agent", "-c", "main").stdout
    assert "sidecar-first" in logs
    assert "loopback-shared" in logs
    assert "sidecar up" in control_plane.kubectl("logs", "-n", namespace, "agent", "-c", "sidecar").stdout
    assert _exec(control_plane, namespace, "agent", "main", "cat /credentials/key") == "s3cr3t-value"

    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    answer = _exec(
        control_plane,
        namespace,
        "agent",
        "main",
        # The projected token and CA, through the `kubernetes` Service (kube-proxy DNAT to the API server).
        f"kubeget https://kubernetes.default.svc/api/v1/namespaces/$(cat {token_dir}/namespace)/pods/agent",
    )
    assert json.loads(answer)["metadata"]["name"] == "agent"
    # controller-manager published the cluster CA into the namespace, and kubelet projected it.
    ca = _exec(control_plane, namespace, "agent", "main", f"cat {token_dir}/ca.crt")
    assert ca.encode() == control_plane.ca_path.read_bytes()


def test_a_service_over_a_deployment_answers_by_name_and_cluster_ip_even_with_forward_dropped(
    control_plane: ControlPlane, namespace: str
) -> None:
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        _busybox(
                            "web",
                            "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www",
                            ports=[{"containerPort": 8080}],
                            readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                        )
                    ],
                    "terminationGracePeriodSeconds": 1,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    client = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client"},
        "spec": {"containers": [_busybox("client", "exec sleep 3600")], "terminationGracePeriodSeconds": 1},
    }
    _apply(control_plane, namespace, deployment, service, client)
    _wait_ready(control_plane, namespace, "pods", "--all")
    pods = json.loads(control_plane.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "json").stdout)
    replicas = {p["metadata"]["name"] for p in pods["items"] if p["status"]["phase"] == "Running"}
    assert len(replicas) == 2
    assert all(p["spec"]["nodeName"] == NODE_NAME for p in pods["items"])  # placed by kube-scheduler

    cluster_ip = control_plane.kubectl(
        "get", "service", "web", "-n", namespace, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    answers = set()
    with _forward_dropped_but_for_cni():
        for url in (f"http://web.{namespace}.svc.cluster.local/", "http://web/", f"http://{cluster_ip}/"):
            answers.add(_fetch_from(control_plane, namespace, url))
    assert answers <= replicas and answers  # every answer came from one of the Deployment's pods


@contextlib.contextmanager
def _forward_dropped_but_for_cni() -> Iterator[None]:
    """What dockerd's FORWARD policy DROP does to the node's bridge, without touching other traffic."""
    rules = [["-o", BRIDGE, "-j", "DROP"], ["-i", BRIDGE, "-j", "DROP"]]
    for rule in rules:
        subprocess.run(["iptables", "-w", "-A", "FORWARD", *rule], check=True)
    try:
        yield
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-w", "-D", "FORWARD", *rule], check=False)


def _fetch_from(control_plane: ControlPlane, namespace: str, url: str) -> str:
    # kube-proxy programs rules within a second of the endpoints; retry briefly rather than sleep.
    # (busybox 1.35's `wget -T` crashes: `timeout` bounds each try instead)
    script = f"for i in 1 2 3 4 5 6 7 8 9 10; do timeout 2 wget -q -O- {url} && exit 0; sleep 0.5; done; exit 1"
    try:
        return _exec(control_plane, namespace, "client", "client", script).strip()
    except ControlPlaneError as error:
        raise AssertionError(f"{url} unreachable from a pod:\n{error}\n{control_plane.log_tails()[-4000:]}") from error
