"""``make demo``: capgate's whole story on a local Kubernetes control plane, in about a minute.

Starts etcd + kube-apiserver (building them on first use), installs the CRDs, runs the operator,
applies examples/booking-agent.yaml, creates an agent pod (the webhook injects the sidecar), starts
that sidecar as the pod spec says, and plays a booking agent against fake flights/payments APIs:
search, charge $300, charge $5,000, DELETE, then revokes the capability and measures how fast the
sidecar starts refusing. It prints a table of decisions and timings and leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import Operator, PodSidecar, agent_pod, free_port, install_crds, wait_http
from e2e.controlplane import ControlPlane

PROPAGATION_CLAIM_MS = 1000

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "travel"
DEMO_API_KEY = "sk_demo_payments_0123456789"
EXAMPLE_EXPIRY = datetime(2027, 1, 1, tzinfo=UTC)


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def request(url: str, method: str, body: Any = None) -> tuple[int, dict[str, Any], dict[str, str], float]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer agent-made-this-up"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            payload, status, headers = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        payload, status, headers = error.read(), error.code, dict(error.headers)
    elapsed = (time.perf_counter() - started) * 1000
    try:
        parsed = json.loads(payload or b"{}")
    except ValueError:
        parsed = {}
    return status, parsed if isinstance(parsed, dict) else {}, headers, elapsed


def verdict(status: int, body: dict[str, Any]) -> str:
    if status < 400:
        return "ALLOWED"
    text = f"DENIED {status} {body.get('error')}: {body.get('reason')}"
    return text + (f" (rule {body['rule']})" if body.get("rule") else "")


def table(rows: list[tuple[str, ...]]) -> str:
    header = ("step", "decision", "receipt", "latency")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def the_capability() -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "examples" / "booking-agent.yaml").read_text())
    if datetime.now(UTC) >= EXAMPLE_EXPIRY:
        say("note: the example's own Datalog check ends on 2027-01-01; the demo applies it without that check")
        obj["spec"].pop("datalog", None)
    return dict(obj)


def run(workdir: Path) -> int:
    failures = 0
    with ControlPlane() as plane:
        say(f"control plane up: {plane.server}")
        install_crds(plane)
        plane.create_namespace(NAMESPACE)
        plane.kubectl("create", "serviceaccount", "booking-agent", "-n", NAMESPACE)
        plane.kubectl("create", "secret", "generic", "payments-api-key", "-n", NAMESPACE,
                      f"--from-literal=token={DEMO_API_KEY}")
        operator = Operator(plane, workdir)
        upstream_port = free_port()
        upstream = subprocess.Popen([sys.executable, str(ROOT / "examples" / "upstream_demo.py"), "--port",
                                     str(upstream_port)], stdout=(workdir / "upstream.log").open("wb"),
                                    stderr=subprocess.STDOUT)
        sidecar: PodSidecar | None = None
        try:
            operator.start()
            say("operator running (webhooks on 127.0.0.1, registered with the API server)")
            plane.kubectl("apply", "-f", "-", input=json.dumps(the_capability()))
            plane.kubectl("wait", "acap/booking-agent", "-n", NAMESPACE, "--for=condition=Ready", "--timeout=60s")
            print(plane.kubectl("get", "acap", "-n", NAMESPACE).stdout, flush=True)
            plane.kubectl("apply", "-f", "-", input=json.dumps(agent_pod("booking-agent-7f9c", NAMESPACE,
                                                                         "booking-agent", "booking-agent")))
            pod = json.loads(plane.kubectl("get", "pod", "booking-agent-7f9c", "-n", NAMESPACE, "-o", "json").stdout)
            names = [c["name"] for c in pod["spec"].get("initContainers", [])] + [c["name"] for c in
                                                                                   pod["spec"]["containers"]]
            say(f"pod booking-agent-7f9c admitted with containers {names} (sidecar injected by the webhook)")
            wait_http(f"http://127.0.0.1:{upstream_port}/search", 10, upstream)
            sidecar = PodSidecar(plane, NAMESPACE, "booking-agent-7f9c",
                                 {"flights": f"http://127.0.0.1:{upstream_port}",
                                  "payments": f"http://127.0.0.1:{upstream_port}"}, workdir)
            sidecar.start()
            say("sidecar started with the pod spec's command, args, env and mounted Secret files")
            failures += play(sidecar, plane)
        finally:
            if sidecar is not None:
                sidecar.stop()
            operator.stop()
            upstream.terminate()
            upstream.wait(10)
        received = (workdir / "upstream.log").read_text()
        say("what the payments API received (the sidecar injected its key; the agent's never arrived):")
        for line in received.splitlines():
            if "charges" in line:
                print(f"    {line}")
    say("control plane stopped; nothing left running")
    return 1 if failures else 0


def play(sidecar: PodSidecar, plane: ControlPlane) -> int:
    steps = [
        ("search flights SFO→JFK", "GET", "/flights/search?from=SFO&to=JFK", None, True),
        ("charge $300 (after the search)", "POST", "/payments/v1/charges", {"amount": 30000}, True),
        ("charge $5,000 (limit is $400)", "POST", "/payments/v1/charges", {"amount": 500000}, False),
        ("DELETE a charge", "DELETE", "/payments/v1/charges/ch_1", None, False),
    ]
    rows: list[tuple[str, ...]] = []
    failures = 0
    for title, method, path, body, expect in steps:
        status, payload, headers, elapsed = request(sidecar.url + path, method, body)
        failures += (status < 400) != expect
        rows.append((title, verdict(status, payload), "yes" if "X-Capgate-Receipt" in headers else "-",
                     f"{elapsed:.1f} ms"))
    started = time.monotonic()
    plane.kubectl("patch", "acap", "booking-agent", "-n", NAMESPACE, "--type=merge", "-p",
                  '{"spec":{"revoked":true}}')
    status, payload = 200, {}
    while time.monotonic() - started < 10:
        status, payload, _, _ = request(sidecar.url + "/flights/search?from=SFO&to=JFK", "GET")
        if status == 401:
            break
        time.sleep(0.01)
    propagation = (time.monotonic() - started) * 1000
    failures += status != 401 or propagation >= PROPAGATION_CLAIM_MS  # the README promises "within a second"
    rows.append(("revoke, then search again", verdict(status, payload), "-", f"revoked in {propagation:.0f} ms"))
    print()
    print(table(rows), flush=True)
    print()
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capgate-demo-") as workdir:
        code = run(Path(workdir))
    say("demo finished: " + ("every decision as expected" if code == 0 else "UNEXPECTED decisions above"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
