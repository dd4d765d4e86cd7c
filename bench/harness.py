"""Shared set-up for the operator benchmarks: a private control plane, the CRDs and the operator.

Each benchmark starts its own :class:`e2e.controlplane.ControlPlane` (real etcd + kube-apiserver),
installs the CRDs and runs ``capgate-operator`` as a local process (:class:`e2e.cluster.Operator`),
exactly as the e2e tests do; everything is stopped in ``finally`` blocks, so no process outlives
the benchmark, also when it fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # e2e/ is not an installed package

from e2e.cluster import Operator, install_crds  # noqa: E402
from e2e.controlplane import ControlPlane  # noqa: E402

NAMESPACE = "bench"
SERVICE_ACCOUNT = "agent"


@dataclass
class Cluster:
    plane: ControlPlane
    operator: Operator
    workdir: Path


def _quiet(line: str) -> None:
    print(f"  [{line}]", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cluster(namespaces: Sequence[str] = (NAMESPACE,)) -> Iterator[Cluster]:
    """Control plane + CRDs + operator, namespaces with the agent ServiceAccount; all stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="capgate-bench-") as tmp, ControlPlane(progress=_quiet) as plane:
        workdir = Path(tmp)
        install_crds(plane)
        for namespace in namespaces:
            plane.create_namespace(namespace)
            plane.kubectl("create", "serviceaccount", SERVICE_ACCOUNT, "-n", namespace)
        operator = Operator(plane, workdir)
        try:
            operator.start()
            wait_port(operator.webhook_port)  # /readyz answers before kopf's webhook server listens
            yield Cluster(plane, operator, workdir)
        except BaseException:
            if operator.log.exists():
                print(operator.log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            operator.stop()


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def capability(name: str, namespace: str = NAMESPACE, rules: int = 2) -> dict[str, Any]:
    """A small AgentCapability (no injected upstream keys, so no other Secret is needed)."""
    return {
        "apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "serviceAccountName": SERVICE_ACCOUNT,
            "upstreams": [{"name": "flights", "url": "http://flights.bench.svc:8080"}],
            "rules": [{"name": f"search-{index}", "effect": "allow", "upstream": "flights", "methods": ["GET"],
                       "paths": [f"/search{index}", f"/search{index}/**"]} for index in range(rules - 1)]
                     + [{"name": "no-deletes", "effect": "deny", "methods": ["DELETE"]}],
        },
    }


def is_ready(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    return bool(cond and cond.get("status") == "True"
                and status.get("observedGeneration") == obj["metadata"].get("generation"))


def wait_ready(plane: ControlPlane, names: Sequence[str], namespace: str = NAMESPACE,
               timeout: float = 120) -> dict[str, dict[str, Any]]:
    """Poll until every named AgentCapability is Ready for its generation; name -> object."""
    deadline = time.monotonic() + timeout
    wanted = set(names)
    while True:
        listing = json.loads(plane.kubectl("get", "acap", "-n", namespace, "-o", "json").stdout)
        ready = {o["metadata"]["name"]: o for o in listing["items"] if o["metadata"]["name"] in wanted and is_ready(o)}
        if len(ready) == len(wanted):
            return ready
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ready)}/{len(wanted)} capabilities became Ready in {timeout}s")
        time.sleep(0.25)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """A markdown table; numeric columns right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    align = right or [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join(("-" * (w + 1) + ":") if a else ("-" * (w + 2)) for w, a in
                            zip(widths, align, strict=True)) + "|"]
    for row in cells:
        lines.append("| " + " | ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in
                                       zip(row, widths, align, strict=True)) + " |")
    return "\n".join(lines)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


async def wait_answering(url: str, timeout: float = 30.0) -> None:
    """Until ``url`` answers 200 (another process starting up), or exit naming it."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"not ready: {url}")
            await asyncio.sleep(0.05)  # polling a separate process: there is no event to await
