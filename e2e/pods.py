"""capgate on real pods: the chart installed from the local image, upstreams and agents as Deployments.

:class:`Stack` is what ``e2e/test_pods.py`` drives. Everything runs in pods on the session's node:

- the operator, from the image ``make image`` built (imported into the node's containerd, never pulled),
  installed by ``helm install`` with :func:`local_image_values`;
- three upstreams, each a Deployment of the same image running ``pod_scripts/upstream.py`` from a
  ConfigMap: ``flights`` (plain HTTP), ``payments`` (HTTPS, a certificate for ``payments.<ns>.svc``
  from a test CA whose ``ca.crt`` sits beside it in the Secret, cert-manager style, and is what the
  capability's ``tls.caSecretRef`` names) and ``ledger`` (declared nowhere: what an agent must not reach);
- the agent, an ordinary Deployment with 2 replicas labelled ``capgate.dev/capability``, running as
  UID :data:`AGENT_UID` (non-root, not the sidecar's 65532), whose container only sleeps; tests act as
  the agent with ``kubectl exec`` running ``pod_scripts/agent.py`` (urllib and raw sockets).

- steady-agent, a second capability (flights only, a credential valid for an hour) with a one-replica
  Deployment, for session keys renewed under an unchanged credential; and, for one test, oom-agent, a
  replica of booking-agent whose sidecar gets a memory limit a flood of large bodies crosses.

Upstreams print one JSON line per thing they receive, so "what the upstream saw" is ``kubectl logs``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capgate import resources
from capgate.operator import certificates
from e2e.external import Cluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLE = REPO / "examples" / "booking-agent.yaml"
UPSTREAM_SCRIPT = HERE / "pod_scripts" / "upstream.py"
AGENT_SCRIPT = HERE / "pod_scripts" / "agent.py"

CAPABILITY = "booking-agent"
SERVICE_ACCOUNT = "booking-agent"
AGENT = "booking-agent"
REPLICAS = 2
AGENT_UID = 1000  # any UID but the sidecar's 65532 (whose traffic the egress rules exempt)
HTTP_PORT = 8080
TLS_PORT = 8443
RAW_PORT = 9000
API_KEY = "sk_pods_payments_5f2c8e0d"
AGENT_AUTHORIZATION = "Bearer agent-made-this-up"
READY_TIMEOUT_S = 180
CREDENTIAL_TTL, ROTATE_BEFORE = "2m", "110s"
WEBHOOK_REACHABLE_S = 30  # kube-proxy programs a new endpoint within a second or two; generous on 2 shared cores
IDLE = "import time\nwhile True:\n    time.sleep(3600)\n"
# A capability whose credential does not change while the suite runs (1 h): its session keys are renewed on
# their own, every 40 s in this suite (lifetime - renewal lead, see session_key_values).
STEADY = "steady-agent"  # the capability, its ServiceAccount and its Deployment (1 replica)
SESSION_KEY_LIFETIME_S, SESSION_KEY_RENEW_BEFORE_S = 150, 110
# An agent whose sidecar gets a memory limit its normal work fits in and a flood of large bodies does not.
OOM_AGENT = "oom-agent"
OOM_MEMORY_LIMIT = "80Mi"


def local_image_values(ref: str, pull_policy: str = "Never") -> list[str]:
    """``helm --set`` flags for the operator's and the sidecar's image: by default one already on the node."""
    repository, _, tag = ref.rpartition(":")
    return ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", f"image.pullPolicy={pull_policy}", "--set", f"sidecar.image.pullPolicy={pull_policy}"]


def session_key_values() -> list[str]:
    """``helm --set`` flags for session keys renewed every 40 s, each signing for 150 s.

    The lead (110 s, plus the 30 s a sidecar may sign past the end) covers the kubelet's Secret sync
    (60-90 s) with time to spare for the operator restarts of the upgrade tests.
    """
    return ["--set", f"sessionKeys.lifetime={SESSION_KEY_LIFETIME_S}s",
            "--set", f"sessionKeys.renewBefore={SESSION_KEY_RENEW_BEFORE_S}s"]


# ---------------------------------------------------------------------------------------------- manifests

def capability(namespace: str) -> dict[str, Any]:
    """examples/booking-agent.yaml for this namespace, its upstreams being the pods below."""
    obj: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"] = {"name": CAPABILITY, "namespace": namespace}
    spec = obj["spec"]
    spec.pop("datalog", None)  # the example's calendar check; not what these tests are about
    # The revocation test polls each sidecar every few ms; the example's 600/h would answer 429 first.
    spec["rateLimit"] = {"requests": 100000, "per": "1h"}
    # A credential re-minted every ~10 s, so the kubelet's real Secret sync (up to about a minute) is seen
    # rotating it in a running sidecar while every other test runs; each one is valid for 2 minutes.
    spec["credential"] = {"ttl": CREDENTIAL_TTL, "rotateBefore": ROTATE_BEFORE}
    flights, payments = spec["upstreams"]
    flights["url"] = f"http://flights.{namespace}.svc:{HTTP_PORT}"
    payments["url"] = f"https://payments.{namespace}.svc:{TLS_PORT}"
    payments["tls"] = {"caSecretRef": {"name": "payments-tls", "key": "ca.crt"}}
    return obj


def steady_capability(namespace: str) -> dict[str, Any]:
    """search, and book which requires search's receipt: every round needs a freshly signed receipt."""
    flights = f"http://flights.{namespace}.svc:{HTTP_PORT}"
    return {"apiVersion": f"{resources.GROUP}/{resources.VERSION}", "kind": "AgentCapability",
            "metadata": {"name": STEADY, "namespace": namespace},
            "spec": {"serviceAccountName": STEADY, "upstreams": [{"name": "flights", "url": flights}],
                     "rules": [{"name": "search", "effect": "allow", "upstream": "flights", "methods": ["GET"],
                                "paths": ["/search"]},
                               {"name": "book", "effect": "allow", "upstream": "flights", "methods": ["POST"],
                                "paths": ["/book"], "requires": ["search"]}],
                     "rateLimit": {"requests": 100000, "per": "1h"},
                     "credential": {"ttl": "1h", "rotateBefore": "10m"},
                     # Short-lived: a held search receipt opens book for 5 s (+30 s skew), not for minutes.
                     "receipts": {"ttl": "5s"}}}


def _upstream(name: str, port: int, *, tls: bool) -> list[dict[str, Any]]:
    labels = {"app": name}
    env = [{"name": "NAME", "value": name}, {"name": "PORT", "value": str(port)},
           {"name": "RAW_PORT", "value": str(RAW_PORT)}]
    mounts = [{"name": "script", "mountPath": "/app", "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "script", "configMap": {"name": "upstream-script"}}]
    if tls:
        env.append({"name": "TLS_DIR", "value": "/tls"})
        mounts.append({"name": "tls", "mountPath": "/tls", "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": "payments-tls"}})
    container = {"name": "server", "image": "IMAGE", "imagePullPolicy": "Never",
                 "command": ["python", "/app/upstream.py"], "env": env, "volumeMounts": mounts,
                 "ports": [{"containerPort": port}, {"containerPort": RAW_PORT}],
                 "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
                  "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                      "metadata": {"labels": labels},
                      "spec": {"containers": [container], "volumes": volumes,
                               "terminationGracePeriodSeconds": 1}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"selector": labels, "ports": [
                   {"name": "api", "port": port, "targetPort": port, "protocol": "TCP"},
                   {"name": "raw", "port": RAW_PORT, "targetPort": RAW_PORT, "protocol": "TCP"},
                   {"name": "udp", "port": port, "targetPort": port, "protocol": "UDP"}]}}
    return [deployment, service]


def agent_deployment(replicas: int = REPLICAS, *, name: str = AGENT, capability: str = CAPABILITY,
                     account: str = SERVICE_ACCOUNT, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An ordinary Deployment: nothing capgate-specific but the label (and the ServiceAccount it is bound to).

    Its container idles (tests ``kubectl exec`` the agent script), or with ``calls`` runs the agent script
    on them from the start, as its own command.
    """
    labels = {"app": name, resources.CAPABILITY_LABEL: capability}
    container: dict[str, Any] = {
        "name": "agent", "image": "IMAGE", "imagePullPolicy": "Never", "command": ["python", "-c", IDLE],
        "securityContext": {"runAsUser": AGENT_UID, "runAsGroup": AGENT_UID, "runAsNonRoot": True}}
    volumes: list[dict[str, Any]] = []
    if calls is not None:
        container["command"] = ["python", "/app/agent.py", json.dumps(calls)]
        container["volumeMounts"] = [{"name": "script", "mountPath": "/app", "readOnly": True}]
        volumes.append({"name": "script", "configMap": {"name": "upstream-script"}})
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"serviceAccountName": account, "containers": [container], "volumes": volumes,
                         "terminationGracePeriodSeconds": 1}}}}


def upstream_objects(namespace: str) -> list[dict[str, Any]]:
    """Secrets, the script ConfigMap, the ServiceAccount and the three upstream Deployments + Services."""
    hosts = [f"payments.{namespace}.svc", f"payments.{namespace}.svc.cluster.local"]
    tls = certificates.issue(hosts)
    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "payments-api-key"},
         "stringData": {"token": API_KEY}},
        # The layout cert-manager writes: the server's pair and the CA that signed it, in one Secret.
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "payments-tls"}, "type": "kubernetes.io/tls",
         "stringData": {"tls.crt": tls.cert_pem.decode(), "tls.key": tls.key_pem.decode(),
                        "ca.crt": tls.ca_pem.decode()}},
    ]
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "upstream-script"},
              "data": {"upstream.py": UPSTREAM_SCRIPT.read_text(), "agent.py": AGENT_SCRIPT.read_text()}}
    accounts = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
                for name in (SERVICE_ACCOUNT, STEADY)]
    return [*secrets, config, *accounts, *_upstream("flights", HTTP_PORT, tls=False),
            *_upstream("payments", TLS_PORT, tls=True), *_upstream("ledger", HTTP_PORT, tls=False)]


def with_image(objects: list[dict[str, Any]], image: str, pull_policy: str = "Never") -> list[dict[str, Any]]:
    """The objects with every Deployment container's image set to ``image`` (written ``IMAGE`` above)."""
    out = json.loads(json.dumps(objects))
    for obj in out:
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                container["image"], container["imagePullPolicy"] = image, pull_policy
    return list(out)


# ---------------------------------------------------------------------------------------------- the stack

@dataclass
class Stack:
    plane: Cluster
    namespace: str
    image: str
    pull_policy: str = "Never"
    timings: dict[str, float] = field(default_factory=dict)
    replicas: int = REPLICAS
    tweak: Callable[[dict[str, Any]], None] | None = None
    """Changes :func:`capability`'s object in place before it is applied (another module's own rules)."""

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl("-n", self.namespace, *args, input=input, check=check)

    def apply(self, objects: list[dict[str, Any]]) -> None:
        """``kubectl apply``; retried while the API server cannot reach the webhook *yet*.

        A Ready operator pod is not yet an endpoint kube-proxy has programmed (the Service answers
        "connection refused" until it is), so a failed call of the webhook is retried for a while;
        any other error, or one that lasts, fails the test.
        """
        items = with_image(objects, self.image, self.pull_policy)
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        deadline = time.monotonic() + WEBHOOK_REACHABLE_S
        while True:
            result = self.kubectl("apply", "-f", "-", input=manifest, check=False)
            if result.returncode == 0:
                return
            if "failed calling webhook" not in result.stderr or time.monotonic() > deadline:
                raise AssertionError(f"kubectl apply failed: {result.stderr}\n{self.describe()}")
            time.sleep(0.5)

    def get(self, *what: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *what, "-o", "json").stdout))

    def describe(self) -> str:
        described = self.kubectl("describe", "pods", check=False).stdout
        events = self.kubectl("get", "events", "--sort-by=.lastTimestamp", check=False).stdout
        return f"{described[-5000:]}\n{events[-3000:]}\n{self.plane.log_tails()[-4000:]}"

    def rollout(self, deployment: str) -> float:
        """Seconds until the Deployment's pods are all Ready; on timeout, fail with what the node says."""
        started = time.monotonic()
        result = self.kubectl("rollout", "status", f"deployment/{deployment}", f"--timeout={READY_TIMEOUT_S}s",
                              check=False)
        if result.returncode != 0:
            raise AssertionError(f"deployment {deployment} not ready: {result.stderr}\n{self.describe()}")
        return time.monotonic() - started

    def start(self) -> None:
        self.plane.create_namespace(self.namespace)
        self.apply(upstream_objects(self.namespace))
        cap = capability(self.namespace)
        if self.tweak is not None:
            self.tweak(cap)
        self.apply([cap])
        self.kubectl("wait", f"acap/{CAPABILITY}", "--for=condition=Ready", "--timeout=60s")
        for name in ("flights", "payments", "ledger"):
            self.timings[f"upstream {name} ready s"] = self.rollout(name)
        self.apply([agent_deployment(self.replicas)])
        self.timings["agent deployment ready s"] = self.rollout(AGENT)

    def start_steady(self, calls: list[dict[str, Any]]) -> None:
        """The steady-agent capability and its one-replica Deployment (see :func:`steady_capability`),
        whose agent makes ``calls`` from the moment the pod starts."""
        self.apply([steady_capability(self.namespace)])
        self.kubectl("wait", f"acap/{STEADY}", "--for=condition=Ready", "--timeout=60s")
        self.apply([agent_deployment(1, name=STEADY, capability=STEADY, account=STEADY, calls=calls)])
        self.rollout(STEADY)

    def agent_log(self, app: str) -> list[dict[str, Any]]:
        """The JSON lines the agent container of Deployment ``app`` printed."""
        lines = self.kubectl("logs", f"deployment/{app}", "-c", "agent", "--tail=-1").stdout.splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def agent_pods(self, app: str = AGENT) -> list[dict[str, Any]]:
        pods = self.get("pods", "-l", f"app={app}")["items"]
        return [p for p in pods if p["metadata"].get("deletionTimestamp") is None]

    def pod_ip(self, app: str) -> str:
        (pod,) = self.get("pods", "-l", f"app={app}")["items"]
        return str(pod["status"]["podIP"])

    def agent(self, pod: str, calls: list[dict[str, Any]], script: Path = AGENT_SCRIPT) -> list[dict[str, Any]]:
        """Run the calls inside the agent container of ``pod``, as the agent's own process."""
        result = self.kubectl("exec", pod, "-c", "agent", "--", "python", "-c", script.read_text(),
                              json.dumps(calls))
        return list(json.loads(result.stdout.strip().splitlines()[-1]))

    def agent_process(self, pod: str, calls: list[dict[str, Any]],
                      script: Path = AGENT_SCRIPT) -> subprocess.Popen[str]:
        """:meth:`agent`, left running (for calls that wait for something, such as a revocation)."""
        argv = self.plane.kubectl_command("-n", self.namespace, "exec", pod, "-c", "agent", "--", "python", "-c",
                                          script.read_text(), json.dumps(calls))
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def seen(self, app: str) -> list[dict[str, Any]]:
        """Everything the upstream ``app`` received, one dict per request, connection or datagram."""
        lines = self.kubectl("logs", f"deployment/{app}", "--tail=-1").stdout.splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def sidecar_log(self, pod: str) -> str:
        return self.kubectl("logs", pod, "-c", "capgate-sidecar", "--tail=-1").stdout
