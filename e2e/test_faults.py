"""Faults of the control plane, each with its fail-closed outcome, on the real API server.

* the API server dies: sidecars lock down writes (503 ``lockdown``) after ``lockdownAfter`` while
  reads are still decided, and recover when it is back;
* the operator is SIGKILLed around a rotation: no pod loses a valid credential, and after a
  restart exactly one current credential is in the Secret and the status;
* the webhook is down: labelled agent pods are refused (``failurePolicy: Fail``), others admitted;
* the credential Secret is deleted under a running sidecar: it keeps its last good credential
  (the kubelet keeps the mounted files of a deleted Secret; the credential is good until it
  expires) and the operator recreates the Secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from capgate import resources
from capgate.capabilities import tokens
from e2e.cluster import Environment, PodSidecar, agent_pod, call, environment, example_capability, wait_for
from e2e.controlplane import ControlPlane

NAMESPACE = "faults"
API_KEY = "sk_live_faults_0c1d2e3f4a5b"
Faults = Environment


def capability(name: str, **spec_changes: Any) -> dict[str, Any]:
    obj = example_capability(name, NAMESPACE, **spec_changes)
    obj["spec"].pop("rateLimit", None)  # these tests call often; rate limits are tested elsewhere
    return obj


def status_of(env: Environment, name: str) -> dict[str, Any]:
    """The status with a ``ready`` flag (Ready=True for the current generation)."""
    return {**(env.get_capability(name).get("status") or {}), "ready": env.ready(name) is not None}


def agent(env: Environment, cap: str, pod: str) -> PodSidecar:
    assert env.create_pod(pod, cap).returncode == 0
    return env.sidecar(pod)


@pytest.fixture(scope="module")
def faults(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    with environment(control_plane, tmp_path_factory.mktemp("faults"), NAMESPACE, API_KEY) as env:
        try:
            yield env
        finally:
            control_plane.start_apiserver()  # whatever a failed test left behind


def test_losing_the_api_server_locks_down_writes_keeps_deciding_reads_and_recovers(faults: Faults) -> None:
    faults.apply(capability("lockdown", lockdownAfter="3s"))
    faults.wait_ready("lockdown")
    sidecar = agent(faults, "lockdown", "agent-lockdown")
    assert call(sidecar, "GET", "/flights/search")[0] == 200
    assert call(sidecar, "POST", "/payments/v1/charges", {"amount": 100})[0] == 200

    faults.plane.stop_apiserver()
    try:
        status, body, _ = wait_for(lambda: (r := call(sidecar, "POST", "/payments/v1/charges", {"amount": 100}))[0]
                                != 200 and r, 15, "writes to lock down")
        assert (status, body["error"]) == (503, "lockdown")
        assert call(sidecar, "GET", "/flights/search")[0] == 200  # reads are still decided...
        assert call(sidecar, "GET", "/payments/v1/refunds")[0] == 403  # ...both ways
    finally:
        faults.plane.start_apiserver()
    wait_for(lambda: call(sidecar, "POST", "/payments/v1/charges", {"amount": 100})[0] == 200, 60,
             "writes to be allowed again once the API server is back")


def test_an_operator_killed_around_rotation_never_leaves_a_pod_without_a_valid_credential(faults: Faults) -> None:
    faults.apply(capability("rotating", credential={"ttl": "20s", "rotateBefore": "12s"}))
    first = faults.wait_ready("rotating")
    sidecar = agent(faults, "rotating", "agent-rotating")
    issued = datetime.fromisoformat(first["issuedAt"].replace("Z", "+00:00"))
    statuses: list[int] = []
    refusals: list[dict[str, Any]] = []

    def keep_calling_until(predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body, _ = call(sidecar, "GET", "/flights/search")
            statuses.append(status)
            if status != 200:
                refusals.append(body)
            if predicate():
                return
        raise AssertionError(f"timed out; statuses {sorted(set(statuses))}")

    # Kill the operator at the moment rotation is due (ttl - rotateBefore = 8 s after issue).
    keep_calling_until(lambda: (datetime.now(UTC) - issued).total_seconds() >= 8, 20)
    faults.operator.kill()
    keep_calling_until(lambda: (datetime.now(UTC) - issued).total_seconds() >= 10, 10)
    faults.operator.start()

    def rotated() -> bool:
        secret = faults.secret(first["credentialSecret"])
        status = status_of(faults, "rotating")
        if secret is None or status["revocationIds"] == first["revocationIds"]:
            return False
        token = secret[resources.TOKEN_FILE].decode()
        return bool(tokens.inspect(token)["revocationIds"][0] == status["revocationIds"][0])

    keep_calling_until(rotated, 40)
    keep_calling_until(lambda: (datetime.now(UTC) - issued).total_seconds() >= 22, 20)  # past the first's ttl
    assert set(statuses) == {200}, f"every request was allowed: {refusals[:3]}"
    assert rotated(), "exactly one current credential: the Secret's token is the one the status names"


def test_with_the_webhook_down_agent_pods_are_refused_and_other_pods_admitted(faults: Faults) -> None:
    faults.apply(capability("webhook-down"))
    faults.wait_ready("webhook-down")
    faults.operator.kill()
    try:
        refused = faults.apply(agent_pod("agent-no-webhook", NAMESPACE, "webhook-down", "booking-agent"), check=False)
        assert refused.returncode != 0
        assert "capgate" in refused.stderr and "webhook" in refused.stderr, refused.stderr
        plain = agent_pod("plain-no-webhook", NAMESPACE, "x", "default")
        del plain["metadata"]["labels"]
        assert faults.apply(plain, check=False).returncode == 0
        listed = faults.plane.kubectl("get", "pods", "-n", NAMESPACE, "-o", "name").stdout
        assert "agent-no-webhook" not in listed
    finally:
        faults.operator.start()
    assert faults.apply(agent_pod("agent-webhook-back", NAMESPACE, "webhook-down", "booking-agent"),
                        check=False).returncode == 0


def test_a_deleted_credential_secret_leaves_the_sidecar_working_and_is_recreated(faults: Faults) -> None:
    faults.apply(capability("secret-gone"))
    status = faults.wait_ready("secret-gone")
    sidecar = agent(faults, "secret-gone", "agent-secret-gone")
    assert call(sidecar, "GET", "/flights/search")[0] == 200
    faults.plane.kubectl("delete", "secret", status["credentialSecret"], "-n", NAMESPACE)
    # The sidecar keeps its last good credential (until it expires) while the Secret is gone...
    assert call(sidecar, "GET", "/flights/search")[0] == 200
    assert call(sidecar, "DELETE", "/flights/search/1")[0] == 403
    # ...and the operator puts a credential back.
    recreated = wait_for(lambda: faults.secret(status["credentialSecret"]), 60, "the Secret to be recreated")
    assert resources.TOKEN_FILE in recreated
    wait_for(lambda: status_of(faults, "secret-gone")["ready"], 30, "the capability to be Ready again")
    assert call(sidecar, "GET", "/flights/search")[0] == 200
