"""Proxy overhead: the same requests straight to an upstream and through capgate-sidecar.

    python bench/proxy.py            # 10,000 requests per row
    python bench/proxy.py --quick    # 1,000 requests per row

The upstream (a tiny aiohttp app) and the sidecar (the real ``python -m capgate.sidecar``,
standalone, audit ledger to a file) each run in their own process, so neither shares an event
loop with the load generator. Every request through the sidecar is fully decided: token check,
Datalog verdict, receipt minted and held, audit record hash-chained and written.

Targets (issue 3): throughput through the sidecar ≥ 0.5× direct, added p50 ≤ 1 ms, idle RSS < 60 MB.
On a small machine the load generator competes with both servers for the same cores, so absolute
numbers are lower bounds; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import harness

REPO = Path(__file__).resolve().parents[1]
CAPABILITY = {
    "apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
    "metadata": {"name": "bench-agent", "namespace": "bench"},
    "spec": {
        "serviceAccountName": "bench-agent",
        "upstreams": [{"name": "flights", "url": "http://127.0.0.1:1"}],
        "rules": [{"name": "search", "effect": "allow", "upstream": "flights", "methods": ["GET"],
                   "paths": ["/search", "/search/**"]},
                  {"name": "no-deletes", "effect": "deny", "methods": ["DELETE"]}],
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_upstream(port: int) -> None:
    from aiohttp import web

    body = json.dumps({"flights": [{"id": "UA1", "from": "SFO", "to": "JFK", "price": 30000}]}).encode()

    async def search(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/search", search)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_passthrough(port: int, upstream_port: int) -> None:
    """A bare aiohttp forwarder (no decisions): the floor any aiohttp-based proxy pays."""
    from aiohttp import web

    async def client_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["client"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["client"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        async with request.app["client"].get(f"http://127.0.0.1:{upstream_port}/search") as upstream:
            return web.Response(body=await upstream.read(), status=upstream.status,
                                content_type=upstream.content_type)

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_get("/flights/search", forward)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, total: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal errors
            for _ in counter:
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        for _ in range(min(200, total // 10)):  # warm the pools and caches
            async with session.get(url) as response:
                await response.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": total / elapsed, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000, "errors": errors}


def start_sidecar(workdir: Path, upstream_port: int, listen: int, admin: int) -> subprocess.Popen[bytes]:
    from capgate.capabilities import keys

    keys.KeySet.generate().write(workdir / "keys")
    cap = workdir / "capability.json"
    cap.write_text(json.dumps(CAPABILITY))
    return subprocess.Popen(
        [sys.executable, "-m", "capgate.sidecar", "--capability", str(cap), "--root-key",
         str(workdir / "keys" / "root.key"), "--listen", f"127.0.0.1:{listen}", "--admin-listen",
         f"127.0.0.1:{admin}", "--upstream-url", f"flights=http://127.0.0.1:{upstream_port}",
         "--audit-log", str(workdir / "audit.jsonl"), "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


async def bench(total: int) -> None:
    upstream_port, listen, admin = free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--port", str(upstream_port)])
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--role", "passthrough", "--port", str(bare_port),
                             "--upstream-port", str(upstream_port)])
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = start_sidecar(Path(tmp), upstream_port, listen, admin)
        try:
            await harness.wait_answering(f"http://127.0.0.1:{upstream_port}/search")
            await harness.wait_answering(f"http://127.0.0.1:{admin}/readyz")
            await harness.wait_answering(f"http://127.0.0.1:{bare_port}/flights/search")
            idle = rss_mb(sidecar.pid)
            rows = []
            for concurrency in (1, 64):
                direct = await load(f"http://127.0.0.1:{upstream_port}/search", total, concurrency)
                bare_row = await load(f"http://127.0.0.1:{bare_port}/flights/search", total, concurrency)
                cpu_before = cpu_seconds(sidecar.pid)
                proxied = await load(f"http://127.0.0.1:{listen}/flights/search", total, concurrency)
                proxied["cpu_ms"] = (cpu_seconds(sidecar.pid) - cpu_before) * 1000 / (total + min(200, total // 10))
                rows.append((concurrency, direct, bare_row, proxied))
            loaded = rss_mb(sidecar.pid)
            ledger_lines = sum(1 for _ in (Path(tmp) / "audit.jsonl").open())
        finally:
            for process in (sidecar, bare, upstream):
                process.terminate()
            for process in (sidecar, bare, upstream):
                process.wait(10)
    print(f"\ncapgate-sidecar proxy benchmark: {total} GET requests per row, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print(f"{'conc':>4} | {'path':<8} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'errors':>6}")
    print("-" * 56)
    for concurrency, direct, bare_row, proxied in rows:
        for name, row in (("direct", direct), ("bare fwd", bare_row), ("sidecar", proxied)):
            print(f"{concurrency:>4} | {name:<8} | {row['rps']:>8.0f} | {row['p50']:>7.2f} | {row['p99']:>7.2f} | "
                  f"{row['errors']:>6.0f}")
        ratio = proxied["rps"] / direct["rps"]
        added = proxied["p50"] - direct["p50"]
        print(f"{'':>4} | {'ratio':<8} | {ratio:>7.2f}x | +{added:>6.2f} |          | sidecar CPU "
              f"{proxied['cpu_ms']:.2f} ms/request")
        print("-" * 56)
    print(f"sidecar RSS: idle {idle:.1f} MB, after load {loaded:.1f} MB; audit ledger lines: {ledger_lines}")
    print("targets: ratio >= 0.5x, added p50 <= 1 ms, idle RSS < 60 MB")
    print("'bare fwd' is a minimal aiohttp forwarder with no checks: the floor for any aiohttp proxy here.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 requests per row instead of 10,000")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--role", choices=("bench", "upstream", "passthrough"), default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        run_upstream(args.port)
        return
    if args.role == "passthrough":
        run_passthrough(args.port, args.upstream_port)
        return
    asyncio.run(bench(args.requests or (1000 if args.quick else 10_000)))


if __name__ == "__main__":
    main()
