"""Thin async I/O over the Kubernetes API (kubernetes_asyncio) for what kopf does not do for us.

Every write here is idempotent and conflict-safe: create-or-replace with the object's
``resourceVersion``, retried on 409, so a restarted operator or two concurrent handlers never
lose an update. Errors are mapped to kopf's TemporaryError (retry) in the handlers, not here.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from capgate import resources

CONFLICT_RETRIES = 8


async def connect(kubeconfig: str | None) -> client.ApiClient:
    """An API client from ``kubeconfig``, or the in-cluster ServiceAccount when there is none."""
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


@dataclass
class Kube:
    api: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api)

    @property
    def admission(self) -> client.AdmissionregistrationV1Api:
        return client.AdmissionregistrationV1Api(self.api)

    # ------------------------------------------------------------------ secrets

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            secret = await self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}

    async def write_secret(self, namespace: str, name: str, data: Mapping[str, bytes], *,
                           labels: Mapping[str, str] | None = None,
                           owner: Mapping[str, Any] | None = None) -> None:
        body: Any = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {resources.MANAGED_BY_LABEL: resources.MANAGED_BY, **(labels or {})}},
            "data": {key: base64.b64encode(value).decode("ascii") for key, value in data.items()},
        }
        if owner is not None:
            body["metadata"]["ownerReferences"] = [owner]
        for _ in range(CONFLICT_RETRIES):
            try:
                current = await self.core.read_namespaced_secret(name, namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                try:
                    await self.core.create_namespaced_secret(namespace, body)
                    return
                except ApiException as create_exc:
                    if create_exc.status == 409:
                        continue
                    raise
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            try:
                await self.core.replace_namespaced_secret(name, namespace, body)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError(f"Secret {namespace}/{name}: too many write conflicts")

    async def create_secret_if_absent(self, namespace: str, name: str, data: Mapping[str, bytes]) -> dict[str, bytes]:
        """Create the Secret unless it exists; return what is stored (ours, or the one that won a race)."""
        existing = await self.read_secret(namespace, name)
        if existing is not None:
            return existing
        body: Any = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {resources.MANAGED_BY_LABEL: resources.MANAGED_BY}},
                "data": {key: base64.b64encode(value).decode("ascii") for key, value in data.items()}}
        try:
            await self.core.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            stored = await self.read_secret(namespace, name)
            assert stored is not None
            return stored
        return dict(data)

    # ------------------------------------------------------------------ RevocationList

    async def update_revocation_list(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Apply ``change`` to the RevocationList's spec under optimistic concurrency."""
        from capgate import revocation

        group, version, plural = resources.GROUP, resources.VERSION, resources.REVOCATION_PLURAL
        name = resources.REVOCATION_LIST_NAME
        for _ in range(CONFLICT_RETRIES):
            try:
                current = await self.custom.get_cluster_custom_object(group, version, plural, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                fresh = revocation.empty_list()
                fresh["spec"] = change(fresh["spec"])
                try:
                    return dict(await self.custom.create_cluster_custom_object(group, version, plural, fresh))
                except ApiException as create_exc:
                    if create_exc.status == 409:
                        continue
                    raise
            updated = dict(current)
            updated["spec"] = change(dict(current.get("spec") or {}))
            if updated["spec"] == current.get("spec"):
                return dict(current)
            try:
                return dict(await self.custom.replace_cluster_custom_object(group, version, plural, name, updated))
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError("RevocationList: too many write conflicts")

    # ------------------------------------------------------------------ RBAC and webhooks

    async def apply(self, read: Callable[[], Awaitable[Any]], create: Callable[[], Awaitable[Any]],
                    replace: Callable[[str], Awaitable[Any]],
                    desired: Mapping[str, Any] | None = None) -> None:
        """Create, or replace keeping the resourceVersion: for cluster objects we own outright.

        With ``desired``, an existing object that already holds every field of it is left alone: many
        capabilities share one binding, and rewriting it on every reconcile only makes write conflicts.
        """
        for _ in range(CONFLICT_RETRIES):
            try:
                current = await read()
            except ApiException as exc:
                if exc.status != 404:
                    raise
                try:
                    await create()
                    return
                except ApiException as create_exc:
                    if create_exc.status == 409:
                        continue
                    raise
            if desired is not None and _covers(self.api.sanitize_for_serialization(current), desired):
                return
            try:
                await replace(current.metadata.resource_version)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError("too many write conflicts")

    async def apply_cluster_role_binding(self, body: Any) -> None:
        name = body["metadata"]["name"]

        async def replace(version: str) -> Any:
            body["metadata"]["resourceVersion"] = version
            return await self.rbac.replace_cluster_role_binding(name, body)

        wanted = {"metadata": {"labels": body["metadata"].get("labels") or {}}, "roleRef": body["roleRef"],
                  "subjects": body["subjects"]}
        await self.apply(lambda: self.rbac.read_cluster_role_binding(name),
                         lambda: self.rbac.create_cluster_role_binding(body), replace, desired=wanted)

    async def apply_cluster_role(self, body: Any) -> None:
        """Create the role, or make its rules ours again, keeping whoever else labelled it (e.g. Helm)."""
        name = body["metadata"]["name"]

        async def replace(version: str) -> Any:
            return await self.rbac.patch_cluster_role(name, {"rules": body["rules"]})

        await self.apply(lambda: self.rbac.read_cluster_role(name), lambda: self.rbac.create_cluster_role(body),
                         replace)

    async def apply_role(self, body: Any) -> None:
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]

        async def replace(version: str) -> Any:
            body["metadata"]["resourceVersion"] = version
            return await self.rbac.replace_namespaced_role(name, namespace, body)

        await self.apply(lambda: self.rbac.read_namespaced_role(name, namespace),
                         lambda: self.rbac.create_namespaced_role(namespace, body), replace,
                         desired={"rules": body["rules"]})

    async def apply_role_binding(self, body: Any) -> None:
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]

        async def replace(version: str) -> Any:
            body["metadata"]["resourceVersion"] = version
            return await self.rbac.replace_namespaced_role_binding(name, namespace, body)

        await self.apply(lambda: self.rbac.read_namespaced_role_binding(name, namespace),
                         lambda: self.rbac.create_namespaced_role_binding(namespace, body), replace,
                         desired={"roleRef": body["roleRef"], "subjects": body["subjects"]})

    async def create_usage_if_absent(self, body: Any) -> None:
        """Create the AgentCapabilityUsage unless it exists; an existing one keeps its spending."""
        namespace = body["metadata"]["namespace"]
        try:
            await self.custom.create_namespaced_custom_object(resources.GROUP, resources.VERSION, namespace,
                                                              resources.USAGE_PLURAL, body)
        except ApiException as exc:
            if exc.status != 409:
                raise

    async def delete_cluster_role_binding(self, name: str) -> None:
        try:
            await self.rbac.delete_cluster_role_binding(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def apply_webhook_configs(self, mutating: Any, validating: Any) -> None:
        m_name, v_name = mutating["metadata"]["name"], validating["metadata"]["name"]

        async def replace_m(version: str) -> Any:
            mutating["metadata"]["resourceVersion"] = version
            return await self.admission.replace_mutating_webhook_configuration(m_name, mutating)

        async def replace_v(version: str) -> Any:
            validating["metadata"]["resourceVersion"] = version
            return await self.admission.replace_validating_webhook_configuration(v_name, validating)

        await self.apply(lambda: self.admission.read_mutating_webhook_configuration(m_name),
                         lambda: self.admission.create_mutating_webhook_configuration(mutating), replace_m)
        await self.apply(lambda: self.admission.read_validating_webhook_configuration(v_name),
                         lambda: self.admission.create_validating_webhook_configuration(validating), replace_v)

    async def patch_webhook_ca(self, mutating: str, validating: str, ca_pem: bytes) -> None:
        """Fill in caBundle of chart-owned configurations, leaving everything else to Helm."""
        bundle = base64.b64encode(ca_pem).decode("ascii")
        for read, patch, name in (
                (self.admission.read_mutating_webhook_configuration,
                 self.admission.patch_mutating_webhook_configuration, mutating),
                (self.admission.read_validating_webhook_configuration,
                 self.admission.patch_validating_webhook_configuration, validating)):
            current = await read(name)
            ops = [{"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": bundle}
                   for index in range(len(current.webhooks or []))]
            if ops:
                await patch(name, ops)


def _covers(current: Any, desired: Any) -> bool:
    """Every field of ``desired`` is in ``current`` with the same value (lists: same length, item by item)."""
    if isinstance(desired, Mapping):
        return isinstance(current, Mapping) and all(k in current and _covers(current[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(current, list) and len(current) == len(desired)
                and all(_covers(c, d) for c, d in zip(current, desired, strict=True)))
    return bool(current == desired)
