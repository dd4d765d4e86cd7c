"""From an aiohttp request to the core's :class:`~capgate.capabilities.decision.Request`.

The pieces the policy may see: method, upstream, normalized path, the correlation, the rules with
valid receipts in that correlation, and — whenever a limit or budget reads fields for this
upstream — the JSON body, whatever the method (a JSON body sent with GET is read too). The body is
then read whole, bounded by ``--max-body-bytes`` (413 ``too_large`` above it, decided from
Content-Length before reading when possible), and kept so it is forwarded exactly as read.
Otherwise it is never touched and streams straight through.

What a body must be is :mod:`capgate.capabilities.bodies`' business, the one reader the CLI shares:
a body that is not exactly one unambiguous JSON document is 400 ``bad_request``, never counted as
0; a valid document without the field is what limits deny (403 ``limit_missing``).

Header bytes that are not UTF-8 are refused (400 ``bad_header``): the forwarder could only drop or
mangle them, and an upstream would then see another request than the one decided.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from capgate.capabilities import bodies, spec
from capgate.sidecar import buffers, errors

CORRELATION_HEADER = "X-Capgate-Correlation-Id"
RECEIPT_HEADER = "X-Capgate-Receipt"
TOKEN_HEADER = "X-Capgate-Token"
DECISION_HEADER = "X-Capgate-Decision-Id"
CORRELATION = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
MAX_TOKEN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Body:
    raw: bytes
    parsed: object
    """The JSON document (None for an empty body)."""


def correlation(request: web.Request, default: str) -> str:
    values = request.headers.getall(CORRELATION_HEADER, [])
    if not values:
        return default
    if len(values) > 1 or not CORRELATION.match(values[0]):
        raise errors.bad_request("bad_correlation",
                                 f"{CORRELATION_HEADER} must be one value of 1-128 characters [A-Za-z0-9._:@/+=-]")
    return values[0]


def narrowed_token(request: web.Request) -> str | None:
    values = request.headers.getall(TOKEN_HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise errors.bad_request("bad_token_header", f"send at most one {TOKEN_HEADER}")
    if len(values[0]) > MAX_TOKEN_BYTES:
        raise errors.SidecarError(401, "invalid_token", "malformed", "narrowed token is oversized")
    return values[0].strip()


def check_headers(request: web.Request) -> None:
    """Every header name and value must be UTF-8 (aiohttp would otherwise hand us surrogate escapes)."""
    for name, value in request.raw_headers:
        try:
            name.decode("utf-8")
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.bad_request("bad_header", "a request header is not valid UTF-8") from None


async def limited_body(request: web.Request, cap: spec.Capability, upstream: str, query: str,
                       limit: int) -> Body | None:
    """The body limits and budgets read (None when none applies or none was sent), else 400/413.

    ``_method`` in the query or in a URL-encoded form body is refused for every request (method
    override; a form is read for that, bounded like any body); the rest only where a limit or
    budget reads this upstream's bodies.
    """
    fields = bodies.fields_for(cap, upstream)
    content_type = request.headers.getall("Content-Type", [])
    content_encoding = request.headers.getall("Content-Encoding", [])
    try:
        bodies.check_query(query, fields)
        if not request.body_exists:
            return None
        if not fields:
            if not bodies.is_form(content_type):
                return None
            raw = await read_bytes(request, limit)
            bodies.check_form(raw, content_encoding)
            return Body(raw=raw, parsed=None)
        raw = await read_bytes(request, limit)
        document = bodies.read(raw, content_type=content_type, content_encoding=content_encoding, query=query,
                               fields=fields)
    except bodies.BodyError as exc:
        raise errors.bad_request(exc.reason, exc.message) from None
    return Body(raw=raw, parsed=document)


async def read_bytes(request: web.Request, limit: int) -> bytes:
    """At most ``limit`` bytes of the body, as sent (413 above it), within the sidecar's in-flight
    buffer budget and the body timeout (503 / 408): every inspected body is read here, and only here."""
    return await buffers.read(request, limit, _read_bytes(request, limit))


async def _read_bytes(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int) -> Body:
    """A control API body: one strict JSON document (400 ``bad_json`` / ``ambiguous_body`` otherwise)."""
    raw = await read_bytes(request, limit)
    try:
        return Body(raw=raw, parsed=bodies.parse(raw))
    except bodies.BodyError as exc:
        if exc.reason == "ambiguous_body":
            raise errors.bad_request(exc.reason, exc.message) from None
        raise errors.bad_request("bad_json", "the request body must be one JSON document") from None


def _too_large(limit: int) -> errors.SidecarError:
    return errors.SidecarError(413, "too_large", "body_too_large",
                               f"a body this rule must inspect is limited to {limit} bytes")
