"""The local control plane is real where capgate needs it to be.

CRD schemas are enforced, RBAC narrows a ServiceAccount to one named object (for reviews and for real
watches), and the API server itself calls a mutating webhook over TLS and applies its patch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client as k8s
from kubernetes import watch

from e2e.controlplane import ControlPlane
from e2e.pki import ServingCert

WIDGET_GROUP = "example.test"
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{WIDGET_GROUP}"},
    "spec": {
        "group": WIDGET_GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}
WEBHOOK_LABEL = "e2e.capgate.dev/mutated"
EVENT_TIMEOUT_SECONDS = 30  # generous for a loaded 2-core CI machine


def widget(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{WIDGET_GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def pod(name: str) -> k8s.V1Pod:
    # No kubelet exists: the pod is stored and stays Pending, which is all admission needs.
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, labels={"app": name}),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="agent", image="example.invalid/agent:1")]),
    )


def test_the_api_server_reports_kubernetes_1_35(kube_api: k8s.ApiClient) -> None:
    version = k8s.VersionApi(kube_api).get_code()
    assert version.git_version.startswith("v1.35.")
    assert (version.major, version.minor) == ("1", "35")


def test_kubectl_and_helm_reach_the_api_server_as_admin(control_plane: ControlPlane) -> None:
    assert control_plane.kubectl("get", "namespace", "default", "-o", "name").stdout == "namespace/default\n"
    assert control_plane.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
    assert control_plane.helm("list", "--all-namespaces").returncode == 0


def test_crd_schema_validation_rejects_a_widget_that_breaks_the_schema(
    control_plane: ControlPlane, kube_api: k8s.ApiClient
) -> None:
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    try:
        control_plane.kubectl(
            "wait",
            "--for=condition=Established",
            f"crd/widgets.{WIDGET_GROUP}",
            f"--timeout={EVENT_TIMEOUT_SECONDS}s",
        )
        control_plane.create_namespace("crd-e2e")
        objects = k8s.CustomObjectsApi(kube_api)

        created = objects.create_namespaced_custom_object(
            WIDGET_GROUP, "v1", "crd-e2e", "widgets", widget("small", {"size": 3, "color": "red"})
        )
        assert isinstance(created, dict)
        assert created["metadata"]["uid"]

        with pytest.raises(k8s.ApiException) as rejected:
            objects.create_namespaced_custom_object(
                WIDGET_GROUP, "v1", "crd-e2e", "widgets", widget("huge", {"size": 11, "color": "green"})
            )
        assert rejected.value.status == 422
        message = json.loads(rejected.value.body or "{}")["message"]
        assert "spec.size" in message
        assert "spec.color" in message
    finally:
        control_plane.kubectl("delete", "crd", f"widgets.{WIDGET_GROUP}", "--ignore-not-found")


# ------------------------------------------------------------------------------------------------- RBAC


@dataclass(frozen=True)
class Reader:
    """ServiceAccount ``reader`` may get and watch ConfigMap ``allowed`` and nothing else."""

    namespace: str
    user: str
    token: str


@pytest.fixture(scope="module")
def reader(control_plane: ControlPlane, kube_api: k8s.ApiClient) -> Reader:
    namespace = "rbac-e2e"
    control_plane.create_namespace(namespace)
    core = k8s.CoreV1Api(kube_api)
    rbac = k8s.RbacAuthorizationV1Api(kube_api)
    for name in ("allowed", "other"):
        core.create_namespaced_config_map(
            namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name), data={"generation": "1"})
        )
    core.create_namespaced_service_account(namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="reader")))
    rbac.create_namespaced_role(
        namespace,
        k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name="read-allowed"),
            rules=[
                k8s.V1PolicyRule(
                    api_groups=[""],
                    resources=["configmaps"],
                    resource_names=["allowed"],
                    verbs=["get", "watch"],
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name="reader-reads-allowed"),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="read-allowed"),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
        ),
    )
    return Reader(
        namespace=namespace,
        user=f"system:serviceaccount:{namespace}:reader",
        token=control_plane.service_account_token(namespace, "reader"),
    )


def review(kube_api: k8s.ApiClient, reader: Reader, verb: str, resource: str, name: str | None) -> bool:
    spec = k8s.V1SubjectAccessReviewSpec(
        user=reader.user,
        groups=[
            "system:serviceaccounts",
            f"system:serviceaccounts:{reader.namespace}",
            "system:authenticated",
        ],
        resource_attributes=k8s.V1ResourceAttributes(
            namespace=reader.namespace, verb=verb, resource=resource, name=name
        ),
    )
    result = k8s.AuthorizationV1Api(kube_api).create_subject_access_review(k8s.V1SubjectAccessReview(spec=spec))
    assert result.status is not None
    return result.status.allowed


def test_subject_access_review_allows_the_reader_only_the_named_configmap(
    kube_api: k8s.ApiClient, reader: Reader
) -> None:
    assert review(kube_api, reader, "get", "configmaps", "allowed")
    assert review(kube_api, reader, "watch", "configmaps", "allowed")
    assert not review(kube_api, reader, "get", "configmaps", "other")
    assert not review(kube_api, reader, "list", "configmaps", None)
    assert not review(kube_api, reader, "update", "configmaps", "allowed")
    assert not review(kube_api, reader, "list", "secrets", None)


def watch_configmaps(api: k8s.ApiClient, namespace: str, name: str) -> Iterator[dict[str, Any]]:
    """Events of a real watch on one ConfigMap, selected by name as a narrowly-scoped client must."""
    stream: Iterator[dict[str, Any]] = watch.Watch().stream(  # type: ignore[no-untyped-call]
        k8s.CoreV1Api(api).list_namespaced_config_map,
        namespace=namespace,
        field_selector=f"metadata.name={name}",
        timeout_seconds=EVENT_TIMEOUT_SECONDS,
    )
    return stream


def test_service_account_token_watches_the_named_configmap_and_nothing_else(
    control_plane: ControlPlane, kube_api: k8s.ApiClient, reader: Reader
) -> None:
    with control_plane.client(token=reader.token) as api:
        events = watch_configmaps(api, reader.namespace, "allowed")
        try:
            added = next(events)
            assert (added["type"], added["object"].metadata.name) == ("ADDED", "allowed")

            k8s.CoreV1Api(kube_api).patch_namespaced_config_map(
                "allowed", reader.namespace, {"data": {"generation": "2"}}
            )
            modified = next(events)
            assert modified["type"] == "MODIFIED"
            assert modified["object"].data == {"generation": "2"}
        finally:
            events.close()  # type: ignore[attr-defined]

        with pytest.raises(k8s.ApiException) as other:
            next(watch_configmaps(api, reader.namespace, "other"))
        assert other.value.status == 403

        with pytest.raises(k8s.ApiException) as secrets:
            k8s.CoreV1Api(api).list_namespaced_secret(reader.namespace, watch=False)
        assert secrets.value.status == 403


def test_service_account_kubeconfig_drives_kubectl_with_the_readers_rights(
    control_plane: ControlPlane, reader: Reader
) -> None:
    kubeconfig = control_plane.kubeconfig_for_token(reader.token, "reader")
    got = control_plane.kubectl(
        "get", "configmap", "allowed", "-n", reader.namespace, "-o", "name", kubeconfig=kubeconfig
    )
    assert got.stdout == "configmap/allowed\n"
    refused = control_plane.kubectl(
        "get", "configmap", "other", "-n", reader.namespace, kubeconfig=kubeconfig, check=False
    )
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr


# ---------------------------------------------------------------------------------------------- webhook


class LabellingWebhook:
    """A mutating admission webhook (aiohttp, TLS, 127.0.0.1) that labels every pod it is asked about.

    It runs its own event loop in a thread, so the tests stay plain sync tests whatever the pytest
    asyncio configuration, while the API server calls it concurrently.
    """

    def __init__(self, cert: ServingCert) -> None:
        self.cert = cert
        self.port = 0
        self.reviews: list[dict[str, Any]] = []
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._connections: set[asyncio.Transport] = set()
        self._thread = threading.Thread(target=self._run, name="labelling-webhook", daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mutate"

    def __enter__(self) -> LabellingWebhook:
        self._thread.start()
        if not self._started.wait(EVENT_TIMEOUT_SECONDS):
            raise TimeoutError("webhook server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(EVENT_TIMEOUT_SECONDS)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # noqa: BLE001 - handed to the test thread, which re-raises it in __enter__
            self._error = error
            self._started.set()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/mutate", self._mutate)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.cert.ssl_context())
            await site.start()
            self.port = runner.addresses[0][1]
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await self._stop.wait()
            # The API server keeps its connections alive. Closing TLS gracefully could outlive this
            # event loop (an "unclosed transport" ResourceWarning); the test is over, so drop them.
            for connection in self._connections:
                connection.abort()
        finally:
            await runner.cleanup()

    async def _mutate(self, request: web.Request) -> web.Response:
        review: dict[str, Any] = await request.json()
        self.reviews.append(review)
        if request.transport is not None:
            self._connections.add(request.transport)
        patch = [{"op": "add", "path": "/metadata/labels/" + WEBHOOK_LABEL.replace("/", "~1"), "value": "yes"}]
        return web.json_response(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": review["request"]["uid"],
                    "allowed": True,
                    "patchType": "JSONPatch",
                    "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
                },
            }
        )


def webhook_configuration(name: str, webhook: LabellingWebhook, namespace: str) -> k8s.V1MutatingWebhookConfiguration:
    return k8s.V1MutatingWebhookConfiguration(
        metadata=k8s.V1ObjectMeta(name=name),
        webhooks=[
            k8s.V1MutatingWebhook(
                name="label.e2e.capgate.dev",
                client_config=k8s.AdmissionregistrationV1WebhookClientConfig(
                    url=webhook.url, ca_bundle=webhook.cert.ca_bundle
                ),
                rules=[
                    k8s.V1RuleWithOperations(
                        operations=["CREATE"], api_groups=[""], api_versions=["v1"], resources=["pods"]
                    )
                ],
                # Only this test's namespace: the control plane is shared by the whole session.
                namespace_selector=k8s.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": namespace}),
                admission_review_versions=["v1"],
                side_effects="None",
                failure_policy="Fail",
                timeout_seconds=10,
            )
        ],
    )


def wait_until_webhook_is_active(core: k8s.CoreV1Api, namespace: str) -> None:
    """The API server picks up a new webhook configuration asynchronously, from its own informer.

    Nothing announces that moment, so dry-run pod creations probe it (webhooks with sideEffects None
    see dry-run requests too) until one comes back mutated.
    """
    deadline = time.monotonic() + EVENT_TIMEOUT_SECONDS
    while True:
        probe = core.create_namespaced_pod(namespace, pod("probe"), dry_run="All")
        if probe.metadata is not None and WEBHOOK_LABEL in (probe.metadata.labels or {}):
            return
        assert time.monotonic() < deadline, "the API server never started calling the webhook"
        time.sleep(0.2)


def test_api_server_calls_the_mutating_webhook_over_tls_and_stores_its_patch(
    control_plane: ControlPlane, kube_api: k8s.ApiClient
) -> None:
    namespace = "webhook-e2e"
    control_plane.create_namespace(namespace)
    core = k8s.CoreV1Api(kube_api)
    registrations = k8s.AdmissionregistrationV1Api(kube_api)
    with LabellingWebhook(control_plane.issue_serving_cert("labelling-webhook")) as webhook:
        registrations.create_mutating_webhook_configuration(webhook_configuration("e2e-labeller", webhook, namespace))
        try:
            wait_until_webhook_is_active(core, namespace)

            created = core.create_namespaced_pod(namespace, pod("agent"))

            seen = [r["request"] for r in webhook.reviews if r["request"]["object"]["metadata"].get("name") == "agent"]
            assert [(r["operation"], r["dryRun"], r["namespace"]) for r in seen] == [("CREATE", False, namespace)]
            assert created.metadata is not None
            assert created.metadata.labels == {"app": "agent", WEBHOOK_LABEL: "yes"}
            stored = core.read_namespaced_pod("agent", namespace)
            assert stored.metadata is not None
            assert stored.metadata.labels == {"app": "agent", WEBHOOK_LABEL: "yes"}
            assert stored.status is not None
            assert stored.status.phase == "Pending"
        finally:
            registrations.delete_mutating_webhook_configuration("e2e-labeller")
