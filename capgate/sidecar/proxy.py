"""Forwarding an allowed request upstream, honestly: streamed both ways, nothing added but the key.

What changes on the way out: the agent's ``Authorization`` and ``Proxy-Authorization``, every
hop-by-hop header (``Connection`` and the headers it names, ``Keep-Alive``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade``, ``Proxy-Connection``), the method-override headers
(``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override``: Rails, Symfony, ASP.NET and
Express would turn the POST that was allowed into the DELETE a rule denies) and every
``X-Capgate-*`` header are dropped; the upstream credential is injected. Nothing is added: the
client's automatic ``Accept``, ``Accept-Encoding``, ``User-Agent`` and ``Content-Type:
application/octet-stream`` are switched off, so the upstream sees the agent's headers, not ours.

On the way back hop-by-hop and ``X-Capgate-*`` headers from the upstream are dropped (an upstream
must not be able to hand the agent something that looks like a receipt), and the sidecar's own
decision id and receipt are added.

No redirects are followed (a redirect is the upstream's answer, the agent decides whether to make
a new — separately authorized — request), nothing is decompressed, and connect/read/total timeouts
apply. Failures before the response starts become 502 ``upstream_unavailable`` / 504
``upstream_timeout``; a failure mid-stream can only abort the connection, which the agent sees as
a truncated response rather than a silently shortened one.

**Once the request has reached the upstream, the call may have executed** (a charge ran), so from
that moment on nothing is recorded as denied: the client's ``on_request_headers_sent`` trace marks
the caller's :class:`Record` ``forwarded`` the moment the request head is written — a refused
connect or a full pool is not forwarded; a reset, a timeout or a bad answer after it is. A response
head the sidecar cannot relay byte for byte — a control byte or a byte that is not UTF-8 in a header
or the reason phrase, which aiohttp would refuse (``ValueError``) or silently drop — is 502
``bad_response``, never a rewritten header. A non-idempotent call that failed after it was sent also
carries ``X-Should-Retry: false`` (the retry hint the OpenAI/Anthropic clients obey), because a blind
retry would run the charge twice. For the same reason a 2xx answer's receipt is minted and held even
when its head cannot be relayed: the step did happen upstream, and a ``requires`` gate that forgot it
would push the agent to run it again.
"""

from __future__ import annotations

import io
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from capgate.sidecar import errors
from capgate.sidecar.config import Settings
from capgate.sidecar.routing import Route

log = logging.getLogger("capgate.sidecar.proxy")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization"})
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
REQUEST_DROP = HOP_BY_HOP | METHOD_OVERRIDES | {"authorization", "host", "expect"}
AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
"""What aiohttp's client would add on its own; an agent's own values are still forwarded."""
CAPGATE_PREFIX = "x-capgate-"
CHUNK = 64 * 1024
LARGE_BYTES = 1024 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 §9.2.2: the methods a client may retry without asking; every other one gets a no-retry hint."""
NO_RETRY = {"X-Should-Retry": "false"}
TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
"""RFC 9110 §5.6.2 ``tchar``: what a header name may hold."""


class Tap(Protocol):
    """Sees the response as it is relayed (response budgets read usage from it); never changes it."""

    def start(self, status: int, headers: CIMultiDictProxy[str]) -> None: ...

    def feed(self, chunk: bytes) -> None: ...

    def complete(self) -> None:
        """The whole body reached the agent."""


class Record(Protocol):
    """What forwarding tells the request's audit record (the sidecar's ``Trace`` is one)."""

    forwarded: bool
    upstream_status: int | None
    status: int | None
    """What the agent got: set as soon as the response head is on its way."""
    reason: str


@dataclass(frozen=True)
class Injection:
    header: str
    value: str


def connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    """Headers named in ``Connection`` are hop-by-hop too (RFC 9110 §7.6.1)."""
    listed: set[str] = set()
    for value in headers.getall("Connection", []):
        listed.update(part.strip().lower() for part in value.split(",") if part.strip())
    return listed


def outgoing_headers(incoming: CIMultiDictProxy[str], injection: Injection | None,
                     body_buffered: bool) -> CIMultiDict[str]:
    drop = REQUEST_DROP | connection_listed(incoming)
    if body_buffered:
        drop = drop | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or lower.startswith(CAPGATE_PREFIX):
            continue
        if injection is not None and lower == injection.header.lower():
            continue
        out.add(name, value)
    if injection is not None:
        out[injection.header] = injection.value
    return out


def incoming_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | connection_listed(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in drop or lower.startswith(CAPGATE_PREFIX):
            continue
        out.add(name, value)
    return out


def timeout(settings: Settings) -> aiohttp.ClientTimeout:
    # sock_connect, not connect: aiohttp's ``connect`` also counts waiting for a free pooled
    # connection, so under load (more agent requests in flight than the pool holds) healthy calls
    # failed with 504 after --connect-timeout. Waiting for the pool is bounded by --total-timeout.
    return aiohttp.ClientTimeout(total=settings.total_timeout, sock_connect=settings.connect_timeout,
                                 sock_read=settings.read_timeout)


def new_client(settings: Settings) -> aiohttp.ClientSession:
    """One pooled session per app: keep-alive to upstreams is most of the proxy's speed."""
    connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=60, enable_cleanup_closed=False)
    sent = aiohttp.TraceConfig()
    sent.on_request_headers_sent.append(_headers_sent)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=timeout(settings),
                                 cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=AUTO_HEADERS,
                                 trace_configs=[sent])


async def _headers_sent(session: aiohttp.ClientSession, context: SimpleNamespace,
                        params: aiohttp.TraceRequestHeadersSentParams) -> None:
    record = context.trace_request_ctx
    if record is not None:
        record.forwarded = True


async def forward(request: web.Request, route: Route, *, client: aiohttp.ClientSession, body: bytes | None,
                  injection: Injection | None, response_headers: Callable[[int], Mapping[str, str]],
                  observe: Callable[[float], None], record: Record,
                  trust: ssl.SSLContext | None = None, tap: Tap | None = None) -> web.StreamResponse:
    """Send the request upstream and stream the answer back, telling ``record`` what happened.

    ``trust`` verifies an https upstream that declares its own CA (:mod:`capgate.sidecar.trust`);
    None keeps the client's default verification. Verification is never turned off.
    With a ``tap`` (a response budget reads this answer) the upstream is asked for
    ``Accept-Encoding: identity``: the sidecar never decompresses, and a compressed answer's usage
    could not be read (it would be charged its worst case).
    """
    data: bytes | io.BytesIO | aiohttp.StreamReader | None = body
    if body is not None and len(body) > LARGE_BYTES:
        data = io.BytesIO(body)  # aiohttp warns about (and may block on) big raw bytes payloads
    if body is None and request.body_exists:
        data = request.content
    headers = outgoing_headers(request.headers, injection, body is not None)
    if tap is not None:
        headers["Accept-Encoding"] = "identity"
    started = time.perf_counter()
    try:
        upstream = await client.request(request.method, URL(route.target, encoded=True), headers=headers,
                                        data=data, allow_redirects=False, trace_request_ctx=record,
                                        ssl=trust if trust is not None else True)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _request_failed(request, route, exc, sent=record.forwarded) from exc
    observe(time.perf_counter() - started)
    async with upstream:
        record.upstream_status = upstream.status
        return await _relay(request, route, upstream, response_headers(upstream.status), record, tap)


async def _relay(request: web.Request, route: Route, upstream: aiohttp.ClientResponse,
                 extra: Mapping[str, str], record: Record, tap: Tap | None) -> web.StreamResponse:
    bad = unrelayable(upstream)
    if bad is not None:
        log.warning("upstream %s answered %d with %s; refused with 502", route.upstream.name, upstream.status, bad)
        raise errors.SidecarError(
            502, "upstream_unavailable", "bad_response",
            f"upstream {route.upstream.name!r} answered {upstream.status}, but with {bad}, which cannot be "
            "relayed faithfully; the call reached the upstream and may have taken effect", headers=_hint(request))
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=incoming_headers(upstream.headers))
    response.headers.update(extra)
    try:
        await response.prepare(request)
    except ValueError as exc:  # aiohttp's own header check, should unrelayable() ever miss a case
        raise errors.SidecarError(502, "upstream_unavailable", "bad_response",
                                  f"upstream {route.upstream.name!r} answered {upstream.status} with a head that "
                                  "cannot be relayed; the call reached the upstream and may have taken effect",
                                  headers=_hint(request)) from exc
    except ConnectionError as exc:
        record.reason = "client_disconnected"
        log.info("agent went away before the response of %s started (%s)", route.upstream.name, type(exc).__name__)
        return response
    record.status = response.status
    if tap is not None:
        tap.start(upstream.status, upstream.headers)
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            if tap is not None:
                tap.feed(chunk)
            await response.write(chunk)
        await response.write_eof()
        if tap is not None:
            tap.complete()
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        # Writing to a gone agent raises ConnectionResetError (aiohttp's ClientConnectionResetError is
        # one); the upstream giving out surfaces as ClientPayloadError, ServerDisconnectedError or a timeout.
        agent_side = isinstance(exc, ConnectionError)
        record.reason = "client_disconnected" if agent_side else "reset_mid_response"
        log.warning("%s failed mid-response from upstream %s (%s); aborting the agent's connection",
                    "the agent" if agent_side else "the upstream", route.upstream.name, type(exc).__name__)
        _abort(request)
    except Exception as exc:  # noqa: BLE001 - the head is out: no error response can follow it
        record.reason = "relay_failed"
        log.error("relaying upstream %s failed mid-response (%s); aborting the agent's connection",
                  route.upstream.name, type(exc).__name__)
        _abort(request)
    return response


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def unrelayable(upstream: aiohttp.ClientResponse) -> str | None:
    """Why the response head cannot be relayed byte for byte, or None.

    aiohttp's client decodes header bytes that are not UTF-8 as lone surrogates, which its server
    side then drops without a word, and it refuses control bytes with ``ValueError`` only at
    ``prepare()``. Either way the agent would read something other than what the upstream said.
    """
    if not _text_ok(upstream.reason or ""):
        return "a control or non-UTF-8 byte in its reason phrase"
    for name, value in upstream.headers.items():
        if not name or not set(name) <= TOKEN_CHARS:
            return "an invalid header name"
        if not _text_ok(value):
            return "a control or non-UTF-8 byte in a header value"
    return None


def _text_ok(text: str) -> bool:
    """Field values and reason phrases: HTAB, SP, VCHAR, obs-text (RFC 9110 §5.5), as valid UTF-8."""
    return all(char == "\t" or (" " <= char != "\x7f" and not "\ud800" <= char <= "\udfff") for char in text)


def _hint(request: web.Request) -> dict[str, str]:
    return {} if request.method.upper() in IDEMPOTENT else NO_RETRY


def _request_failed(request: web.Request, route: Route, exc: Exception, *, sent: bool) -> errors.SidecarError:
    """502/504; once the request was sent, say it may have taken effect and discourage blind retries."""
    name = route.upstream.name
    caveat = "; the request reached it and may have taken effect" if sent else ""
    headers = _hint(request) if sent else {}
    if isinstance(exc, TimeoutError):
        return errors.SidecarError(504, "upstream_timeout", "timeout", f"upstream {name!r} did not answer in time"
                                   + caveat, headers=headers)
    assert isinstance(exc, aiohttp.ClientError)
    return errors.SidecarError(502, "upstream_unavailable", _failure(exc), f"upstream {name!r} is unavailable"
                               + caveat, headers=headers)


def _failure(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):  # a ClientOSError too: ask first
        return "unreachable"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return "reset"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "bad_response"  # the client's parser refused the head (NUL, bare CR, ...)
    return "upstream_error"
