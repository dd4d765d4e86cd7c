"""The sidecar's error tree, and the one JSON shape every refusal takes.

::

    SidecarError(status, error, reason)       rendered by the outermost middleware as
    │                                          {"error", "reason", "rule", "decision_id", "message"}
    ├── 400 bad_request         ambiguous path, body or query; bad header; bad control request; CONNECT (405)
    ├── 401 invalid_token       malformed, bad_signature, unknown_root, expired, revoked, identity, too_deep
    ├── 403 denied              a policy verdict, unknown_upstream, receipt_consumed, internal_error (fail closed)
    ├── 408 bad_request         body_timeout (header_timeout and 431 header_too_large: server.py, no request)
    ├── 413 too_large           a body a limit must read is over --max-body-bytes
    ├── 429 rate_limited / budget_exhausted   with Retry-After
    ├── 502 upstream_unavailable / 504 upstream_timeout
    ├── 503 overloaded          buffer_full, connection_limit (--max-inflight-bytes, --max-connections)
    ├── 503 usage_unavailable   a single-use receipt could not be recorded (Retry-After)
    └── 503 lockdown

Core errors (:mod:`capgate.capabilities.errors`) are converted where they are caught; any other
exception becomes 403 ``denied``/``internal_error`` in the middleware. Messages are written from
typed values here and in the core, never from a header or secret.
"""

from __future__ import annotations

from collections.abc import Mapping

from capgate.capabilities.decision import Decision


class SidecarError(Exception):
    def __init__(self, status: int, error: str, reason: str, message: str, *, rule: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.reason = reason
        self.message = message
        self.rule = rule
        self.headers = dict(headers or {})
        self.jsonrpc: tuple[str | int | None, int] | None = None
        """(request id, JSON-RPC code) when refusing an MCP message: the body is then a JSON-RPC error."""

    def body(self, decision_id: str) -> dict[str, object]:
        out: dict[str, object] = {"error": self.error, "reason": self.reason, "rule": self.rule,
                                  "decision_id": decision_id, "message": self.message}
        if self.jsonrpc is None:
            return out
        ident, code = self.jsonrpc
        return {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": self.message, "data": out}}


def bad_request(reason: str, message: str) -> SidecarError:
    return SidecarError(400, "bad_request", reason, message)


def from_decision(decision: Decision) -> SidecarError:
    return SidecarError(decision.status, decision.code, decision.reason, decision.message, rule=decision.rule)


def unknown_upstream(message: str) -> SidecarError:
    return SidecarError(403, "denied", "unknown_upstream", message)


def lockdown(message: str) -> SidecarError:
    return SidecarError(503, "lockdown", "lockdown", message)


def after_forwarding() -> SidecarError:
    """An unexpected failure once the upstream may have acted: 502, never a denial (DESIGN.md)."""
    return SidecarError(502, "upstream_unavailable", "relay_failed",
                        "the sidecar failed while relaying the upstream's answer; the call reached the upstream "
                        "and may have taken effect", headers={"X-Should-Retry": "false"})


def internal() -> SidecarError:
    return SidecarError(403, "denied", "internal_error",
                        "the sidecar could not decide this request, so it is denied (fail closed)")
