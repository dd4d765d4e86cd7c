"""The Helm chart against a real API server: install, what the API server accepts, RBAC, uninstall.

There is no kubelet (nor controller-manager), so the operator pod is never created; the release is
installed with ``--wait=false`` and the tests look at what the API server stored and what RBAC
allows. Nothing of the release may outlive this module: its webhook configurations fail closed and
share their (fixed) names with those an e2e operator process creates, so objects of those names that
exist before the install are set aside and put back afterwards, and the CRDs (which other tests'
AgentCapabilities live in) are adopted by the release rather than replaced.

With ``CAPGATE_E2E_KUBECONFIG`` (e2e/external.py) the release goes to that cluster; the last test,
which runs the operator as a local process against an API server of its own, still starts one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from capgate import resources
from capgate.operator import manifests
from e2e.controlplane import ControlPlane
from e2e.external import Cluster
from e2e.pods import local_image_values, session_key_values

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "capgate"
RELEASE = "capgate"
CRDS = (f"{resources.CAPABILITY_PLURAL}.{resources.GROUP}", f"{resources.REVOCATION_PLURAL}.{resources.GROUP}",
        f"{resources.USAGE_PLURAL}.{resources.GROUP}")
# Cluster-scoped objects of the chart that an e2e operator process (or an earlier run) may have made.
SHARED = (("mutatingwebhookconfiguration", manifests.MUTATING_CONFIG),
          ("validatingwebhookconfiguration", manifests.VALIDATING_CONFIG),
          ("clusterrole", manifests.REVOCATION_READER_ROLE), ("clusterrole", "capgate-admin"),
          ("clusterrole", "capgate-viewer"), ("clusterrole", f"{RELEASE}-operator"),
          ("clusterrolebinding", f"{RELEASE}-operator"))
KEEP_METADATA = ("name", "labels", "annotations")


@dataclass
class Release:
    plane: Cluster
    namespace: str
    installed: bool = False
    notes: str = ""
    set_aside: list[dict[str, Any]] = field(default_factory=list)

    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self.plane.kubectl("get", kind, name, "-o", "json", "--ignore-not-found")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def prepare(self) -> None:
        """Adopt existing CRDs into the release; set aside the other shared objects (restored later)."""
        for crd in CRDS:
            if self._get("customresourcedefinition", crd) is not None:
                self.plane.kubectl("label", "--overwrite", "customresourcedefinition", crd,
                                   "app.kubernetes.io/managed-by=Helm")
                self.plane.kubectl("annotate", "--overwrite", "customresourcedefinition", crd,
                                   f"meta.helm.sh/release-name={RELEASE}",
                                   f"meta.helm.sh/release-namespace={self.namespace}")
        for kind, name in SHARED:
            existing = self._get(kind, name)
            if existing is not None:
                existing["metadata"] = {k: v for k, v in existing["metadata"].items() if k in KEEP_METADATA}
                self.set_aside.append(existing)
                self.plane.kubectl("delete", kind, name, "--wait=true")

    def restore(self) -> None:
        for obj in self.set_aside:
            self.plane.kubectl("create", "-f", "-", input=json.dumps(obj))
        self.set_aside.clear()

    def install(self) -> None:
        if not self.installed:
            self.notes = self.plane.helm("install", RELEASE, str(CHART), "--namespace", self.namespace,
                                         "--create-namespace", "--wait=false").stdout
            self.installed = True

    def uninstall(self) -> str:
        self.installed = False
        return self.plane.helm("uninstall", RELEASE, "--namespace", self.namespace, "--wait").stdout

    def remove(self, stack_namespace: str | None = None) -> None:
        """A module's teardown: the release if it is still installed (with a module's ``stack_namespace``
        first and the release's own namespace after it, not waited for), then the shared objects set aside."""
        try:
            if stack_namespace is not None:
                self.plane.kubectl("delete", "namespace", stack_namespace, "--wait=false", "--ignore-not-found")
            if self.plane.helm("status", RELEASE, "-n", self.namespace, check=False).returncode == 0:
                self.uninstall()
            if stack_namespace is not None:
                self.plane.kubectl("delete", "namespace", self.namespace, "--wait=false", "--ignore-not-found")
        finally:
            self.restore()


@dataclass
class LocalRelease(Release):
    """The chart with a suite's image; ``helm install --wait``: the operator pod must become Ready.
    ``session_keys``: the pod suite's short session-key lifetime (renewals seen within its run)."""

    image: str = ""
    pull_policy: str = "Never"
    session_keys: bool = True

    def image_values(self) -> list[str]:
        return local_image_values(self.image, self.pull_policy)

    def install(self) -> None:
        if not self.installed:
            self.notes = self.plane.helm("install", RELEASE, str(CHART), "--namespace", self.namespace,
                                         "--create-namespace", "--wait", "--timeout", "300s", *self.image_values(),
                                         *(session_key_values() if self.session_keys else [])).stdout
            self.installed = True


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    """The chart installed into a namespace of its own; uninstalled, and shared objects restored, at the end."""
    the_release = Release(cluster, f"capgate-helm-{uuid.uuid4().hex[:8]}")
    try:
        the_release.prepare()
        the_release.install()
        yield the_release
    finally:
        the_release.remove()


@pytest.fixture
def installed(release: Release) -> Release:
    release.install()  # again, if a test before this one uninstalled it
    return release


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[k8s.ApiClient]:
    with cluster.client() as client:
        yield client


def allowed(api: k8s.ApiClient, user: str, verb: str, group: str, resource: str, *, namespace: str | None = None,
            name: str | None = None, groups: list[str] | None = None) -> bool:
    """What the API server's RBAC authorizer answers for ``user`` (a SubjectAccessReview)."""
    review = k8s.V1SubjectAccessReview(spec=k8s.V1SubjectAccessReviewSpec(
        user=user, groups=[*(groups or []), "system:authenticated"],
        resource_attributes=k8s.V1ResourceAttributes(verb=verb, group=group, resource=resource,
                                                     namespace=namespace, name=name)))
    status = k8s.AuthorizationV1Api(api).create_subject_access_review(review).status
    return bool(status.allowed)


# ------------------------------------------------------------------------------------------------ install


def test_crds_are_established(installed: Release, api: k8s.ApiClient) -> None:
    for crd in CRDS:
        installed.plane.kubectl("wait", "--for=condition=Established", f"customresourcedefinition/{crd}",
                                "--timeout=60s")
    crd = k8s.ApiextensionsV1Api(api).read_custom_resource_definition(CRDS[0])
    assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
    assert crd.spec.names.short_names == [resources.CAPABILITY_SHORT_NAME]


def test_operator_deployment_and_service_account_are_created(installed: Release, api: k8s.ApiClient) -> None:
    deployment = k8s.AppsV1Api(api).read_namespaced_deployment(RELEASE, installed.namespace)
    pod = deployment.spec.template.spec
    assert deployment.spec.replicas == 1
    assert pod.service_account_name == RELEASE
    (container,) = pod.containers
    assert container.image == "ghcr.io/capgate/capgate:0.1.0"
    assert "--webhook-configs=patch-ca" in container.args
    assert container.security_context.read_only_root_filesystem is True
    assert pod.security_context.run_as_non_root is True
    core = k8s.CoreV1Api(api)
    assert core.read_namespaced_service_account(RELEASE, installed.namespace).metadata.name == RELEASE
    service = core.read_namespaced_service(f"{RELEASE}-webhook", installed.namespace)
    assert [(p.port, p.target_port) for p in service.spec.ports] == [(443, "https-webhook")]


def test_install_notes_tell_the_next_step(installed: Release) -> None:
    assert f"kubectl -n {installed.namespace} rollout status deployment/{RELEASE}" in installed.notes
    assert "kubectl apply -f examples/booking-agent.yaml" in installed.notes
    assert "capgate.dev/capability: booking-agent" in installed.notes
    assert "kubectl get acap -A" in installed.notes


def test_cluster_roles_are_created(installed: Release, api: k8s.ApiClient) -> None:
    rbac = k8s.RbacAuthorizationV1Api(api)
    for name in (f"{RELEASE}-operator", manifests.REVOCATION_READER_ROLE, "capgate-admin", "capgate-viewer"):
        assert rbac.read_cluster_role(name).metadata.labels["app.kubernetes.io/instance"] == RELEASE
    reader = rbac.read_cluster_role(manifests.REVOCATION_READER_ROLE)
    assert api.sanitize_for_serialization(reader.rules) == manifests.revocation_reader_role()["rules"]


def test_webhook_configurations_are_accepted_with_fail_closed_selectors(installed: Release,
                                                                         api: k8s.ApiClient) -> None:
    admission = k8s.AdmissionregistrationV1Api(api)
    (inject,) = admission.read_mutating_webhook_configuration(manifests.MUTATING_CONFIG).webhooks
    assert inject.name == "inject.capgate.dev"
    assert inject.failure_policy == "Fail"
    assert inject.side_effects == "None"
    assert inject.reinvocation_policy == "IfNeeded"
    assert inject.timeout_seconds == manifests.WEBHOOK_TIMEOUT_SECONDS
    assert api.sanitize_for_serialization(inject.object_selector) == {
        "matchExpressions": [{"key": resources.CAPABILITY_LABEL, "operator": "Exists"}]}
    assert api.sanitize_for_serialization(inject.namespace_selector) == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [installed.namespace]}]}
    service = inject.client_config.service
    assert (service.name, service.namespace, service.path, service.port) == (
        f"{RELEASE}-webhook", installed.namespace, "/inject-sidecar", 443)
    assert inject.client_config.ca_bundle is None  # the operator patches it in when it starts
    validate, guard = admission.read_validating_webhook_configuration(manifests.VALIDATING_CONFIG).webhooks
    assert validate.name == "validate.capgate.dev"
    assert validate.failure_policy == "Fail"
    assert validate.client_config.service.path == "/validate-capability"
    assert validate.rules[0].resources == [resources.CAPABILITY_PLURAL]
    assert guard.name == "ephemeral.capgate.dev"
    assert guard.failure_policy == "Fail"
    assert guard.client_config.service.path == f"/{manifests.GUARD_HANDLER}"
    assert guard.rules[0].resources == ["pods/ephemeralcontainers"]


# --------------------------------------------------------------------------------------------------- RBAC


def test_operator_service_account_has_exactly_the_access_it_needs(installed: Release, api: k8s.ApiClient) -> None:
    user = f"system:serviceaccount:{installed.namespace}:{RELEASE}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{installed.namespace}"]

    def can(verb: str, group: str, resource: str, namespace: str | None = None, name: str | None = None) -> bool:
        return allowed(api, user, verb, group, resource, namespace=namespace, name=name, groups=groups)

    assert can("create", "", "secrets", "travel")
    assert can("get", "", "secrets", installed.namespace, resources.ROOT_KEY_SECRET)
    assert can("update", resources.GROUP, resources.REVOCATION_PLURAL, name=resources.REVOCATION_LIST_NAME)
    assert can("watch", resources.GROUP, resources.CAPABILITY_PLURAL)
    assert can("patch", resources.GROUP, f"{resources.CAPABILITY_PLURAL}/status", "travel")
    assert can("create", "", "events", "travel")
    assert can("bind", "rbac.authorization.k8s.io", "clusterroles", name=manifests.REVOCATION_READER_ROLE)
    assert can("patch", "admissionregistration.k8s.io", "mutatingwebhookconfigurations",
               name=manifests.MUTATING_CONFIG)
    assert not can("delete", "", "namespaces", name="travel")
    assert not can("list", "", "secrets", "travel")
    assert not can("bind", "rbac.authorization.k8s.io", "clusterroles", name="cluster-admin")
    assert not can("update", "rbac.authorization.k8s.io", "clusterroles", name="admin")
    assert not can("patch", "admissionregistration.k8s.io", "validatingwebhookconfigurations", name="other")
    assert not can("create", "", "pods", "travel")


def test_operator_can_bind_sidecars_to_the_revocation_reader_and_nothing_else(installed: Release) -> None:
    """The API server's escalation check, for real: bind is what lets the operator grant this role."""
    plane = installed.plane
    kubeconfig = plane.kubeconfig_for_service_account(installed.namespace, RELEASE)
    binding = manifests.revocation_reader_binding(installed.namespace, f"agent-{uuid.uuid4().hex[:8]}")
    name = binding["metadata"]["name"]
    try:
        plane.kubectl("create", "-f", "-", kubeconfig=kubeconfig, input=json.dumps(binding))
        escalation = {**binding, "metadata": {"name": "capgate-e2e-escalation"},
                      "roleRef": {**binding["roleRef"], "name": "cluster-admin"}}
        refused = plane.kubectl("create", "-f", "-", kubeconfig=kubeconfig, input=json.dumps(escalation), check=False)
        assert refused.returncode != 0
        assert "forbidden" in refused.stderr.lower()
        # What --webhook-configs patch-ca does at start.
        patch = [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": "Y2E="}]
        plane.kubectl("patch", "mutatingwebhookconfiguration", manifests.MUTATING_CONFIG, "--type=json",
                      "-p", json.dumps(patch), kubeconfig=kubeconfig)
    finally:
        plane.kubectl("delete", "clusterrolebinding", name, "capgate-e2e-escalation", "--ignore-not-found")


def test_operator_can_give_sidecars_their_usage_object_and_nothing_more(installed: Release) -> None:
    """The escalation check again: the operator may grant a capability's sidecars get on their usage
    object and update on its status, because it holds both itself; never more (no delete)."""
    plane = installed.plane
    kubeconfig = plane.kubeconfig_for_service_account(installed.namespace, RELEASE)
    name = f"usage-{uuid.uuid4().hex[:8]}"
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": str(uuid.uuid4())}
    bodies = [manifests.usage_object(name, installed.namespace, owner),
              manifests.usage_role(name, installed.namespace, owner),
              manifests.usage_role_binding(name, installed.namespace, "agent", owner)]
    for body in bodies:
        body["metadata"].pop("ownerReferences")  # no owner to collect them: removed below
    try:
        for body in bodies:
            plane.kubectl("create", "-f", "-", kubeconfig=kubeconfig, input=json.dumps(body))
        greedy = manifests.usage_role(f"{name}-greedy", installed.namespace, owner)
        greedy["metadata"].pop("ownerReferences")
        greedy["rules"][0]["verbs"] = ["get", "delete"]
        refused = plane.kubectl("create", "-f", "-", kubeconfig=kubeconfig, input=json.dumps(greedy), check=False)
        assert refused.returncode != 0
        assert "forbidden" in refused.stderr.lower()
    finally:
        plane.kubectl("delete", "-n", installed.namespace, "--ignore-not-found",
                      f"{resources.USAGE_PLURAL}.{resources.GROUP}/{name}",
                      f"role/{manifests.usage_role_name(name)}", f"rolebinding/{manifests.usage_role_name(name)}")


@pytest.mark.parametrize(("role", "may", "may_not"), [
    ("capgate-viewer",
     [("list", resources.CAPABILITY_PLURAL, "travel"), ("watch", resources.REVOCATION_PLURAL, None)],
     [("create", resources.CAPABILITY_PLURAL, "travel"), ("update", resources.REVOCATION_PLURAL, None),
      ("delete", resources.CAPABILITY_PLURAL, "travel")]),
    ("capgate-admin",
     [("create", resources.CAPABILITY_PLURAL, "travel"), ("delete", resources.CAPABILITY_PLURAL, "travel"),
      ("patch", resources.REVOCATION_PLURAL, None)],
     [("delete", resources.REVOCATION_PLURAL, None)]),
])
def test_people_roles_grant_what_their_names_say(installed: Release, api: k8s.ApiClient, role: str,
                                                 may: list[tuple[str, str, str | None]],
                                                 may_not: list[tuple[str, str, str | None]]) -> None:
    user = f"{role}-e2e-user"
    rbac = k8s.RbacAuthorizationV1Api(api)
    rbac.create_cluster_role_binding(k8s.V1ClusterRoleBinding(
        metadata=k8s.V1ObjectMeta(name=user),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role),
        subjects=[k8s.RbacV1Subject(api_group="rbac.authorization.k8s.io", kind="User", name=user)]))
    try:
        for verb, resource, namespace in may:
            assert allowed(api, user, verb, resources.GROUP, resource, namespace=namespace), (verb, resource)
        for verb, resource, namespace in may_not:
            assert not allowed(api, user, verb, resources.GROUP, resource, namespace=namespace), (verb, resource)
        assert not allowed(api, user, "get", "", "secrets", namespace="travel")
    finally:
        rbac.delete_cluster_role_binding(user)


# ---------------------------------------------------------------------------------------------- uninstall


def test_uninstall_leaves_nothing_but_the_kept_crds(installed: Release, api: k8s.ApiClient) -> None:
    installed.uninstall()
    plane, namespace = installed.plane, installed.namespace
    assert plane.helm("list", "--namespace", namespace, "--short").stdout.strip() == ""
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/managed-by=Helm"
    leftovers = plane.kubectl("get", "deployments,services,serviceaccounts,secrets,poddisruptionbudgets",
                              "-n", namespace, "-l", selector, "-o", "name").stdout.split()
    leftovers += plane.kubectl("get", "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,"
                               "validatingwebhookconfigurations", "-l", selector, "-o", "name").stdout.split()
    assert leftovers == []
    for kind, name in SHARED:
        assert plane.kubectl("get", kind, name, "--ignore-not-found", "-o", "name").stdout == "", (kind, name)
    releases = plane.kubectl("get", "secrets", "-n", namespace, "-l", "owner=helm", "-o", "name").stdout
    assert releases == ""
    extensions = k8s.ApiextensionsV1Api(api)
    for crd in CRDS:  # kept, and still serving: AgentCapabilities survive an uninstall
        assert extensions.read_custom_resource_definition(crd).metadata.annotations[
            "helm.sh/resource-policy"] == "keep"


# ------------------------------------------------------------------------- the operator under the chart's RBAC


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the operator exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)  # polling a local port: there is no event to wait on
    pytest.fail(f"the operator was not ready within {timeout}s:\n{log.read_text()[-4000:]}")


def test_operator_runs_with_exactly_the_charts_rbac(tmp_path: Path) -> None:
    """capgate-operator with the chart's arguments, authenticated as the chart's ServiceAccount, does its job.

    The operator runs as a local process (there is no kubelet) on a control plane of its own, because
    kopf would otherwise reconcile other tests' AgentCapabilities with this release's root key. Its
    webhook Service is unreachable without a cluster network, so after start-up (which patches the
    caBundle) the webhook configurations are removed and a capability goes through mint and revoke.
    """
    with ControlPlane() as plane:
        release = Release(plane, "capgate-system")
        release.install()
        plane.kubectl("wait", "--for=condition=Established", *[f"customresourcedefinition/{c}" for c in CRDS])
        kubeconfig = plane.kubeconfig_for_service_account(release.namespace, RELEASE)
        metrics = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPGATE_")}
        env.update(KUBECONFIG=str(kubeconfig), CAPGATE_OPERATOR_NAMESPACE=release.namespace, PYTHONUNBUFFERED="1")
        args = [sys.executable, "-m", "capgate.operator", "--webhook-service", f"{RELEASE}-webhook",
                "--webhook-configs", "patch-ca", "--webhook-listen", f"127.0.0.1:{_free_port()}",
                "--metrics-listen", f"127.0.0.1:{metrics}"]
        log = tmp_path / "operator.log"
        with log.open("wb") as out:
            process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                       start_new_session=True)
        try:
            _wait_ready(f"http://127.0.0.1:{metrics}/readyz", process, log)
            for kind, name in (("mutatingwebhookconfiguration", manifests.MUTATING_CONFIG),
                               ("validatingwebhookconfiguration", manifests.VALIDATING_CONFIG)):
                bundle = plane.kubectl("get", kind, name, "-o", "jsonpath={.webhooks[0].clientConfig.caBundle}")
                assert bundle.stdout, f"{kind} {name}: caBundle not patched"
                plane.kubectl("delete", kind, name)
            secrets = plane.kubectl("get", "secrets", "-n", release.namespace, "-o", "name").stdout.split()
            assert f"secret/{resources.ROOT_KEY_SECRET}" in secrets
            plane.create_namespace("travel")
            example = str(REPO / "examples" / "booking-agent.yaml")
            plane.kubectl("apply", "-f", example)
            plane.kubectl("wait", "--for=condition=Ready", "-n", "travel", "agentcapability/booking-agent",
                          "--timeout=60s")
            plane.kubectl("get", "secret", "-n", "travel", f"booking-agent{resources.CREDENTIAL_SECRET_SUFFIX}")
            plane.kubectl("get", "clusterrolebinding", manifests.revocation_reader_binding_name("travel",
                                                                                                "booking-agent"))
            plane.kubectl("delete", "-f", example, "--timeout=60s")  # the operator revokes, then lets go
            revoked = plane.kubectl("get", resources.REVOCATION_PLURAL, resources.REVOCATION_LIST_NAME, "-o",
                                    "jsonpath={.spec.revokedIds[*].capability}").stdout
            assert "travel/booking-agent" in revoked
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        text = log.read_text()
        assert "Forbidden" not in text, text[-4000:]
        assert " 403" not in text, text[-4000:]
