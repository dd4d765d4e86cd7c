"""An https:// upstream for real: the injected key travels inside verified TLS, and only there.

The ``capgate-sidecar`` command runs as a process against an aiohttp server on loopback that serves
TLS with a certificate from a throwaway CA. The sidecar trusts that CA only through
``SSL_CERT_FILE`` (what a cluster's CA bundle mount would set), so the second test shows the key is
never sent to an upstream whose certificate does not verify.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from capgate.capabilities import keys
from capgate.operator import certificates
from tests.sidecar.test_console import REPO, free_port, wait_for_line

API_KEY = "sk_test_tls_0b9d3e"


@dataclass
class TLSUpstream:
    port: int
    ca_file: Path
    seen: list[tuple[bool, str | None]] = field(default_factory=list)
    """(arrived over TLS, Authorization header) per request."""


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[TLSUpstream]:
    ca_file, cert_file, key_file = certificates.issue(["127.0.0.1"]).write(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    upstream = TLSUpstream(port=free_port(), ca_file=ca_file)

    async def record(request: web.Request) -> web.Response:
        over_tls = request.transport is not None and request.transport.get_extra_info("ssl_object") is not None
        upstream.seen.append((over_tls, request.headers.get("Authorization")))
        return web.json_response({"id": "ch_1"})

    app = web.Application()
    app.router.add_post("/v1/charges", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port, ssl_context=context).start()
    yield upstream
    await runner.cleanup()


def capability_file(tmp_path: Path, upstream: TLSUpstream) -> Path:
    """The example, with payments served by the TLS upstream by its real https:// URL (no override)."""
    document = yaml.safe_load((REPO / "examples" / "booking-agent.yaml").read_text())
    spec = document["spec"]
    spec.pop("datalog", None)
    spec["upstreams"][1]["url"] = f"https://127.0.0.1:{upstream.port}"
    for rule in spec["rules"]:
        rule.pop("requires", None)
    path = tmp_path / "capability.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def charge_through_sidecar(tmp_path: Path, upstream: TLSUpstream, env: dict[str, str]) -> int:
    keys.KeySet.generate().write(tmp_path / "keys")
    listen, admin = free_port(), free_port()
    command = shutil.which("capgate-sidecar") or sys.executable
    prefix = [] if command.endswith("capgate-sidecar") else ["-m", "capgate.sidecar"]
    process = await asyncio.create_subprocess_exec(
        command, *prefix, "--capability", str(capability_file(tmp_path, upstream)),
        "--root-key", str(tmp_path / "keys" / "root.key"),
        "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
        "--upstream-credential", "payments=env:PAYMENTS_API_KEY",
        env={**{k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}, "PAYMENTS_API_KEY": API_KEY, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    try:
        await asyncio.wait_for(wait_for_line(process.stderr, "listening on"), timeout=30)
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{listen}/payments/v1/charges", json={"amount": 100},
                headers={"Authorization": "Bearer agent-made-this-up"}) as response:
            return response.status
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), timeout=30)


async def test_the_key_is_injected_inside_tls_to_an_https_upstream(tmp_path: Path,
                                                                   tls_upstream: TLSUpstream) -> None:
    status = await charge_through_sidecar(tmp_path, tls_upstream, {"SSL_CERT_FILE": str(tls_upstream.ca_file)})

    assert status == 200
    assert tls_upstream.seen == [(True, f"Bearer {API_KEY}")]


async def test_the_key_is_never_sent_to_an_upstream_whose_certificate_does_not_verify(
        tmp_path: Path, tls_upstream: TLSUpstream) -> None:
    status = await charge_through_sidecar(tmp_path, tls_upstream, {})

    assert status == 502
    assert tls_upstream.seen == []
