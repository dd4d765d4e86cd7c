"""The two aiohttp applications of the sidecar and the resources they share.

* the **agent app** (``--listen``): the proxy (``/<upstream>/<path>`` and absolute-form) and the
  control API under ``/_capgate/``;
* the **admin app** (``--admin-listen``): ``/metrics``, ``/healthz``, ``/readyz`` for the kubelet
  and Prometheus — on its own port so an agent cannot reach it through the proxy path space.

:func:`create_apps` loads the credential synchronously, so a bad setting fails before anything
listens. Background work (credential reload, revocation source, ledger checkpoints) and the one
upstream ``ClientSession`` live in the agent app's ``cleanup_ctx``; the admin app only reads.

One middleware, outermost, owns the outcome of every request: it assigns the decision id (set on
*every* response), maps :class:`~capgate.sidecar.errors.SidecarError` and anything unexpected to the
JSON error shape (never a traceback), and writes the request's single audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime

import aiohttp
from aiohttp import web

from capgate.capabilities import decision, spec
from capgate.sidecar import buffers, consumption, control, egress, errors, facts, mcp, proxy, routing, server
from capgate.sidecar.audit import AuditLog
from capgate.sidecar.config import Settings
from capgate.sidecar.credentials import CredentialStore, Loaded, UpstreamSecrets
from capgate.sidecar.gate import Gate, Receipts, ResponseTap, Trace, new_decision_id, response_budgets
from capgate.sidecar.limits import Charger, Limits
from capgate.sidecar.metrics import Metrics
from capgate.sidecar.receipts import ReceiptBook, split_header
from capgate.sidecar.trust import UpstreamTrust
from capgate.sidecar.watch import FileSource, RevocationSource, RevocationState

log = logging.getLogger("capgate.sidecar")

SETTINGS = web.AppKey("settings", Settings)
GATE = web.AppKey("gate", Gate)
SECRETS = web.AppKey("upstream_secrets", UpstreamSecrets)
TRUST = web.AppKey("upstream_trust", UpstreamTrust)
SOURCE: web.AppKey[RevocationSource | None] = web.AppKey("revocation_source")
CLIENT = web.AppKey("client", aiohttp.ClientSession)
MCP_SESSIONS = web.AppKey("mcp_sessions", mcp.Sessions)
MCP_PENDING = web.AppKey("mcp_pending", mcp.Pending)
EGRESS: web.AppKey[egress.Egress | None] = web.AppKey("egress")
TRACE = web.RequestKey("trace", Trace)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_apps(settings: Settings, *, env: Mapping[str, str] | None = None,
                revocation_source: RevocationSource | None = None,
                limits: Charger | None = None,
                single_use: consumption.SingleUse | None = None) -> tuple[web.Application, web.Application]:
    """Build the agent and admin apps; raises :class:`~capgate.sidecar.config.ConfigError` on bad material."""
    store = CredentialStore(settings)
    store.load_initial()
    secrets = UpstreamSecrets(settings.upstream_credentials, settings.upstream_credentials_dir, env)
    secrets.check()
    _warn_missing_secrets(store, secrets)
    audit = AuditLog(settings.audit_log, checkpoint_every=settings.checkpoint_every,
                     session=lambda: store.current.session if store.current else None)
    metrics = Metrics()
    charger = limits if limits is not None else _limits(settings, store, metrics, env)
    single_use = single_use if single_use is not None else _single_use(settings, store, metrics, env)
    gate = Gate(settings, store, RevocationState(), charger, ReceiptBook(settings.max_correlations), metrics, audit,
                single_use)
    source = revocation_source
    if source is None and settings.revocations is not None:
        source = FileSource(settings.revocations, settings.poll_seconds)
    if source is None and settings.credential_dir is not None:
        # In a pod the RevocationList watch is the revocation feed and the heartbeat.
        assert store.current is not None
        from capgate.sidecar.kubewatch import KubeSource  # the Kubernetes client only where it is used

        source = KubeSource((env or os.environ).get("KUBECONFIG"), store.current.capability.lockdown_after)

    agent = web.Application(middlewares=[server.track, outcome_middleware], client_max_size=settings.max_body_bytes)
    agent[SETTINGS] = settings
    agent[buffers.BUDGET] = budget = buffers.Budget(settings.max_inflight_bytes)
    agent[buffers.BODY_TIMEOUT] = settings.body_timeout
    refused = gate.metrics.connections_refused
    agent[server.GUARD] = server.agent_guard(settings.header_timeout, settings.max_connections, budget,
                                             lambda reason: refused.labels("agent", reason).inc())
    agent[GATE] = gate
    agent[SECRETS] = secrets
    agent[TRUST] = UpstreamTrust(settings.upstream_ca_dir)
    agent[SOURCE] = source
    agent[MCP_SESSIONS] = mcp.Sessions()
    agent[MCP_PENDING] = mcp.Pending()
    agent[EGRESS] = egress.Egress(settings, gate) if settings.outbound_listen is not None else None
    agent.cleanup_ctx.append(runtime)
    agent.cleanup_ctx.append(_closing(charger))
    agent.cleanup_ctx.append(_closing(single_use))
    agent.router.add_post("/_capgate/v1/authorize", _control(control.authorize))
    agent.router.add_post("/_capgate/v1/attenuate", _control(control.attenuate))
    agent.router.add_get("/_capgate/v1/whoami", _control(control.whoami))
    # [\s\S], not '.': a decoded path may hold a newline (%0a), which must reach routing (400), not 404.
    agent.router.add_route("*", r"/_capgate/{tail:[\s\S]*}", _control(unknown_control))
    agent.router.add_route("*", r"/{tail:[\s\S]*}", handle_proxy)

    admin = web.Application(middlewares=[server.track])
    admin[GATE] = gate
    admin[server.GUARD] = server.admin_guard(settings.header_timeout,
                                             lambda reason: refused.labels("admin", reason).inc())
    admin.router.add_get("/metrics", handle_metrics)
    admin.router.add_get("/healthz", handle_healthz)
    admin.router.add_get("/readyz", handle_readyz)
    return agent, admin


def _limits(settings: Settings, store: CredentialStore, metrics: Metrics, env: Mapping[str, str] | None) -> Charger:
    """In a pod, rate limits and budgets hold fleet-wide (the capability's AgentCapabilityUsage);
    standalone, in this process's memory."""
    if settings.credential_dir is None:
        return Limits()
    assert store.current is not None
    from capgate.sidecar import usage  # the Kubernetes client only where it is used

    cap = store.current.capability
    kube = usage.KubeUsageStore((env or os.environ).get("KUBECONFIG"), cap.namespace, cap.name)
    return usage.FleetLimits(kube, cap.qualified_name, metrics)


def _single_use(settings: Settings, store: CredentialStore, metrics: Metrics,
                env: Mapping[str, str] | None) -> consumption.SingleUse:
    """Consumed receipts: in a pod, in the capability's AgentCapabilityUsage (fleet-wide, across
    restarts); standalone, in this process's memory. The API client is made on the first consuming call."""
    if settings.credential_dir is None:
        return consumption.SingleUse(consumption.MemoryUsageStore(), metrics)
    assert store.current is not None
    from capgate.sidecar import usage  # the Kubernetes client only where it is used

    cap = store.current.capability
    return consumption.SingleUse(usage.KubeUsageStore((env or os.environ).get("KUBECONFIG"), cap.namespace, cap.name),
                                 metrics)


def _closing(charger: object) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        close = getattr(charger, "close", None)  # the fleet-wide charger and receipts hold an API client
        if close is not None:
            await close()
    return ctx


def _warn_missing_secrets(store: CredentialStore, secrets: UpstreamSecrets) -> None:
    assert store.current is not None
    for upstream in store.current.capability.upstreams:
        if upstream.inject is not None and secrets.get(upstream.name) is None:
            log.warning("upstream %r injects %s but no credential is configured: its calls will fail with 502",
                        upstream.name, upstream.inject.header)


async def runtime(app: web.Application) -> AsyncIterator[None]:
    """The upstream client pool and the background pollers, for the app's lifetime."""
    settings, gate = app[SETTINGS], app[GATE]
    gate.audit.open()
    app[CLIENT] = proxy.new_client(settings)
    tasks = [asyncio.create_task(gate.store.run(settings.poll_seconds), name="capgate-credentials"),
             asyncio.create_task(gate.audit.run(settings.checkpoint_seconds), name="capgate-checkpoints"),
             asyncio.create_task(mcp.reap(app[MCP_SESSIONS], app[MCP_PENDING], gate), name="capgate-mcp-sessions")]
    source = app[SOURCE]
    if source is not None:
        gate.revocations.has_source = True
        tasks.append(asyncio.create_task(source.run(gate.revocations), name="capgate-revocations"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app[CLIENT].close()
        gate.audit.close()


# -- the outermost middleware -------------------------------------------------------------------
@web.middleware
async def outcome_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    gate = request.app[GATE]
    trace = Trace(decision_id=new_decision_id())
    request[TRACE] = trace
    try:
        response = await _guarded(request, handler, trace)
    finally:
        buffers.release(request)
        gate.finish(trace)
    if not response.prepared:
        response.headers[facts.DECISION_HEADER] = trace.decision_id
    return response


async def _guarded(request: web.Request, handler: Handler, trace: Trace) -> web.StreamResponse:
    try:
        if request.method == "CONNECT":
            raise errors.SidecarError(405, "bad_request", "connect_refused",
                                      "CONNECT tunnels cannot be inspected, so they are refused; send plain "
                                      "HTTP to the sidecar (it speaks TLS to the upstream)",
                                      headers={"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"})
        response = await handler(request)
        if trace.status is None:
            trace.status = response.status
        return response
    except errors.SidecarError as exc:
        return error_response(exc, trace)
    except web.HTTPException as exc:
        return error_response(errors.SidecarError(exc.status, "bad_request", "http_error", exc.reason), trace)
    except asyncio.CancelledError:
        if not trace.forwarded:  # once forwarded, the decision stands: the call may have run
            trace.outcome = "error"
        trace.reason = "client_disconnected"
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here fails closed and is logged
        log.error("internal error in %s (%s); %s. %s", trace.decision_id, type(exc).__name__,
                  "after forwarding: 502" if trace.forwarded else "denied",
                  "".join(traceback.format_tb(exc.__traceback__)).strip())
        return error_response(errors.after_forwarding() if trace.forwarded else errors.internal(), trace)


def error_response(exc: errors.SidecarError, trace: Trace) -> web.Response:
    """The JSON refusal, and what the record says about it.

    Before forwarding a 5xx is an ``error`` and a refusal ``denied``; after forwarding (the upstream
    may have acted) the record keeps its decision (``allowed``, ``would_deny``) with ``forwarded``
    and the upstream's status, and only ``status``/``reason`` say what the agent got.
    """
    trace.status = exc.status
    trace.reason = exc.reason
    trace.rule = exc.rule or trace.rule
    if not trace.forwarded and (trace.outcome != "would_deny" or exc.status >= 500):
        trace.outcome = "error" if exc.status >= 500 and exc.error != "lockdown" else "denied"
    headers = {**exc.headers, facts.DECISION_HEADER: trace.decision_id}
    return web.json_response(exc.body(trace.decision_id), status=exc.status, headers=headers)


# -- the proxy ----------------------------------------------------------------------------------
async def handle_proxy(request: web.Request) -> web.StreamResponse:
    gate, settings, trace = request.app[GATE], request.app[SETTINGS], request[TRACE]
    now = datetime.now(UTC)
    trace.method = request.method
    loaded = gate.loaded(trace)
    route = await _route(request, loaded.capability, settings, trace)
    trace.upstream, trace.path = route.upstream.name, route.path
    correlation = facts.correlation(request, gate.session_id)
    trace.correlation = correlation
    if mcp.is_mcp(route):
        return await mcp.handle(request, mcp.Context(gate, settings, trace, loaded, route, correlation, now,
                                                     request.app[CLIENT], lambda: _injection(request, route.upstream),
                                                     request.app[MCP_SESSIONS], request.app[MCP_PENDING]))
    creds = gate.credentials(loaded, facts.narrowed_token(request), trace, now)
    gate.check_lockdown(loaded, request.method)
    facts.check_headers(request)
    body = await facts.limited_body(request, loaded.capability, route.upstream.name, route.query,
                                    settings.max_body_bytes)
    parsed = body.parsed if body is not None else None
    carried = split_header(request.headers.getall(facts.RECEIPT_HEADER, []))
    receipts = gate.receipts(loaded, carried, correlation, trace, now)
    verdict = gate.decide(creds, decision.Request(
        principal=loaded.principal, correlation=correlation, method=request.method, upstream=route.upstream.name,
        path=route.path, body=parsed, receipts=receipts.rules, unconsumed=receipts.unconsumed, now=now), trace)
    gate.enforce(loaded, verdict, trace)
    deposited = await gate.charge(loaded, route.upstream.name, parsed, trace)
    return await _forward(request, gate, loaded, route, verdict, receipts, correlation, body.raw if body else None,
                          deposited)


async def _route(request: web.Request, cap: spec.Capability, settings: Settings, trace: Trace) -> routing.Route:
    """Path/absolute form on the agent port; the original destination on the outbound listener."""
    outbound = request.app[EGRESS]
    if outbound is not None:
        captured = outbound.captured(request)
        if captured is not None:
            return await outbound.route(request, captured, cap, trace)
    return routing.resolve(request.raw_path, cap, settings.upstream_urls)


def _injection(request: web.Request, upstream: spec.Upstream) -> proxy.Injection | None:
    if upstream.inject is None:
        return None
    value = request.app[SECRETS].get(upstream.name)
    if value is None:
        raise errors.SidecarError(502, "upstream_unavailable", "no_upstream_credential",
                                  f"no credential is configured for upstream {upstream.name!r}")
    return proxy.Injection(upstream.inject.header, upstream.inject.value_prefix + value)


async def _forward(request: web.Request, gate: Gate, loaded: Loaded, route: routing.Route,
                   verdict: decision.Decision, receipts: Receipts, correlation: str, body: bytes | None,
                   deposited: bool) -> web.StreamResponse:
    trace: Trace = request[TRACE]
    metered = response_budgets(loaded.capability, route.upstream.name)
    tap = ResponseTap(metered) if metered else None
    try:
        # After charging, so a call its budget refuses spends no receipt; inside the try, so a call
        # whose receipt is refused gets its deposit back (settled unforwarded: 0).
        await gate.consume(loaded, verdict, receipts, trace)
        return await _send(request, gate, loaded, route, verdict, correlation, body, tap)
    finally:  # every way out — relayed, cut short, 502/504, the agent gone — is charged (sync: safe on cancel)
        if tap is not None:
            gate.settle(loaded, metered, tap, trace, deposited=deposited)


async def _send(request: web.Request, gate: Gate, loaded: Loaded, route: routing.Route,
                verdict: decision.Decision, correlation: str, body: bytes | None,
                tap: ResponseTap | None) -> web.StreamResponse:
    trace: Trace = request[TRACE]
    injection = _injection(request, route.upstream)
    trust = request.app[TRUST].context(route.upstream)

    def extra_headers(status: int) -> dict[str, str]:
        headers = {facts.DECISION_HEADER: trace.decision_id}
        if 200 <= status < 300 and verdict.allowed and verdict.rule:
            receipt = gate.mint_receipt(loaded, verdict.rule, correlation, trace)
            if receipt is not None:
                headers[facts.RECEIPT_HEADER] = receipt
        return headers

    def observe(seconds: float) -> None:
        gate.metrics.upstream_time(route.upstream.name, seconds)

    response = await proxy.forward(request, route, client=request.app[CLIENT], body=body, injection=injection,
                                   response_headers=extra_headers, observe=observe, record=trace, trust=trust,
                                   tap=tap)
    trace.status = response.status
    return response


# -- control and admin --------------------------------------------------------------------------
ControlHandler = Callable[[web.Request, Gate, Trace], Awaitable[web.StreamResponse]]


def _control(func: ControlHandler) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        outbound = request.app[EGRESS]
        if not request.raw_path.startswith("/") or (outbound is not None and outbound.captured(request)):
            return await handle_proxy(request)  # absolute-form or captured: an upstream's path, not ours
        return await func(request, request.app[GATE], request[TRACE])
    return handler


async def unknown_control(request: web.Request, gate: Gate, trace: Trace) -> web.StreamResponse:
    trace.skip = True
    raise errors.SidecarError(404, "bad_request", "unknown_endpoint",
                              "no such capgate endpoint (authorize, attenuate, whoami under /_capgate/v1/)")


async def handle_metrics(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    current = gate.store.current
    if current is not None:
        gate.metrics.credential_expiry.set(current.credential.expires_at.timestamp())
        namespace = current.principal.partition("/")[0]
        locked = gate.revocations.lockdown_reason(namespace, current.capability.lockdown_after)
        gate.metrics.lockdown.set(1 if locked else 0)
    age = gate.revocations.age()
    gate.metrics.revocation_age.set(-1 if age is None else age)
    body, content_type = gate.metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Ready once the credential is valid and, with a revocation feed, the feed has been heard from:
    a pod must not start its agent before the sidecar knows what is revoked."""
    gate = request.app[GATE]
    ready, why = gate.store.ready()
    if ready and gate.revocations.has_source and gate.revocations.last_contact is None:
        ready, why = False, "waiting for the first RevocationList read"
    return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)
