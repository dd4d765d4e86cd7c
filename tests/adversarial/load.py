"""Load: many concurrent agent connections through one sidecar, each part in its own process.

``run_load(connections, seconds)`` starts an upstream (``python -m tests.adversarial.load upstream``),
a standalone ``capgate-sidecar`` and a load generator (``... load generate``), and returns what the
README quotes: requests per second, p99 latency, errors other than policy decisions, and the
sidecar's RSS before and after. The generator keeps every connection busy with keep-alive
requests, a tenth of them ones the policy refuses (so refusals are load too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"serviceAccountName": "agent",
        "upstreams": [{"name": "flights", "url": "http://flights.svc:8080"}],
        "rules": [{"name": "search", "effect": "allow", "upstream": "flights", "methods": ["GET"],
                   "paths": ["/search", "/search/**"]},
                  {"name": "no-deletes", "effect": "deny", "methods": ["DELETE"]}]}


@dataclass
class LoadResult:
    connections: int
    seconds: float
    requests: int
    allowed: int
    refused: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    rss_before_mb: float
    rss_after_mb: float
    error_samples: list[str]
    statuses: dict[int, int]


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the upstream process ---------------------------------------------------------------------------
def serve_upstream(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


# -- the load generator process -------------------------------------------------------------------
async def generate(port: int, connections: int, seconds: float) -> dict[str, object]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        requests = [b"GET /flights/search?q=%d HTTP/1.1\r\nHost: s\r\n\r\n" % index,
                    b"DELETE /flights/search/1 HTTP/1.1\r\nHost: s\r\n\r\n"]
        count = 0
        reader = writer = None
        while time.monotonic() < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                request = requests[1] if (count + index) % 10 == 9 else requests[0]
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(head.split(b" ")[1])
                statuses[status] = statuses.get(status, 0) + 1
                count += 1
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if len(errors) < 10:
                    errors.append(f"{time.monotonic() - (deadline - seconds):.1f}s {type(exc).__name__}: {exc}")
                statuses[-1] = statuses.get(-1, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
        if writer is not None:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"statuses": statuses, "elapsed": elapsed, "errors": errors,
            "p50": latencies[len(latencies) // 2] if latencies else 0.0,
            "p99": latencies[int(len(latencies) * 0.99)] if latencies else 0.0}


# -- the orchestration ----------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling another process's port: nothing to wait on instead
    raise RuntimeError(f"port {port} did not open")


def run_load(connections: int, seconds: float) -> LoadResult:
    from capgate.capabilities import keys

    raise_fd_limit(connections * 2 + 1024)
    with tempfile.TemporaryDirectory(prefix="capgate-load-") as tmp:
        work = Path(tmp)
        key, _ = keys.KeySet.generate().write(work / "keys")
        cap = work / "cap.yaml"
        cap.write_text(yaml.safe_dump({"apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
                                       "metadata": {"name": "load", "namespace": "bench"}, "spec": SPEC}))
        up_port, port, admin = free_port(), free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        processes: list[subprocess.Popen[bytes]] = []
        try:
            upstream = subprocess.Popen([sys.executable, "-m", "tests.adversarial.load", "upstream", str(up_port)],
                                        cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
            processes.append(upstream)
            sidecar = subprocess.Popen(
                [sys.executable, "-m", "capgate.sidecar", "--capability", str(cap), "--root-key", str(key),
                 "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                 "--upstream-url", f"flights=http://127.0.0.1:{up_port}", "--audit-log", str(work / "audit.jsonl"),
                 "--log-level", "warning"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
            processes.append(sidecar)
            _wait_port(up_port, upstream)
            _wait_port(port, sidecar)
            # Warm up (imports, caches, connection pool) before the "before" RSS.
            subprocess.run([sys.executable, "-m", "tests.adversarial.load", "generate", str(port), "20", "1"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            before = rss_mb(sidecar.pid)
            result = subprocess.run([sys.executable, "-m", "tests.adversarial.load", "generate", str(port),
                                     str(connections), str(seconds)], cwd=ROOT, env=env, check=True,
                                    capture_output=True)
            after = rss_mb(sidecar.pid)
        finally:
            for process in reversed(processes):
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
    report = json.loads(result.stdout)
    statuses = {int(k): v for k, v in report["statuses"].items()}
    total = sum(v for k, v in statuses.items() if k > 0)
    return LoadResult(
        connections=connections, seconds=report["elapsed"], requests=total, allowed=statuses.get(200, 0),
        refused=statuses.get(403, 0), errors=sum(v for k, v in statuses.items() if k not in (200, 403)),
        rps=total / report["elapsed"], p50_ms=report["p50"] * 1000, p99_ms=report["p99"] * 1000,
        rss_before_mb=before, rss_after_mb=after, error_samples=report["errors"], statuses=statuses)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["upstream", "generate", "run"])
    parser.add_argument("args", nargs="*")
    options = parser.parse_args()
    raise_fd_limit(8192)
    if options.role == "upstream":
        serve_upstream(int(options.args[0]))
    elif options.role == "generate":
        port, connections, seconds = int(options.args[0]), int(options.args[1]), float(options.args[2])
        raise_fd_limit(connections * 2 + 1024)
        print(json.dumps(asyncio.run(generate(port, connections, seconds))))
    else:
        print(json.dumps(asdict(run_load(int(options.args[0]), float(options.args[1])))))


if __name__ == "__main__":
    main()
