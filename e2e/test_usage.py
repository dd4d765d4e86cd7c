"""Fleet-wide usage on the real API server: the state cannot be reset, sidecars never overspend, and a
single-use receipt opens its consuming gate once across sidecars and restarts.

The AgentCapabilityUsage status is writable by every sidecar of a capability, and so by the agent
that shares their ServiceAccount. What keeps the agent from resetting it is not RBAC but the CRD's
transition rules, which the API server applies to every writer: these tests try each reset as the
cluster admin (who is allowed everything RBAC can allow) and expect the API server to refuse it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from capgate import resources
from e2e.cluster import Environment, PodSidecar, call, environment, example_capability, install_crds, wait_for
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


# ------------------------------------------------------------------------------ sidecars sharing a budget

API_KEY = "sk_live_e2e_fleet_7c1d"
SA = "booking-agent"


def budget_capability(name: str, max_amount: int) -> dict[str, Any]:
    obj = example_capability(name, NAMESPACE, budgets=[{"upstream": "payments", "field": "amount",
                                                        "max": max_amount, "per": "24h"}])
    obj["spec"].pop("rateLimit", None)  # searches stay unmetered: the calls fail-closed must leave alone
    for rule in obj["spec"]["rules"]:
        rule.pop("requires", None)
    return obj


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    with environment(control_plane, tmp_path_factory.mktemp("usage"), NAMESPACE, API_KEY) as env:
        yield env


def _stored(env: Environment, name: str) -> dict[str, Any]:
    result = env.plane.kubectl("get", resources.USAGE_PLURAL, name, "-n", NAMESPACE, "-o", "json")
    return dict(json.loads(result.stdout))


def _charged(env: Environment, marker: str) -> int:
    """The amount that reached the payments upstream for calls tagged with ``marker``."""
    total = 0
    for seen in list(env.upstream.seen):
        if seen.path == "/v1/charges" and seen.body:
            body = json.loads(seen.body)
            if body.get("marker") == marker:
                total += int(body["amount"])
    return total


def _hammer(sidecars: list[PodSidecar], marker: str, amount: int, calls: int) -> list[int]:
    def one(index: int) -> int:
        status, body, _ = call(sidecars[index % len(sidecars)], "POST", "/payments/v1/charges",
                               {"amount": amount, "marker": marker})
        assert status == 200 or (status == 429 and body["error"] == "budget_exhausted"), (status, body)
        return status

    with ThreadPoolExecutor(max_workers=12) as pool:
        return list(pool.map(one, range(calls)))


def test_the_operator_creates_the_usage_object_and_its_sidecar_only_access(cluster: Environment) -> None:
    cluster.apply(budget_capability("shared-budget", 1000))
    cluster.wait_ready("shared-budget")
    stored = _stored(cluster, "shared-budget")
    assert stored["spec"] == {"capability": "shared-budget"}
    assert stored["metadata"]["ownerReferences"][0]["kind"] == resources.CAPABILITY_KIND

    kubeconfig = cluster.plane.kubeconfig_for_service_account(NAMESPACE, SA)

    def can(verb: str, resource: str, name: str) -> bool:
        args = ["auth", "can-i", verb, f"{resources.USAGE_PLURAL}.{resources.GROUP}/{name}", "-n", NAMESPACE,
                f"--kubeconfig={kubeconfig}"]
        if resource == "status":
            args.append("--subresource=status")
        out = cluster.plane.kubectl(*args, check=False)
        return out.stdout.strip() == "yes"

    assert can("get", "main", "shared-budget")
    assert can("update", "status", "shared-budget")
    assert not can("update", "main", "shared-budget")
    assert not can("delete", "main", "shared-budget")
    assert not can("patch", "status", "other-capability")
    assert not can("update", "status", "other-capability")
    assert not can("create", "main", "anything")


def test_the_agent_identity_can_spend_but_never_reset(cluster: Environment) -> None:
    cluster.apply(budget_capability("agent-reset", 1000))
    cluster.wait_ready("agent-reset")
    token = cluster.plane.service_account_token(NAMESPACE, SA)
    api = cluster.plane.client(token)
    try:
        custom = k8s.CustomObjectsApi(api)
        obj = custom.get_namespaced_custom_object(resources.GROUP, resources.VERSION, NAMESPACE,
                                                  resources.USAGE_PLURAL, "agent-reset")
        obj["status"] = {"windows": {"budget/payments/amount/86400s": {"start": 86400, "spent": 900}}}
        obj = _replace_status(custom, obj)  # spending more: allowed
        obj["status"] = {"windows": {"budget/payments/amount/86400s": {"start": 86400, "spent": 0}}}
        assert "spent only grows" in _refused(custom, obj, obj["status"])
        with pytest.raises(ApiException) as caught:
            custom.delete_namespaced_custom_object(resources.GROUP, resources.VERSION, NAMESPACE,
                                                   resources.USAGE_PLURAL, "agent-reset")
        assert caught.value.status == 403
    finally:
        api.close()  # type: ignore[no-untyped-call]


def test_three_sidecars_with_one_killed_mid_lease_never_overspend_and_a_restart_keeps_the_spending(
        cluster: Environment) -> None:
    cluster.apply(budget_capability("shared-budget", 1000))
    cluster.wait_ready("shared-budget")
    for pod in ("fleet-a", "fleet-b", "fleet-c"):
        result = cluster.create_pod(pod, "shared-budget", SA)
        assert result.returncode == 0, result.stderr
    sidecars = [cluster.sidecar(pod) for pod in ("fleet-a", "fleet-b", "fleet-c")]

    _hammer(sidecars, "fleet", 7, 30)
    assert sidecars[1].process is not None
    sidecars[1].process.kill()  # SIGKILL mid-lease: its unused slice is lost, never handed out again
    sidecars[1].process.wait(5)
    sidecars[1].process = None
    sidecars[1] = cluster.sidecar("fleet-b")
    statuses = _hammer(sidecars, "fleet", 7, 300)

    charged = _charged(cluster, "fleet")
    window = _stored(cluster, "shared-budget")["status"]["windows"]["budget/payments/amount/86400s"]
    assert charged <= 1000, f"{charged} charged of a 1000 budget"
    assert charged <= window["spent"] <= 1000
    assert charged >= 1000 - 200, f"only {charged} of 1000 usable: slices strand too much"
    assert statuses.count(429) > 0

    for sidecar in sidecars:  # a rollout: every sidecar restarts, the spending stays
        sidecar.stop()
    restarted = cluster.sidecar("fleet-a")
    status, body, _ = call(restarted, "POST", "/payments/v1/charges", {"amount": 1000 - window["spent"] + 1,
                                                                         "marker": "fleet"})
    assert (status, body["error"]) == (429, "budget_exhausted")
    assert _charged(cluster, "fleet") == charged


def test_a_fully_spent_window_that_ended_rolls_over_and_the_new_one_starts_empty(
        cluster: Environment, custom: k8s.CustomObjectsApi) -> None:
    cluster.apply(budget_capability("rollover", 100))
    cluster.wait_ready("rollover")
    key = "budget/payments/amount/86400s"
    today = int(time.time()) // 86400 * 86400
    obj = custom.get_namespaced_custom_object(resources.GROUP, resources.VERSION, NAMESPACE, resources.USAGE_PLURAL,
                                              "rollover")
    obj["status"] = {"windows": {key: {"start": today - 86400, "spent": 100}}}  # yesterday: all spent
    _replace_status(custom, obj)
    assert cluster.create_pod("fleet-rollover", "rollover", SA).returncode == 0
    sidecar = cluster.sidecar("fleet-rollover")
    assert call(sidecar, "POST", "/payments/v1/charges", {"amount": 60, "marker": "rollover"})[0] == 200
    window = _stored(cluster, "rollover")["status"]["windows"][key]
    assert window["start"] == today
    assert 60 <= window["spent"] <= 100
    status, body, headers = call(sidecar, "POST", "/payments/v1/charges", {"amount": 41, "marker": "rollover"})
    assert (status, body["error"]) == (429, "budget_exhausted")
    assert 0 < int(headers["Retry-After"]) <= today + 86400 - int(time.time()) + 1

    shown = subprocess.run([sys.executable, "-m", "capgate.cli", "usage", "rollover", "-n", NAMESPACE, "--json",
                            "--kubeconfig", str(cluster.plane.kubeconfig)], capture_output=True, text=True, check=True)
    (row,) = json.loads(shown.stdout)
    assert (row["meter"], row["windowStart"], row["max"]) == (key, today, 100)
    assert row["spent"] == window["spent"] and row["remaining"] == 100 - window["spent"]
    table = subprocess.run([sys.executable, "-m", "capgate.cli", "usage", "rollover", "-n", NAMESPACE,
                            "--kubeconfig", str(cluster.plane.kubeconfig)], capture_output=True, text=True, check=True)
    assert "budget payments.amount" in table.stdout and "REMAINING" in table.stdout


def test_with_the_api_server_stopped_budgeted_calls_are_refused_and_others_pass(
        cluster: Environment, control_plane: ControlPlane) -> None:
    cluster.apply(budget_capability("unreachable", 16))  # slices of 2: the lease in hand runs out fast
    cluster.wait_ready("unreachable")
    assert cluster.create_pod("fleet-down", "unreachable", SA).returncode == 0
    sidecar = cluster.sidecar("fleet-down")
    assert call(sidecar, "POST", "/payments/v1/charges", {"amount": 1, "marker": "down"})[0] == 200
    control_plane.stop_apiserver()
    try:
        results = [call(sidecar, "POST", "/payments/v1/charges", {"amount": 1, "marker": "down"}) for _ in range(3)]
        refused = [body for status, body, _ in results if status == 429]
        assert refused, results
        assert refused[0]["error"] == "budget_exhausted"
        assert refused[0]["reason"] == "usage_unavailable"
        assert call(sidecar, "GET", "/flights/search")[0] == 200
    finally:
        control_plane.start_apiserver()
    wait_for(lambda: call(sidecar, "POST", "/payments/v1/charges", {"amount": 1, "marker": "down"})[0] == 200,
             30, "budgeted calls to pass again once the API server is back")


# ------------------------------------------------------------------------------ single-use receipts

def consuming_capability(name: str) -> dict[str, Any]:
    """The example with ``charge`` consuming its search receipt, and no budget or rate limit (so only
    the receipt decides)."""
    obj = example_capability(name, NAMESPACE)
    obj["spec"].pop("rateLimit", None)
    obj["spec"].pop("budgets", None)
    charge = next(rule for rule in obj["spec"]["rules"] if rule["name"] == "charge")
    charge["requires"] = [{"rule": "search", "consume": True}]
    return obj


def _search(sidecar: PodSidecar, correlation: str) -> tuple[str, str]:
    """A search in ``correlation``: its receipt, and the decision id that names it."""
    status, _, headers = call(sidecar, "GET", "/flights/search", headers={"X-Capgate-Correlation-Id": correlation})
    assert status == 200
    return headers["X-Capgate-Receipt"], headers["X-Capgate-Decision-Id"]


def _charge(sidecar: PodSidecar, receipt: str, correlation: str, marker: str) -> tuple[int, dict[str, Any]]:
    status, body, _ = call(sidecar, "POST", "/payments/v1/charges", {"amount": 5, "marker": marker},
                           headers={"X-Capgate-Receipt": receipt, "X-Capgate-Correlation-Id": correlation})
    return status, body


def _audited(sidecar: PodSidecar) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sidecar.audit.read_text().splitlines() if line.strip()]


def test_one_receipt_opens_a_consuming_gate_once_across_three_sidecars_and_across_restarts(
        cluster: Environment) -> None:
    cluster.apply(consuming_capability("single-use"))
    cluster.wait_ready("single-use")
    pods = ("once-a", "once-b", "once-c")
    for pod in pods:
        assert cluster.create_pod(pod, "single-use", SA).returncode == 0
    sidecars = [cluster.sidecar(pod) for pod in pods]
    receipt, receipt_id = _search(sidecars[0], "trip-1")

    with ThreadPoolExecutor(max_workers=9) as pool:  # every sidecar, three times each, at once
        results = list(pool.map(lambda i: _charge(sidecars[i % 3], receipt, "trip-1", "once"), range(9)))
    assert [status for status, _ in results].count(200) == 1, results
    refused = [body for status, body in results if status != 200]
    assert {(body["error"], body["reason"], body["rule"]) for body in refused} == {
        ("denied", "receipt_consumed", "charge")}
    assert _charged(cluster, "once") == 5, "exactly one charge reached the upstream"

    stored = _stored(cluster, "single-use")["status"]
    assert receipt_id in stored["consumed"]
    spent = [record for sidecar in sidecars for record in _audited(sidecar) if record.get("receipts_consumed")]
    assert [record["receipts_consumed"] for record in spent] == [[receipt_id]]
    assert spent[0]["outcome"] == "allowed" and spent[0]["rule"] == "charge"

    for sidecar in sidecars:  # a rollout: the consumption is in the API server, not in any process
        sidecar.stop()
    restarted = cluster.sidecar("once-b")
    status, body = _charge(restarted, receipt, "trip-1", "once")
    assert (status, body["reason"]) == (403, "receipt_consumed")
    fresh, _ = _search(restarted, "trip-1")
    assert _charge(restarted, fresh, "trip-1", "once")[0] == 200
    assert _charged(cluster, "once") == 10


def test_with_the_api_server_stopped_consuming_calls_are_refused_and_ungated_calls_pass(
        cluster: Environment, control_plane: ControlPlane) -> None:
    cluster.apply(consuming_capability("single-use-down"))
    cluster.wait_ready("single-use-down")
    assert cluster.create_pod("once-down", "single-use-down", SA).returncode == 0
    sidecar = cluster.sidecar("once-down")
    receipt, _ = _search(sidecar, "trip-down")
    control_plane.stop_apiserver()
    try:
        status, body = _charge(sidecar, receipt, "trip-down", "down-once")
        assert (status, body["error"], body["reason"]) == (503, "usage_unavailable", "usage_unavailable"), body
        assert call(sidecar, "GET", "/flights/search")[0] == 200
        assert _charged(cluster, "down-once") == 0
    finally:
        control_plane.start_apiserver()
    # Refused, not spent: once the state is reachable the same receipt opens the gate, once.
    wait_for(lambda: _charge(sidecar, receipt, "trip-down", "down-once")[0] == 200, 30,
             "the unspent receipt to open the gate once the API server is back")
    assert _charge(sidecar, receipt, "trip-down", "down-once")[1]["reason"] == "receipt_consumed"
    assert _charged(cluster, "down-once") == 5


# ------------------------------------------------------------------------------ kubectl get acap, token budgets

def _printed(env: Environment, name: str) -> dict[str, str]:
    """``kubectl get acap NAME`` as a user reads it: the real kubectl's table, column by header."""
    lines = env.plane.kubectl("get", "acap", name, "-n", NAMESPACE).stdout.splitlines()
    header, row = lines[0], lines[1]
    starts = [header.index(column) for column in header.split()]
    cells = [row[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(header.split(), cells, strict=True))


def test_kubectl_get_acap_shows_what_the_fleet_spent_and_keeps_it_fresh(cluster: Environment) -> None:
    cluster.apply(budget_capability("shown", 1000))
    cluster.wait_ready("shown")
    assert cluster.create_pod("fleet-shown", "shown", SA).returncode == 0
    sidecar = cluster.sidecar("fleet-shown")
    for amount, least in ((300, 300), (100, 400)):
        assert call(sidecar, "POST", "/payments/v1/charges", {"amount": amount, "marker": "shown"})[0] == 200

        def shown(least: int = least) -> bool:
            spent = _stored(cluster, "shown")["status"]["windows"]["budget/payments/amount/86400s"]["spent"]
            return spent >= least and _printed(cluster, "shown").get("BUDGET") == f"payments.amount {spent}/1000"

        wait_for(shown, 30, f"kubectl get acap to show what the fleet leased (at least {least})")
    meters = cluster.get_capability("shown")["status"]["usage"]["meters"]
    shown = subprocess.run([sys.executable, "-m", "capgate.cli", "usage", "shown", "-n", NAMESPACE, "--json",
                            "--kubeconfig", str(cluster.plane.kubeconfig)], capture_output=True, text=True, check=True)
    (row,) = json.loads(shown.stdout)
    assert [(m["meter"], m["spent"], m["max"], m["remaining"]) for m in meters] == [
        (row["meter"], row["spent"], row["max"], row["remaining"])], "capgate usage and the status agree"


class ThreadedLlm:
    """tests/sidecar/llm_server.py's chat completions server, on loopback in its own thread."""

    def __init__(self) -> None:
        import asyncio
        import threading

        from aiohttp.test_utils import TestServer

        from tests.sidecar.llm_server import LlmServer

        self.llm = LlmServer()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start() -> None:
            self.llm.server = TestServer(self.llm.app(), host="127.0.0.1")
            await self.llm.server.start_server()
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        import asyncio

        assert self.llm.server is not None
        asyncio.run_coroutine_threadsafe(self.llm.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_openai_calls_through_a_pod_sidecar_are_charged_their_tokens_fleet_wide_and_shown(
        cluster: Environment) -> None:
    import openai

    from e2e.cluster import PodSidecar

    obj = budget_capability("tokens", 1000)
    obj["spec"]["upstreams"].append({"name": "llm", "url": "http://llm.example.internal"})
    obj["spec"]["rules"].append({"name": "chat", "effect": "allow", "upstream": "llm", "methods": ["POST"],
                                 "paths": ["/v1/chat/completions"]})
    obj["spec"]["budgets"] = [{"upstream": "llm", "field": "usage.total_tokens", "max": 1000, "per": "24h",
                               "from": "response", "worstCase": 4000}]
    cluster.apply(obj)
    cluster.wait_ready("tokens")
    assert cluster.create_pod("fleet-tokens", "tokens", SA).returncode == 0
    server = ThreadedLlm()
    stack = contextlib.ExitStack()
    sidecar = PodSidecar(cluster.plane, NAMESPACE, "fleet-tokens", {"flights": cluster.upstream.url,
                                                                    "payments": cluster.upstream.url,
                                                                    "llm": server.llm.url}, cluster.workdir)
    try:
        sidecar.start()
        client = openai.OpenAI(api_key="sk-agent-made-up", base_url=f"{sidecar.url}/llm/v1")
        stack.callback(client.close)
        for used, stream in ((400, False), (350, True), (300, False)):
            server.llm.usage = used
            if stream:
                chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                             stream=True, stream_options={"include_usage": True}))
                assert [c.usage.total_tokens for c in chunks if c.usage] == [used]
            else:
                answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                assert answer.usage is not None and answer.usage.total_tokens == used
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body == "budget_exhausted"
        assert len(server.llm.calls) == 3
        key = "budget/llm/response:usage.total_tokens/86400s"
        wait_for(lambda: _stored(cluster, "tokens")["status"]["windows"][key]["spent"] >= 1050, 10,
                 "the tokens used to reach the shared window")
        window = _stored(cluster, "tokens")["status"]["windows"][key]
        assert window["spent"] == 1050, "one sidecar: every slice it leased was used, and the overshoot recorded"
        wait_for(lambda: _printed(cluster, "tokens").get("BUDGET") == "llm.usage.total_tokens 1050/1000", 30,
                 "kubectl get acap to show the tokens spent")
    finally:
        stack.close()
        sidecar.stop()
        server.stop()
