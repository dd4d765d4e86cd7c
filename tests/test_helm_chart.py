"""The Helm chart renders what the operator expects, least-privileged, fail-closed and fully documented.

No cluster: ``helm lint`` and ``helm template`` with the helm binary that hack/build-controlplane.sh
builds into the cache. A missing helm fails these tests loudly; they never skip.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from capgate import injection, resources
from capgate.operator import config, manifests
from e2e.controlplane import ControlPlane, ControlPlaneError
from e2e.pods import local_image_values

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "capgate"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "capgate-system"
RELEASE = "capgate"


# ------------------------------------------------------------------------------------------------ helm


@dataclass(frozen=True)
class Helm:
    binary: Path
    home: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {"HELM_CACHE_HOME": str(self.home / "cache"), "HELM_CONFIG_HOME": str(self.home / "config"),
               "HELM_DATA_HOME": str(self.home / "data"), "PATH": "/usr/bin:/bin"}
        result = subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=env, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} exited with {result.returncode}:\n{result.stderr}", pytrace=False)
        return result

    def template(self, *args: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        out = self.run("template", RELEASE, str(CHART), "--namespace", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The cached helm binary (built if missing); its absence is a failure, never a skip."""
    try:
        bin_dir = ControlPlane().ensure_binaries()
    except ControlPlaneError as error:
        pytest.fail(f"helm is not available (hack/build-controlplane.sh):\n{error}", pytrace=False)
    return Helm(bin_dir / "helm", tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> list[dict[str, Any]]:
    return helm.template()


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------- chart basics


def test_chart_metadata_requires_kubernetes_with_native_sidecars() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "capgate"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.29.0-0"


def test_ci_values_cover_defaults_cert_manager_high_availability_and_no_crds() -> None:
    assert [p.name for p in CI_VALUES] == ["certmanager-values.yaml", "default-values.yaml", "ha-values.yaml",
                                           "nocrds-values.yaml"]


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_chart_lints_clean_in_strict_mode(helm: Helm, values: Path | None) -> None:
    result = helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                      *(["--values", str(values)] if values else []))
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_chart_renders_with_each_ci_values_file(helm: Helm, values: Path) -> None:
    docs = helm.template("--values", str(values))
    expected = {"Deployment", "ServiceAccount", "Service", "ClusterRole", "ClusterRoleBinding",
                "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
    assert expected <= set(kinds(docs))
    for doc in docs:
        assert doc["metadata"]["labels"]["helm.sh/chart"] == "capgate-0.1.0"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_defaults_render_exactly_the_expected_objects(rendered: list[dict[str, Any]]) -> None:
    assert kinds(rendered) == sorted([
        "CustomResourceDefinition", "CustomResourceDefinition", "CustomResourceDefinition",
        "Deployment", "ServiceAccount", "Service", "Service",
        "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding",
        "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"])
    # Off by default: they need CRDs (cert-manager, Prometheus Operator) a plain cluster lacks.
    assert not {"Certificate", "Issuer", "ServiceMonitor", "PodDisruptionBudget"} & set(kinds(rendered))


# -------------------------------------------------------------------------------------------------- CRDs


def test_crd_copies_equal_the_source_byte_for_byte() -> None:
    source = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    copies = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert copies == source, "helm/capgate/files/crds/ must hold exactly the files of crds/ (cp crds/*.yaml ...)"
    for name in source:
        assert (CHART / "files" / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"helm/capgate/files/crds/{name} differs from crds/{name}: cp crds/*.yaml helm/capgate/files/crds/")


def test_rendered_crds_equal_the_source_apart_from_chart_labels_and_keep(rendered: list[dict[str, Any]]) -> None:
    for path in sorted((REPO / "crds").glob("*.yaml")):
        source = yaml.safe_load(path.read_text())
        crd = one(rendered, "CustomResourceDefinition", source["metadata"]["name"])
        assert crd["spec"] == source["spec"]
        assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crds_can_be_left_to_helm_uninstall_or_to_someone_else(helm: Helm) -> None:
    unkept = helm.template("--set", "crds.keep=false")
    for crd in [d for d in unkept if d["kind"] == "CustomResourceDefinition"]:
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    assert "CustomResourceDefinition" not in kinds(helm.template("--values", str(CHART / "ci" / "nocrds-values.yaml")))


# ------------------------------------------------------------------------------------------------ webhooks


def test_webhook_configurations_match_what_the_operator_builds(rendered: list[dict[str, Any]]) -> None:
    """Same names, rules, selectors and policies as manifests.py: the operator patches these by name."""
    mutating, validating = manifests.webhook_configurations(
        b"", url=None, service=f"{RELEASE}-webhook", namespace=NAMESPACE)
    for expected in (mutating, validating):
        actual = one(rendered, expected["kind"], expected["metadata"]["name"])
        for webhook in expected["webhooks"]:
            del webhook["clientConfig"]["caBundle"]  # the operator (or cert-manager) fills it in
        assert actual["webhooks"] == expected["webhooks"]


def test_injection_fails_closed_for_labelled_pods_outside_the_release_namespace(
        rendered: list[dict[str, Any]]) -> None:
    (webhook,) = one(rendered, "MutatingWebhookConfiguration", manifests.MUTATING_CONFIG)["webhooks"]
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["objectSelector"] == {"matchExpressions": [{"key": resources.CAPABILITY_LABEL,
                                                               "operator": "Exists"}]}
    assert webhook["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NAMESPACE]}]}
    assert webhook["rules"][0]["resources"] == ["pods"]
    assert webhook["rules"][0]["operations"] == ["CREATE"]


def test_release_namespace_and_extra_namespaces_are_never_injected(helm: Helm) -> None:
    docs = helm.template("--set", "webhook.excludedNamespaces={kube-system,other}", namespace="security")
    (webhook,) = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    (expression,) = webhook["namespaceSelector"]["matchExpressions"]
    assert expression["operator"] == "NotIn"
    assert expression["values"] == ["security", "kube-system", "other"]
    assert webhook["clientConfig"]["service"] == {"name": f"{RELEASE}-webhook", "namespace": "security",
                                                  "path": "/inject-sidecar", "port": 443}


def test_failure_policy_and_timeout_come_from_values(helm: Helm) -> None:
    docs = helm.template("--set", "webhook.failurePolicy=Ignore", "--set", "webhook.timeoutSeconds=10")
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for webhook in one(docs, kind)["webhooks"]:
            assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == ("Ignore", 10)


def test_webhook_service_sends_443_to_the_operators_webhook_port(rendered: list[dict[str, Any]]) -> None:
    service = one(rendered, "Service", f"{RELEASE}-webhook")
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (443, "https-webhook")
    container = operator_container(rendered)
    assert {"name": "https-webhook", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    pod_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_cert_manager_issues_the_certificate_and_injects_the_ca(helm: Helm) -> None:
    docs = helm.template("--values", str(CHART / "ci" / "certmanager-values.yaml"))
    issuer = one(docs, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    certificate = one(docs, "Certificate")
    assert certificate["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    assert f"{RELEASE}-webhook.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        annotations = one(docs, kind)["metadata"]["annotations"]
        assert annotations["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{certificate['metadata']['name']}"
    container = operator_container(docs)
    assert "--webhook-cert-dir=/tls" in container["args"]
    assert "--webhook-configs=none" in container["args"]
    assert {"name": "webhook-cert", "mountPath": "/tls", "readOnly": True} in container["volumeMounts"]
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-cert", "secret": {"secretName": certificate["spec"]["secretName"],
                                               "defaultMode": 0o440}} in volumes


def test_cert_manager_can_use_an_existing_cluster_issuer(helm: Helm) -> None:
    docs = helm.template("--set", "certManager.enabled=true", "--set", "certManager.issuerRef.name=corp-ca",
                         "--set", "certManager.issuerRef.kind=ClusterIssuer")
    assert "Issuer" not in kinds(docs)
    assert one(docs, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer",
                                                             "group": "cert-manager.io"}


# ------------------------------------------------------------------------------------------------ operator


def test_operator_arguments_are_the_operators_own_flags(rendered: list[dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered command line parses with capgate.operator.config as the pod would run it."""
    container = operator_container(rendered)
    assert container["command"] == ["capgate-operator"]
    (namespace_env,) = [e for e in container["env"] if e["name"] == "CAPGATE_OPERATOR_NAMESPACE"]
    assert namespace_env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    for name in [n for n in os.environ if n.startswith("CAPGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CAPGATE_OPERATOR_NAMESPACE", NAMESPACE)  # what the downward API provides
    parsed = config.parse(container["args"])
    assert parsed.namespace == NAMESPACE
    assert parsed.webhook_service == f"{RELEASE}-webhook"
    assert parsed.webhook_url is None
    assert parsed.webhook_configs == "patch-ca"
    assert parsed.webhook_cert_dir is None  # the operator's own CA, written below /tmp
    assert (parsed.webhook_port, parsed.metrics_port) == (9443, 8080)
    assert parsed.sidecar.image == "ghcr.io/capgate/capgate:0.1.0"
    assert parsed.sidecar.image_pull_policy == "IfNotPresent"


def test_operator_runs_non_root_with_a_read_only_root_filesystem(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = operator_container(rendered)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in operator_container(rendered)["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert pod["serviceAccountName"] == one(rendered, "ServiceAccount")["metadata"]["name"]


def test_probes_use_the_operators_health_endpoints(rendered: list[dict[str, Any]]) -> None:
    container = operator_container(rendered)
    assert {"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]


def test_image_tag_defaults_to_app_version_and_a_digest_wins(helm: Helm, rendered: list[dict[str, Any]]) -> None:
    assert operator_container(rendered)["image"] == "ghcr.io/capgate/capgate:0.1.0"
    digest = "sha256:" + "ab" * 32
    container = operator_container(helm.template("--set", f"image.digest={digest}"))
    assert container["image"] == f"ghcr.io/capgate/capgate@{digest}"
    assert f"--sidecar-image=ghcr.io/capgate/capgate@{digest}" in container["args"]  # one image for both
    container = operator_container(helm.template("--set", "sidecar.image.repository=example.com/sidecar",
                                                 "--set", "sidecar.image.tag=dev"))
    assert container["image"] == "ghcr.io/capgate/capgate:0.1.0"
    assert "--sidecar-image=example.com/sidecar:dev" in container["args"]


def test_a_local_image_reaches_the_operator_and_the_sidecar_it_injects_without_any_pull(helm: Helm) -> None:
    # What e2e/test_pods.py installs: the image `make image` built, imported into the node, never pulled.
    container = operator_container(helm.template(*local_image_values("capgate.local/capgate:0123abcd")))
    assert (container["image"], container["imagePullPolicy"]) == ("capgate.local/capgate:0123abcd", "Never")
    settings = config.parse([arg for arg in container["args"] if arg.startswith("--")]).sidecar
    assert (settings.image, settings.image_pull_policy) == ("capgate.local/capgate:0123abcd", "Never")


def test_sidecar_values_default_to_the_operators_sidecar_settings() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["sidecar"]
    defaults = injection.SidecarSettings()
    assert values["ports"] == {"listen": defaults.listen_port, "admin": defaults.admin_port}
    assert values["resources"] == {"requests": {"cpu": defaults.cpu_request, "memory": defaults.memory_request},
                                   "limits": {"cpu": defaults.cpu_limit, "memory": defaults.memory_limit}}
    assert values["image"]["pullPolicy"] == defaults.image_pull_policy


def test_sidecar_values_reach_the_operator(helm: Helm) -> None:
    docs = helm.template("--set", "sidecar.ports.listen=16080", "--set", "sidecar.resources.limits.memory=256Mi")
    env = {e["name"]: e.get("value") for e in operator_container(docs)["env"]}
    assert env["CAPGATE_SIDECAR_LISTEN_PORT"] == "16080"
    assert env["CAPGATE_SIDECAR_MEMORY_LIMIT"] == "256Mi"


def test_high_availability_adds_a_disruption_budget(helm: Helm, rendered: list[dict[str, Any]]) -> None:
    docs = helm.template("--values", str(CHART / "ci" / "ha-values.yaml"))
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert one(helm.template("--set", "replicaCount=3"), "PodDisruptionBudget")
    assert "PodDisruptionBudget" not in kinds(rendered)


def test_service_monitor_only_when_asked(helm: Helm) -> None:
    docs = helm.template("--set", "prometheus.servicemonitor.enabled=true")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    metrics = one(docs, "Service", f"{RELEASE}-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert not [d for d in helm.template("--set", "prometheus.enabled=false") if d["metadata"]["name"].endswith(
        "-metrics")]


# -------------------------------------------------------------------------------------------------- RBAC


def allows(rules: list[dict[str, Any]], verb: str, group: str, resource: str, name: str | None = None) -> bool:
    """Kubernetes RBAC rule matching (no wildcards are used by this chart, so none are honoured)."""
    for rule in rules:
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []) and verb in rule["verbs"]:
            names = rule.get("resourceNames")
            if not names or (name is not None and name in names):
                return True
    return False


OPERATOR_NEEDS = [
    ("get", "capgate.dev", "agentcapabilities"), ("list", "capgate.dev", "agentcapabilities"),
    ("watch", "capgate.dev", "agentcapabilities"), ("patch", "capgate.dev", "agentcapabilities"),
    ("update", "capgate.dev", "agentcapabilities"), ("patch", "capgate.dev", "agentcapabilities/status"),
    ("update", "capgate.dev", "agentcapabilities/finalizers"),
    *[(verb, "capgate.dev", "revocationlists") for verb in ("get", "list", "watch", "create", "update", "patch")],
    *[(verb, "", "secrets") for verb in ("get", "create", "update", "patch")],
    ("create", "", "events"), ("patch", "", "events"), ("create", "events.k8s.io", "events"),
    ("list", "", "namespaces"), ("watch", "", "namespaces"),
    ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("create", "rbac.authorization.k8s.io", "clusterroles"),
    *[(verb, "rbac.authorization.k8s.io", "clusterrolebindings") for verb in ("get", "create", "update", "delete")],
]
NAMED_NEEDS = [
    *[(verb, "rbac.authorization.k8s.io", "clusterroles", manifests.REVOCATION_READER_ROLE)
      for verb in ("get", "update", "bind")],
    *[(verb, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", manifests.MUTATING_CONFIG)
      for verb in ("get", "patch")],
    *[(verb, "admissionregistration.k8s.io", "validatingwebhookconfigurations", manifests.VALIDATING_CONFIG)
      for verb in ("get", "patch")],
]
OPERATOR_MUST_NOT = [
    ("delete", "", "namespaces", None), ("list", "", "secrets", None), ("delete", "", "secrets", None),
    ("create", "", "pods", None), ("bind", "rbac.authorization.k8s.io", "clusterroles", "cluster-admin"),
    ("update", "rbac.authorization.k8s.io", "clusterroles", "admin"),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles", manifests.REVOCATION_READER_ROLE),
    ("patch", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "someone-elses-webhook"),
    ("delete", "capgate.dev", "agentcapabilities", None), ("delete", "capgate.dev", "revocationlists", None),
]


def test_operator_cluster_role_grants_what_the_operator_needs_and_no_more(rendered: list[dict[str, Any]]) -> None:
    rules = one(rendered, "ClusterRole", f"{RELEASE}-operator")["rules"]
    missing = [need for need in OPERATOR_NEEDS if not allows(rules, *need)]
    missing += [need for need in NAMED_NEEDS if not allows(rules, *need)]
    assert not missing
    granted = [forbidden for forbidden in OPERATOR_MUST_NOT if allows(rules, *forbidden)]
    assert not granted
    assert all("*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"] for rule in rules)
    binding = one(rendered, "ClusterRoleBinding", f"{RELEASE}-operator")
    assert binding["roleRef"]["name"] == f"{RELEASE}-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]


def test_with_cert_manager_the_operator_cannot_touch_webhook_configurations(helm: Helm) -> None:
    docs = helm.template("--set", "certManager.enabled=true")
    rules = one(docs, "ClusterRole", f"{RELEASE}-operator")["rules"]
    assert not [r for r in rules if "admissionregistration.k8s.io" in r["apiGroups"]]


def test_revocation_reader_role_is_the_operators(rendered: list[dict[str, Any]]) -> None:
    expected = manifests.revocation_reader_role()
    assert one(rendered, "ClusterRole", manifests.REVOCATION_READER_ROLE)["rules"] == expected["rules"]


def test_people_get_an_admin_and_a_read_only_viewer_role(rendered: list[dict[str, Any]]) -> None:
    admin = one(rendered, "ClusterRole", "capgate-admin")
    viewer = one(rendered, "ClusterRole", "capgate-viewer")
    for verb in ("create", "update", "delete", "get", "list", "watch"):
        assert allows(admin["rules"], verb, "capgate.dev", "agentcapabilities")
    for verb in ("get", "update", "patch"):
        assert allows(admin["rules"], verb, "capgate.dev", "revocationlists")
    assert not allows(admin["rules"], "get", "", "secrets")
    assert {verb for rule in viewer["rules"] for verb in rule["verbs"]} == {"get", "list", "watch"}
    assert allows(viewer["rules"], "list", "capgate.dev", "agentcapabilities")
    assert allows(viewer["rules"], "watch", "capgate.dev", "revocationlists")
    assert admin["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"


# ------------------------------------------------------------------------------------------------ values


def test_schema_rejects_an_unknown_value_key(helm: Helm) -> None:
    for args in (["--set", "bogus=1"], ["--set", "webhook.bogus=1"], ["--set", "sidecar.resources.requests.gpu=1"]):
        result = helm.run("template", RELEASE, str(CHART), *args, check=False)
        assert result.returncode != 0, f"helm template {args} should fail"
        assert "additional properties" in result.stderr


def test_schema_rejects_values_outside_their_enum_or_type(helm: Helm) -> None:
    for args in (["--set", "webhook.failurePolicy=Maybe"], ["--set", "replicaCount=many"],
                 ["--set", "image.pullPolicy=Sometimes"], ["--set", "webhook.timeoutSeconds=60"]):
        assert helm.run("template", RELEASE, str(CHART), *args, check=False).returncode != 0, args


# Kubernetes objects passed through verbatim (their own API validates them), and Helm's global.
OPEN_OBJECTS = {"global", "extraEnv[]", "volumes[]", "volumeMounts[]", "tolerations[]", "topologySpreadConstraints[]",
                "affinity.nodeAffinity", "affinity.podAffinity", "affinity.podAntiAffinity"}


def _schema_objects(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if schema.get("type") == "object":
        yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _schema_objects(sub, f"{path}.{key}".lstrip("."))
    if isinstance(schema.get("items"), dict):
        yield from _schema_objects(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _schema_objects(schema["additionalProperties"], f"{path}.*")
    for sub in schema.get("anyOf") or []:
        yield from _schema_objects(sub, path)


def test_schema_is_closed_at_every_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []
    for path, node in _schema_objects(schema):
        if "properties" in node and node.get("additionalProperties") is not False and path not in OPEN_OBJECTS:
            open_objects.append(path)
        if "properties" not in node and "additionalProperties" not in node and path not in OPEN_OBJECTS:
            open_objects.append(path)
    assert not open_objects, f"schema objects accepting unknown keys: {open_objects}"


def _value_keys(text: str) -> Iterator[tuple[int, tuple[str, ...], str]]:
    """(line number, key path, previous non-blank line) for every key of values.yaml."""
    stack: list[tuple[int, str]] = []
    previous = ""
    for number, line in enumerate(text.splitlines(), 1):
        match = re.match(r"^(\s*)([A-Za-z0-9_./-]+):(\s|$)", line)
        if match:
            indent = len(match.group(1))
            stack = [(i, k) for i, k in stack if i < indent]
            stack.append((indent, match.group(2)))
            yield number, tuple(k for _, k in stack), previous
        if line.strip():
            previous = line


def test_every_values_key_has_a_comment_line_above_it() -> None:
    undocumented = [f"values.yaml:{number} {'.'.join(path)}" for number, path, previous in
                    _value_keys((CHART / "values.yaml").read_text()) if not previous.strip().startswith("#")]
    assert not undocumented


def test_values_keys_all_appear_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    unknown = []
    for _, path, _ in _value_keys((CHART / "values.yaml").read_text()):
        node: dict[str, Any] | None = schema
        for part in path:
            props = (node or {}).get("properties") or {}
            extra = (node or {}).get("additionalProperties")
            node = props.get(part) if part in props else (extra if isinstance(extra, dict) else None)
        if node is None:
            unknown.append(".".join(path))
    assert not unknown


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    table_keys = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    keys = {".".join(path) for _, path, _ in _value_keys((CHART / "values.yaml").read_text())}
    leaves = {k for k in keys if not any(other.startswith(f"{k}.") for other in keys)}
    # Every leaf is listed, or a parent of it is (`nodeSelector` stands for `nodeSelector.kubernetes.io/os`).
    missing = sorted(k for k in leaves if not any(k == t or fnmatch.fnmatch(k, f"{t}.*") for t in table_keys))
    assert not missing, f"helm/capgate/README.md values table lacks: {missing}"
    assert not sorted(t for t in table_keys if t not in keys), "README documents values that do not exist"


def test_session_key_timing_reaches_the_operator(helm: Helm, rendered: list[dict[str, Any]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("CAPGATE_")]:
        monkeypatch.delenv(name)
    defaults = config.parse(operator_container(rendered)["args"])
    assert (defaults.session_key_lifetime, defaults.session_key_renew_before) == (
        config.OperatorConfig.session_key_lifetime, config.OperatorConfig.session_key_renew_before)
    docs = helm.template("--set", "sessionKeys.lifetime=2m", "--set", "sessionKeys.renewBefore=80s")
    parsed = config.parse(operator_container(docs)["args"])
    assert (parsed.session_key_lifetime.total_seconds(), parsed.session_key_renew_before.total_seconds()) == (120, 80)
    refused = helm.run("template", RELEASE, str(CHART), "--set", "sessionKeys.lifetime=5 minutes", check=False)
    assert refused.returncode != 0 and "sessionKeys" in refused.stderr
