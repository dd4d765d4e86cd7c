"""How the sidecar's two listeners accept connections: a watchdog on every connection.

aiohttp bounds the size of one header line and the number of header lines, but has no timeout for
reading a request head: a client that sends ``GET / HTTP/1.1`` and then a byte now and then holds its
connection, its partial head (up to 128 lines of 64 KiB here) and a file descriptor for as long as it
likes (its keep-alive timer, 3,630 s by default, is the only limit). 50 such clients held ~630 MiB.
So each connection gets a small :class:`asyncio.Protocol` in front of the one aiohttp made for it:

* the request head must be complete within ``--header-timeout`` seconds of the connection opening
  (or, on a kept-alive connection, of the first byte of the next head): else 408 and close;
* a head may hold at most :data:`MAX_HEAD_BYTES` (431 and close), and every head byte is taken from
  the listener's :class:`~capgate.sidecar.buffers.Budget`, the same one inspected bodies use (503 and
  close when it is spent);
* at most ``--max-connections`` connections are open; one more evicts the connection that has been
  waiting for a head the longest (idle or slow), or is refused if every connection is in a request.

Why lower than aiohttp's API: the library offers no hook between "bytes arrived" and "head parsed",
and its protocol class is instantiated inside ``web.Server``. The least invasive place is the
protocol factory asyncio calls — :class:`GuardedRunner` hands sites a factory that wraps what
aiohttp's own ``Server`` returns, so aiohttp's parser, limits and keep-alive stay untouched and any
site (``TCPSite`` in the pod, ``SockSite`` under ``aiohttp.test_utils``) gets the watchdog. The
wrapper finds the end of a head itself (the first empty line, ``CRLF CRLF``) and is told when a
request starts and ends by :func:`track`, the outermost middleware of each app; when the two disagree
(a head aiohttp accepts with bare LFs) the middleware's word ends the head, so disagreement can only
close a connection early, never let a slow head run long.

The admin listener (kubelet probes, Prometheus) has its own watchdog and its own budget, so an agent
flooding its port cannot starve the probes; and since eviction picks the oldest waiting connection, a
probe that sends its head at once is never the one evicted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from capgate.sidecar.buffers import Budget

MAX_HEAD_BYTES = 128 * 1024
"""A 64 KiB ``X-Capgate-Token`` plus as much again for everything else a head may carry."""
ADMIN_HEAD_BYTES = 16 * 1024
"""Probes and scrapes send a few hundred bytes."""
ADMIN_CONNECTIONS = 256
ADMIN_BUDGET = 4 * 1024 * 1024
LINGER_SECONDS = 2.0
"""How long a refused connection's further bytes are read and dropped, so the client gets the answer."""
IDLE_SECONDS = 75.0
"""aiohttp's keep-alive timeout (its default is 3,630 s): how long an idle kept-alive connection stays."""


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    max_head_bytes: int
    max_connections: int


class Guard:
    """The connections of one listener and what they may hold."""

    def __init__(self, limits: Limits, budget: Budget, on_refuse: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self.budget = budget
        self._on_refuse = on_refuse
        self.connections: dict[object, _Connection] = {}
        """By the aiohttp protocol each one wraps (what ``request.protocol`` is)."""

    def factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def protocol() -> asyncio.Protocol:
            return _Connection(self, make())
        return protocol

    def admit(self, connection: _Connection) -> bool:
        if len(self.connections) >= self.limits.max_connections:
            waiting = [c for c in self.connections.values() if c.waiting]
            if not waiting:
                return False
            min(waiting, key=lambda c: c.since).refuse(503, "overloaded", "connection_limit",
                                                       "too many connections; this one was waiting longest",
                                                       linger=False)
        self.connections[connection.inner] = connection
        return True

    def count(self, reason: str) -> None:
        if self._on_refuse is not None:
            self._on_refuse(reason)


class _Connection(asyncio.Protocol):
    """One client connection: the watchdog in front of aiohttp's protocol ``inner``."""

    def __init__(self, guard: Guard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.loop = asyncio.get_running_loop()
        self.since = self.loop.time()
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.closed = False
        self.busy = False
        """A request of this connection is being handled (its head is complete)."""
        self.reading_head = True
        self.held = 0
        self.started = False
        self.tail = b""
        self.timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> bool:
        return self.reading_head and not self.busy and not self.closed

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        if not self.guard.admit(self):
            self.refuse(503, "overloaded", "connection_limit", "too many connections in a request", linger=False)
            return
        self.connected = True
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.waiting:
            if self.timer is None:
                self.since = self.loop.time()
                self._arm()
            if not self._count(data):
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.connected else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self.closed = True
        if self.guard.connections.get(self.inner) is self:
            del self.guard.connections[self.inner]
        if self.connected:
            self.connected = False
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- the watchdog ----------------------------------------------------------------------------
    def request_started(self) -> None:
        self.busy = True
        self._head_done()

    def request_finished(self) -> None:
        self.busy = False
        self.reading_head = True
        self.since = self.loop.time()

    def _arm(self) -> None:
        self.timer = self.loop.call_later(self.guard.limits.header_timeout, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.waiting:
            self.refuse(408, "bad_request", "header_timeout",
                        f"the request head was not complete within {self.guard.limits.header_timeout:g} s")

    def _count(self, data: bytes) -> bool:
        """Take the head bytes of ``data`` from the budget; False when the connection was refused for them."""
        end = self._head_end(data)
        size = len(data) if end is None else end
        if self.held + size > self.guard.limits.max_head_bytes:
            self.refuse(431, "bad_request", "header_too_large",
                        f"a request head may hold at most {self.guard.limits.max_head_bytes} bytes")
            return False
        if not self.guard.budget.take(size):
            self.refuse(503, "overloaded", "buffer_full",
                        "the sidecar is holding as many request bytes as it may; retry shortly")
            return False
        self.held += size
        if end is not None:
            self._head_done()
        return True

    def _head_end(self, data: bytes) -> int | None:
        """Where in ``data`` the head ends (just after its empty line), if it does."""
        skipped = 0
        if not self.started:
            stripped = data.lstrip(b"\r\n")  # empty lines before a request line are allowed and ignored
            if not stripped:
                return None
            skipped = len(data) - len(stripped)
            data = stripped
            self.started = True
        window = self.tail + data
        found = window.find(b"\r\n\r\n")
        if found < 0:
            self.tail = window[-3:]
            return None
        return skipped + found + 4 - len(self.tail)

    def _head_done(self) -> None:
        self.reading_head = False
        self.started = False
        self.tail = b""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held:
            self.guard.budget.give(self.held)
            self.held = 0

    def refuse(self, status: int, error: str, reason: str, message: str, *, linger: bool = True) -> None:
        """Answer once, outside any request, and close: the client gets a reason, not a reset.

        A refused connection leaves the guard's count at once. Refusals for a full listener close
        without lingering, so a flood of new connections cannot pile up lingering ones.
        """
        if self.closed:
            return
        self.guard.count(reason)
        self._head_done()
        self.closed = True
        if self.guard.connections.get(self.inner) is self:
            del self.guard.connections[self.inner]
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = json.dumps({"error": error, "reason": reason, "rule": None, "decision_id": None,
                           "message": message}).encode()
        phrase = {408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(status, "Service Unavailable")
        retry = "Retry-After: 1\r\n" if status == 503 else ""
        transport.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n{retry}"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        # Closing with unread bytes pending makes the kernel send RST, and the client loses the answer:
        # end our side, drop whatever still arrives (data_received ignores it) and close a little later.
        if linger and transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()


GUARD = web.AppKey("connection_guard", Guard)


@web.middleware
async def track(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    """Tell the watchdog a head is complete and a request runs (outermost middleware of each app).

    A request whose body was not read to its end (refused before it was needed) closes its connection
    after the response: aiohttp reads and drops the rest, and those bytes must not count as a head.
    """
    guard = request.app.get(GUARD)
    connection = guard.connections.get(request.protocol) if guard is not None else None
    if connection is None:
        return await handler(request)
    connection.request_started()
    drained = False
    try:
        response = await handler(request)
    finally:
        drained = request.content.is_eof()
        if drained:
            connection.request_finished()
    if not drained:
        response.force_close()
    return response


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose sites accept connections through ``guard``'s watchdog.

    Sites call ``runner.server`` as their protocol factory; this hands them aiohttp's own ``Server``
    wrapped, and leaves everything else (shutdown, connection tracking) to the real one.
    """

    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", IDLE_SECONDS)
        super().__init__(app, **kwargs)
        self.guard = guard
        self._wrapped: tuple[object, Any] | None = None

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return None
        if self._wrapped is None or self._wrapped[0] is not inner:
            self._wrapped = (inner, self.guard.factory(inner))
        return self._wrapped[1]


def agent_guard(header_timeout: float, max_connections: int, budget: Budget,
                on_refuse: Callable[[str], None] | None = None) -> Guard:
    return Guard(Limits(header_timeout, MAX_HEAD_BYTES, max_connections), budget, on_refuse)


def admin_guard(header_timeout: float, on_refuse: Callable[[str], None] | None = None) -> Guard:
    return Guard(Limits(header_timeout, ADMIN_HEAD_BYTES, ADMIN_CONNECTIONS), Budget(ADMIN_BUDGET), on_refuse)
