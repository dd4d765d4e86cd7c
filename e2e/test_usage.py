"""Fleet-wide usage on the real API server: the state cannot be reset, and sidecars never overspend.

The AgentCapabilityUsage status is writable by every sidecar of a capability, and so by the agent
that shares their ServiceAccount. What keeps the agent from resetting it is not RBAC but the CRD's
transition rules, which the API server applies to every writer: these tests try each reset as the
cluster admin (who is allowed everything RBAC can allow) and expect the API server to refuse it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from capgate import resources
from e2e.cluster import install_crds
from e2e.controlplane import ControlPlane

NAMESPACE = "fleet"
KEY = "requests/3600s"


@pytest.fixture(scope="module")
def custom(control_plane: ControlPlane) -> Iterator[k8s.CustomObjectsApi]:
    install_crds(control_plane)
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          f"crd/{resources.USAGE_PLURAL}.{resources.GROUP}")
    control_plane.create_namespace(NAMESPACE)
    api = control_plane.client()
    try:
        yield k8s.CustomObjectsApi(api)
    finally:
        api.close()  # type: ignore[no-untyped-call]


def _usage(custom: k8s.CustomObjectsApi, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """A fresh usage object with ``status`` (the status subresource ignores status on create)."""
    body = {"apiVersion": resources.API_VERSION, "kind": resources.USAGE_KIND,
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {"capability": name}}
    with contextlib.suppress(ApiException):
        custom.delete_namespaced_custom_object(resources.GROUP, resources.VERSION, NAMESPACE, resources.USAGE_PLURAL,
                                               name)
    created = custom.create_namespaced_custom_object(resources.GROUP, resources.VERSION, NAMESPACE,
                                                     resources.USAGE_PLURAL, body)
    created["status"] = status
    return _replace_status(custom, created)


def _replace_status(custom: k8s.CustomObjectsApi, obj: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = custom.replace_namespaced_custom_object_status(
        resources.GROUP, resources.VERSION, NAMESPACE, resources.USAGE_PLURAL, obj["metadata"]["name"], obj)
    return result


def _refused(custom: k8s.CustomObjectsApi, obj: dict[str, Any], status: dict[str, Any] | None) -> str:
    changed = {**obj}
    if status is None:
        changed.pop("status", None)
    else:
        changed["status"] = status
    with pytest.raises(ApiException) as caught:
        _replace_status(custom, changed)
    assert caught.value.status == 422, caught.value.body
    return str(caught.value.body)


BASE: dict[str, Any] = {"windows": {KEY: {"start": 3600, "spent": 500}}, "horizon": 1000,
                        "consumed": {"a" * 32: 2000, "b" * 32: 900}}


@pytest.mark.parametrize(("name", "status", "message"), [
    ("lower-spent", {**BASE, "windows": {KEY: {"start": 3600, "spent": 0}}}, "spent only grows"),
    ("earlier-window", {**BASE, "windows": {KEY: {"start": 0, "spent": 0}}}, "only moves forward"),
    ("drop-window", {**BASE, "windows": {}}, "never removed"),
    ("drop-windows", {k: v for k, v in BASE.items() if k != "windows"}, "never removed"),
    ("drop-unexpired-id", {**BASE, "consumed": {"b" * 32: 900}}, "only removed once it expired"),
    ("shorten-expiry", {**BASE, "consumed": {"a" * 32: 10, "b" * 32: 900}}, "keeps its expiry"),
    ("horizon-back", {**BASE, "horizon": 10}, "horizon only moves forward"),
    ("drop-status", None, "never removed"),
])
def test_the_api_server_refuses_every_reset_of_the_usage_state(
        custom: k8s.CustomObjectsApi, name: str, status: dict[str, Any] | None, message: str) -> None:
    obj = _usage(custom, f"reset-{name}", BASE)
    assert message in _refused(custom, obj, status)
    stored = custom.get_namespaced_custom_object(resources.GROUP, resources.VERSION, NAMESPACE,
                                                 resources.USAGE_PLURAL, f"reset-{name}")
    assert stored["status"] == BASE


def test_spending_more_moving_a_window_forward_and_pruning_expired_ids_are_allowed(
        custom: k8s.CustomObjectsApi) -> None:
    obj = _usage(custom, "forward", BASE)
    obj["status"] = {**BASE, "windows": {KEY: {"start": 3600, "spent": 501}}}
    obj = _replace_status(custom, obj)
    obj["status"] = {**BASE, "windows": {KEY: {"start": 7200, "spent": 1}}}
    obj = _replace_status(custom, obj)
    obj["status"] = {**obj["status"], "consumed": {"a" * 32: 2000}}  # b expired at 900 <= horizon 1000
    obj = _replace_status(custom, obj)
    assert obj["status"]["windows"][KEY] == {"start": 7200, "spent": 1}
    assert obj["status"]["consumed"] == {"a" * 32: 2000}


def test_a_write_from_a_stale_read_is_refused_with_a_conflict(custom: k8s.CustomObjectsApi) -> None:
    first = _usage(custom, "stale", BASE)
    _replace_status(custom, {**first, "status": {**BASE, "windows": {KEY: {"start": 3600, "spent": 600}}}})
    with pytest.raises(ApiException) as caught:
        _replace_status(custom, {**first, "status": {**BASE, "windows": {KEY: {"start": 3600, "spent": 700}}}})
    assert caught.value.status == 409
