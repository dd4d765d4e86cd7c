"""MCP on the agent port: one decision per JSON-RPC message, not per HTTP request.

On an upstream's declared MCP path (``upstreams[].mcp``) a POST carries exactly one JSON-RPC
message. It is read whole (bounded by ``--max-body-bytes``) by the core's one reader
(:mod:`capgate.capabilities.mcp`), checked against ``Mcp-Method``/``Mcp-Name``, and decided by the
same core as every other request: a tool call is the action ``mcp.call`` on
``mcp://<upstream>/<tool>`` with ``params.arguments`` as the body its limits, ``args`` and
budgets read. Protocol plumbing is implied; the GET stream and ``DELETE`` of a session pass.

A refusal keeps its HTTP status, and its body is a JSON-RPC error with the request's id whose
``data`` is capgate's error object, so an SDK user sees *why* (the middleware renders it from
:attr:`~capgate.sidecar.errors.SidecarError.jsonrpc`).

Answers are read as they come: a JSON answer whole (bounded), an SSE answer event by event
(passed on byte for byte: ``id:``, ``retry:`` and comment pings included). A receipt is minted for
an allowed ``tools/call`` only when the answer to *its* id is a success — a ``result`` that is not
``isError`` and not an unfinished multi-round-trip result — never for the transport's 200.
With a JSON answer the receipt also rides ``X-Capgate-Receipt``; with SSE the headers are gone by
then, so it is held by this sidecar for the correlation (which is what ``requires`` reads). A
2026-07-28 retry after an ``input_required`` result is decided again in full, but charged once per
call (:func:`_round_key`). An answer stream cut before its answer is awaited on the session's GET
stream that resumes it (``Last-Event-ID``); a replayed answer already delivered is dropped.

Each message is one audit record: JSON-RPC method, tool/URI, id, argument digest, outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from capgate.capabilities import bodies, decision, spec, tokens
from capgate.capabilities import mcp as core_mcp
from capgate.capabilities.errors import TokenError
from capgate.sidecar import errors, facts, proxy
from capgate.sidecar.config import Settings
from capgate.sidecar.credentials import Loaded
from capgate.sidecar.gate import Gate, Trace
from capgate.sidecar.mcp.sse import EOL, Event, SseEvents
from capgate.sidecar.mcp.state import SESSION_HEADER, Binding, Pending, Sessions
from capgate.sidecar.receipts import split_header
from capgate.sidecar.routing import Route
from capgate.sidecar.watch import RevocationState

__all__ = ["Context", "Pending", "Sessions", "handle", "is_mcp", "reap"]

log = logging.getLogger("capgate.sidecar.mcp")

MAX_JSON_ANSWER = 16 * 1024 * 1024
"""A JSON answer is read whole (to find its result); larger ones are refused (502), never cut."""
MAX_SSE_EVENT = 16 * 1024 * 1024
_STREAM_METHODS = frozenset({"GET", "DELETE"})


def _owner(trace: Trace) -> str:
    return f"narrowed:{trace.narrowed}" if trace.narrowed else "credential"


def _check_session(request: web.Request, ctx: Context) -> str | None:
    """The session id the request names (after checking it is this token's), or None.

    Streamable HTTP names it in ``Mcp-Session-Id``; the old transport in ``?session_id=`` of the
    message endpoint its stream announced.
    """
    values = request.headers.getall(SESSION_HEADER, [])
    if _is_messages(ctx):
        values = parse_qs(ctx.route.query).get("session_id", [])
    if not values:
        return None
    upstream = ctx.route.upstream.name
    binding = ctx.sessions.binding(upstream, values[0]) if len(values) == 1 else None
    # The tokens that opened it, not this request's: a credential rotated in after a revocation
    # must not inherit the revoked one's session (and the reaper may not have run yet).
    why = binding.ended() if binding is not None else None
    if why is not None:
        _closed(ctx.gate, ctx.pending, upstream, values[0], why, ctx.sessions.close(upstream, values[0], why))
    closed = ctx.sessions.closed(upstream, values[0]) if len(values) == 1 else None
    if closed is not None:
        raise errors.SidecarError(404, "bad_request", "session_closed",
                                  f"capgate closed this MCP session ({closed}); start a new one")
    if len(values) > 1 or not ctx.sessions.owned(upstream, values[0], _owner(ctx.trace)):
        raise errors.SidecarError(404, "bad_request", "unknown_session",
                                  "no MCP session with this id was opened by this token here; start a new one")
    return values[0]


SWEEP_SECONDS = 1.0
"""How often sessions are checked for expiry and lockdown by silence; a revocation or kill switch
wakes the sweep at once. (A session's next request is checked when it comes, whatever the sweep.)"""


async def reap(sessions: Sessions, pending: Pending, gate: Gate) -> None:
    """Close every session whose opening tokens were revoked, expired or locked down — woken by the
    RevocationList at once, and every :data:`SWEEP_SECONDS` for expiry and lockdown by silence — so
    the upstream holds nothing for a credential that can no longer act."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gate.revocations.changed.wait(), SWEEP_SECONDS)
        if len(sessions):
            for upstream, session, why, binding in sessions.close_ended():
                _closed(gate, pending, upstream, session, why, binding)


def _closed(gate: Gate, pending: Pending, upstream: str, session: str, why: str, binding: Binding | None) -> None:
    """Audit a closed session and end it on the upstream (streamable HTTP: DELETE with its id)."""
    log.info("closing an MCP session on %s: %s", upstream, why)
    gate.metrics.mcp_sessions_closed.labels(why).inc()
    gate.audit.write({"kind": "mcp", "upstream": upstream, "outcome": "closed", "reason": why,
                      "mcp": {"kind": "session_closed", "session_digest": core_mcp.digest(session)[:32]}})
    if binding is not None and binding.end is not None:
        pending.spawn(binding.end())


def _ender(ctx: Context, session: str) -> Callable[[], Coroutine[Any, Any, None]]:
    """DELETE of ``session`` on the upstream, as its owner would send it (the injected key included)."""
    url = URL(ctx.route.base_url + ctx.route.raw_path, encoded=True)
    name = ctx.route.upstream.name

    async def end() -> None:
        headers = {SESSION_HEADER: session}
        try:
            injection = ctx.injection()
            if injection is not None:
                headers[injection.header] = injection.value
            async with ctx.client.delete(url, headers=headers, allow_redirects=False,
                                         timeout=proxy.timeout(ctx.settings)) as reply:
                await reply.read()
        except (aiohttp.ClientError, TimeoutError, errors.SidecarError, RuntimeError) as exc:
            # RuntimeError: the client pool closed under us (the sidecar is shutting down).
            log.warning("could not end an MCP session on %s (%s)", name, type(exc).__name__)
    return end


def _is_messages(ctx: Context) -> bool:
    old = ctx.old_transport
    return old is not None and old.sse is not None and not spec.Mcp(path=old.sse).covers(ctx.route.path)


def is_mcp(route: Route) -> bool:
    """Does ``route`` address one of its upstream's MCP endpoints?"""
    return route.upstream.mcp is not None and route.upstream.mcp.covers(route.path)


@dataclass
class Context:
    """What the MCP handler needs from the app (kept explicit: this module does not import app)."""

    gate: Gate
    settings: Settings
    trace: Trace
    loaded: Loaded
    route: Route
    correlation: str
    now: datetime
    client: aiohttp.ClientSession
    injection: Callable[[], proxy.Injection | None]
    sessions: Sessions
    pending: Pending
    session: str | None = None
    """The MCP session this request belongs to (checked to be this token's), once known."""
    message: core_mcp.Message | None = None
    """The JSON-RPC message posted, once read."""
    trace_creds: list[tokens.Credential] = field(default_factory=list)
    """The verified tokens of this request (what a session it opens is bound to)."""

    @property
    def old_transport(self) -> spec.Mcp | None:
        mcp = self.route.upstream.mcp
        return mcp if mcp is not None and mcp.sse is not None else None


async def handle(request: web.Request, ctx: Context) -> web.StreamResponse:
    """Decide and forward one MCP HTTP request (raises SidecarError for refusals)."""
    ctx.trace.kind = "mcp"
    if request.method in _STREAM_METHODS:
        return await _plumbing(request, ctx)
    if request.method != "POST":
        raise errors.SidecarError(405, "bad_request", "mcp_method",
                                  "an MCP endpoint takes POST (messages), GET (the stream) and DELETE (a session)",
                                  headers={"Allow": "GET, POST, DELETE"})
    facts.check_headers(request)
    raw = await facts.read_bytes(request, ctx.settings.max_body_bytes)
    ident: core_mcp.JsonRpcId | None = None
    try:
        _check_envelope(request, ctx)
        message = core_mcp.parse(raw)
        ident = message.id
        core_mcp.check_headers(message, request.headers.getall(core_mcp.METHOD_HEADER, []),
                               request.headers.getall(core_mcp.NAME_HEADER, []))
        tool = message.params.get("name") if message.method == "tools/call" else None
        core_mcp.check_param_headers(message, request.headers.items(), ctx.pending.declared_headers(
            ctx.route.upstream.name, tool) if isinstance(tool, str) else None)
        target = core_mcp.target(message, ctx.route.upstream.name)
        cap = ctx.loaded.capability
        core_mcp.check_arguments(target.arguments, cap.limit_fields | cap.arg_fields)
    except core_mcp.McpError as exc:
        raise _rpc(errors.bad_request(exc.reason, exc.message), ident, exc.rpc_code) from None
    _describe(ctx.trace, message, target)
    ctx.message = message
    try:
        creds, verdict, session = await _decide(request, ctx, target)
    except errors.SidecarError as exc:
        refused = _rpc(exc, ident, core_mcp.DENIED)
        outbox = _old_outbox(ctx) if message.kind == "request" else None
        if outbox is None:
            raise refused from None
        return _refuse_on_stream(ctx, refused, outbox)
    if message.kind == "response" and (session is None or not ctx.pending.answer(ctx.route.upstream.name, session,
                                                                                  message.id)):
        raise _rpc(errors.SidecarError(403, "denied", "unknown_request_id",
                                       "this answers no request the server sent on this session"),
                   message.id, core_mcp.DENIED)
    exchange = Exchange(message, target, verdict, creds)
    if session is not None and _is_messages(ctx) and message.kind == "request":
        ctx.pending.add((ctx.route.upstream.name, session, json.dumps(message.id)), ctx, exchange)
    async with _cancel_on_hangup(request):
        return await _forward(request, ctx, raw, exchange)


@contextlib.asynccontextmanager
async def _cancel_on_hangup(request: web.Request) -> AsyncIterator[None]:
    """Cancel this handler (and so the upstream call) when the agent hangs up: capgate-sidecar's
    aiohttp does not cancel handlers itself, and a quiet tool call would run on for nobody."""
    handler = asyncio.current_task()

    async def watch() -> None:
        while True:
            await asyncio.sleep(GUARD_SECONDS)
            transport = request.transport
            if transport is None or transport.is_closing():
                if handler is not None:
                    handler.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


def _old_outbox(ctx: Context) -> asyncio.Queue[bytes] | None:
    """The stream of this token's old-transport session, if the message was posted for one."""
    if not _is_messages(ctx):
        return None
    sessions = parse_qs(ctx.route.query).get("session_id", [])
    upstream = ctx.route.upstream.name
    if len(sessions) != 1 or not ctx.sessions.owned(upstream, sessions[0], _owner(ctx.trace)):
        return None
    return ctx.pending.outbox(upstream, sessions[0])


def _refuse_on_stream(ctx: Context, refused: errors.SidecarError, outbox: asyncio.Queue[bytes]) -> web.Response:
    """The old transport's client takes answers only from its stream, and a non-2xx POST ends its
    writer for good: the refusal goes on the stream, the POST is accepted (202). The audit
    record keeps the refusal's status and reason."""
    trace = ctx.trace
    trace.status, trace.reason, trace.rule = refused.status, refused.reason, refused.rule or trace.rule
    if trace.outcome != "would_deny" or refused.status >= 500:
        trace.outcome = "error" if refused.status >= 500 and refused.error != "lockdown" else "denied"
    event = b"event: message\ndata: " + json_bytes(refused.body(trace.decision_id)) + b"\n\n"
    try:
        outbox.put_nowait(event)
    except asyncio.QueueFull:
        raise refused from None
    return web.Response(status=202, text="Accepted", headers={facts.DECISION_HEADER: trace.decision_id})


def _check_envelope(request: web.Request, ctx: Context) -> None:
    """What the body reader demands of any body it judges: JSON media type, no Content-Encoding,
    no ``_method`` or limited field in the query."""
    try:
        if request.headers.getall("Content-Encoding", []):
            raise bodies.BodyError("body_encoding", "an MCP message must not carry Content-Encoding: the sidecar "
                                                    "never decompresses")
        bodies.check_content_type(request.headers.getall("Content-Type", []))
        cap = ctx.loaded.capability
        bodies.check_query(ctx.route.query, cap.limit_fields | cap.arg_fields)
    except bodies.BodyError as exc:
        raise core_mcp.McpError(core_mcp.INVALID_REQUEST, exc.message, reason=exc.reason) from None


def _rpc(exc: errors.SidecarError, ident: core_mcp.JsonRpcId | None, code: int) -> errors.SidecarError:
    exc.jsonrpc = (ident, code)
    return exc


def _describe(trace: Trace, message: core_mcp.Message, target: core_mcp.Target) -> None:
    trace.action, trace.resource = target.action, target.resource
    record: dict[str, object] = {"kind": message.kind}
    if message.method is not None:
        record["method"] = message.method
    if target.name is not None and target.name != message.method:
        record["name"] = target.name
    if message.id is not None:
        record["id"] = message.id
    if target.arguments is not None:
        record["arguments_digest"] = core_mcp.digest(target.arguments)
    trace.mcp = record


def _describe_session(trace: Trace, session: str | None) -> None:
    """The session by digest: enough to group a session's records, never the id a caller could reuse."""
    if session is not None and trace.mcp is not None:
        trace.mcp["session_digest"] = core_mcp.digest(session)[:32]


async def _decide(request: web.Request, ctx: Context, target: core_mcp.Target
            ) -> tuple[list[tokens.Credential], decision.Decision | None, str | None]:
    """The verified tokens, the verdict (None for implied plumbing) and the session; raises for a refusal."""
    gate, loaded, trace = ctx.gate, ctx.loaded, ctx.trace
    creds = ctx.trace_creds = gate.credentials(loaded, facts.narrowed_token(request), trace, ctx.now)
    session = ctx.session = _check_session(request, ctx)
    _describe_session(trace, session)
    if target.implied:
        await gate.charge(loaded, None, None, trace)  # the rate limit counts every message
        trace.outcome, trace.reason = "allowed", "implied"
        return creds, None, session
    locked: errors.SidecarError | None = None
    try:
        gate.check_lockdown(loaded, request.method)
    except errors.SidecarError as exc:
        locked = exc  # decided first: a readOnly rule's tools go on during a lockdown
    _check_pinned_call(ctx, target)
    carried = split_header(request.headers.getall(facts.RECEIPT_HEADER, []))
    receipts = gate.receipts(loaded, carried, ctx.correlation, trace, ctx.now)
    paid = ctx.pending.retry_of(_round_key(ctx, target, message_state(ctx.message))) \
        if ctx.message is not None and target.action == core_mcp.CALL else None
    paid_rule = loaded.capability.rule(paid) if paid is not None else None
    spent = frozenset(paid_rule.consumes) if paid_rule is not None else frozenset()
    verdict = gate.decide(creds, decision.Request(
        principal=loaded.principal, correlation=ctx.correlation, action=target.action, resource=target.resource,
        body=dict(target.arguments) if target.arguments is not None else None, receipts=receipts.rules,
        unconsumed=receipts.unconsumed | spent, now=ctx.now), trace)
    if locked is not None:
        rule = loaded.capability.rule(verdict.rule) if verdict.allowed and verdict.rule else None
        if rule is None or not rule.read_only:
            raise locked
    gate.enforce(loaded, verdict, trace)
    if paid is not None and verdict.allowed and verdict.rule == paid:
        # The retry continues a call its first round paid for: charging its budgets or spending a
        # receipt again would count one call twice (and refuse a single-use gate's own retry).
        await gate.charge(loaded, None, None, trace)  # the rate limit counts every message
        if trace.mcp is not None:
            trace.mcp["continues"] = True
        return creds, verdict, session
    await gate.charge(loaded, ctx.route.upstream.name, target.arguments, trace,
                      tool=target.resource if target.action == core_mcp.CALL else None)
    await gate.consume(loaded, verdict, receipts, trace)
    return creds, verdict, session


def message_state(message: core_mcp.Message) -> str | None:
    """The ``requestState`` a 2026-07-28 retry echoes (opaque: compared, never read)."""
    state = message.params.get("requestState")
    return state if isinstance(state, str) else None


def _round_key(ctx: Context, target: core_mcp.Target, state: str | None) -> Hashable:
    """What a retry must repeat to continue a paid round: the same tokens, correlation, tool,
    arguments and the ``requestState`` the server returned."""
    arguments = core_mcp.digest(target.arguments) if target.arguments is not None else None
    return (ctx.route.upstream.name, _owner(ctx.trace), ctx.correlation, target.resource, arguments,
            core_mcp.digest(state) if state is not None else None)


_CALLABLE_REASONS = frozenset({"allowed", "limit_missing", "limit_exceeded", "missing_receipt", "receipt_consumed"})
"""Denials that depend on the call's arguments or order, not on the tool: the tool stays listed."""


def could_call(ctx: Context, creds: list[tokens.Credential], action: str, resource: str) -> bool:
    """Would some call of this tool (prompt, resource) be allowed under every token sent?

    Asked of the same decision core with every rule's receipt and no arguments: a tool whose rule
    needs a receipt or argument values is still listed; a denied or unnamed one is not.
    """
    cap = ctx.loaded.capability
    every = frozenset(rule.name for rule in cap.rules)
    request = decision.Request(principal=ctx.loaded.principal, correlation=ctx.correlation, action=action,
                               resource=resource, receipts=every, unconsumed=every, now=ctx.now,
                               body=_probe(cap.limit_fields))
    # Each token on its own: decide() stops at the first refusal, and a base credential's
    # "needs arguments" must not hide the narrowed token's "not this tool at all".
    return all(decision.decide([cred], request, revoked=ctx.gate.revocations.revoked_ids).reason in _CALLABLE_REASONS
               for cred in creds)


def _probe(fields: frozenset[str]) -> dict[str, object]:
    """Arguments that pass every limit (0 is within any ``0..max``): a narrowed token's lowered
    limit is a check that fails on missing arguments, which must not hide the tool from its list."""
    probe: dict[str, object] = {}
    for dotted in sorted(fields):
        node = probe
        *parents, last = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node.setdefault(last, 0)
    return probe


# -- forwarding --------------------------------------------------------------------------------
@dataclass
class Exchange:
    """One message on its way: what was asked, the verdict, and whether its answer was seen."""

    message: core_mcp.Message | None
    target: core_mcp.Target | None
    verdict: decision.Decision | None
    creds: list[tokens.Credential] = field(default_factory=list)
    answered: bool = False
    receipt: str | None = field(default=None, repr=False)


def _timeout(ctx: Context, streaming: bool) -> aiohttp.ClientTimeout:
    # A stream (the GET listen stream, a long tool call's SSE answer) is quiet for as long as the
    # server has nothing to say: neither the read nor the total timeout may cut it.
    if streaming:
        return aiohttp.ClientTimeout(total=None, sock_connect=ctx.settings.connect_timeout, sock_read=None)
    return proxy.timeout(ctx.settings)


async def _send(request: web.Request, ctx: Context, body: bytes | None) -> aiohttp.ClientResponse:
    headers = proxy.outgoing_headers(request.headers, ctx.injection(), body is not None)
    name = ctx.route.upstream.name
    try:
        # trace_request_ctx: once the headers are sent the call may act upstream (proxy marks it forwarded)
        return await ctx.client.request(request.method, URL(ctx.route.target, encoded=True), headers=headers,
                                        data=body, allow_redirects=False, trace_request_ctx=ctx.trace,
                                        timeout=_timeout(ctx, request.method == "GET" or body is not None))
    except TimeoutError as exc:
        raise errors.SidecarError(504, "upstream_timeout", "timeout", f"upstream {name!r} did not answer in time") \
            from exc
    except aiohttp.ClientError as exc:
        raise errors.SidecarError(502, "upstream_unavailable", "unreachable", f"upstream {name!r} is unavailable") \
            from exc


async def _plumbing(request: web.Request, ctx: Context) -> web.StreamResponse:
    """The GET stream and DELETE of a session: implied by the upstream, still token-checked (and
    refused, like any request, for non-UTF-8 headers or ``_method`` in the query)."""
    facts.check_headers(request)
    try:
        cap = ctx.loaded.capability
        bodies.check_query(ctx.route.query, cap.limit_fields | cap.arg_fields)
    except bodies.BodyError as exc:
        raise errors.bad_request(exc.reason, exc.message) from None
    creds = ctx.trace_creds = ctx.gate.credentials(ctx.loaded, facts.narrowed_token(request), ctx.trace, ctx.now)
    ctx.trace.mcp = {"kind": "stream" if request.method == "GET" else "session_end"}
    session = ctx.session = _check_session(request, ctx)
    _describe_session(ctx.trace, session)
    ctx.trace.outcome, ctx.trace.reason = "allowed", "implied"
    if request.body_exists:
        raise errors.bad_request("mcp_body", f"an MCP {request.method} carries no body")
    response = await _forward(request, ctx, None, Exchange(None, None, None, creds))
    if request.method == "DELETE" and session is not None and 200 <= response.status < 300:
        ctx.sessions.forget(ctx.route.upstream.name, session)
    return response


async def _forward(request: web.Request, ctx: Context, body: bytes | None, exchange: Exchange) -> web.StreamResponse:
    upstream = await _send(request, ctx, body)
    trace = ctx.trace
    trace.status = trace.upstream_status = upstream.status
    opened = upstream.headers.getall(SESSION_HEADER, [])
    if len(opened) == 1 and not request.headers.get(SESSION_HEADER):
        ended, identity = _watch(ctx, exchange.creds)
        ctx.sessions.bind(ctx.route.upstream.name, opened[0], _owner(trace), ended, _ender(ctx, opened[0]), identity)
    async with upstream:
        headers = proxy.incoming_headers(upstream.headers)
        headers[facts.DECISION_HEADER] = trace.decision_id
        media = upstream.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if media == "application/json" and exchange.message is not None:
            return await _json_answer(ctx, upstream, headers, exchange)
        if media == "text/event-stream":
            return await _sse_answer(request, ctx, upstream, headers, exchange)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(proxy.CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _json_answer(ctx: Context, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str],
                       exchange: Exchange) -> web.StreamResponse:
    data = bytearray()
    async for chunk in upstream.content.iter_chunked(proxy.CHUNK):
        data.extend(chunk)
        if len(data) > MAX_JSON_ANSWER:
            raise errors.SidecarError(502, "upstream_unavailable", "answer_too_large",
                                      f"the MCP answer is larger than {MAX_JSON_ANSWER} bytes")
    replaced = _observe(ctx, exchange, bytes(data))
    headers.popall("Content-Length", None)
    if exchange.receipt is not None:
        headers[facts.RECEIPT_HEADER] = exchange.receipt
    return web.Response(status=upstream.status, reason=upstream.reason, body=replaced or bytes(data), headers=headers)


async def _sse_answer(request: web.Request, ctx: Context, upstream: aiohttp.ClientResponse,
                      headers: CIMultiDict[str], exchange: Exchange) -> web.StreamResponse:
    headers.popall("Content-Length", None)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    events = SseEvents(MAX_SSE_EVENT)
    stream = OldStream(request, ctx) if exchange.message is None and ctx.old_transport is not None else None
    lock = asyncio.Lock()  # whole events only: the sidecar's own never land inside the upstream's
    pump: asyncio.Task[None] | None = None
    guard = asyncio.create_task(_guard(ctx, exchange.creds, upstream, request))
    try:
        async for chunk in upstream.content.iter_any():
            for event in events.feed(chunk):
                async with lock:
                    await response.write(_relay(ctx, exchange, stream, event))
            if stream is not None and stream.outbox is not None and pump is None:
                pump = asyncio.create_task(_pump(stream.outbox, response, lock))
        for event in events.feed(b"", final=True):
            async with lock:
                await response.write(_relay(ctx, exchange, stream, event))
        await response.write(events.rest())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        if guard.done() and not guard.cancelled():
            await response.write_eof()  # closed by the guard: a clean end the SDK reconnects after (and gets 401)
            return response
        log.warning("MCP stream from %s ended badly (%s); aborting the agent's connection",
                    ctx.route.upstream.name, type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        guard.cancel()
        if pump is not None:
            pump.cancel()
        _await_resumption(ctx, exchange)
        if stream is not None and stream.session is not None:
            ctx.pending.close_outbox(ctx.route.upstream.name, stream.session)
    await response.write_eof()
    return response


def _await_resumption(ctx: Context, exchange: Exchange) -> None:
    """A request's answer stream that ended before its answer may be resumed on the session's GET
    stream (``Last-Event-ID``): its answer is awaited there."""
    message = exchange.message
    if (message is None or message.kind != "request" or exchange.answered or ctx.session is None
            or ctx.old_transport is not None):
        return
    ctx.pending.add((ctx.route.upstream.name, ctx.session, json.dumps(message.id)), ctx, exchange)


def _relay(ctx: Context, exchange: Exchange, stream: OldStream | None, event: Event) -> bytes:
    """What the agent gets for one upstream event: as sent, filtered, or a comment in its place."""
    session = stream.session if stream is not None else ctx.session
    if event.data is not None and not _server_asks(ctx, exchange.creds, event.data, session, stream):
        return b": capgate refused a server request (no rule allows it)\n\n"
    replaced = None
    if stream is not None:
        replaced = stream.event(event)
    elif event.data is not None and exchange.message is None:
        return _resumed(ctx, event)
    elif event.data is not None:
        replaced = _observe(ctx, exchange, event.data.encode("utf-8", "surrogatepass"))
    return event.raw if replaced is None else event.with_data(replaced)


def _resumed(ctx: Context, event: Event) -> bytes:
    """An event on a streamable HTTP GET stream. An answer there is a resumed (``Last-Event-ID``)
    answer stream's: judged as its request's own stream would have (a list filtered, a receipt
    minted), once. An answer to nothing still waiting — delivered already, or never asked here —
    is dropped (its ``id:`` kept, so the client resumes after it): a replay must neither mint a
    second receipt nor carry an unfiltered list."""
    assert event.data is not None
    data = event.data.encode("utf-8", "surrogatepass")
    try:
        answer = core_mcp.parse(data)
    except core_mcp.McpError:
        return event.raw
    if answer.kind != "response":
        return event.raw
    found = None
    if ctx.session is not None:
        found = ctx.pending.pop((ctx.route.upstream.name, ctx.session, json.dumps(answer.id)))
    if found is None:
        kept = [line for line in EOL.split(event.raw) if line.startswith(b"id:")]
        return b"".join(line + b"\n" for line in kept) + b": capgate dropped an answer already delivered\n\n"
    replaced = _observe(found[0], found[1], data)
    if ctx.trace.mcp is not None:
        ctx.trace.mcp["resumed"] = answer.id
    if found[1].receipt is not None:
        ctx.trace.receipt_minted = True
    return event.raw if replaced is None else event.with_data(replaced)


SERVER_IMPLIED = frozenset({"ping", "elicitation/create"})
"""Server-to-client requests that need no rule; sampling, roots and anything else need ``mcp.rpc``."""


def _server_asks(ctx: Context, creds: list[tokens.Credential], data: str, session: str | None,
                 stream: OldStream | None) -> bool:
    """False when ``data`` is a server-to-client request no rule allows (it is then answered with
    an error on the client's behalf and never shown to the agent); True otherwise.

    An allowed request's id is remembered for the session, so only answers to real ids pass.
    """
    try:
        message = core_mcp.parse(data.encode("utf-8", "surrogatepass"))
    except core_mcp.McpError:
        return True
    upstream = ctx.route.upstream.name
    if message.kind == "notification" and message.method == "notifications/tools/list_changed":
        ctx.pending.forget_definitions(upstream)  # pinned tools wait for the next list to be checked again
    if message.kind != "request" or message.method is None:
        return True
    allowed = message.method in SERVER_IMPLIED
    if not allowed:
        try:
            resource = core_mcp.resource(upstream, message.method, what="method")
        except core_mcp.McpError:
            resource = None
        allowed = resource is not None and decision.decide(creds, decision.Request(
            principal=ctx.loaded.principal, correlation=ctx.correlation, action=core_mcp.RPC, resource=resource,
            now=datetime.now(UTC)), revoked=ctx.gate.revocations.revoked_ids).allowed
    if allowed:
        if session is not None:
            ctx.pending.ask(upstream, session, message.id)
        return True
    log.info("refused server request %s on %s", message.method, upstream)
    ctx.pending.spawn(_refuse_for_client(ctx, message, session, stream))
    return False


async def _refuse_for_client(ctx: Context, message: core_mcp.Message, session: str | None,
                             stream: OldStream | None) -> None:
    """Tell the server the client declined, so a tool waiting for sampling fails instead of hanging."""
    body = json_bytes(core_mcp.error_message(message.id, core_mcp.DENIED,
                                             f"capgate: no rule allows the server request {message.method}"))
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if stream is not None and stream.endpoint is not None:
        origin = urlsplit(ctx.route.base_url)
        url = f"{origin.scheme}://{origin.netloc}{stream.endpoint}"
    else:
        url = ctx.route.base_url + ctx.route.raw_path
        if session is not None:
            headers[SESSION_HEADER] = session
    injection = ctx.injection()
    if injection is not None:
        headers[injection.header] = injection.value
    try:
        async with ctx.client.post(URL(url, encoded=True), data=body, headers=headers, allow_redirects=False) as reply:
            await reply.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("could not refuse a server request on %s (%s)", ctx.route.upstream.name, type(exc).__name__)


GUARD_SECONDS = 0.25
"""How often an open stream re-checks lockdown by silence and expiry; revocations wake it at once."""


async def _guard(ctx: Context, creds: list[tokens.Credential], upstream: aiohttp.ClientResponse,
                 request: web.Request) -> None:
    """Close a stream when its tokens are revoked or expire, the sidecar locks down, or the agent
    hangs up (a quiet stream would otherwise hold the upstream request open forever).

    A stream outlives the decision that opened it; what it carries afterwards (server requests,
    notifications, a long tool call's progress) must stop when the credential stops.
    """
    state = ctx.gate.revocations
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.changed.wait(), GUARD_SECONDS)
        transport = request.transport
        why = "client_disconnected" if transport is None or transport.is_closing() else _stream_end(ctx, creds)
        if why is not None:
            log.info("closing an MCP stream of %s: %s", ctx.trace.decision_id, why)
            if ctx.trace.mcp is not None:
                ctx.trace.mcp["closed"] = why
            upstream.close()
            return


def _stream_end(ctx: Context, creds: list[tokens.Credential]) -> str | None:
    return _ended(ctx.gate.revocations, creds, ctx.loaded.principal.partition("/")[0],
                  ctx.loaded.capability.lockdown_after)


def _ended(state: RevocationState, creds: list[tokens.Credential], namespace: str,
           lockdown_after: timedelta) -> str | None:
    """Why these tokens can no longer act here (revoked, expired, ..., lockdown), or None."""
    now = datetime.now(UTC)
    for cred in creds:
        try:
            decision.check_validity(cred, now, revoked=state.revoked_ids)
        except TokenError as exc:
            return exc.reason
    return "lockdown" if state.lockdown_reason(namespace, lockdown_after) else None


def _watch(ctx: Context, creds: list[tokens.Credential]) -> tuple[Callable[[], str | None], Hashable]:
    """How a session's end is told from its opening tokens alone (a session outlives its request,
    so nothing of the request is kept), and those tokens' identity (their revocation ids)."""
    state, kept = ctx.gate.revocations, list(creds)
    namespace, lockdown_after = ctx.loaded.principal.partition("/")[0], ctx.loaded.capability.lockdown_after
    identity = (namespace, lockdown_after, tuple(tuple(cred.revocation_ids) for cred in kept))
    return (lambda: _ended(state, kept, namespace, lockdown_after)), identity


async def _pump(outbox: asyncio.Queue[bytes], response: web.StreamResponse, lock: asyncio.Lock) -> None:
    while True:
        event = await outbox.get()
        async with lock:
            await response.write(event)


def _observe(ctx: Context, exchange: Exchange, data: bytes) -> bytes | None:
    """Look at one answer message: the answer to our request may be filtered (a list) or mint its
    receipt (a successful tool call). Returns the bytes to send instead, or None to pass it on."""
    if exchange.answered or exchange.message is None or exchange.message.kind != "request":
        return None
    try:
        answer = core_mcp.parse(data)
    except core_mcp.McpError:
        return None  # not a message we must understand; the agent's SDK judges it
    if answer.kind != "response" or answer.id != exchange.message.id:
        return None
    exchange.answered = True
    verdict, target = exchange.verdict, exchange.target
    if target is not None and target.method == "tools/list":
        _learn_headers(ctx, answer.document)
    if target is not None and target.listing is not None and ctx.loaded.capability.mode == "enforce":
        return _filtered(ctx, exchange, answer)
    if verdict is None or not verdict.allowed or verdict.rule is None:
        return None
    state = _input_required_state(answer.document)
    if target is not None and target.action == core_mcp.CALL and state is not None:
        ctx.pending.paid_round(_round_key(ctx, target, state), verdict.rule)
    if not succeeded(answer.document):
        return None
    if target is not None and target.action == core_mcp.CALL:
        exchange.receipt = ctx.gate.mint_receipt(ctx.loaded, verdict.rule, ctx.correlation, ctx.trace)
    return None


def _filtered(ctx: Context, exchange: Exchange, answer: core_mcp.Message) -> bytes | None:
    method = exchange.message.method if exchange.message is not None else None
    assert method is not None

    def may(action: str, resource: str) -> bool:
        return could_call(ctx, exchange.creds, action, resource)

    source = _check_pins(ctx, answer.document) if method == "tools/list" else answer.document
    document = core_mcp.filter_list(source, method, ctx.route.upstream.name, may)
    return None if document is None else json_bytes(document)


def _learn_headers(ctx: Context, document: Mapping[str, object]) -> None:
    """Remember the ``Mcp-Param-*`` headers each listed tool declares: the SDK's client mirrors
    exactly those from a list's schemas, so they are all its calls may carry."""
    result = document.get("result")
    tools = result.get("tools") if isinstance(result, Mapping) else None
    for tool in tools if isinstance(tools, list) else []:
        name = tool.get("name") if isinstance(tool, Mapping) else None
        if isinstance(tool, Mapping) and isinstance(name, str):
            ctx.pending.declare_headers(ctx.route.upstream.name, name, core_mcp.param_headers(tool.get("inputSchema")))


def _check_pins(ctx: Context, document: Mapping[str, object]) -> Mapping[str, object]:
    """Compare each listed tool that has a pin with it: a changed one is hidden, remembered (its
    calls are refused) and counted; a matching one is remembered as verified."""
    mcp = ctx.route.upstream.mcp
    result = document.get("result")
    if mcp is None or not mcp.pins or not isinstance(result, Mapping) or not isinstance(result.get("tools"), list):
        return document
    upstream = ctx.route.upstream.name
    kept: list[object] = []
    changed: list[str] = []
    for tool in result["tools"]:
        name = tool.get("name") if isinstance(tool, Mapping) else None
        pin = mcp.pin(name) if isinstance(name, str) else None
        if pin is None or not isinstance(name, str) or not isinstance(tool, Mapping):
            kept.append(tool)
            continue
        matches = core_mcp.definition_pin(tool) == pin
        ctx.pending.verified(upstream, name, matches)
        if matches:
            kept.append(tool)
        else:
            changed.append(name)
            ctx.gate.metrics.mcp_definition_changed.labels(upstream).inc()
    if changed:
        log.warning("MCP tools on %s differ from their pins and are hidden: %s", upstream, ", ".join(changed))
        if ctx.trace.mcp is not None:
            ctx.trace.mcp["definition_changed"] = changed
    return {**document, "result": {**result, "tools": kept}}


def _check_pinned_call(ctx: Context, target: core_mcp.Target) -> None:
    """A pinned tool is called only after a list showed its definition matching the pin."""
    mcp = ctx.route.upstream.mcp
    if mcp is None or target.action != core_mcp.CALL or target.name is None or mcp.pin(target.name) is None:
        return
    if ctx.loaded.capability.mode == "audit":
        return  # lists are not rewritten in audit mode, so nothing was checked
    if ctx.trace.mcp is not None:
        ctx.trace.mcp["pin"] = mcp.pin(target.name)
    state = ctx.pending.is_verified(ctx.route.upstream.name, target.name)
    if state is not True:
        why = ("its definition differs from its pin" if state is False
               else "its definition has not been checked against its pin yet (list the tools first)")
        raise errors.SidecarError(403, "denied", "definition_changed", f"tool {target.name!r} is refused: {why}")


class OldStream:
    """The old transport's GET stream: announces the message endpoint, then carries the answers.

    The ``endpoint`` event names a path on the upstream's origin; the agent resolves it against the
    sidecar's URL, so it is rewritten to stay under the upstream's prefix (``/<upstream>/...``),
    and its session is bound to the token that opened the stream. Answers are matched to the
    requests posted for that session (:class:`Pending`).
    """

    def __init__(self, request: web.Request, ctx: Context) -> None:
        self.ctx = ctx
        agent_path = urlsplit(request.raw_path).path
        route = ctx.route
        self.prefix = agent_path[:-len(route.raw_path)] if agent_path.endswith(route.raw_path) else ""
        self.base = urlsplit(route.base_url).path.rstrip("/")
        self.session: str | None = None
        self.outbox: asyncio.Queue[bytes] | None = None
        self.endpoint: str | None = None
        """The message endpoint as the upstream named it (where the sidecar itself posts replies)."""

    def event(self, event: Event) -> bytes | None:
        if event.data is None:
            return None
        if event.name == "endpoint":
            return self._endpoint(event.data)
        if self.session is None:
            return None
        data = event.data.encode("utf-8", "surrogatepass")
        try:
            answer = core_mcp.parse(data)
        except core_mcp.McpError:
            return None
        if answer.kind != "response":
            return None
        found = self.ctx.pending.pop((self.ctx.route.upstream.name, self.session, json.dumps(answer.id)))
        return None if found is None else _observe(found[0], found[1], data)

    def _endpoint(self, data: str) -> bytes:
        if not data.startswith("/") or data.startswith("//") or "://" in data:
            raise ValueError("the MCP endpoint event is not a path on the upstream's origin")
        self.endpoint = data
        path = data[len(self.base):] if self.base and data.startswith(self.base + "/") else data
        sessions = parse_qs(urlsplit(path).query).get("session_id", [])
        if len(sessions) == 1:
            self.session = sessions[0]
            ctx = self.ctx
            # The old transport's session is its stream: the stream guard ends it upstream.
            ended, identity = _watch(ctx, ctx.trace_creds)
            ctx.sessions.bind(ctx.route.upstream.name, self.session, _owner(ctx.trace), ended, tokens=identity)
            self.outbox = self.ctx.pending.open_outbox(self.ctx.route.upstream.name, self.session)
        return (self.prefix + path).encode("utf-8")


def _input_required_state(document: Mapping[str, object]) -> str | None:
    """The ``requestState`` of an ``input_required`` result, or None."""
    result = document.get("result")
    if not isinstance(result, Mapping) or result.get("resultType") != "input_required":
        return None
    state = result.get("requestState")
    return state if isinstance(state, str) else None


def succeeded(document: Mapping[str, object]) -> bool:
    """A tool result that is a success: a ``result``, not ``isError``, not waiting for more input."""
    result = document.get("result")
    if not isinstance(result, Mapping) or result.get("isError", False) is not False:
        return False
    return bool(result.get("resultType", "complete") == "complete")


def json_bytes(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
