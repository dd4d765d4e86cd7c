"""``make demo``: capgate's whole story on real pods, on a local Kubernetes cluster with a real node.

Starts etcd, kube-apiserver and a node (kubelet, containerd, kube-proxy, scheduler, controller-manager,
CoreDNS), builds the capgate image (``make image``, cached by content hash) and imports it into the
node, installs the Helm chart (the operator runs in a pod from that image), and deploys the booking
story of :mod:`e2e.pods`: flights (HTTP) and payments (HTTPS, private CA) upstream pods, an undeclared
ledger service, and an ordinary 2-replica agent Deployment that the webhook injects with
``capgate-init`` and the sidecar. Then, inside an agent container (``kubectl exec``), it plays what a
prompt-injected agent might: search, charge $300, charge $5,000, DELETE, a direct call to a service
no rule names, and finally revokes the capability and measures how fast *every* replica refuses.

It prints ``kubectl get pods``, a table of decisions, what the payments API received, and leaves
nothing running. :func:`run_on` plays the story on a cluster that already runs (``e2e/test_demo.py``
uses the test session's, since one node runs per machine).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from e2e import external
from e2e.controlplane import ControlPlane
from e2e.external import Cluster
from e2e.pods import CAPABILITY, HTTP_PORT, REPLICAS, Stack, local_image_values
from e2e.test_helm_install import CHART

PROPAGATION_CLAIM_S = 1.0  # the README: "revocation reaches every sidecar within a second"
NAMESPACE = "travel"
RELEASE = "capgate"
OPERATOR_NAMESPACE = "capgate-system"

Say = Callable[[str], None]


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def verdict(result: dict[str, Any]) -> str:
    if "status" not in result:
        return f"NO ANSWER ({result.get('error', '?')[:60]})"
    status, body = result["status"], result.get("body") or {}
    if status < 400:
        return "ALLOWED"
    text = f"DENIED {status} {body.get('error')}: {body.get('reason')}"
    return text + (f" (rule {body['rule']})" if body.get("rule") else "")


def table(rows: list[tuple[str, ...]]) -> str:
    header = ("step", "decision", "receipt")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# The story: (title, the agent's call, whether capgate should let it through).
STEPS: list[tuple[str, dict[str, Any], bool]] = [
    ("search flights SFO→JFK", {"http": "$CAPGATE_UPSTREAM_FLIGHTS_URL/search?from=SFO&to=JFK"}, True),
    ("charge $300 (after the search)", {"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges", "method": "POST",
                                        "json": {"amount": 30000}}, True),
    ("charge $5,000 (limit is $400)", {"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges", "method": "POST",
                                       "json": {"amount": 500000}}, False),
    ("DELETE a charge", {"http": "$CAPGATE_UPSTREAM_PAYMENTS_URL/v1/charges/ch_1", "method": "DELETE"}, False),
]


def _bypass_step(namespace: str) -> tuple[str, dict[str, Any], bool]:
    """An agent that ignores HTTP_PROXY and calls a service no rule names, by its real URL."""
    return ("ignore HTTP_PROXY, call ledger directly",
            {"http": f"http://ledger.{namespace}.svc:{HTTP_PORT}/books", "proxy": False}, False)


def play(stack: Stack, pod: str) -> tuple[list[tuple[str, ...]], int]:
    steps = [*STEPS, _bypass_step(stack.namespace)]
    results = stack.agent(pod, [call for _, call, _ in steps])
    rows: list[tuple[str, ...]] = []
    failures = 0
    for (title, _, expect), result in zip(steps, results, strict=True):
        allowed = result.get("status", 599) < 400
        failures += allowed != expect
        rows.append((title, verdict(result), "yes" if "x-capgate-receipt" in result.get("headers", {}) else "-"))
    return rows, failures


def revoke_and_time(stack: Stack, pods: list[str]) -> tuple[list[float], list[str]]:
    """Patch ``revoked: true`` while every replica polls; seconds until each refused, and their reasons."""
    pollers = [stack.agent_process(pod, [{"until_refused": "$CAPGATE_UPSTREAM_FLIGHTS_URL/search", "seconds": 30}])
               for pod in pods]
    try:
        for poller in pollers:
            assert poller.stdout is not None
            if poller.stdout.readline().strip() != "ready":
                error = poller.stderr.read() if poller.stderr else ""
                raise RuntimeError(f"an agent replica did not start polling: {error}")
        revoked_at = time.time()
        stack.kubectl("patch", f"acap/{CAPABILITY}", "--type=merge", "-p", '{"spec":{"revoked":true}}')
        seconds, reasons = [], []
        for poller in pollers:
            out, _ = poller.communicate(timeout=60)
            (result,) = json.loads(out.strip().splitlines()[-1])
            seconds.append(result.get("refused_at", float("inf")) - revoked_at)
            reasons.append(str((result.get("body") or {}).get("reason", result.get("error"))))
        return seconds, reasons
    finally:
        for poller in pollers:
            if poller.poll() is None:
                poller.kill()
                poller.wait()


def run_on(plane: Cluster, *, namespace: str = NAMESPACE, operator_namespace: str = OPERATOR_NAMESPACE,
           show: Say = say) -> int:
    """The story on ``plane`` (a local one with its node, or CAPGATE_E2E_KUBECONFIG's); everything it creates
    is removed again. 0 = as expected."""
    started = time.monotonic()
    ref, pull_policy = external.capgate_image(plane)
    show(f"image {ref} ready on the node ({time.monotonic() - started:.0f} s)")
    plane.helm("install", RELEASE, str(CHART), "--namespace", operator_namespace, "--create-namespace", "--wait",
               "--timeout", "300s", *local_image_values(ref, pull_policy))
    show(f"helm install {RELEASE}: the operator runs in a pod from that image")
    stack = Stack(plane, namespace, ref, pull_policy)
    try:
        stack.start()
        show(f"upstreams, the capability and a {REPLICAS}-replica agent Deployment are running:")
        print(stack.kubectl("get", "acap").stdout, flush=True)
        print(stack.kubectl("get", "pods", "-o", "wide").stdout, flush=True)
        pods = [str(p["metadata"]["name"]) for p in stack.agent_pods()]
        containers = stack.get("pod", pods[0])["spec"]
        init = [c["name"] for c in containers.get("initContainers", [])]
        show(f"pod {pods[0]}: init containers {init} (injected by the webhook), containers "
             f"{[c['name'] for c in containers['containers']]}")
        rows, failures = play(stack, pods[0])
        seconds, reasons = revoke_and_time(stack, pods)
        refused = all(reason == "revoked" for reason in reasons) and max(seconds) < PROPAGATION_CLAIM_S
        failures += not refused
        rows.append((f"revoke, then search on all {len(pods)} replicas",
                     f"DENIED 401 invalid_token: {', '.join(sorted(set(reasons)))}",
                     "every replica in " + ", ".join(f"{s * 1000:.0f} ms" for s in seconds)))
        print()
        print(table(rows), flush=True)
        print()
        show("what the payments API received (the sidecar injected its key over verified TLS; "
             "the agent's never arrived):")
        for seen in stack.seen("payments"):
            if seen.get("method"):
                print(f"    {seen.get('method')} {seen.get('path')} authorization={seen.get('authorization')!r} "
                      f"body={seen.get('body')}", flush=True)
        ledger = [seen for seen in stack.seen("ledger") if seen.get("method")]
        show(f"what the undeclared ledger service received: {len(ledger)} requests")
        failures += bool(ledger)
        return 1 if failures else 0
    finally:
        plane.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)
        plane.helm("uninstall", RELEASE, "--namespace", operator_namespace, "--wait", check=False)
        plane.kubectl("delete", "namespace", operator_namespace, "--wait=false", check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args()
    target = external.from_env()
    if target is not None:  # CAPGATE_E2E_KUBECONFIG (+ CAPGATE_E2E_IMAGE): a cluster that already runs
        try:
            target.check()
            say(f"cluster of {target.kubeconfig}")
            return run_on(target)
        finally:
            target.stop()
    with ControlPlane(node=True) as plane:
        say(f"cluster up: {plane.server}, node Ready")
        code = run_on(plane)
    say("cluster stopped; nothing left running")
    say("demo finished: " + ("every decision as expected" if code == 0 else "UNEXPECTED decisions above"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
