"""From an aiohttp request to the core's :class:`~capgate.capabilities.decision.Request`.

The pieces the policy may see: method, upstream, normalized path, the correlation, the rules with
valid receipts in that correlation, and — only when a limit or budget on this upstream reads one —
the JSON body. The body is then read whole, bounded by ``--max-body-bytes`` (413 ``too_large``
above it, decided from Content-Length before reading when possible), and kept so it can be
forwarded as read. Otherwise it is never touched and streams straight through.

A body that is not JSON (or not an object) where a limit needs a field is *not* a 400: the fields
are simply missing, so the limit denies with 403 ``limit_missing`` — the same answer a JSON body
without the field gets, which is what the capability author wrote ("missing/non-numeric = deny").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from aiohttp import web

from capgate.capabilities import spec
from capgate.sidecar import errors

CORRELATION_HEADER = "X-Capgate-Correlation-Id"
RECEIPT_HEADER = "X-Capgate-Receipt"
TOKEN_HEADER = "X-Capgate-Token"
DECISION_HEADER = "X-Capgate-Decision-Id"
CORRELATION = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_TOKEN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Body:
    raw: bytes
    parsed: object
    """The JSON document, or None when the bytes are not JSON."""


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


def fields_for(cap: spec.Capability, upstream: str) -> frozenset[str]:
    """Body fields some limit or budget reads for requests to ``upstream``."""
    found = {lim.field for rule in cap.rules if rule.upstream in (None, upstream) for lim in rule.limits}
    found.update(b.field for b in cap.budgets if b.upstream == upstream)
    return frozenset(found)


def needs_body(request: web.Request, cap: spec.Capability, upstream: str) -> bool:
    return request.method in BODY_METHODS and bool(fields_for(cap, upstream))


async def read_body(request: web.Request, limit: int) -> Body:
    """Read at most ``limit`` bytes (413 above it) and parse JSON leniently (None if not JSON)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    return Body(raw=raw, parsed=parse_json(raw))


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise _DuplicateKey
    return dict(pairs)


def parse_json(raw: bytes) -> object:
    """The JSON document, None when not JSON; 400 when a key repeats.

    ``{"amount": 99999, "amount": 1}`` reads as 1 here (last wins) but as 99999 to a first-wins
    upstream parser: like an ambiguous path, an ambiguous body is refused, never read "leniently".
    """
    if not raw:
        return None
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        raise errors.bad_request("ambiguous_body", "the JSON body repeats a key, which parsers read differently") \
            from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _too_large(limit: int) -> errors.SidecarError:
    return errors.SidecarError(413, "too_large", "body_too_large",
                               f"a body this rule must inspect is limited to {limit} bytes")
