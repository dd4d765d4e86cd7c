"""A real sidecar in front of a real aiohttp upstream on loopback, with real Biscuit crypto.

``sidecar(**changes)`` builds one from the booking-agent capability (without the example's
calendar check, so these tests do not expire) — ``spec`` edits the capability, everything else
is a :class:`Settings` field. The upstream records what it received so tests can assert what the
upstream *saw*, which is what matters to a user.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from capgate.capabilities import keys
from capgate.sidecar import app as sidecar_app
from capgate.sidecar import server
from capgate.sidecar.config import SecretRef, Settings
from capgate.sidecar.gate import Gate

API_KEY = "sk_live_SECRET_payments_key_0123456789"
BASE_SPEC: dict[str, Any] = {
    "serviceAccountName": "booking-agent",
    "upstreams": [
        {"name": "flights", "url": "http://flights.travel.svc:8080"},
        {"name": "payments", "url": "https://payments.example.com",
         "inject": {"secretRef": {"name": "payments-api-key", "key": "token"}, "header": "Authorization",
                    "valuePrefix": "Bearer "}},
    ],
    "rules": [
        {"name": "search", "effect": "allow", "upstream": "flights", "methods": ["GET"],
         "paths": ["/search", "/search/**"]},
        {"name": "browse", "effect": "allow", "upstream": "flights", "methods": ["GET", "HEAD", "POST"],
         "paths": ["/slow", "/reset", "/redirect", "/gzip", "/upload", "/echo"]},
        {"name": "charge", "effect": "allow", "upstream": "payments", "methods": ["POST"], "paths": ["/v1/charges"],
         "requires": ["search"], "limits": [{"field": "amount", "max": 40000}]},
        {"name": "no-deletes", "effect": "deny", "methods": ["DELETE"]},
    ],
    "rateLimit": {"requests": 600, "per": "1h"},
    "budgets": [{"upstream": "payments", "field": "amount", "max": 100000, "per": "24h"}],
    "credential": {"ttl": "1h", "rotateBefore": "20m"},
    "receipts": {"ttl": "5m"},
    "mode": "enforce",
    "lockdownAfter": "60s",
}


def capability_document(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
            "metadata": {"name": "booking-agent", "namespace": "travel"},
            "spec": spec if spec is not None else copy.deepcopy(BASE_SPEC)}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    server: TestServer
    seen: list[Seen] = field(default_factory=list)
    never: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


def upstream_app(upstream: Upstream) -> web.Application:
    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        upstream.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        tail = request.match_info["tail"]
        if tail == "slow":
            await upstream.never.wait()
        if tail == "redirect":
            raise web.HTTPFound("/search")
        if tail == "gzip":
            return web.Response(body=b"\x1f\x8b-not-really-gzip", headers={"Content-Encoding": "gzip"})
        if tail == "upload":
            return web.json_response({"received": len(body)})
        return web.json_response({"ok": True, "path": request.raw_path},
                                 headers={"X-Capgate-Receipt": "forged-by-upstream", "Connection": "keep-alive"})

    application = web.Application(client_max_size=16 * 1024 * 1024)
    application.router.add_route("*", "/{tail:.*}", record)
    return application


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    holder = Upstream(server=None)  # type: ignore[arg-type]
    server = TestServer(upstream_app(holder))
    holder.server = server
    await server.start_server(auto_decompress=False)  # record the bytes as they arrived
    yield holder
    holder.never.set()
    await server.close()


@pytest.fixture
def keyset() -> keys.KeySet:
    return keys.KeySet.generate()


@pytest.fixture
def root_key(tmp_path: Path, keyset: keys.KeySet) -> Path:
    private, _ = keyset.write(tmp_path / "keys")
    return private


@dataclass
class Sidecar:
    client: TestClient
    admin: TestClient
    gate: Gate
    settings: Settings
    upstream: Upstream
    audit_path: Path

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def decisions(self) -> list[dict[str, Any]]:
        return [r for r in self.audit_records() if "type" not in r]  # not checkpoints, not run starts


MakeSidecar = Callable[..., Awaitable[Sidecar]]


class GuardedTestServer(TestServer):
    """Serves an app through the sidecar's own runner, connection watchdog included, as capgate-sidecar does."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return server.GuardedRunner(self.app, self.app[server.GUARD], **kwargs)


@pytest.fixture
async def sidecar(tmp_path: Path, root_key: Path, upstream: Upstream) -> AsyncIterator[MakeSidecar]:
    clients: list[TestClient] = []
    counter = iter(range(1000))

    async def make(spec: dict[str, Any] | None = None, *, env: dict[str, str] | None = None,
                   revocation_source: Any = None, limits: Any = None, single_use: Any = None,
                   **changes: Any) -> Sidecar:
        index = next(counter)
        cap_path = tmp_path / f"capability-{index}.yaml"
        cap_path.write_text(yaml.safe_dump(capability_document(spec)))
        audit_path = tmp_path / f"audit-{index}.jsonl"
        settings = Settings(capability=cap_path, root_key=root_key, audit_log=str(audit_path),
                            upstream_urls={"flights": upstream.url, "payments": upstream.url},
                            upstream_credentials={"payments": SecretRef("env", "PAYMENTS_API_KEY")},
                            read_timeout=0.5, total_timeout=2.0, connect_timeout=0.5)
        settings = replace(settings, **changes)
        agent, admin = sidecar_app.create_apps(settings, env={"PAYMENTS_API_KEY": API_KEY, **(env or {})},
                                               revocation_source=revocation_source, limits=limits,
                                               single_use=single_use)
        server = GuardedTestServer(agent)
        await server.start_server(auto_decompress=False)  # as capgate-sidecar serves it: never inflate
        client = TestClient(server)
        admin_client = TestClient(GuardedTestServer(admin))
        await client.start_server()
        await admin_client.start_server()
        clients.extend([client, admin_client])
        return Sidecar(client=client, admin=admin_client, gate=agent[sidecar_app.GATE], settings=settings,
                       upstream=upstream, audit_path=audit_path)

    yield make
    for client in reversed(clients):
        await client.close()
