"""The outbound listener: connections ``capgate-init`` redirected here are decided like any other call.

In an enforce-mode pod every TCP connection an agent opens is REDIRECTed by the kernel to this
listener (``--outbound-listen``, 127.0.0.1:15001; see :mod:`capgate.netinit`). For each one:

1. **Where was it going?** ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` gives the address the agent
   dialled. A connection without one (dialled to the listener itself) or to a loopback address is
   refused.
2. **What does it speak?** The first bytes are peeked, not read. A TLS ClientHello (see
   :mod:`capgate.sidecar.clienthello`) must name — by SNI, or by the IP for an IP-literal URL — a
   declared ``https://`` upstream whose host and port are where the connection went; only then is
   the handshake answered, with a leaf from the pod CA (:mod:`capgate.sidecar.podca`). An HTTP
   request line is handed to aiohttp as is. Anything else (a protocol where the server speaks first,
   raw bytes) is refused by closing the connection.
3. **Which upstream?** Per request, in the one proxy handler (``app.handle_proxy``): the ``Host``
   header, the TLS name and the original destination must all name the same declared upstream,
   scheme included (TLS only to ``https://`` upstreams, plain HTTP only to ``http://`` ones). The
   upstream's host must *resolve* to the original destination IP (the sidecar asks the same DNS),
   so ``Host: payments.example.com`` sent to an attacker's address is refused rather than given the
   payments key. The sidecar then connects to the upstream's declared URL — never to the original
   destination — and the request is decided exactly as ``/<upstream>/<path>`` is.

Everything refused is audited with reason ``undeclared_destination`` and the destination
``ip:port``: HTTP gets 403, everything else a closed connection.

Design notes: the connection is classified before aiohttp sees it, and served by the agent app's own
``web.Server`` through ``loop.connect_accepted_socket``, so there is no second HTTP stack and no
second decision path. The handler recognises captured requests by the kernel's view of the socket
(local port, original destination, the TLS context it was handed), never by anything the agent sends.
A Host naming two upstreams at one host:port is refused as ambiguous.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from capgate.capabilities import spec
from capgate.sidecar import clienthello, errors, routing
from capgate.sidecar.config import Settings
from capgate.sidecar.gate import Gate, Trace, new_decision_id
from capgate.sidecar.podca import PodCA

log = logging.getLogger("capgate.sidecar.egress")

SO_ORIGINAL_DST = 80
"""From <linux/netfilter_ipv4.h>; Python's socket module does not export it."""
REASON = "undeclared_destination"
PEEK_SECONDS = 10.0
"""How long a captured connection may stay silent before it is refused (server-speaks-first protocols)."""
HANDSHAKE_SECONDS = 10.0
RESOLVE_SECONDS = 2.0
REMEMBER_SECONDS = 300.0
"""An address an upstream's name resolved to stays an address of it this long: DNS answers rotate, and
the agent may have resolved a moment before the sidecar did."""
POLL_SECONDS = 0.005
HTTP_PEEK = 17
HTTP_START = re.compile(rb"^[A-Z]{3,16} ")
BACKLOG = 1024
MAX_CLASSIFYING = 512
"""Captured connections still being peeked at, at most; beyond that new ones are refused at once, so a
flood of silent connections costs the agent its own calls, never the sidecar's memory."""


@dataclass(frozen=True)
class Captured:
    """A redirected connection, as the kernel and the TLS layer describe it."""

    ip: str
    port: int
    tls: bool
    name: str | None = None
    """The TLS server name the handshake was answered for (the IP for an IP-literal upstream)."""

    @property
    def destination(self) -> str:
        return f"{self.ip}:{self.port}"


class _Sockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def original_destination(sock: _Sockopt) -> tuple[str, int]:
    """``(ip, port)`` the connection was dialled to before REDIRECT; OSError when there was no NAT."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), int(port)


def refused(message: str) -> errors.SidecarError:
    return errors.SidecarError(403, "denied", REASON, message)


def _default_port(tls: bool) -> int:
    return 443 if tls else 80


def host_port(value: str, tls: bool) -> tuple[str, int] | None:
    """``name[:port]`` from a Host header, lower-cased; None unless it is a plain DNS name or IPv4 literal."""
    name, sep, port_text = value.strip().rpartition(":")
    if not sep:
        name, port_text = port_text, ""
    name = name.lower()
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        return None
    if not clienthello.HOSTNAME.match(name):
        return None  # IPv6 literals, trailing dots, user info, spaces: never a declared upstream here
    return name, int(port_text) if port_text else _default_port(tls)


class Declared(NamedTuple):
    upstream: spec.Upstream
    prefix: str
    """The path of the upstream's URL (``""`` or ``/v2``): a captured request must lie under it."""


def declared(cap: spec.Capability, overrides: Mapping[str, str], *, host: str, port: int,
             tls: bool) -> Declared | None:
    """The one upstream whose URL (declared or overridden) is ``scheme://host:port``; None if none or several."""
    scheme = "https" if tls else "http"
    found: list[Declared] = []
    for upstream in cap.upstreams:
        for url in {upstream.url, routing.effective_url(upstream, overrides)}:
            parts = urlsplit(url)
            if (parts.scheme == scheme and (parts.hostname or "").lower() == host
                    and (parts.port or _default_port(tls)) == port):
                found.append(Declared(upstream, parts.path.rstrip("/")))
    unique = list(dict.fromkeys(found))
    return unique[0] if len(unique) == 1 else None


def under_prefix(raw_target: str, prefix: str) -> str | None:
    """``/v2/search?q`` under ``/v2`` is ``/search?q`` — what path form calls ``/<upstream>/search?q``.

    Compared on the raw bytes: an encoded or differently-cased prefix is not under it (refused).
    """
    if not prefix:
        return raw_target
    path, sep, query = raw_target.partition("?")
    if path == prefix:
        return "/" + sep + query
    if path.startswith(prefix + "/"):
        return raw_target[len(prefix):]
    return None


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Resolver:
    """Which IPv4 addresses a declared host has (recently had), asked of the pod's own DNS."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, float]] = {}

    async def has(self, host: str, ip: str, port: int) -> bool:
        literal = _literal(host)
        if literal is not None:
            return literal == ipaddress.ip_address(ip)
        now = time.monotonic()
        seen = self._seen.setdefault(host, {})
        for address, until in list(seen.items()):
            if until < now:
                del seen[address]
        if ip in seen:
            return True
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM), RESOLVE_SECONDS)
        except (OSError, TimeoutError):
            return False  # cannot tell where the name points: refuse
        for *_, sockaddr in infos:
            seen[str(sockaddr[0])] = now + REMEMBER_SECONDS
        return ip in seen


class Egress:
    """The outbound listener of one sidecar: the pod CA, the accept loop, and per-request routing."""

    def __init__(self, settings: Settings, gate: Gate) -> None:
        assert settings.outbound_listen is not None
        self.settings = settings
        self.address = settings.outbound_listen
        self.gate = gate
        self.ca = PodCA()
        if settings.ca_dir is not None:
            self.ca.write(settings.ca_dir)
        if gate.store.current is not None:  # mint leaves now (~15 ms each), not on the event loop later
            for upstream in gate.store.current.capability.upstreams:
                for url in {upstream.url, routing.effective_url(upstream, settings.upstream_urls)}:
                    parts = urlsplit(url)
                    if parts.scheme == "https" and parts.hostname:
                        self.ca.context_for(parts.hostname.lower())
        self.resolver = Resolver()
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._classifying = 0

    # -- serving ---------------------------------------------------------------------------------
    async def start(self, server: web.Server) -> None:
        """Listen and hand every classified connection to ``server`` (the agent app's)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address.host, self.address.port))
        listener.listen(BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._spawn(self._accept(listener, server), "capgate-outbound-accept")
        log.info("capgate-sidecar outbound listener on %s", self.address)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            self._listener.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket, server: web.Server) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.warning("outbound accept failed: %s", exc.strerror)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            self._spawn(self._serve(sock, server), "capgate-outbound-conn")

    async def _serve(self, sock: socket.socket, server: web.Server) -> None:
        if self._classifying >= MAX_CLASSIFYING:
            self.audit(None, f"more than {MAX_CLASSIFYING} captured connections are waiting to be read")
            sock.close()
            return
        self._classifying += 1
        try:
            captured = await self._classify(sock)
        except Exception:  # anything unexpected refuses the connection (logged, fail closed)
            log.exception("outbound connection could not be classified; refused")
            captured = None
        finally:
            self._classifying -= 1
        if captured is None:
            sock.close()
            return
        context = self.ca.context_for(captured.name) if captured.tls and captured.name else None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                server, sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_SECONDS if context else None)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The transport owns the socket by now and has closed it; closing it here too could close a
            # descriptor number the loop has already reused.
            log.info("captured connection to %s failed before its first request: %s", captured.destination, exc)

    async def _classify(self, sock: socket.socket) -> Captured | None:
        try:
            ip, port = original_destination(sock)
        except OSError:
            self.audit(None, "the connection was not redirected (no original destination)")
            return None
        destination = f"{ip}:{port}"
        if ipaddress.ip_address(ip).is_loopback:
            self.audit(destination, "loopback destinations are not upstreams")
            return None
        first = await _peek(sock, lambda data: len(data) >= 1, 1)
        if first is None:
            self.audit(destination, "the client sent nothing")
            return None
        if not first:
            return None  # connected and closed without a byte: nothing was asked
        if clienthello.looks_like_tls(first):
            return await self._classify_tls(sock, ip, port)
        start = await _peek(sock, lambda data: len(data) >= HTTP_PEEK or b" " in data, HTTP_PEEK)
        if start is None or not HTTP_START.match(start):
            self.audit(destination, "not HTTP or TLS")
            return None
        return Captured(ip, port, tls=False)

    async def _classify_tls(self, sock: socket.socket, ip: str, port: int) -> Captured | None:
        destination = f"{ip}:{port}"
        hello = clienthello.Hello(need=clienthello.RECORD_HEADER)
        while hello.need:
            need = hello.need
            data = await _peek(sock, _at_least(need), need)
            if data is None or len(data) < need:
                self.audit(destination, "incomplete TLS ClientHello")
                return None
            hello = clienthello.parse(data)
        if hello.malformed:
            self.audit(destination, "malformed TLS ClientHello")
            return None
        name = hello.name or ip
        current = self.gate.store.current
        if current is None or declared(current.capability, self.settings.upstream_urls, host=name, port=port,
                                       tls=True) is None:
            self.audit(destination, "TLS server name names no declared https upstream at this port")
            return None
        if not await self.resolver.has(name, ip, port):
            self.audit(destination, "the TLS server name does not resolve to the destination")
            return None
        return Captured(ip, port, tls=True, name=name)

    # -- routing a captured request (called by the proxy handler) ---------------------------------
    def captured(self, request: web.Request) -> Captured | None:
        """The captured connection ``request`` arrived on, or None for the agent port."""
        transport = request.transport
        if transport is None:
            return None
        sockname = transport.get_extra_info("sockname")
        if not sockname or sockname[1] != self.address.port:
            return None
        ip, port = original_destination(transport.get_extra_info("socket"))
        sslobj = transport.get_extra_info("ssl_object")
        name = getattr(sslobj.context, "host", None) if sslobj is not None else None
        return Captured(ip, port, tls=sslobj is not None, name=name)

    async def route(self, request: web.Request, captured: Captured, cap: spec.Capability,
                    trace: Trace) -> routing.Route:
        """The upstream a captured request is for, with the same path reading as the path form."""
        trace.destination = captured.destination
        hosts = request.headers.getall("Host", [])
        if len(hosts) != 1:
            raise refused("a captured request needs exactly one Host header")
        parsed = host_port(hosts[0], captured.tls)
        if parsed is None:
            raise refused("the Host header is not a host name or IPv4 address")
        host, port = parsed
        if port != captured.port:
            raise refused(f"Host names port {port}, but the connection went to port {captured.port}")
        if captured.tls and host != captured.name:
            raise refused("the Host header and the TLS server name differ")
        overrides = self.settings.upstream_urls
        scheme = "https" if captured.tls else "http"
        match = declared(cap, overrides, host=host, port=port, tls=captured.tls)
        if match is None:
            raise refused(f"{scheme}://{host[:253]}:{port} is not a declared upstream of {cap.qualified_name}")
        if not await self.resolver.has(host, captured.ip, port):
            raise refused(f"{host[:253]} does not resolve to {captured.ip}, where the connection went")
        rest = under_prefix(request.raw_path, match.prefix)
        if rest is None:
            raise refused(f"the path is outside {scheme}://{host[:253]}:{port}{match.prefix}, "
                          f"the URL of upstream {match.upstream.name!r}")
        return routing.for_upstream(rest, match.upstream, overrides)

    def audit(self, destination: str | None, why: str) -> None:
        """One audit record for a connection refused before any HTTP request could be read."""
        trace = Trace(decision_id=new_decision_id(), kind="egress", outcome="denied", reason=REASON,
                      destination=destination)
        current = self.gate.store.current
        if current is not None:
            trace.capability, trace.principal = current.capability.qualified_name, current.principal
        self.gate.finish(trace)
        log.info("refused captured connection to %s: %s", destination or "?", why)


def _at_least(size: int) -> Callable[[bytes], bool]:
    return lambda data: len(data) >= size


async def _peek(sock: socket.socket, enough: Callable[[bytes], bool], size: int) -> bytes | None:
    """Peek up to ``size`` bytes until ``enough`` holds or the peer closes; None after PEEK_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PEEK_SECONDS
    while True:
        try:
            data = sock.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except OSError:
            return b""
        if data is not None and (enough(data) or len(data) == 0):
            return data
        if loop.time() >= deadline:
            return None
        if data is None:
            await _readable(sock, deadline - loop.time())
        else:
            await asyncio.sleep(POLL_SECONDS)  # some bytes but not enough: readiness would spin


async def _readable(sock: socket.socket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, max(timeout, 0))
    finally:
        loop.remove_reader(fd)
