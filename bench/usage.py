"""Fleet-wide budgets: what a budgeted call costs with a warm lease and when it renews, and how many
API-server writes 1,000 budgeted calls take.

    python bench/usage.py            # 20,000 calls per row
    python bench/usage.py --quick    # 2,000

A private control plane (etcd + kube-apiserver) and one AgentCapabilityUsage; the chargers are the
sidecar's own :class:`capgate.sidecar.usage.FleetLimits` over :class:`KubeUsageStore` (the real
client, the real compare-and-swap), in this process. Rows, all from this run:

  * baseline: the standalone in-memory ``Limits.charge`` (one sidecar's sliding window);
  * warm lease: calls that spent from the lease in hand (no I/O);
  * a lease write landed during the call: the call renewed inline (near the limit a slice is a
    single call) or waited for the background renewal's last step (a lease running low is renewed
    between requests);
  * three chargers sharing the budget, interleaved (conflicts make some renewals retry).

Writes per 1,000 calls are counted far from the limit (a 10,000,000 budget) and for a budget that
runs out within the run (every lease near the limit is smaller). Target (issue 13): ≤ 0.05 ms added
per budgeted call with a warm lease.

Single-use receipts (``requires: [{rule, consume: true}]``): what recording one consumed receipt adds
to a call — the sidecar's :class:`capgate.sidecar.consumption.SingleUse` over the same store, one
compare-and-swap write per call; in memory (standalone) as the baseline, alone (its last write's
resourceVersion is current, so one write), and with a second sidecar consuming in between (every
write first meets a 409, then reads and writes again).

Response budgets (``from: response``, LLM tokens): the charger rows add a response-charged call with
a warm lease (its one-unit deposit, then the settlement of its usage), and a second table compares,
through a real ``capgate-sidecar`` process (standalone) in front of a loopback chat completions
server (tests/sidecar/llm_server.py), a call whose budget reads the request body with one whose
budget reads the answer — JSON, and a text/event-stream — by latency and by the sidecar's CPU per
request from /proc (the figure that survives a shared machine's noise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import harness
from aiohttp import web

from capgate import resources
from capgate import usage as core_usage
from capgate.capabilities import spec
from capgate.sidecar import consumption, usage
from capgate.sidecar.limits import Limits
from capgate.sidecar.metrics import Metrics
from e2e.cluster import free_port, install_crds
from e2e.controlplane import ControlPlane
from tests.sidecar.llm_server import LlmServer

NAMESPACE = "bench"


def capability(name: str, max_amount: int) -> spec.Capability:
    return spec.Capability(name=name, namespace=NAMESPACE, service_account="agent", upstreams=(), rules=(),
                           budgets=(spec.Budget("payments", "amount", max_amount, timedelta(hours=24)),))


class Counting:
    """A KubeUsageStore that counts its writes (the API-server load the leases cause)."""

    def __init__(self, inner: usage.KubeUsageStore) -> None:
        self.inner = inner
        self.writes = 0

    async def read(self) -> tuple[str, dict[str, Any]]:
        return await self.inner.read()

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.writes += 1
        return await self.inner.write(version, status)

    async def close(self) -> None:
        await self.inner.close()


def create_usage(plane: ControlPlane, name: str) -> None:
    plane.kubectl("apply", "-f", "-", input=(
        f"apiVersion: {resources.API_VERSION}\nkind: {resources.USAGE_KIND}\n"
        f"metadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec: {{capability: {name}}}\n"))


async def run(kubeconfig: str, calls: int) -> tuple[list[list[object]], list[list[object]]]:
    timings: dict[str, list[float]] = {"baseline: standalone in-memory Limits": [], "warm lease (no I/O)": [],
                                       "a lease write landed during the call": [], "three chargers, warm": [],
                                       "three chargers, a lease write landed": []}
    body = {"amount": 10}
    standalone, cap = Limits(), capability("far", 10_000_000)
    for _ in range(calls):
        started = time.perf_counter()
        await standalone.charge(cap, "payments", body)
        timings["baseline: standalone in-memory Limits"].append(time.perf_counter() - started)

    writes: list[list[object]] = []
    for name, max_amount, sharers in (("far", 10_000_000, 1), ("near", calls * 10 // 2, 1),
                                      ("shared", 10_000_000, 3)):
        cap = capability(name, max_amount)
        stores = [Counting(usage.KubeUsageStore(kubeconfig, NAMESPACE, name)) for _ in range(sharers)]
        chargers = [usage.FleetLimits(s, cap.qualified_name, Metrics()) for s in stores]
        allowed = 0
        for index in range(calls):
            store = stores[index % sharers]
            before = store.writes
            started = time.perf_counter()
            refused = await chargers[index % sharers].charge(cap, "payments", body)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0)  # a server's event loop runs between requests: background renewals progress
            allowed += refused is None
            if refused is not None:
                continue
            renewed = store.writes != before
            prefix = "three chargers, " if sharers > 1 else ""
            key = f"{prefix}a lease write landed" if renewed else f"{prefix}warm"
            names = {"warm": "warm lease (no I/O)", "a lease write landed": "a lease write landed during the call"}
            key = names.get(key, key)
            timings[key].append(elapsed)
        total = sum(s.writes for s in stores)
        writes.append([f"{name}: budget {max_amount:,}, {sharers} charger(s)", calls, allowed, total,
                       f"{total * 1000 / calls:.1f}"])
        for charger in chargers:
            await charger.close()

    # Response-charged: the deposit with the call, the settlement after it (both from the warm lease).
    tokens = spec.Capability(name="tokens", namespace=NAMESPACE, service_account="agent", upstreams=(), rules=(),
                             budgets=(spec.Budget("llm", "usage.total_tokens", 10_000_000_000, timedelta(hours=24),
                                                  "response", 4096),))
    store = Counting(usage.KubeUsageStore(kubeconfig, NAMESPACE, "tokens"))
    charger = usage.FleetLimits(store, tokens.qualified_name, Metrics())
    (budget,) = tokens.budgets
    warm = timings.setdefault("response-charged, warm lease (deposit + settlement)", [])
    for _ in range(calls):
        before = store.writes
        started = time.perf_counter()
        refused = await charger.charge(tokens, "llm", None)
        charger.settle(tokens, [(budget, 120)])
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0)
        if refused is None and store.writes == before:
            warm.append(elapsed)
    await charger.close()

    rows: list[list[object]] = []
    for case, samples in timings.items():
        if not samples:
            continue
        ms = [s * 1000 for s in samples]
        rows.append([case, len(ms), f"{harness.percentile(ms, 50):.4f}", f"{harness.percentile(ms, 99):.4f}",
                     f"{statistics.fmean(ms):.4f}"])
    return rows, writes


async def consuming(kubeconfig: str, calls: int) -> list[list[object]]:
    """Latency of recording one consumed receipt, per case (see the module docstring)."""
    now = time.time()
    ids = iter(range(10 * calls))

    def gate() -> list[consumption.Gate]:
        receipt = core_usage.Candidate(f"{next(ids):032x}", int(now) + 600)
        return [consumption.Gate("search", frozenset({receipt}))]

    memory = consumption.SingleUse(consumption.MemoryUsageStore(), Metrics())
    alone = consumption.SingleUse(usage.KubeUsageStore(kubeconfig, NAMESPACE, "receipts"), Metrics())
    first, second = (consumption.SingleUse(usage.KubeUsageStore(kubeconfig, NAMESPACE, "receipts-shared"), Metrics())
                     for _ in range(2))
    rows: list[list[object]] = []
    for case, single, other in (("baseline: standalone, in memory", memory, None),
                                ("one sidecar: one API write", alone, None),
                                ("two sidecars alternating: 409, read, write", first, second)):
        samples = []
        for _ in range(calls):
            if other is not None:
                assert isinstance(await other.consume(gate()), consumption.Consumed)
            started = time.perf_counter()
            outcome = await single.consume(gate())
            samples.append((time.perf_counter() - started) * 1000)
            assert isinstance(outcome, consumption.Consumed), outcome
        rows.append([case, calls, f"{harness.percentile(samples, 50):.3f}", f"{harness.percentile(samples, 99):.3f}",
                     f"{statistics.fmean(samples):.3f}"])
    for single in (alone, first, second):
        await single.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    calls = 2_000 if args.quick else 20_000
    with tempfile.TemporaryDirectory(prefix="capgate-bench-"), ControlPlane(progress=harness._quiet) as plane:
        install_crds(plane)
        plane.create_namespace(NAMESPACE)
        for name in ("far", "near", "shared", "tokens", "receipts", "receipts-shared"):
            create_usage(plane, name)
        rows, writes = asyncio.run(run(str(plane.kubeconfig), calls))
        consumed = asyncio.run(consuming(str(plane.kubeconfig), calls // 40))
    sidecar_rows = asyncio.run(through_sidecar(max(200, calls // 10)))
    print(f"fleet-wide budget charge latency — {calls} calls per budget, {harness.machine()}")
    print(harness.table(["case", "calls", "p50 ms", "p99 ms", "mean ms"], rows))
    print()
    print(harness.table(["budget", "calls", "allowed", "API writes", "writes / 1000 calls"], writes))
    baseline = float(rows[0][2])
    warm = next(r for r in rows if r[0] == "warm lease (no I/O)")
    added = float(warm[2]) - baseline
    print(f"\nwarm lease adds {added:.4f} ms p50 over the standalone charge (target <= 0.05 ms)")
    print(f"\nsingle-use receipts: recording one consumed receipt — {calls // 40} calls per row")
    print(harness.table(["case", "calls", "p50 ms", "p99 ms", "mean ms"], consumed))
    print()
    print(f"request- vs response-charged calls through a capgate-sidecar process — {sidecar_rows[0][1]} sequential "
          "calls per row, a chat completion of 9 words")
    print(harness.table(["case", "calls", "p50 ms", "p99 ms", "sidecar CPU ms/call"], sidecar_rows))
    return 0


# ------------------------------------------------------------------------------ through a sidecar process

def sidecar_capability(source: str) -> dict[str, Any]:
    budget: dict[str, Any] = {"upstream": "llm", "max": 10_000_000_000, "per": "24h"}
    if source == "response":
        budget.update({"field": "usage.total_tokens", "from": "response", "worstCase": 4096})
    else:
        budget["field"] = "max_tokens"
    return {"apiVersion": resources.API_VERSION, "kind": resources.CAPABILITY_KIND,
            "metadata": {"name": f"llm-{source}", "namespace": NAMESPACE},
            "spec": {"serviceAccountName": "agent", "upstreams": [{"name": "llm", "url": "http://llm.internal"}],
                     "rules": [{"name": "chat", "effect": "allow", "upstream": "llm", "methods": ["POST"],
                                "paths": ["/v1/chat/completions"]}],
                     "budgets": [budget]}}


async def through_sidecar(calls: int) -> list[list[object]]:
    from capgate.capabilities import keys

    llm = LlmServer()
    runner = web.AppRunner(llm.app(), access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    rows: list[list[object]] = []
    repo = Path(__file__).resolve().parents[1]
    try:
        with tempfile.TemporaryDirectory(prefix="capgate-bench-") as tmp:
            keys.KeySet.generate().write(Path(tmp) / "keys")
            for source, stream in (("request", False), ("response", False), ("request", True), ("response", True)):
                cap = Path(tmp) / f"{source}.json"
                cap.write_text(json.dumps(sidecar_capability(source)))
                listen, admin = free_port(), free_port()
                sidecar = subprocess.Popen(
                    [sys.executable, "-m", "capgate.sidecar", "--capability", str(cap), "--root-key",
                     str(Path(tmp) / "keys" / "root.key"), "--listen", f"127.0.0.1:{listen}", "--admin-listen",
                     f"127.0.0.1:{admin}", "--upstream-url", f"llm=http://127.0.0.1:{upstream_port}",
                     "--audit-log", str(Path(tmp) / f"audit-{source}-{stream}.jsonl"), "--log-level", "warning"],
                    cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
                try:
                    rows.append(await _calls(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}/readyz",
                                             sidecar.pid, calls, source, stream))
                finally:
                    sidecar.terminate()
                    sidecar.wait(10)
    finally:
        await runner.cleanup()
    return rows


async def _calls(url: str, ready: str, pid: int, calls: int, source: str, stream: bool) -> list[object]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    if stream:
        body.update({"stream": True, "stream_options": {"include_usage": True}})
    await harness.wait_answering(ready)
    async with aiohttp.ClientSession() as session:
        latencies: list[float] = []
        for index in range(calls + 50):  # the first 50 warm the pools and caches
            if index == 50:
                cpu_before = harness.cpu_seconds(pid)
            started = time.perf_counter()
            async with session.post(f"{url}/llm/v1/chat/completions", json=body) as response:
                await response.read()
                assert response.status == 200, response.status
            if index >= 50:
                latencies.append((time.perf_counter() - started) * 1000)
        cpu_ms = (harness.cpu_seconds(pid) - cpu_before) * 1000 / calls
    kind = "text/event-stream (10 events)" if stream else "JSON"
    case = f"{source}-charged, {kind}" + (" (usage.total_tokens)" if source == "response" else " (max_tokens)")
    return [case, calls, f"{harness.percentile(latencies, 50):.2f}", f"{harness.percentile(latencies, 99):.2f}",
            f"{cpu_ms:.2f}"]


if __name__ == "__main__":
    sys.exit(main())
