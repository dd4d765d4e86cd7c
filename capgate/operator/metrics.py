"""The operator's Prometheus metrics and its health endpoints, on one small aiohttp server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.minted = Counter("capgate_operator_credentials_minted_total", "Credentials minted, by reason.",
                              ["reason"], registry=self.registry)
        self.revoked = Counter("capgate_operator_credentials_revoked_total", "Revocation ids pushed, by reason.",
                               ["reason"], registry=self.registry)
        self.session_keys = Counter("capgate_operator_session_keys_issued_total", "Receipt session keys issued.",
                                    registry=self.registry)
        self.reconcile_errors = Counter("capgate_operator_reconcile_errors_total", "Failed reconciliations.",
                                        ["kind"], registry=self.registry)
        self.webhook_seconds = Histogram("capgate_operator_webhook_seconds", "Admission webhook latency.",
                                         ["webhook", "outcome"], registry=self.registry,
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))


async def serve(metrics: OperatorMetrics, host: str, port: int, ready: ReadyFlag) -> web.AppRunner:
    """/metrics, /healthz (the process answers) and /readyz (startup finished: keys, lists, webhooks)."""

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if await ready.check():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


@dataclass
class ReadyFlag:
    ready: bool = False
    webhook: tuple[str, int] | None = None
    """Readiness also needs kopf's webhook server to accept connections: with failurePolicy Fail, an
    operator that says "ready" before it listens would get the first pods and capabilities refused."""

    async def check(self) -> bool:
        if not self.ready:
            return False
        if self.webhook is None:
            return True
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*self.webhook), timeout=1)
        except (OSError, TimeoutError):
            return False
        writer.close()
        await writer.wait_closed()
        return True
