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
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=timeout(settings),
                                 cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=AUTO_HEADERS)


async def forward(request: web.Request, route: Route, *, client: aiohttp.ClientSession, body: bytes | None,
                  injection: Injection | None, response_headers: Callable[[int], Mapping[str, str]],
                  observe: Callable[[float], None]) -> tuple[web.StreamResponse, int]:
    """Send the request upstream and stream the answer back; returns the response and upstream status."""
    data: bytes | io.BytesIO | aiohttp.StreamReader | None = body
    if body is not None and len(body) > LARGE_BYTES:
        data = io.BytesIO(body)  # aiohttp warns about (and may block on) big raw bytes payloads
    if body is None and request.body_exists:
        data = request.content
    headers = outgoing_headers(request.headers, injection, body is not None)
    started = time.perf_counter()
    try:
        upstream = await client.request(request.method, URL(route.target, encoded=True),
                                        headers=headers, data=data, allow_redirects=False)
    except TimeoutError as exc:
        raise errors.SidecarError(504, "upstream_timeout", "timeout",
                                  f"upstream {route.upstream.name!r} did not answer in time") from exc
    except aiohttp.ClientError as exc:
        raise errors.SidecarError(502, "upstream_unavailable", _failure(exc),
                                  f"upstream {route.upstream.name!r} is unavailable") from exc
    observe(time.perf_counter() - started)
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=incoming_headers(upstream.headers))
        response.headers.update(response_headers(upstream.status))
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream %s failed mid-response (%s); aborting the agent's connection",
                        route.upstream.name, type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            return response, upstream.status
        await response.write_eof()
        return response, upstream.status


def _failure(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "reset"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "unreachable"
    return "reset" if isinstance(exc, aiohttp.ClientOSError) else "upstream_error"
