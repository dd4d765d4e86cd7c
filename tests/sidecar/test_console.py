"""The real ``capgate-sidecar`` command, run standalone exactly as DESIGN.md shows it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import yaml

from capgate import ledger
from capgate.capabilities import keys
from tests.sidecar.conftest import Upstream

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def example_without_calendar_check(tmp_path: Path) -> Path:
    """examples/booking-agent.yaml, minus its `time < 2027-01-01` check so this test does not expire."""
    document = yaml.safe_load((REPO / "examples" / "booking-agent.yaml").read_text())
    document["spec"].pop("datalog", None)
    path = tmp_path / "booking-agent.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def wait_for_line(stream: asyncio.StreamReader, needle: str) -> list[str]:
    seen = []
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError("capgate-sidecar exited early:\n" + "".join(seen))
        seen.append(line)
        if needle in line:
            return seen


async def test_capgate_sidecar_command_runs_standalone_and_allows_a_search(tmp_path: Path,
                                                                          upstream: Upstream) -> None:
    keys.KeySet.generate().write(tmp_path / "keys")  # stands in for `capgate keys init --dir keys/`
    listen, admin = free_port(), free_port()
    command = shutil.which("capgate-sidecar") or sys.executable
    prefix = [] if command.endswith("capgate-sidecar") else ["-m", "capgate.sidecar"]
    process = await asyncio.create_subprocess_exec(
        command, *prefix, "--capability", str(example_without_calendar_check(tmp_path)),
        "--root-key", str(tmp_path / "keys" / "root.key"),
        "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
        "--upstream-url", f"flights={upstream.url}",
        "--upstream-credential", "payments=env:PAYMENTS_API_KEY",
        env={**os.environ, "PAYMENTS_API_KEY": "sk_test_console"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        await asyncio.wait_for(wait_for_line(process.stderr, "listening on"), timeout=30)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{listen}/flights/search?from=SFO") as response:
                assert response.status == 200
                assert response.headers["X-Capgate-Receipt"].startswith("v1.")
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as ready:
                assert ready.status == 200
            # A narrowed token of a large capability is longer than aiohttp's 8 KiB header default:
            # the sidecar must read it and judge it (here: not a token), not refuse the header line.
            big = {"X-Capgate-Token": "A" * 20_000}
            async with session.get(f"http://127.0.0.1:{listen}/flights/search", headers=big) as response:
                assert response.status == 401
                assert (await response.json())["reason"] == "malformed"
        assert upstream.seen[-1].path == "/search?from=SFO"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert records[0]["type"] == "start"
    assert records[1]["outcome"] == "allowed"
    assert (records[-1]["type"], records[-1]["closing"]) == ("checkpoint", True)  # SIGTERM signs the tail
    audit = tmp_path / "audit.jsonl"
    audit.write_bytes(out)
    report = ledger.verify(audit, keys.TrustBundle.from_file(tmp_path / "keys" / "root.pub"))
    assert report.verdict() == "VERIFIED", report.summary()
    assert report.covered == report.records == len(records)
