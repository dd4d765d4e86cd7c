"""The bytes all in-flight requests may hold at once, and the one bounded way to read a body for inspection.

A body a limit or budget reads is held whole until the request ends (it is forwarded as read), and a
request head is held until it is complete. One agent can open dozens of connections that each stop
one byte short: 50 such 1 MiB bodies held ~270 MiB, beyond a 128 MiB pod limit, and the kill that
followed reset every in-memory budget. So both are taken from one :class:`Budget` per listener
(``--max-inflight-bytes``); a request that would exceed it is refused at once with 503
``overloaded`` / ``buffer_full`` and ``Retry-After`` — fail closed, never queued, never forwarded
unread. An inspected body must also arrive within ``--body-timeout`` seconds (408 ``bad_request`` /
``body_timeout``).

A body of known length reserves its ``Content-Length``; one without (chunked) reserves the whole
``--max-body-bytes``, since how much of it will come is up to the agent. The reservation is returned
when the request ends (:func:`release`, called by the outermost middleware).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from capgate.sidecar import errors

T = TypeVar("T")


class Budget:
    """A count of bytes that may be held at once; ``take`` never blocks, it only says no."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def take(self, amount: int) -> bool:
        if self.used + amount > self.capacity:
            return False
        self.used += amount
        return True

    def give(self, amount: int) -> None:
        self.used = max(0, self.used - amount)


BUDGET = web.AppKey("inflight_budget", Budget)
BODY_TIMEOUT = web.AppKey("body_timeout", float)
_RESERVED = web.RequestKey("inflight_reserved", int)


async def read(request: web.Request, limit: int, reader: Awaitable[T]) -> T:
    """Await ``reader`` (the body reader, not yet started) within the budget and the body timeout."""
    budget = request.app[BUDGET]
    length = request.content_length
    wanted = min(length, limit) if length is not None else limit
    if not budget.take(wanted):
        if asyncio.iscoroutine(reader):
            reader.close()  # never started: nothing was read
        raise errors.SidecarError(503, "overloaded", "buffer_full",
                                  "the sidecar is holding as many request bytes as it may; retry shortly",
                                  headers={"Retry-After": "1"})
    request[_RESERVED] = request.get(_RESERVED, 0) + wanted
    seconds = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(seconds):
            return await reader
    except TimeoutError:
        raise errors.SidecarError(408, "bad_request", "body_timeout",
                                  f"the request body did not arrive within {seconds:g} s",
                                  headers={"Connection": "close"}) from None
    except ConnectionResetError:
        # The agent went away mid-body: nothing to decide, and not an internal error worth a traceback.
        raise errors.SidecarError(400, "bad_request", "client_disconnected",
                                  "the connection closed before the body arrived") from None


def release(request: web.Request) -> None:
    """Give back what :func:`read` reserved for ``request`` (idempotent)."""
    reserved = request.get(_RESERVED, 0)
    if reserved:
        request.app[BUDGET].give(reserved)
        request[_RESERVED] = 0
