"""Real peers on loopback: a Go ``net/http`` + ``encoding/json`` upstream behind a real ``capgate-sidecar`` process.

The Go program (``goupstream/``, standard library only) is built once and cached under
``~/.cache/capgate/go`` (build cache and binary keyed by the source's digest), then run on a
free loopback port. The sidecar runs as ``python -m capgate.sidecar`` — the same server set-up as
in a pod, so what it does to bodies (never decompressing) is what production does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from capgate.capabilities import keys

PEER_SOURCE = Path(__file__).parent / "goupstream"
CACHE = Path.home() / ".cache" / "capgate" / "go"
GO = shutil.which("go") or "/usr/local/go/bin/go"
STARTUP_SECONDS = 30.0

PEER_SPEC: dict[str, Any] = {
    "serviceAccountName": "peer-agent",
    "upstreams": [{"name": "payments", "url": "http://payments.peers.svc:8080"},
                  {"name": "files", "url": "http://files.peers.svc:8080"}],
    "rules": [
        {"name": "charge", "effect": "allow", "upstream": "payments", "methods": ["POST"], "paths": ["/v1/charges"],
         "limits": [{"field": "amount", "max": 40000}]},
        {"name": "refund", "effect": "allow", "upstream": "payments", "paths": ["/v1/refunds"]},
        {"name": "files", "effect": "allow", "upstream": "files", "methods": ["GET", "POST"], "paths": ["/**"]},
        {"name": "no-deletes", "effect": "deny", "methods": ["DELETE"]},
    ],
    "budgets": [{"upstream": "payments", "field": "amount", "max": 10**9, "per": "24h"}],
}


def _go_binary() -> Path:
    if not Path(GO).exists():
        pytest.fail("the Go toolchain is not installed: the Go net/http peer needs it "
                    "(so does hack/setup.sh, which builds the cluster)", pytrace=False)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(PEER_SOURCE.iterdir()))).hexdigest()[:16]
    binary = CACHE / "bin" / f"goupstream-{digest}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOCACHE": str(CACHE / "cache"), "GOMODCACHE": str(CACHE / "mod"), "GOFLAGS": "-mod=mod",
           "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOPROXY": "off"}
    subprocess.run([GO, "build", "-o", str(binary), "."], cwd=PEER_SOURCE, env=env, check=True, timeout=600)
    return binary


@pytest.fixture(scope="session")
def go_upstream() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of the running Go payments API."""
    process = subprocess.Popen([str(_go_binary())], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening "), line
        yield "http://" + line.split(" ", 1)[1]
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RealSidecar:
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def run_sidecar(workdir: Path, upstream: str, spec: dict[str, Any]) -> Iterator[RealSidecar]:
    """``python -m capgate.sidecar`` in front of ``upstream`` until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    private, _ = keys.KeySet.generate().write(workdir / "keys")
    capability = workdir / "capability.yaml"
    capability.write_text(yaml.safe_dump({"apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
                                          "metadata": {"name": "peer-agent", "namespace": "peers"}, "spec": spec}))
    sidecar = RealSidecar(free_port(), free_port())
    command = [sys.executable, "-m", "capgate.sidecar", "--capability", str(capability), "--root-key", str(private),
               "--listen", f"127.0.0.1:{sidecar.port}", "--admin-listen", f"127.0.0.1:{sidecar.admin_port}",
               "--audit-log", str(workdir / "audit.jsonl"), "--log-level", "warning",
               *[arg for u in spec["upstreams"] for arg in ("--upstream-url", f"{u['name']}={upstream}")]]
    log = workdir / "sidecar.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stderr=stderr)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise AssertionError(f"capgate-sidecar exited: {log.read_text()}")
            if _ready(sidecar.admin_port):
                break
            if time.monotonic() > deadline:
                raise AssertionError("capgate-sidecar did not become ready")
            time.sleep(0.1)
        yield sidecar
    finally:
        process.terminate()
        process.wait(timeout=10)


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as answer:
            return bool(json.load(answer).get("ready"))
    except OSError:
        return False


@pytest.fixture(scope="module")
def peer_sidecar(tmp_path_factory: pytest.TempPathFactory, go_upstream: str) -> Iterator[RealSidecar]:
    with run_sidecar(tmp_path_factory.mktemp("peer-sidecar"), go_upstream, PEER_SPEC) as sidecar:
        yield sidecar
