"""One sidecar process under hostile load: memory held by stalled clients, and the event loop during a bomb.

    python bench/availability.py

* **slow heads** — 50 connections each send a request line and 100 (or one) 64 KiB header lines
  without ever ending the head; the sidecar's RSS (from /proc) is read after they have sent what
  they could, and again after the header timeout.
* **slow bodies** — 50 connections send all but the last byte of a 1 MiB JSON body to a limited rule.
* **datalog bomb** — a token narrowed through ``/_capgate/v1/attenuate``, plus a block appended offline
  (100 facts and a 3-way join); ``/healthz`` is probed every 10 ms while the sidecar answers it.

Each row reports what the connections saw (closed by the sidecar or still open) and the RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import rss_mb, table, wait_port  # noqa: E402

CONNECTIONS = 50
HOLD_SECONDS = 12.0
"""Longer than the sidecar's default header and body timeouts (10 s), so "after" rows show them firing."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    subprocess.run([sys.executable, "-m", "capgate.cli", "keys", "init", "--dir", str(workdir / "keys")],
                   check=True, capture_output=True)
    agent, admin = _free_port(), _free_port()
    env = dict(os.environ, PAYMENTS_API_KEY="bench-key")
    process = subprocess.Popen(
        [sys.executable, "-m", "capgate.sidecar", "--capability", str(ROOT / "examples" / "booking-agent.yaml"),
         "--root-key", str(workdir / "keys" / "root.key"), "--listen", f"127.0.0.1:{agent}",
         "--admin-listen", f"127.0.0.1:{admin}", "--audit-log", str(workdir / "audit.jsonl"),
         "--upstream-url", "flights=http://127.0.0.1:9", "--upstream-url", "payments=http://127.0.0.1:9",
         "--upstream-credential", "payments=env:PAYMENTS_API_KEY", "--log-level", "warning"],
        env=env, cwd=ROOT)
    wait_port(agent)
    wait_port(admin)
    return process, agent, admin


Held = tuple[list[asyncio.StreamReader], list[asyncio.StreamWriter]]


async def _hold(port: int, send: bytes, chunks: list[bytes]) -> Held:
    readers: list[asyncio.StreamReader] = []
    writers: list[asyncio.StreamWriter] = []
    for _ in range(CONNECTIONS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(send)
        readers.append(reader)
        writers.append(writer)
    for chunk in chunks:
        for writer in writers:
            with contextlib.suppress(OSError):
                writer.write(chunk)
        await asyncio.sleep(0)
    with contextlib.suppress(OSError):
        await asyncio.gather(*(w.drain() for w in writers), return_exceptions=True)
    return readers, writers


async def _stalled(pid: int, port: int, head: bytes, chunks: list[bytes]) -> tuple[float, float, str]:
    """RSS after the connections sent what they could (1 s), RSS at the end, what the connections were told."""
    readers, writers = await _hold(port, head, chunks)
    await asyncio.sleep(1.0)
    early = rss_mb(pid)
    await asyncio.sleep(HOLD_SECONDS)
    late = rss_mb(pid)
    told: dict[str, int] = {}
    for reader in readers:
        answer = b""
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            answer = await asyncio.wait_for(reader.read(4096), 0.05)
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "no answer"
        if b'"reason": "' in answer:
            status += " " + answer.split(b'"reason": "', 1)[1].split(b'"', 1)[0].decode()
        told[status] = told.get(status, 0) + 1
    for writer in writers:
        writer.close()
    await asyncio.sleep(0.5)
    return early, late, ", ".join(f"{count}x {status}" for status, count in sorted(told.items()))


def _slow_heads(pid: int, port: int, lines: int) -> tuple[float, float, str]:
    line = b"X-Pad: " + b"a" * (64 * 1024 - 16) + b"\r\n"
    head = b"GET /flights/search HTTP/1.1\r\nHost: x\r\n"
    return asyncio.run(_stalled(pid, port, head, [line] * lines))


def _slow_bodies(pid: int, port: int) -> tuple[float, float, str]:
    size = 1024 * 1024
    head = (b"POST /payments/v1/charges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(size).encode() + b"\r\n\r\n")
    body = b'{"amount": 1, "pad": "' + b"a" * (size - 40) + b'"}'
    return asyncio.run(_stalled(pid, port, head, [body[i:i + 65536] for i in range(0, len(body) - 1, 65536)]))


def _post(url: str, data: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _bomb_token(agent: int, workdir: Path) -> str:
    import biscuit_auth as ba

    narrowed = str(_post(f"http://127.0.0.1:{agent}/_capgate/v1/attenuate", {"ttl": "5m"})["token"])
    public = (workdir / "keys" / "root.pub").read_text()
    _key_id, key = _first_public_key(public)
    parent = ba.Biscuit.from_base64(narrowed, ba.PublicKey.from_bytes(key, ba.Algorithm.Ed25519))
    block = " ".join(f"f({i});" for i in range(100)) + " g($a, $b, $c) <- f($a), f($b), f($c);"
    return str(parent.append(ba.BlockBuilder(block)).to_base64())


def _first_public_key(text: str) -> tuple[int, bytes]:
    from capgate.capabilities import keys

    bundle = keys.TrustBundle.from_json(text)
    key_id, public = next(iter(bundle.keys.items()))
    return key_id, public


async def _probe(admin: int, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", admin)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await reader.read()
        writer.close()
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    return latencies


async def _bomb(pid: int, agent: int, admin: int, token: str) -> tuple[int, str, float, float, float]:
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(admin, stop))
    await asyncio.sleep(0.3)
    before = rss_mb(pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", agent)
    started = time.perf_counter()
    writer.write(f"GET /flights/search HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Capgate-Token: {token}\r\n\r\n"
                 .encode())
    answer = await reader.read()
    took = time.perf_counter() - started
    writer.close()
    await asyncio.sleep(0.3)
    peak = rss_mb(pid)
    stop.set()
    latencies = await probe
    status = int(answer.split(b" ", 2)[1]) if answer else 0
    reason = ""
    with contextlib.suppress(ValueError, IndexError):
        reason = str(json.loads(answer.split(b"\r\n\r\n", 1)[1])["reason"])
    return status, reason, took, max(latencies), peak - before


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="capgate-avail-") as tmp:
        workdir = Path(tmp)
        process, agent, admin = _start(workdir)
        try:
            idle = rss_mb(process.pid)
            rows.append(["idle", f"{idle:.0f}", "", ""])
            for lines in (100, 1):
                early, late, told = _slow_heads(process.pid, agent, lines)
                rows.append([f"{CONNECTIONS} slow heads ({lines} x 64 KiB lines)", f"{early:.0f}", f"{late:.0f}",
                             told])
            early, late, told = _slow_bodies(process.pid, agent)
            rows.append([f"{CONNECTIONS} slow 1 MiB bodies", f"{early:.0f}", f"{late:.0f}", told])
            token = _bomb_token(agent, workdir)
            status, reason, took, worst, grew = asyncio.run(_bomb(process.pid, agent, admin, token))
            rows.append([f"datalog bomb ({len(token)} B token)", f"+{grew:.0f}", "",
                         f"{status} {reason} in {took * 1000:.0f} ms; /healthz worst {worst * 1000:.0f} ms"])
            rows.append(["alive afterwards", f"{rss_mb(process.pid):.0f}", "",
                         "yes" if process.poll() is None else f"exit {process.returncode}"])
        finally:
            process.terminate()
            process.wait(10)
    print(table(["case", "RSS MB after 1 s", f"RSS MB after {HOLD_SECONDS:.0f} s", "outcome"], rows))


if __name__ == "__main__":
    main()
