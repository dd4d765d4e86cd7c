"""capgate on real pods: the chart from the local image, a 2-replica agent Deployment, real upstream pods.

One module-scoped stack (see :mod:`e2e.pods`): ``helm install`` of the chart with the image ``make image``
built, imported into the node; flights (HTTP), payments (HTTPS with a private CA named by
``tls.caSecretRef``) and ledger (undeclared) as pods; the agent Deployment injected by the operator's
webhook; a second capability, steady-agent, whose credential does not change while its session keys
are renewed every 40 s (its agent calls from the start; the session-key test collects what it saw).
Tests act as the agent with ``kubectl exec`` and read what the upstreams received from their
logs. They run in file order: the revocation is terminal for the capability and comes after the
upgrade, the uninstall comes last. With ``CAPGATE_E2E_KUBECONFIG`` they run on that cluster instead
(e2e/external.py), except the SIGKILL test, which kills through the local node's containerd.
The timings (pod starts, revocation across replicas, session keys) are printed
and written to ``CAPGATE_CACHE/pods-timings.json``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from capgate import injection, resources
from e2e import external
from e2e.external import Cluster
from e2e.node import Node
from e2e.pods import (
    AGENT,
    AGENT_AUTHORIZATION,
    AGENT_UID,
    API_KEY,
    CAPABILITY,
    HTTP_PORT,
    OOM_AGENT,
    OOM_MEMORY_LIMIT,
    RAW_PORT,
    REPLICAS,
    SESSION_KEY_LIFETIME_S,
    STEADY,
    TLS_PORT,
    Stack,
    agent_deployment,
)
from e2e.test_helm_install import CHART, RELEASE, LocalRelease

ROTATION_WAIT_S = 150  # a re-minted credential (every ~10 s) reaches the volume at the kubelet's next sync
REVOCATION_CLAIM_S = 1.0  # the README: "revocation reaches every sidecar within a second"
AUDIT_WAIT_S = 20  # the outbound listener gives a silent connection 10 s to speak (capgate.sidecar.egress)
INIT = injection.INIT_CONTAINER_NAME
SIDECAR = injection.DEFAULT_CONTAINER_NAME
TIMINGS = Path(os.environ.get("CAPGATE_CACHE", Path.home() / ".cache" / "capgate")) / "pods-timings.json"
TIMINGS_SEEN: dict[str, Any] = {}


SESSION_KEYS_SEEN = 3  # the first one and two renewals, all for the same credential
SESSION_KEYS_WAIT_S = 330  # two kubelet syncs (60-90 s apart) after a renewal, with room for a slow node
# 16 bodies in flight, what --max-inflight-bytes (16 MiB) admits; each over the charge limit, so refused once read.
OOM_FLOOD = {"bodies": 16, "kib": 1000, "amount": 500000, "seconds": 60}


@dataclass
class Deployed:
    stack: Stack
    release: LocalRelease
    started: float = 0.0
    """When the steady agent began calling (time.monotonic())."""


@pytest.fixture(scope="module")
def pulled(cluster: Cluster) -> tuple[str, str]:
    """(image, pull policy): locally the image ``make image`` built, imported into the node; else CAPGATE_E2E_IMAGE."""
    started = time.monotonic()
    try:
        found = external.capgate_image(cluster)
    except external.ExternalClusterError as error:
        pytest.fail(str(error), pytrace=False)
    TIMINGS_SEEN["image build+import s"] = time.monotonic() - started
    return found


@pytest.fixture(scope="module")
def image(pulled: tuple[str, str]) -> str:
    return pulled[0]


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, pulled: tuple[str, str]) -> Iterator[Deployed]:
    image, pull_policy = pulled
    release = LocalRelease(cluster, f"capgate-pods-{uuid.uuid4().hex[:6]}", image=image, pull_policy=pull_policy)
    stack = Stack(cluster, f"travel-pods-{uuid.uuid4().hex[:6]}", image, pull_policy)
    try:
        release.prepare()
        started = time.monotonic()
        release.install()
        TIMINGS_SEEN["helm install --wait (operator pod Ready) s"] = time.monotonic() - started
        stack.start()
        # Its agent calls from the start, so that the renewals it must see happen while the other tests run;
        # as the container's own command (read back with kubectl logs), not over a minutes-long kubectl exec.
        stack.start_steady([{
            "receipts": ["$CAPGATE_UPSTREAM_FLIGHTS_URL/search", "$CAPGATE_UPSTREAM_FLIGHTS_URL/book"],
            "keys": SESSION_KEYS_SEEN, "seconds": SESSION_KEYS_WAIT_S}])
        TIMINGS_SEEN.update(stack.timings)
        yield Deployed(stack, release, time.monotonic())
    finally:
        try:
            release.remove(stack.namespace)
        finally:
            TIMINGS.parent.mkdir(parents=True, exist_ok=True)
            TIMINGS.write_text(json.dumps(TIMINGS_SEEN, indent=2) + "\n")
            print(f"\nreal-pod timings: {json.dumps(TIMINGS_SEEN)}")


@pytest.fixture
def stack(deployed: Deployed) -> Stack:
    return deployed.stack


def names(stack: Stack, app: str = AGENT) -> list[str]:
    return [str(p["metadata"]["name"]) for p in stack.agent_pods(app)]


def demo_calls() -> list[dict[str, Any]]:
    return [
        {"http": "$CAPGATE_UPSTREAM_FLIGHTS_URL/search?from=SFO&to=JFK"},
        {"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges", "method": "POST", "json": {"amount": 30000}},
        {"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges", "method": "POST", "json": {"amount": 500000}},
        {"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges/ch_1", "method": "DELETE"},
    ]


def refused_destinations(stack: Stack, pod: str) -> set[str]:
    """Destinations the sidecar's audit ledger (its stdout) records as refused, undeclared."""
    records = [json.loads(line) for line in stack.sidecar_log(pod).splitlines() if line.startswith("{")]
    return {r["destination"] for r in records
            if r.get("reason") == "undeclared_destination" and r.get("outcome") == "denied" and "destination" in r}


def outcome(result: dict[str, Any]) -> tuple[int, str | None]:
    assert "status" in result, result
    return result["status"], result["body"].get("reason")


# -------------------------------------------------------------------------------------- the operator pod

def test_the_operator_runs_in_a_pod_from_the_local_image(deployed: Deployed, image: str) -> None:
    plane, namespace = deployed.release.plane, deployed.release.namespace
    pods = json.loads(plane.kubectl("get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={RELEASE}",
                                    "-o", "json").stdout)["items"]
    (pod,) = pods
    (container,) = pod["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == (image, deployed.release.pull_policy)
    assert pod["status"]["phase"] == "Running"
    assert all(status["ready"] for status in pod["status"]["containerStatuses"])
    assert f"--sidecar-image={image}" in container["args"]


# ------------------------------------------------------------------------------------------- agent pods

def test_every_replica_runs_with_its_sidecar_ready_before_the_agent(stack: Stack, image: str) -> None:
    pods = stack.agent_pods()
    assert len(pods) == REPLICAS
    for pod in pods:
        spec, status = pod["spec"], pod["status"]
        assert status["phase"] == "Running"
        inits = {s["name"]: s for s in status["initContainerStatuses"]}
        sidecar = next(c for c in spec["initContainers"] if c["name"] == SIDECAR)
        assert (sidecar["image"], sidecar["imagePullPolicy"], sidecar["restartPolicy"]) == (image, "Never", "Always")
        assert inits[SIDECAR]["ready"] is True and inits[SIDECAR]["started"] is True
        assert inits[SIDECAR]["restartCount"] == 0
        (agent,) = status["containerStatuses"]
        assert agent["ready"] is True
        assert spec["containers"][0]["securityContext"]["runAsUser"] == AGENT_UID
        # The private CA of payments is mounted into the sidecar, and only there.
        assert any(m["name"] == injection.UPSTREAM_CA_VOLUME for m in sidecar["volumeMounts"])
        assert all(m["name"] != injection.UPSTREAM_CA_VOLUME for m in spec["containers"][0].get("volumeMounts", []))
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        TIMINGS_SEEN.setdefault("agent pod created -> Ready s (1 s resolution)", []).append(
            (datetime.fromisoformat(ready["lastTransitionTime"])
             - datetime.fromisoformat(pod["metadata"]["creationTimestamp"])).total_seconds())
        # capgate-init programmed the pod's network and exited, before the sidecar started.
        assert inits[INIT]["state"]["terminated"]["exitCode"] == 0, inits[INIT]
        assert [c["name"] for c in spec["initContainers"]][:2] == [INIT, SIDECAR]


def test_the_demo_story_on_every_replica(stack: Stack) -> None:
    for pod in names(stack):
        search, charge, too_much, delete = stack.agent(pod, demo_calls())
        assert outcome(search) == (200, None)
        assert outcome(charge) == (200, None)
        assert "x-capgate-receipt" in charge["headers"]
        assert outcome(too_much) == (403, "limit_exceeded")
        assert outcome(delete) == (403, "deny_rule")

    charges = [r for r in stack.seen("payments") if r.get("method")]
    # One $300 charge per replica reached payments, over TLS verified with the private CA, with the
    # sidecar's key; the $5,000 charge and the DELETE never left the pods.
    assert [(r["method"], r["path"], r["body"]) for r in charges] == [
        ("POST", "/v1/charges", '{"amount": 30000}')] * REPLICAS
    assert {r["authorization"] for r in charges} == {f"Bearer {API_KEY}"}
    assert all(r["capgate_headers"] == [] for r in charges)
    searches = [r for r in stack.seen("flights") if r.get("method")]
    assert len(searches) >= REPLICAS
    assert AGENT_AUTHORIZATION not in {r["authorization"] for r in searches}


def test_kubectl_debug_may_not_target_the_sidecar(stack: Stack, image: str) -> None:
    pod = names(stack)[0]
    result = stack.kubectl("debug", pod, f"--image={image}", f"--image-pull-policy={stack.pull_policy}",
                           "--profile=restricted",
                           f"--target={SIDECAR}", "-c", "peek", "--", "python", "-c", "pass", check=False)
    assert result.returncode != 0
    assert "may not target the capgate sidecar" in result.stderr
    ephemeral = stack.get("pod", pod)["spec"].get("ephemeralContainers", [])
    assert ephemeral == []


# -------------------------------------------------------------------------- an agent that ignores HTTP_PROXY

def test_an_agent_calling_declared_upstreams_by_their_real_urls_is_enforced_and_keyed(stack: Stack) -> None:
    namespace = stack.namespace
    pod = names(stack)[0]
    before = len([r for r in stack.seen("payments") if r.get("method")])
    search, delete, charge = stack.agent(pod, [
        {"http": f"http://flights.{namespace}.svc:{HTTP_PORT}/search?from=SFO", "proxy": False},
        {"http": f"http://flights.{namespace}.svc:{HTTP_PORT}/search/1", "method": "DELETE", "proxy": False},
        {"http": f"https://payments.{namespace}.svc:{TLS_PORT}/v1/charges", "method": "POST",
         "json": {"amount": 1000}, "proxy": False},
    ])
    assert outcome(search) == (200, None)
    assert "x-capgate-decision-id" in search["headers"]  # the sidecar decided, though the agent went direct
    assert outcome(delete) == (403, "deny_rule")
    assert outcome(charge) == (200, None)  # https by its real URL: intercepted with the pod CA, then keyed
    charges = [r for r in stack.seen("payments") if r.get("method")][before:]
    assert [(r["body"], r["authorization"]) for r in charges] == [('{"amount": 1000}', f"Bearer {API_KEY}")]


def test_undeclared_services_and_pod_ips_are_refused_and_audited(stack: Stack) -> None:
    pod = names(stack)[0]
    ledger_ip = stack.pod_ip("ledger")
    by_name, by_ip = stack.agent(pod, [
        {"http": f"http://ledger.{stack.namespace}.svc:{HTTP_PORT}/books", "proxy": False},
        {"http": f"http://{ledger_ip}:{HTTP_PORT}/books", "proxy": False},
    ])
    for result in (by_name, by_ip):
        assert result.get("status") in (None, 403), result
        if "status" in result:
            assert result["body"]["reason"] == "undeclared_destination"
    assert [r for r in stack.seen("ledger") if r.get("method")] == []
    cluster_ip = stack.kubectl("get", "service", "ledger", "-o", "jsonpath={.spec.clusterIP}").stdout
    assert {f"{cluster_ip}:{HTTP_PORT}", f"{ledger_ip}:{HTTP_PORT}"} <= refused_destinations(stack, pod)


def test_raw_tcp_and_udp_never_reach_anything(stack: Stack) -> None:
    pod = names(stack)[0]
    ledger_ip, flights_ip = stack.pod_ip("ledger"), stack.pod_ip("flights")
    results = stack.agent(pod, [
        {"tcp": [ledger_ip, RAW_PORT], "send": "RAW-LEDGER\n"},
        {"tcp": [f"ledger.{stack.namespace}.svc", RAW_PORT], "send": "RAW-LEDGER-SVC\n"},
        {"tcp": [flights_ip, RAW_PORT], "send": "RAW-FLIGHTS\n"},
        {"udp": [ledger_ip, HTTP_PORT], "send": "UDP-LEDGER"},
        {"udp": [flights_ip, HTTP_PORT], "send": "UDP-FLIGHTS"},
    ])
    for result in results[:3]:
        assert "RAW-ANSWER" not in result.get("received", ""), result
    time.sleep(1)  # a datagram that got through would be logged within milliseconds
    # Even an empty connection reaching a raw listener would be a way around the sidecar.
    assert [r for app in ("ledger", "flights") for r in stack.seen(app) if "tcp" in r or "udp" in r] == []
    # A connection that never says enough to be read as HTTP or TLS is refused when the sidecar stops
    # waiting for its first bytes, which may be after the agent gave up: wait for the record, not a time.
    wanted = {f"{ledger_ip}:{RAW_PORT}", f"{flights_ip}:{RAW_PORT}"}
    deadline = time.monotonic() + AUDIT_WAIT_S
    while not wanted <= refused_destinations(stack, pod) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert wanted <= refused_destinations(stack, pod), [
        line for line in stack.sidecar_log(pod).splitlines() if any(w in line for w in wanted)]


# ------------------------------------------------------------------------------------------ helm upgrade

def test_helm_upgrade_replaces_the_operator_and_new_replicas_are_still_injected(deployed: Deployed,
                                                                                image: str) -> None:
    release, stack = deployed.release, deployed.stack
    selector = f"app.kubernetes.io/instance={RELEASE}"

    def operator_pods() -> set[str]:
        listed = release.plane.kubectl("get", "pods", "-n", release.namespace, "-l", selector, "-o", "name")
        return set(listed.stdout.split())

    before = operator_pods()
    release.plane.helm("upgrade", RELEASE, str(CHART), "--namespace", release.namespace, "--reuse-values",
                       "--set", "podAnnotations.capgate\\.dev/e2e-upgraded=yes", "--wait", "--timeout", "300s",
                       *release.image_values())
    release.plane.kubectl("rollout", "status", "-n", release.namespace, f"deployment/{RELEASE}", "--timeout=120s")
    release.plane.kubectl("wait", "-n", release.namespace, "--for=delete", *before, "--timeout=60s")
    assert operator_pods() and operator_pods().isdisjoint(before)

    replaced = names(stack)[0]
    stack.kubectl("delete", "pod", replaced, "--wait=true")
    stack.rollout(AGENT)
    fresh = [n for n in names(stack) if n != replaced]
    assert len(fresh) == REPLICAS
    for pod in fresh:
        (search,) = stack.agent(pod, demo_calls()[:1])
        assert outcome(search) == (200, None)


# ------------------------------------------------------------------------------------------- rotation

def test_credential_rotation_reaches_a_running_sidecar_through_the_kubelet_without_a_failed_call(
        stack: Stack) -> None:
    pod = names(stack)[-1]
    (result,) = stack.agent(pod, [{"until_rotated": "$CAPGATE_UPSTREAM_FLIGHTS_URL/search",
                                   "whoami": "$CAPGATE_URL/_capgate/v1/whoami", "seconds": ROTATION_WAIT_S}])
    calls = result["calls"]
    credentials = list(dict.fromkeys(c["credential"] for c in calls))
    assert len(credentials) >= 2, f"the sidecar kept credential {credentials} for {ROTATION_WAIT_S} s"
    assert None not in credentials
    # Every call allowed, each with its receipt: no gap while the Secret volume was swapped underneath.
    assert [(c["status"], c["receipt"]) for c in calls if (c["status"], c["receipt"]) != (200, True)] == []
    changes = [c["at"] for previous, c in itertools.pairwise(calls)
               if c["credential"] != previous["credential"]]
    TIMINGS_SEEN["credential rotation seen in the sidecar after s"] = round(changes[0] - calls[0]["at"], 1)
    TIMINGS_SEEN["calls during rotation"] = len(calls)


# ---------------------------------------------------------------------------------------- sidecar killed

def test_a_killed_sidecar_fails_closed_and_the_kubelet_brings_it_back(stack: Stack, node: Node) -> None:
    pod = names(stack)[0]
    status = {s["name"]: s for s in stack.get("pod", pod)["status"]["initContainerStatuses"]}[SIDECAR]
    restarts = status["restartCount"]
    before = len([r for r in stack.seen("flights") if r.get("method")])
    flights = f"http://flights.{stack.namespace}.svc:{HTTP_PORT}/search"
    # The agent keeps calling, through the sidecar's port and around it, while the sidecar is killed.
    watcher = stack.agent_process(pod, [{"watch": [{"http": "$CAPGATE_UPSTREAM_FLIGHTS_URL/search"},
                                                   {"http": flights, "proxy": False}], "seconds": 8}])
    assert watcher.stdout is not None
    assert watcher.stdout.readline().strip() == "ready"
    time.sleep(1)
    killed_at = time.time()
    node.ctr("tasks", "kill", "--signal", "SIGKILL", status["containerID"].removeprefix("containerd://"))
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    (result,) = json.loads(out.strip().splitlines()[-1])
    outcomes = result["outcomes"]

    after = [o for o in outcomes if o["at"] > killed_at]
    failed = [o for o in after if o["status"] is None]
    assert failed, "no call failed: the sidecar was never seen down"  # the outage was observed...
    assert all(o["decided"] for o in outcomes if o["status"] is not None)  # ...and every answer came from it
    back = max(o["at"] for o in failed)
    assert [o["status"] for o in after if o["at"] > back] != [] and all(
        o["status"] == 200 for o in after if o["at"] > back)  # recovered: everything after the outage works
    TIMINGS_SEEN["sidecar outage after SIGKILL s"] = back - killed_at
    status = {s["name"]: s for s in stack.get("pod", pod)["status"]["initContainerStatuses"]}[SIDECAR]
    assert status["restartCount"] == restarts + 1
    assert status["ready"] is True
    # Nothing reached flights around the sidecar: a direct call would carry the agent's own Authorization.
    arrived = [r for r in stack.seen("flights") if r.get("method")][before:]
    assert arrived and AGENT_AUTHORIZATION not in {r["authorization"] for r in arrived}, err


# ------------------------------------------------------------------------------------------ OOM-killed

def _sidecar_status(stack: Stack, pod: str) -> dict[str, Any]:
    return {s["name"]: s for s in stack.get("pod", pod)["status"]["initContainerStatuses"]}[SIDECAR]


def _budget_spent(stack: Stack) -> int:
    usage = stack.get(f"{resources.USAGE_PLURAL}.{resources.GROUP}", CAPABILITY)
    windows = (usage.get("status") or {}).get("windows") or {}
    return sum(int(w.get("spent", 0)) for key, w in windows.items() if key.startswith("budget/payments/amount/"))


def _wait_ready_again(stack: Stack, pod: str, restarts: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = _sidecar_status(stack, pod)
        if status["restartCount"] > restarts and status["ready"]:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"the sidecar did not come back: {status}\n{stack.describe()}")
        time.sleep(0.5)


def test_an_oom_killed_sidecar_fails_closed_and_comes_back_with_the_fleet_budget_still_spent(
        deployed: Deployed) -> None:
    """A sidecar memory limit its normal work fits in (Helm sidecar.resources), crossed by legitimate but
    heavy calls: JSON bodies within --max-body-bytes, 16 in flight, each about ten times larger once parsed."""
    release, stack = deployed.release, deployed.stack
    release.plane.helm("upgrade", RELEASE, str(CHART), "--namespace", release.namespace, "--reuse-values",
                       "--set", f"sidecar.resources.limits.memory={OOM_MEMORY_LIMIT}", "--wait", "--timeout", "300s",
                       *release.image_values())
    stack.apply([agent_deployment(1, name=OOM_AGENT)])
    stack.rollout(OOM_AGENT)
    try:
        (pod,) = names(stack, OOM_AGENT)
        sidecar = next(c for c in stack.get("pod", pod)["spec"]["initContainers"] if c["name"] == SIDECAR)
        assert sidecar["resources"]["limits"]["memory"] == OOM_MEMORY_LIMIT
        restarts = _sidecar_status(stack, pod)["restartCount"]
        # Spend the fleet-wide budget (100000 a day, 40000 a charge) until it refuses, on any replica's account.
        exhausted = stack.agent(pod, [demo_calls()[0], *[{"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges",
                                                           "method": "POST", "json": {"amount": 40000}}] * 4])
        assert outcome(exhausted[-1]) == (429, "budget_exhausted"), exhausted
        spent = _budget_spent(stack)
        assert spent > 100000 - 40000, spent

        flights = f"http://flights.{stack.namespace}.svc:{HTTP_PORT}/search"
        watcher = stack.agent_process(pod, [{"watch": [{"http": "$CAPGATE_UPSTREAM_FLIGHTS_URL/search"},
                                                       {"http": flights, "proxy": False}], "seconds": 45}])
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"
        before = len([r for r in stack.seen("flights") if r.get("method")])
        # Over the limit per charge (403 limit_exceeded), so nothing is forwarded and nothing spent: only read.
        (flood,) = stack.agent(pod, [{"memory": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges", **OOM_FLOOD}])
        assert flood["stopped"] is not None, f"the sidecar survived the flood: {flood}"
        killed_at = flood["stopped"]["at"]
        status = _wait_ready_again(stack, pod, restarts)
        assert status["lastState"]["terminated"]["reason"] == "OOMKilled", status
        TIMINGS_SEEN["OOM flood answers before the kill"] = flood["answers"]
        out, err = watcher.communicate(timeout=90)
        assert watcher.returncode == 0, err
        (watched,) = json.loads(out.strip().splitlines()[-1])
        outcomes = watched["outcomes"]
        after = [o for o in outcomes if o["at"] >= killed_at]
        failed = [o for o in after if o["status"] is None]
        assert failed, "no call failed: the sidecar was never seen down"
        assert all(o["decided"] for o in outcomes if o["status"] is not None)  # every answer was the sidecar's
        back = max(o["at"] for o in failed)
        assert [o["status"] for o in after if o["at"] > back] != [] and all(
            o["status"] == 200 for o in after if o["at"] > back)
        TIMINGS_SEEN["sidecar outage after OOM kill s"] = round(back - killed_at, 1)
        arrived = [r for r in stack.seen("flights") if r.get("method")][before:]
        assert AGENT_AUTHORIZATION not in {r["authorization"] for r in arrived}  # nothing went around it

        # The restarted sidecar starts from the fleet's usage object, not from a fresh budget.
        search, charge = stack.agent(pod, [demo_calls()[0], {"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges",
                                                              "method": "POST", "json": {"amount": 40000}}])
        assert outcome(search) == (200, None)
        assert outcome(charge) == (429, "budget_exhausted")
        assert _budget_spent(stack) >= spent
    finally:
        stack.kubectl("delete", "deployment", OOM_AGENT, "--wait=false")


# ------------------------------------------------------------------------------------------ session keys

def test_session_keys_are_renewed_through_the_kubelet_without_a_failed_call_or_an_unsigned_receipt(
        deployed: Deployed) -> None:
    """steady-agent's credential stays for an hour; its session key is renewed every 40 s (lifetime 150 s)
    and reaches the pod when the kubelet syncs the Secret volume. The agent called search, then book (which
    requires search's 5 s receipt), since the stack came up."""
    stack = deployed.stack
    deadline = deployed.started + SESSION_KEYS_WAIT_S + 60
    while not any("done" in line for line in stack.agent_log(STEADY)) and time.monotonic() < deadline:
        time.sleep(2)
    (pod,) = stack.agent_pods(STEADY)
    assert {s["name"]: s["restartCount"] for s in pod["status"]["containerStatuses"]} == {"agent": 0}
    log = stack.agent_log(STEADY)
    assert any("done" in line for line in log), log[-3:]
    calls = [line["call"] for line in log if "call" in line]
    keys = list(dict.fromkeys(c["key"] for c in calls))
    assert None not in keys, [c for c in calls if c["key"] is None][:5]  # every allowed call got a receipt
    assert [(c["step"], c["status"], c["reason"]) for c in calls if c["status"] != 200] == []
    assert len(keys) >= SESSION_KEYS_SEEN, f"{len(keys)} session keys in {calls[-1]['at'] - calls[0]['at']:.0f} s"
    assert len({c["credential"] for c in calls}) == 1  # renewed for an unchanged credential

    first_seen = {c["key"]: c["at"] for c in reversed(calls)}
    sign_until = {c["key"]: c["sign_until"] for c in calls}
    ages = [first_seen[k] - (sign_until[k] - SESSION_KEY_LIFETIME_S) for k in keys[1:]]
    # The kubelet's sync period on this node (each change the pod saw), and how old a key was when replaced.
    syncs = [first_seen[b] - first_seen[a] for a, b in itertools.pairwise(keys)]
    replaced_at_age = [first_seen[b] - (sign_until[a] - SESSION_KEY_LIFETIME_S) for a, b in itertools.pairwise(keys)]
    TIMINGS_SEEN["session keys: new key seen by the pod after its write s"] = [round(a, 1) for a in ages]
    TIMINGS_SEEN["session keys: between the pod's key changes (kubelet sync) s"] = [round(s, 1) for s in syncs]
    TIMINGS_SEEN["session keys: a key's age when the pod replaced it s (signs 150 s)"] = [
        round(a, 1) for a in replaced_at_age]
    TIMINGS_SEEN["session keys: calls, seconds"] = [len(calls), round(calls[-1]["at"] - calls[0]["at"])]
    assert max(replaced_at_age) < SESSION_KEY_LIFETIME_S


# ------------------------------------------------------------------------------------------- revocation

def test_revocation_refuses_every_replica_within_a_second(stack: Stack) -> None:
    pods = names(stack)
    assert len(pods) == REPLICAS
    pollers = [stack.agent_process(pod, [{"until_refused": "$CAPGATE_UPSTREAM_FLIGHTS_URL/search", "seconds": 60}])
               for pod in pods]
    try:
        for poller in pollers:
            assert poller.stdout is not None
            line = poller.stdout.readline()
            assert line.strip() == "ready", (line, poller.stderr.read() if poller.stderr else "")
        revoked_at = time.time()
        stack.kubectl("patch", f"acap/{CAPABILITY}", "--type=merge", "-p", '{"spec":{"revoked":true}}')
        refused = []
        for poller in pollers:
            out, err = poller.communicate(timeout=90)
            (result,) = json.loads(out.strip().splitlines()[-1])
            assert "refused_at" in result, (result, err)
            assert result["body"]["reason"] == "revoked"
            refused.append(result["refused_at"] - revoked_at)
    finally:
        for poller in pollers:
            if poller.poll() is None:
                poller.kill()
                poller.wait()
    TIMINGS_SEEN["revocation per replica s"] = refused
    TIMINGS_SEEN["revocation, every replica refusing s"] = max(refused)
    assert max(refused) < REVOCATION_CLAIM_S, refused


# --------------------------------------------------------------------------------------------- uninstall

def _bindings_for(plane: Cluster, namespace: str) -> list[str]:
    """The ClusterRoleBindings the operator made for ServiceAccounts of ``namespace`` (revocation readers)."""
    listed = json.loads(plane.kubectl("get", "clusterrolebindings", "-l", "app.kubernetes.io/managed-by=capgate",
                                      "-o", "json").stdout)["items"]
    return [b["metadata"]["name"] for b in listed
            if any(s.get("namespace") == namespace for s in b.get("subjects") or [])]


def test_removing_capgate_as_documented_leaves_only_the_root_key_and_webhook_secrets(deployed: Deployed) -> None:
    release, stack = deployed.release, deployed.stack
    plane = release.plane
    assert _bindings_for(plane, stack.namespace) != []
    # helm/capgate/README.md, "Uninstall": delete the capabilities while the operator runs, then uninstall.
    stack.kubectl("delete", "acap", "--all", "--wait=true", "--timeout=60s")
    stack.kubectl("wait", "--for=delete", *[f"secret/{name}{resources.CREDENTIAL_SECRET_SUFFIX}"
                                            for name in (CAPABILITY, STEADY)], "--timeout=60s")
    assert _bindings_for(plane, stack.namespace) == []

    release.uninstall()
    selector = f"app.kubernetes.io/instance={RELEASE}"
    started = time.monotonic()
    # helm deletes the Deployment; its pods go with their grace period (the operator exits on SIGTERM).
    plane.kubectl("wait", "-n", release.namespace, "--for=delete", "pods", "-l", selector, "--timeout=60s")
    TIMINGS_SEEN["operator pod gone after helm uninstall s"] = time.monotonic() - started
    leftovers = plane.kubectl("get", "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,"
                              "validatingwebhookconfigurations", "-l", selector, "-o", "name").stdout.split()
    assert leftovers == []
    everything = plane.kubectl("get", "all,configmaps,secrets,serviceaccounts,roles,rolebindings,leases",
                               "-n", release.namespace, "-o", "name").stdout.split()
    # What the README says stays (the operator made them at run time), and what every namespace has.
    assert sorted(everything) == ["configmap/kube-root-ca.crt", "secret/capgate-root-key",
                                  "secret/capgate-webhook-tls", "serviceaccount/default"]
