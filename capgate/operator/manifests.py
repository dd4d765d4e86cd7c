"""The cluster objects the operator keeps in place, built as plain dicts (pure, no I/O).

Webhook configurations follow what a cert-manager or Istio user expects: opt-in by label
(``objectSelector``), the operator's own namespace excluded, ``failurePolicy: Fail`` so an agent
pod is never admitted without its sidecar, ``sideEffects: None``, a short timeout.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from capgate import resources

INJECT_HANDLER = "inject-sidecar"
VALIDATE_HANDLER = "validate-capability"
GUARD_HANDLER = "guard-ephemeral-containers"
MUTATING_CONFIG = "capgate-sidecar-injector"
VALIDATING_CONFIG = "capgate-capability-validator"
REVOCATION_READER_ROLE = "capgate-revocation-reader"
WEBHOOK_TIMEOUT_SECONDS = 5


def _labels() -> dict[str, str]:
    return {resources.MANAGED_BY_LABEL: resources.MANAGED_BY, "app.kubernetes.io/name": "capgate"}


def client_config(handler: str, ca_pem: bytes, *, url: str | None, service: str | None, namespace: str,
                  port: int) -> dict[str, Any]:
    config: dict[str, Any] = {"caBundle": base64.b64encode(ca_pem).decode("ascii")}
    if url:
        config["url"] = f"{url.rstrip('/')}/{handler}"
    else:
        config["service"] = {"name": service, "namespace": namespace, "path": f"/{handler}", "port": port}
    return config


def webhook_configurations(ca_pem: bytes, *, url: str | None, service: str | None, namespace: str,
                           port: int = 443) -> tuple[dict[str, Any], dict[str, Any]]:
    exclude_own = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                         "values": [namespace]}]}
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": MUTATING_CONFIG, "labels": _labels()},
        "webhooks": [{
            "name": "inject.capgate.dev",
            "clientConfig": client_config(INJECT_HANDLER, ca_pem, url=url, service=service, namespace=namespace,
                                          port=port),
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"],
                       "scope": "Namespaced"}],
            "objectSelector": {"matchExpressions": [{"key": resources.CAPABILITY_LABEL, "operator": "Exists"}]},
            "namespaceSelector": exclude_own,
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": WEBHOOK_TIMEOUT_SECONDS,
            "admissionReviewVersions": ["v1"],
        }],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": VALIDATING_CONFIG, "labels": _labels()},
        "webhooks": [{
            "name": "validate.capgate.dev",
            "clientConfig": client_config(VALIDATE_HANDLER, ca_pem, url=url, service=service, namespace=namespace,
                                          port=port),
            "rules": [{"apiGroups": [resources.GROUP], "apiVersions": [resources.VERSION],
                       "resources": [resources.CAPABILITY_PLURAL], "operations": ["CREATE", "UPDATE"],
                       "scope": "Namespaced"}],
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": WEBHOOK_TIMEOUT_SECONDS,
            "admissionReviewVersions": ["v1"],
        }, {
            # `kubectl debug --target=capgate-sidecar` would share the sidecar's processes and files.
            "name": "ephemeral.capgate.dev",
            "clientConfig": client_config(GUARD_HANDLER, ca_pem, url=url, service=service, namespace=namespace,
                                          port=port),
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/ephemeralcontainers"],
                       "operations": ["UPDATE"], "scope": "Namespaced"}],
            "objectSelector": {"matchExpressions": [{"key": resources.CAPABILITY_LABEL, "operator": "Exists"}]},
            "namespaceSelector": exclude_own,
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": WEBHOOK_TIMEOUT_SECONDS,
            "admissionReviewVersions": ["v1"],
        }],
    }
    return mutating, validating


def revocation_reader_role() -> dict[str, Any]:
    """Read access to the one RevocationList, and nothing else: what every sidecar needs."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": REVOCATION_READER_ROLE, "labels": _labels()},
        "rules": [{"apiGroups": [resources.GROUP], "resources": [resources.REVOCATION_PLURAL],
                   "resourceNames": [resources.REVOCATION_LIST_NAME], "verbs": ["get", "list", "watch"]}],
    }


def revocation_reader_binding_name(namespace: str, service_account: str) -> str:
    digest = hashlib.sha256(f"{namespace}/{service_account}".encode()).hexdigest()[:10]
    return f"capgate-revocations-{namespace[:20]}-{service_account[:20]}-{digest}"


def revocation_reader_binding(namespace: str, service_account: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": revocation_reader_binding_name(namespace, service_account), "labels": _labels()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": REVOCATION_READER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }


def usage_role_name(capability: str) -> str:
    return f"capgate-usage-{capability}"


def usage_object(capability: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """The capability's fleet-wide usage state, empty; owned by it, so deleting the capability deletes it."""
    return {"apiVersion": resources.API_VERSION, "kind": resources.USAGE_KIND,
            "metadata": {"name": capability, "namespace": namespace, "labels": _labels(),
                         "ownerReferences": [owner]},
            "spec": {"capability": capability}}


def usage_role(capability: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """What a sidecar of the capability needs: read its own usage object and write its status, nothing else.

    The agent shares the sidecar's ServiceAccount and so holds this too; the CRD's transition rules are
    what keep it from resetting the state (spend more, never less). No create or delete: only the
    operator makes the object, and deleting it (a reset) is for people with capgate-admin.
    """
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": usage_role_name(capability), "namespace": namespace, "labels": _labels(),
                         "ownerReferences": [owner]},
            "rules": [{"apiGroups": [resources.GROUP], "resources": [resources.USAGE_PLURAL],
                       "resourceNames": [capability], "verbs": ["get"]},
                      {"apiGroups": [resources.GROUP], "resources": [f"{resources.USAGE_PLURAL}/status"],
                       "resourceNames": [capability], "verbs": ["get", "update"]}]}


def usage_role_binding(capability: str, namespace: str, service_account: str,
                       owner: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": usage_role_name(capability), "namespace": namespace, "labels": _labels(),
                         "ownerReferences": [owner]},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": usage_role_name(capability)},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]}
