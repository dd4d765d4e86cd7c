"""Fleet-wide budgets and single-use receipts on real pods: a 3-replica agent Deployment, one usage object.

The stack of :mod:`e2e.pods` (the chart from the local image, real upstream pods, the agent Deployment
injected by the operator's webhook) with 3 replicas and a capability of its own: no rate limit (so
unbudgeted calls never touch the shared state), two fleet-wide budgets of :data:`MAX` on payments
(``amount`` and ``units``, one per test that needs a fresh window) and a ``book`` rule on flights
that consumes its search receipt. The agents' calls are made inside their containers
(``pod_scripts/fleet_agent.py``, through ``HTTP_PROXY`` as an unmodified client), several threads in
every pod at once; what was really spent is what the payments pod logged receiving.

The accounting the tests check is the lease algorithm's (:mod:`capgate.usage`): the stored ``spent``
is what was leased out, so at rest ``spent == charged at the upstream + what each live sidecar still
holds (its capgate_usage_lease_remaining) + the slice of a sidecar that was killed`` and ``spent <=
MAX``. A sidecar refuses a call of ``a`` only when ``a - held > remaining``, and ``remaining + held``
of a sidecar only goes down afterwards (a grant moves units from one to the other, spending lowers
it); every sidecar ends refusing the largest call :data:`HIGH`, so what the fleet could not use is
``remaining + sum(held) <= REPLICAS * (HIGH - 1) - (REPLICAS - 1) * remaining``.

Timings and counts are printed and written to ``CAPGATE_CACHE/pods-fleet-timings.json``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capgate import injection
from capgate.operator import manifests
from e2e import images
from e2e.controlplane import ControlPlane
from e2e.node import Node
from e2e.pods import AGENT, CAPABILITY, HERE, Stack
from e2e.test_helm_install import LocalRelease

REPLICAS = 3
MAX = 1000
LOW, HIGH = 7, 50  # the amounts each call charges
THREADS = 4  # per pod
AMOUNT = "budget/payments/amount/86400s"
UNITS = "budget/payments/units/86400s"
SHARE = 8  # capgate.usage.SHARE: a first lease is an eighth of what is left
HAMMER_S = 90
START_S = 6  # for three ``kubectl exec`` of python to be up on 2 shared cores
FLEET_AGENT = HERE / "pod_scripts" / "fleet_agent.py"
CHARGES = "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges"
BOOKINGS = "$CAPGATE_UPSTREAM_FLIGHTS_URL/bookings"
SEARCH = "$CAPGATE_UPSTREAM_FLIGHTS_URL/search?from=SFO"
METRICS = "http://127.0.0.1:15090/metrics"
SIDECAR = injection.DEFAULT_CONTAINER_NAME
TIMINGS = Path(os.environ.get("CAPGATE_CACHE", Path.home() / ".cache" / "capgate")) / "pods-fleet-timings.json"
SEEN: dict[str, Any] = {}


def fleet_capability(cap: dict[str, Any]) -> None:
    """:func:`e2e.pods.capability`, changed for these tests (see the module docstring)."""
    spec = cap["spec"]
    spec.pop("rateLimit", None)
    spec["credential"] = {"ttl": "1h", "rotateBefore": "20m"}  # no re-mint every 10 s: not what this is about
    spec["budgets"] = [{"upstream": "payments", "field": field, "max": MAX, "per": "24h"}
                       for field in ("amount", "units")]
    charge = next(rule for rule in spec["rules"] if rule["name"] == "charge")
    charge.pop("requires", None)
    charge.pop("limits", None)
    spec["rules"].insert(2, {"name": "book", "effect": "allow", "upstream": "flights", "methods": ["POST"],
                             "paths": ["/bookings"], "requires": [{"rule": "search", "consume": True}]})


@pytest.fixture(scope="module")
def stack(control_plane: ControlPlane, node: Node) -> Iterator[Stack]:
    started = time.monotonic()
    image = images.build().images["capgate"].ref
    node.import_docker_image(image)
    release = LocalRelease(control_plane, f"capgate-fleet-{uuid.uuid4().hex[:6]}", image=image, session_keys=False)
    the_stack = Stack(control_plane, f"fleet-pods-{uuid.uuid4().hex[:6]}", image, replicas=REPLICAS,
                      tweak=fleet_capability)
    try:
        release.prepare()
        release.install()
        the_stack.start()
        SEEN.update(the_stack.timings)
        SEEN["stack ready s"] = round(time.monotonic() - started, 1)
        yield the_stack
    finally:
        try:
            release.remove(the_stack.namespace)
        finally:
            TIMINGS.parent.mkdir(parents=True, exist_ok=True)
            TIMINGS.write_text(json.dumps(SEEN, indent=2) + "\n")
            print(f"\nfleet on real pods: {json.dumps(SEEN)}")


# ------------------------------------------------------------------------------------------------ helpers

def names(stack: Stack) -> list[str]:
    return sorted(str(p["metadata"]["name"]) for p in stack.agent_pods())


def run(stack: Stack, pod: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return stack.agent(pod, steps, script=FLEET_AGENT)


def together(stack: Stack, steps: dict[str, dict[str, Any]], timeout: float) -> tuple[float, dict[str, Any]]:
    """Each pod's step, all starting at one moment once every agent process is up (``kubectl exec`` is slow)."""
    at = time.time() + START_S
    processes = {pod: stack.agent_process(pod, [{**step, "at": at}], script=FLEET_AGENT)
                 for pod, step in steps.items()}
    try:
        for process in processes.values():
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.strip() == "ready", (line, process.stderr.read() if process.stderr else "")
        assert time.time() < at, f"the agents were not all ready within {START_S} s"
        results = {}
        for pod, process in processes.items():
            out, err = process.communicate(timeout=timeout)
            assert process.returncode == 0, err
            (results[pod],) = json.loads(out.strip().splitlines()[-1])
        return at, results
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def hammer(stack: Stack, pods: list[str], field: str, marker: str, seed: int) -> dict[str, list[list[Any]]]:
    """Every pod's agent charging ``field`` from :data:`THREADS` threads, all at once, until refused."""
    step = {"hammer": CHARGES, "field": field, "marker": marker, "threads": THREADS, "low": LOW, "high": HIGH,
            "seconds": HAMMER_S}
    at, results = together(stack, {pod: {**step, "seed": seed * 10 + i} for i, pod in enumerate(pods)},
                           HAMMER_S + 60)
    calls = {pod: list(result["calls"]) for pod, result in results.items()}
    ends = [c[0] for pod_calls in calls.values() for c in pod_calls if c[2] == 200]
    SEEN[f"{field} (hammer {seed}): from the start to the last charge s"] = round(max(ends, default=at) - at, 2)
    SEEN[f"{field} (hammer {seed}): calls answered, charged"] = [
        sum(1 for pod_calls in calls.values() for c in pod_calls if c[2] is not None), len(ends)]
    for pod_calls in calls.values():  # every answer is a charge or a refusal on the budget, nothing else
        answered = [c for c in pod_calls if c[2] is not None]
        assert {(status, reason) for _, _, status, reason in answered} <= {(200, None), (429, "budget_exhausted")}, \
            answered
    return calls


def accepted(calls: dict[str, list[list[Any]]]) -> int:
    return sum(amount for pod_calls in calls.values() for _, amount, status, _ in pod_calls if status == 200)


def charged(stack: Stack, field: str, marker: str) -> int:
    """What payments logged receiving for ``marker``: what the fleet really spent."""
    total = 0
    for seen in stack.seen("payments"):
        if seen.get("path") == "/v1/charges" and seen.get("body"):
            body = json.loads(seen["body"])
            if body.get("marker") == marker:
                total += int(body.get(field, 0))
    return total


def window(stack: Stack, key: str) -> dict[str, int]:
    windows = (stack.get("agentcapabilityusages", CAPABILITY).get("status") or {}).get("windows") or {}
    assert key in windows, f"no fleet-wide window {key} stored: the sidecars did not share the budget"
    return dict(windows[key])


def samples(stack: Stack, pod: str) -> dict[str, float]:
    (result,) = run(stack, pod, [{"metrics": METRICS}])
    assert result["status"] == 200, result
    return dict(result["samples"])


def held(stack: Stack, pod: str, key: str) -> int:
    """What this pod's sidecar still holds of ``key``'s window (0 before its first lease)."""
    return int(samples(stack, pod).get(f'capgate_usage_lease_remaining{{meter="{key}"}}', 0))


def leases(stack: Stack, pod: str, key: str) -> int:
    return int(samples(stack, pod).get(f'capgate_usage_leases_total{{meter="{key}"}}', 0))


def usage_writes(stack: Stack) -> dict[str, int]:
    """The API server's own count of status writes to usage objects, by response code."""
    text = stack.plane.kubectl("get", "--raw", "/metrics").stdout
    out: dict[str, int] = {}
    for line in text.splitlines():
        if (line.startswith("apiserver_request_total{") and 'resource="agentcapabilityusages"' in line
                and 'verb="PUT"' in line and 'subresource="status"' in line):
            code = line.split('code="', 1)[1].split('"', 1)[0]
            out[code] = out.get(code, 0) + int(float(line.rpartition(" ")[2]))
    return out


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {code: after[code] - before.get(code, 0) for code in after if after[code] != before.get(code, 0)}


def sidecar_status(stack: Stack, pod: str) -> dict[str, Any]:
    statuses = stack.get("pod", pod)["status"]["initContainerStatuses"]
    return dict(next(s for s in statuses if s["name"] == SIDECAR))


def verdict(result: dict[str, Any]) -> tuple[Any, Any, Any]:
    body = result.get("body") or {}
    return result.get("status"), body.get("error"), body.get("reason")


def unusable_bound(remaining: int) -> int:
    """What the fleet may leave unused when every sidecar ended refusing a call of HIGH (module docstring)."""
    return REPLICAS * (HIGH - 1) - (REPLICAS - 1) * remaining


# -------------------------------------------------------------------------------------------- budgets

def test_three_replicas_hammering_one_budget_never_overspend_and_nearly_exhaust_it(stack: Stack) -> None:
    pods = names(stack)
    assert len(pods) == REPLICAS
    writes = usage_writes(stack)
    calls = hammer(stack, pods, "amount", "fleet-amount", seed=1)
    SEEN["amount: API-server status writes by code"] = delta(usage_writes(stack), writes)

    spent = charged(stack, "amount", "fleet-amount")
    assert spent <= MAX, f"{spent} charged of a {MAX} budget"
    stored = window(stack, AMOUNT)["spent"]
    holding = {pod: held(stack, pod, AMOUNT) for pod in pods}
    SEEN["amount: leases per sidecar"] = [leases(stack, pod, AMOUNT) for pod in pods]
    SEEN["amount: charged, stored spent, held"] = [spent, stored, list(holding.values())]
    assert accepted(calls) == spent  # every 200 the agents saw reached payments, and nothing else did
    assert spent <= stored <= MAX, f"{spent} charged, {stored} leased of {MAX}"
    # Every unit leased from the window was either charged at the upstream or is still held by a sidecar.
    assert spent + sum(holding.values()) == stored, (spent, holding, stored)
    assert MAX - spent <= unusable_bound(MAX - stored), f"only {spent} of {MAX} could be spent"
    assert all(leases(stack, pod, AMOUNT) >= 1 for pod in pods)  # all three really shared the window


def test_a_sidecar_killed_holding_a_lease_loses_its_slice_and_the_restarted_one_goes_on_from_the_fleet_state(
        stack: Stack, node: Node) -> None:
    pods = names(stack)
    for pod in pods:  # every sidecar leases a slice of the units window
        (result,) = run(stack, pod, [{"http": CHARGES, "method": "POST",
                                      "json": {"units": 10, "marker": "fleet-units"}}])
        assert result["status"] == 200, result
    victim = pods[1]
    slice_lost = held(stack, victim, UNITS)
    assert slice_lost > 0, "the sidecar to kill holds no lease"
    before = sidecar_status(stack, victim)
    stored_before = window(stack, UNITS)["spent"]

    node.ctr("tasks", "kill", "--signal", "SIGKILL", before["containerID"].removeprefix("containerd://"))
    killed = time.monotonic()
    deadline = killed + 60
    while not ((now := sidecar_status(stack, victim))["restartCount"] > before["restartCount"] and now["ready"]):
        assert time.monotonic() < deadline, f"the kubelet did not bring the sidecar back: {now}"
        time.sleep(0.2)
    SEEN["units: killed sidecar Ready again after s"] = round(time.monotonic() - killed, 1)
    assert now["restartCount"] == before["restartCount"] + 1
    assert window(stack, UNITS)["spent"] == stored_before  # a restart resets nothing
    assert held(stack, victim, UNITS) == 0  # the new process holds nothing of the dead one's slice

    calls = hammer(stack, pods, "units", "fleet-units", seed=2)
    # The restarted sidecar charged again, from the window as the fleet left it, not a fresh one.
    assert [c for c in calls[victim] if c[2] == 200] != []
    assert leases(stack, victim, UNITS) >= 1

    spent = charged(stack, "units", "fleet-units")
    assert spent <= MAX, f"{spent} charged of a {MAX} budget"
    stored = window(stack, UNITS)["spent"]
    assert stored >= stored_before
    holding = {pod: held(stack, pod, UNITS) for pod in pods}
    SEEN["units: charged, stored spent, held, slice lost in the kill"] = [spent, stored, list(holding.values()),
                                                                         slice_lost]
    assert spent <= stored <= MAX, f"{spent} charged, {stored} leased of {MAX}"
    # The dead sidecar's slice is exactly what is missing: lost, never spent by anyone else.
    assert stored - spent - sum(holding.values()) == slice_lost, (spent, holding, stored, slice_lost)
    assert slice_lost <= MAX // SHARE
    assert MAX - spent - slice_lost <= unusable_bound(MAX - stored), f"only {spent} of {MAX} could be spent"


def test_a_rollout_restart_of_the_deployment_does_not_refill_the_budgets(stack: Stack) -> None:
    old = names(stack)
    stored = {key: window(stack, key)["spent"] for key in (AMOUNT, UNITS)}
    spent = {field: charged(stack, field, f"fleet-{field}") for field in ("amount", "units")}
    started = time.monotonic()
    stack.kubectl("rollout", "restart", f"deployment/{AGENT}")
    stack.rollout(AGENT)
    SEEN["rollout restart ready s"] = round(time.monotonic() - started, 1)
    pods = names(stack)
    assert len(pods) == REPLICAS and set(pods).isdisjoint(old)

    for field, key in (("amount", AMOUNT), ("units", UNITS)):
        calls = hammer(stack, pods, field, f"fleet-{field}", seed=3)
        more = accepted(calls)
        total = charged(stack, field, f"fleet-{field}")
        assert total == spent[field] + more
        assert total <= MAX, f"{field}: {total} charged of a {MAX} budget ({more} after the rollout)"
        # New sidecars start with no lease: whatever they spend comes out of what the old ones left.
        assert total <= window(stack, key)["spent"] <= MAX, (field, total)
        assert more <= MAX - stored[key], f"{field}: {more} spent after the rollout, {MAX - stored[key]} was left"
        SEEN[f"{field}: spent after the rollout (left before it)"] = [more, MAX - stored[key]]


# ----------------------------------------------------------------------------------- single-use receipts

def test_one_receipt_presented_at_once_from_three_pods_books_exactly_once(stack: Stack) -> None:
    pods = names(stack)
    correlation = f"trip-{uuid.uuid4().hex[:8]}"
    (search,) = run(stack, pods[0], [{"http": SEARCH, "headers": {"X-Capgate-Correlation-Id": correlation}}])
    assert search["status"] == 200, search
    receipt, receipt_id = search["headers"]["x-capgate-receipt"], search["headers"]["x-capgate-decision-id"]
    book = {"http": BOOKINGS, "method": "POST", "json": {"marker": correlation},
            "headers": {"X-Capgate-Receipt": receipt, "X-Capgate-Correlation-Id": correlation}}
    _, answers = together(stack, {pod: {"parallel": [book] * 3} for pod in pods}, 60)
    results = [r for answer in answers.values() for r in answer["results"]]

    assert [r.get("status") for r in results].count(200) == 1, results
    refused = [r["body"] for r in results if r.get("status") != 200]
    assert {(b["error"], b["reason"], b["rule"]) for b in refused} == {("denied", "receipt_consumed", "book")}, refused
    booked = [s for s in stack.seen("flights") if s.get("path") == "/bookings" and correlation in s.get("body", "")]
    assert len(booked) == 1, booked
    assert receipt_id in stack.get("agentcapabilityusages", CAPABILITY)["status"]["consumed"]


# --------------------------------------------------------------------------------------------- fail closed

def test_without_access_to_the_usage_object_budgeted_and_consuming_calls_are_refused_and_others_pass(
        stack: Stack) -> None:
    pod = names(stack)[0]
    binding = manifests.usage_role_name(CAPABILITY)
    saved = stack.get("rolebinding", binding)
    saved["metadata"] = {k: v for k, v in saved["metadata"].items()
                         if k in ("name", "namespace", "labels", "ownerReferences")}
    budgeted = {"http": CHARGES, "method": "POST", "json": {"amount": HIGH, "marker": "fleet-down"}}
    stack.kubectl("delete", "rolebinding", binding)
    try:
        refused, search, book = run(stack, pod, [
            {"until": budgeted, "reason": "usage_unavailable", "seconds": 20},
            {"http": SEARCH},  # the sidecar holds its receipt for the pod session
            {"http": BOOKINGS, "method": "POST", "json": {"marker": "fleet-down"}},
        ])
        SEEN["access removed: calls until refused usage_unavailable"] = refused["tries"]
        assert verdict(refused) == (429, "budget_exhausted", "usage_unavailable"), refused
        assert "retry-after" in refused["headers"]
        assert search["status"] == 200, search  # no budget on flights: unaffected
        assert verdict(book) == (503, "usage_unavailable", "usage_unavailable"), book
        time.sleep(11)  # two of the operator's 5 s timer ticks
        recreated = stack.kubectl("get", "rolebinding", binding, "--ignore-not-found", "-o", "name").stdout.strip()
        SEEN["access removed: the operator recreated the RoleBinding within 11 s"] = bool(recreated)
    finally:
        if not stack.kubectl("get", "rolebinding", binding, "--ignore-not-found", "-o", "name").stdout.strip():
            stack.apply([saved])
    assert [s for s in stack.seen("flights") if "fleet-down" in s.get("body", "")] == []
    assert charged(stack, "amount", "fleet-down") == 0

    # Access back: the budget answers from the state again (still spent), and the unspent receipt books once.
    answered, book = run(stack, pod, [
        {"until": budgeted, "reason": "budget_exhausted", "seconds": 20},
        {"until": {"http": BOOKINGS, "method": "POST", "json": {"marker": "fleet-down"}}, "reason": None,
         "seconds": 20},
    ])
    assert verdict(answered) == (429, "budget_exhausted", "budget_exhausted"), answered
    assert book["status"] == 200, book
    assert len([s for s in stack.seen("flights") if "fleet-down" in s.get("body", "")]) == 1
