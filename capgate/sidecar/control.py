"""The control API under ``/_capgate/v1/`` on the agent port.

* ``POST authorize`` — "would this be allowed?" for one scope ``{"action", "resource", "context"}``
  or several ``{"scopes": [...]}`` (all must allow). ``context`` may carry ``method``, ``upstream``,
  ``path`` (an HTTP call: all three or none), ``body`` (for limits) and ``correlation``. A scope
  names an action and/or resource, an HTTP call, or both; with both, the action *and* the HTTP call
  are decided and both must allow. A scope naming nothing (``{}``), a partial HTTP call, or an
  ambiguous path or resource name (the one reader: :mod:`capgate.capabilities.paths`) is 400
  ``bad_request``. Answers 200 allowed / 403 denied with ``{"allowed", "reason", "rule",
  "decision_id", "message"}`` (+ ``results`` per scope); a bad token is 401 like everywhere else.
  It is a question, not an action: no receipt, no rate limit or budget charge, and in
  ``mode: audit`` it still answers with the real verdict. The audit record names what was asked:
  the deciding scope's method/upstream/path and action/resource (the first refused one, else the
  first), and, for several scopes, each of them under ``scopes``.
* ``POST attenuate`` — a narrowed token for a sub-agent: ``{"rules", "limits", "ttl", "serviceAccount"}``
  → ``{"token", "expiresAt", "revocationIds"}``. Narrows the sent ``X-Capgate-Token`` if there is
  one (so a sub-agent can narrow further, never widen), else the pod's credential.
* ``GET whoami`` — what this pod may do: capability, principal, expiry, rules, mode, lockdown. No
  token, no key, no secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from capgate import timestamps
from capgate.capabilities import decision, paths, spec, tokens
from capgate.capabilities.errors import AttenuationError, RequestError, SpecError, TokenError
from capgate.sidecar import errors, facts
from capgate.sidecar.credentials import Loaded
from capgate.sidecar.gate import ID_PREFIX, Gate, Trace
from capgate.sidecar.receipts import split_header

MAX_CONTROL_BODY = 64 * 1024
MAX_SCOPES = 32


async def read_json(request: web.Request) -> dict[str, Any]:
    body = await facts.read_json(request, MAX_CONTROL_BODY)
    if not isinstance(body.parsed, dict):
        raise errors.bad_request("bad_json", "the request body must be a JSON object")
    return body.parsed


def _string(data: Mapping[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > paths.MAX_PATH_BYTES:
        raise errors.bad_request("bad_scope", f"{where}.{key} must be a non-empty string")
    return value


def scope_requests(scope: object, where: str, principal: str, default_correlation: str,
                   now: datetime) -> list[decision.Request]:
    """One authorize scope as core Requests: the action, the HTTP call, or both (both must allow).

    Receipts are filled in by the caller per correlation.
    """
    if not isinstance(scope, Mapping):
        raise errors.bad_request("bad_scope", f"{where} must be an object")
    context = scope.get("context") or {}
    if not isinstance(context, Mapping):
        raise errors.bad_request("bad_scope", f"{where}.context must be an object")
    method = _string(context, "method", f"{where}.context")
    upstream = _string(context, "upstream", f"{where}.context")
    path = _string(context, "path", f"{where}.context")
    action = _string(scope, "action", where)
    resource = _string(scope, "resource", where)
    http = (method, upstream, path)
    if any(value is not None for value in http) and None in http:
        raise errors.bad_request("bad_scope", f"{where}.context: an HTTP call needs method, upstream and path")
    if method is None and action is None and resource is None:
        raise errors.bad_request("bad_scope", f"{where} names no action, resource or HTTP call")
    correlation = _string(context, "correlation", f"{where}.context") or default_correlation
    if not facts.CORRELATION.match(correlation):
        raise errors.bad_request("bad_correlation", f"{where}.context.correlation is not a valid correlation id")
    base = decision.Request(principal=principal, correlation=correlation, body=context.get("body"), now=now)
    out = []
    if action is not None or resource is not None:
        out.append(replace(base, action=action, resource=_resource(resource, f"{where}.resource")))
    if method is not None:
        assert path is not None
        out.append(replace(base, method=method.upper(), upstream=upstream,
                           path=_path(path, f"{where}.context.path")))
    return out


def _path(raw: str, where: str) -> str:
    try:
        return paths.normalize(raw)
    except RequestError as exc:
        raise errors.bad_request("ambiguous_path", f"{where}: {exc}") from exc


def _resource(raw: str | None, where: str) -> str | None:
    if raw is None:
        return None
    try:
        return paths.normalize_resource(raw)
    except RequestError as exc:
        raise errors.bad_request("ambiguous_resource", f"{where}: {exc}") from exc


@dataclass(frozen=True)
class Answer:
    allowed: bool
    reason: str
    message: str
    rule: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reason": self.reason, "rule": self.rule, "message": self.message}


async def authorize(request: web.Request, gate: Gate, trace: Trace) -> web.Response:
    trace.kind = "authorize"
    now = datetime.now(UTC)
    loaded = gate.loaded(trace)
    creds = gate.credentials(loaded, facts.narrowed_token(request), trace, now)
    data = await read_json(request)
    multi = "scopes" in data
    scopes = data["scopes"] if multi else [data]
    if not isinstance(scopes, list) or not scopes or len(scopes) > MAX_SCOPES:
        raise errors.bad_request("bad_scope", f"scopes must be a list of 1-{MAX_SCOPES} objects")
    default_corr = facts.correlation(request, gate.session_id)
    carried = split_header(request.headers.getall(facts.RECEIPT_HEADER, []))
    asked = [scope_requests(scope, f"scopes[{index}]" if multi else "body", loaded.principal, default_corr, now)
             for index, scope in enumerate(scopes)]  # every scope is read before any is decided
    answers: list[Answer] = []
    for parts in asked:
        decided = []
        for req in parts:
            # Local knowledge only: the decision API consumes nothing, so it answers whether a receipt
            # not known to be spent is in hand (the forwarded call itself spends it, or is refused).
            held = gate.receipts(loaded, carried, req.correlation, trace, now)
            req = replace(req, receipts=held.rules, unconsumed=held.unconsumed)
            decided.append(_decide_scope(gate, loaded, creds, req, trace))
        answers.append(_both(decided))
    final_index = next((i for i, a in enumerate(answers) if not a.allowed), 0)
    final = answers[final_index]
    _describe(trace, loaded, asked[final_index])
    if multi:
        trace.scopes = [_scope_record(loaded, parts, answer) for parts, answer in zip(asked, answers, strict=True)]
    trace.outcome = "allowed" if final.allowed else "denied"
    trace.reason, trace.rule, trace.status = final.reason, final.rule, 200 if final.allowed else 403
    body: dict[str, Any] = {**final.as_dict(), "decision_id": trace.decision_id}
    if multi:
        body["results"] = [a.as_dict() for a in answers]
    return web.json_response(body, status=trace.status)


def _both(decided: list[Answer]) -> Answer:
    """An action and an HTTP call asked in one scope: the first refusal, else one allowed answer naming both."""
    refused = next((a for a in decided if not a.allowed), None)
    if refused is not None or len(decided) == 1:
        return refused or decided[0]
    return Answer(True, "allowed", "; ".join(a.message for a in decided), decided[0].rule)


def _describe(trace: Trace, loaded: Loaded, parts: list[decision.Request]) -> None:
    for req in parts:
        if req.method is not None:
            trace.method, trace.upstream, trace.path = req.method, _known(loaded, req.upstream), req.path
        else:
            trace.action, trace.resource = req.action, req.resource


def _scope_record(loaded: Loaded, parts: list[decision.Request], answer: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {"allowed": answer.allowed, "reason": answer.reason, "rule": answer.rule}
    for req in parts:
        if req.method is not None:
            out.update(method=req.method, upstream=_known(loaded, req.upstream), path=req.path)
        else:
            out.update(action=req.action, resource=req.resource)
    return {key: value for key, value in out.items() if value is not None}


def _known(loaded: Loaded, upstream: str | None) -> str | None:
    """Only capability-defined upstream names reach metrics labels and the ledger."""
    return upstream if upstream is not None and loaded.capability.upstream(upstream) else None


def _decide_scope(gate: Gate, loaded: Loaded, creds: list[tokens.Credential], req: decision.Request,
                  trace: Trace) -> Answer:
    if req.upstream is not None and loaded.capability.upstream(req.upstream) is None:
        return Answer(False, "unknown_upstream", f"no upstream {req.upstream[:63]!r}")
    try:
        gate.check_lockdown(loaded, req.method)
    except errors.SidecarError as exc:
        return Answer(False, "lockdown", exc.message)
    verdict = gate.decide(creds, req, trace)
    if verdict.code == "invalid_token":
        raise errors.from_decision(verdict)
    return Answer(verdict.allowed, verdict.reason, verdict.message, verdict.rule)


async def attenuate(request: web.Request, gate: Gate, trace: Trace) -> web.Response:
    trace.kind = "attenuate"
    now = datetime.now(UTC)
    loaded = gate.loaded(trace)
    creds = gate.credentials(loaded, facts.narrowed_token(request), trace, now)
    gate.check_lockdown(loaded, None)
    data = await read_json(request)
    parent = creds[-1]
    rules, limits, ttl, principal = _attenuation_args(data, loaded.capability)
    try:
        token = tokens.attenuate(parent, rules=rules, limits=limits, ttl=ttl, principal=principal, now=now)
    except AttenuationError as exc:
        raise errors.SidecarError(403, "denied", "attenuation_refused", str(exc)) from exc
    verifier = gate.store.verifier
    assert verifier is not None
    try:
        child = verifier.load(token, now)
    except TokenError as exc:  # a token we just made must verify; if not, hand out nothing
        raise errors.internal() from exc
    expires = min(now.replace(microsecond=0) + ttl, parent.expires_at) if ttl else parent.expires_at
    trace.narrowed = child.revocation_ids[-1][:ID_PREFIX]
    trace.outcome, trace.reason, trace.status = "allowed", "attenuated", 200
    return web.json_response({"token": token, "expiresAt": timestamps.iso(expires),
                              "revocationIds": list(child.revocation_ids),
                              "depth": child.depth, "decision_id": trace.decision_id})


def _attenuation_args(data: Mapping[str, Any], cap: spec.Capability) -> tuple[
        list[str] | None, dict[str, dict[str, int]] | None, timedelta | None, str | None]:
    rules = data.get("rules")
    if rules is not None and (not isinstance(rules, list) or not all(isinstance(r, str) for r in rules)):
        raise errors.bad_request("bad_attenuation", "rules must be a list of rule names")
    limits = data.get("limits")
    if limits is not None and not (isinstance(limits, dict) and all(isinstance(v, dict) for v in limits.values())):
        raise errors.bad_request("bad_attenuation", "limits must map rule names to {field: max}")
    for fields in (limits or {}).values():
        for maximum in fields.values():
            # Datalog integers are 64-bit: 10**30 cannot be a limit, and must not become an internal error.
            if isinstance(maximum, bool) or not isinstance(maximum, int) or not 0 <= maximum <= spec.MAX_INT64:
                raise errors.bad_request("bad_attenuation", f"limits must be integers from 0 to {spec.MAX_INT64}")
    ttl = None
    if data.get("ttl") is not None:
        try:
            ttl = spec.parse_duration(data["ttl"], "ttl")
        except SpecError as exc:
            raise errors.bad_request("bad_attenuation", str(exc)) from exc
    principal = None
    account = data.get("serviceAccount")
    if account is not None:
        if not isinstance(account, str) or not account:
            raise errors.bad_request("bad_attenuation", "serviceAccount must be 'name' or 'namespace/name'")
        namespace, _, name = account.rpartition("/")
        principal = f"{namespace or cap.namespace}/{name}"
    unknown = sorted(set(data) - {"rules", "limits", "ttl", "serviceAccount"})
    if unknown:
        raise errors.bad_request("bad_attenuation", f"unknown field {unknown[0][:63]!r}")
    return rules, limits, ttl, principal


async def whoami(request: web.Request, gate: Gate, trace: Trace) -> web.Response:
    trace.skip = True
    loaded = gate.loaded(trace)
    cap = loaded.capability
    namespace = loaded.principal.partition("/")[0]
    lockdown = gate.revocations.lockdown_reason(namespace, cap.lockdown_after)
    age = gate.revocations.age()
    body = {
        "capability": cap.qualified_name,
        "principal": loaded.principal,
        "credential": {"id": loaded.credential.id[:ID_PREFIX], "issuedAt": timestamps.iso(loaded.credential.issued_at),
                       "expiresAt": timestamps.iso(loaded.credential.expires_at)},
        "mode": cap.mode,
        "lockdown": {"active": lockdown is not None, "reason": lockdown},
        "revocationListAgeSeconds": None if age is None else round(age, 3),
        "defaultCorrelation": gate.session_id,
        "upstreams": [{"name": u.name, "injects": u.inject.header if u.inject else None} for u in cap.upstreams],
        "rules": [_rule_summary(r) for r in cap.rules],
        "rateLimit": {"requests": cap.rate_limit.requests, "per": spec.format_duration(cap.rate_limit.per)}
        if cap.rate_limit else None,
        "budgets": spec.to_spec(cap).get("budgets", []),
        "receiptTtl": spec.format_duration(cap.receipt_ttl),
    }
    return web.json_response(body, dumps=lambda obj: json.dumps(obj, sort_keys=False))


def _rule_summary(rule: spec.Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"name": rule.name, "effect": rule.effect}
    for key in ("upstream", "methods", "paths", "actions", "resources", "requires"):
        value = getattr(rule, key)
        if value:
            out[key] = list(value) if isinstance(value, tuple) else value
    if rule.consumes:
        out["consumes"] = list(rule.consumes)
    if rule.limits:
        out["limits"] = {lim.field: lim.max for lim in rule.limits}
    return out

