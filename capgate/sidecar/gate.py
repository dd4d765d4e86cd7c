"""The enforcement core of the sidecar, shared by the proxy and the control API.

Order of the checks — each refusal is final, and the first one wins:

1. a credential is loaded (else 401 ``invalid_token``);
2. the base credential and, if sent, the narrowed ``X-Capgate-Token`` verify, are unexpired and
   unrevoked (401, in *every* mode: audit mode never forwards with a bad token);
3. lockdown (503 for writes, every mode);
4. the Datalog verdict over both tokens (403; in ``mode: audit`` logged as ``would_deny`` and
   forwarded anyway);
5. rate limit and budgets (429; audit mode likewise only logs);
6. single-use receipts: when the allowing rule consumes a receipt (``requires: [{rule, consume:
   true}]``), its id is recorded as consumed fleet-wide before forwarding (403 ``receipt_consumed``
   when another call spent it first, 503 ``usage_unavailable`` when the state cannot be reached;
   audit mode only logs). Last, so a call refused for any other reason never spends a receipt.

After forwarding, response budgets (``from: response``) are settled from what the relayed answer
said (:class:`ResponseTap`, :meth:`Gate.settle`), whatever became of the call.

Everything the request path does per call is CPU-bound and sub-millisecond (token verification is
cached by the core's Verifier, receipt verification here), so it runs inline on the event loop
rather than paying a thread hop.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDictProxy

from capgate import usage
from capgate.capabilities import decision, responses, spec, tokens
from capgate.capabilities import receipts as core_receipts
from capgate.capabilities.errors import TokenError
from capgate.sidecar import consumption, errors, state
from capgate.sidecar.audit import AuditLog, Outcome
from capgate.sidecar.config import Settings
from capgate.sidecar.credentials import CredentialStore, Loaded
from capgate.sidecar.limits import Charger
from capgate.sidecar.metrics import Metrics
from capgate.sidecar.receipts import MAX_HELD_PER_RULE, Held, Proofs, ReceiptBook
from capgate.sidecar.watch import RevocationState

log = logging.getLogger("capgate.sidecar.gate")

ID_PREFIX = 16
"""Revocation ids are 128 hex characters; 16 identify a credential in logs without bloating them."""


@dataclass
class Trace:
    """What is known about one request so far; becomes its audit record and metrics."""

    decision_id: str
    kind: str = "proxy"
    started: float = field(default_factory=time.perf_counter)
    capability: str | None = None
    principal: str | None = None
    credential: str | None = None
    narrowed: str | None = None
    upstream: str | None = None
    method: str | None = None
    path: str | None = None
    action: str | None = None
    resource: str | None = None
    correlation: str | None = None
    rule: str | None = None
    outcome: Outcome = "error"
    reason: str = "internal_error"
    status: int | None = None
    upstream_status: int | None = None
    destination: str | None = None
    """``ip:port`` a captured connection was going to (outbound listener only)."""
    receipts_ignored: list[str] = field(default_factory=list)
    scopes: list[dict[str, Any]] = field(default_factory=list)
    """What each scope of a several-scope ``authorize`` asked, and its answer."""
    receipt_minted: bool = False
    receipts_consumed: list[str] = field(default_factory=list)
    """Ids of the single-use receipts this call spent (each the decision id that minted it)."""
    mcp: dict[str, object] | None = None
    """For an MCP message: its kind, JSON-RPC method, tool/URI, id and argument digest."""
    forwarded: bool = False
    """The request may have reached the upstream (and taken effect): never recorded as denied."""
    usage: dict[str, dict[str, object]] | None = None
    """Response budgets: per field, what was charged and, when it could not be read, why."""
    skip: bool = False
    """Not a decision (whoami, a refused CONNECT still counts); nothing is recorded."""
    recorded: bool = False

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision_id": self.decision_id, "kind": self.kind, "outcome": self.outcome, "reason": self.reason,
            "status": self.status, "latency_ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        for key in ("capability", "principal", "credential", "narrowed", "upstream", "method", "path", "action",
                    "resource", "correlation", "rule", "upstream_status", "destination"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.receipts_ignored:
            out["receipts_ignored"] = self.receipts_ignored
        if self.scopes:
            out["scopes"] = self.scopes
        if self.receipt_minted:
            out["receipt_minted"] = True
        if self.receipts_consumed:
            out["receipts_consumed"] = self.receipts_consumed
        if self.mcp is not None:
            out["mcp"] = self.mcp
        if self.forwarded:
            out["forwarded"] = True
        if self.usage is not None:
            out["usage"] = self.usage
        return out


@dataclass(frozen=True)
class Receipts:
    """What the receipts of one request prove, as the gate sees them."""

    correlation: str
    rules: frozenset[str]
    """Rules with a verified, unexpired receipt (what plain ``requires`` reads)."""
    unconsumed: frozenset[str]
    """Rules with such a receipt not known to be consumed (what a consuming gate reads)."""
    candidates: Mapping[str, frozenset[usage.Candidate]]
    """Per rule, the receipts not known to be consumed: what a consuming gate may spend."""


class ResponseTap:
    """Reads what response budgets charge from a relayed answer (a :class:`~capgate.sidecar.proxy.Tap`)."""

    def __init__(self, budgets: list[spec.Budget]) -> None:
        self.budgets = budgets
        self.reader: responses.UsageReader | None = None
        self.completed = False

    def start(self, status: int, headers: CIMultiDictProxy[str]) -> None:
        self.reader = responses.UsageReader(sorted({b.field for b in self.budgets}), status=status,
                                            content_type=headers.getall("Content-Type", []),
                                            content_encoding=headers.getall("Content-Encoding", []))

    def feed(self, chunk: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(chunk)

    def complete(self) -> None:
        self.completed = True

    def usage(self) -> dict[str, responses.Usage]:
        """Per field; no answer relayed (a 502 after sending, a timeout) is unreadable too."""
        if self.reader is None:
            return {b.field: responses.Usage(None, "truncated") for b in self.budgets}
        return self.reader.result(complete=self.completed)


def response_budgets(cap: spec.Capability, upstream: str) -> list[spec.Budget]:
    return [b for b in cap.budgets if b.upstream == upstream and b.from_response]


def new_decision_id() -> str:
    """128 random bits as 32 hex characters (uuid4's entropy without its formatting cost)."""
    return secrets.token_hex(16)


class Gate:
    def __init__(self, settings: Settings, store: CredentialStore, revocations: RevocationState, limits: Charger,
                 book: ReceiptBook, metrics: Metrics, audit: AuditLog,
                 single_use: consumption.SingleUse | None = None) -> None:
        self.settings = settings
        self.single_use = single_use or consumption.SingleUse(consumption.MemoryUsageStore(), metrics)
        self.store = store
        self.revocations = revocations
        self.limits = limits
        self.book = book
        self.metrics = metrics
        self.audit = audit
        self.session_id = f"session-{uuid.uuid4().hex}"
        """The default correlation: the pod session (DESIGN.md, request flow step 3)."""
        self._trust_generation = -1

    # -- credentials ---------------------------------------------------------------------------
    def loaded(self, trace: Trace) -> Loaded:
        current = self.store.current
        if current is None:
            raise errors.SidecarError(401, "invalid_token", "malformed", "the sidecar has no credential loaded")
        if self.store.generation != self._trust_generation:
            self.book.forget_verified()
            self._trust_generation = self.store.generation
        trace.capability = current.capability.qualified_name
        trace.principal = current.principal
        trace.credential = current.credential.id[:ID_PREFIX]
        return current

    def credentials(self, loaded: Loaded, narrowed: str | None, trace: Trace,
                    now: datetime) -> list[tokens.Credential]:
        """The base credential and the narrowed token, verified and valid now (else 401)."""
        creds = [loaded.credential]
        if narrowed is not None:
            verifier = self.store.verifier
            assert verifier is not None
            try:
                cred = verifier.load(narrowed, now)
            except TokenError as exc:
                raise errors.SidecarError(401, "invalid_token", exc.reason, _token_message(exc)) from exc
            # It may descend from another capability (delegation to this pod's identity): both
            # tokens must allow, and the token's own principal check binds it to this pod.
            trace.narrowed = cred.revocation_ids[-1][:ID_PREFIX]
            creds.append(cred)
        for cred in creds:
            try:
                decision.check_validity(cred, now, revoked=self.revocations.revoked_ids)
            except TokenError as exc:
                raise errors.SidecarError(401, "invalid_token", exc.reason, _token_message(exc)) from exc
        return creds

    def check_lockdown(self, loaded: Loaded, method: str | None) -> None:
        cap = loaded.capability
        namespace = loaded.principal.partition("/")[0]
        reason = self.revocations.lockdown_reason(namespace, cap.lockdown_after)
        self.metrics.lockdown.set(1 if reason else 0)
        if reason and RevocationState.blocks(method):
            raise errors.lockdown(f"lockdown ({reason}): only reads are allowed")

    # -- deciding ------------------------------------------------------------------------------
    def receipts(self, loaded: Loaded, carried: Iterable[str], correlation: str, trace: Trace,
                 now: datetime) -> Receipts:
        cap_name = loaded.capability.qualified_name
        revoked = self.revocations.revoked_ids
        proofs = Proofs(loaded.capability.consumed_rules)
        self.book.carried_into(proofs, carried, trust=loaded.trust, correlation=correlation, capability=cap_name,
                               revoked=revoked, now=now)
        trace.receipts_ignored = proofs.ignored
        self.book.held_into(proofs, correlation, cap_name, now, revoked)
        candidates = {rule: frozenset(c for c in found if not self.single_use.known(c))
                      for rule, found in proofs.candidates.items()}
        return Receipts(correlation, frozenset(proofs.rules),
                        frozenset(rule for rule, found in candidates.items() if found), candidates)

    def decide(self, creds: list[tokens.Credential], request: decision.Request, trace: Trace) -> decision.Decision:
        started = time.perf_counter()
        verdict = decision.decide(creds, request, revoked=self.revocations.revoked_ids)
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        trace.rule = verdict.rule
        trace.reason = verdict.reason
        return verdict

    def enforce(self, loaded: Loaded, verdict: decision.Decision, trace: Trace) -> None:
        """Raise for a refusal; in audit mode mark a policy denial as would-deny and let it pass."""
        if verdict.allowed:
            trace.outcome = "allowed"
            return
        if verdict.code == "denied" and loaded.capability.mode == "audit":
            trace.outcome = "would_deny"
            log.info("audit mode, would deny %s: %s", trace.decision_id, verdict.reason)
            return
        raise errors.from_decision(verdict)

    async def charge(self, loaded: Loaded, upstream: str | None, body: object, trace: Trace,
                     tool: str | None = None) -> bool:
        """Charge the rate limit and budgets (429 when they refuse); False when audit mode let a refusal pass."""
        refusal = await self.limits.charge(loaded.capability, upstream, body, tool)
        if refusal is None:
            return True
        if loaded.capability.mode == "audit":
            if trace.outcome != "would_deny":  # the first would-be refusal is the one to report
                trace.outcome, trace.reason = "would_deny", refusal.detail or refusal.reason
            return False
        headers = {"Retry-After": str(max(1, round(refusal.retry_after)))}
        if refusal.reason == "budget_exhausted" and refusal.detail is None:
            # Spent until the window ends: the retry hint the OpenAI/Anthropic clients obey (they would
            # otherwise retry a 429 at once, and be refused again).
            headers["X-Should-Retry"] = "false"
        raise errors.SidecarError(429, refusal.reason, refusal.detail or refusal.reason, refusal.message,
                                  headers=headers)

    def settle(self, loaded: Loaded, budgets: list[spec.Budget], tap: ResponseTap, trace: Trace,
               *, deposited: bool) -> None:
        """Charge response budgets after the call: the usage read, else the worst case; nothing if
        the request never reached the upstream."""
        found = tap.usage()
        settlements: list[tuple[spec.Budget, int]] = []
        trace.usage = {}
        for budget in budgets:
            assert budget.worst_case is not None  # required with from: response (spec)
            read = found[budget.field]
            amount = read.charge(budget.worst_case) if trace.forwarded else 0
            settlements.append((budget, amount))
            trace.usage[budget.field] = {"charged": amount} if read.why is None or not trace.forwarded else \
                {"charged": amount, "unreadable": read.why}
            self.metrics.response_charged.labels(f"{budget.upstream}.{budget.field}").inc(amount)
        self.limits.settle(loaded.capability, settlements, deposited=deposited)

    async def consume(self, loaded: Loaded, verdict: decision.Decision, receipts: Receipts, trace: Trace) -> None:
        """Spend the receipts the allowing rule consumes, before forwarding (raise for a refusal)."""
        rule = loaded.capability.rule(verdict.rule) if verdict.allowed and verdict.rule else None
        if rule is None or not rule.consumes:
            return
        gates = [consumption.Gate(name, receipts.candidates.get(name, frozenset())) for name in rule.consumes]
        outcome = await self.single_use.consume(gates)
        if isinstance(outcome, consumption.Consumed):
            trace.receipts_consumed = list(outcome.ids)  # held ones stay held: refused as consumed, not missing
            return
        if loaded.capability.mode == "audit":
            if trace.outcome != "would_deny":
                trace.outcome, trace.reason = "would_deny", outcome.reason
            return
        if outcome.reason == "usage_unavailable":
            raise errors.SidecarError(503, "usage_unavailable", "usage_unavailable", outcome.message, rule=rule.name,
                                      headers={"Retry-After": str(max(1, round(state.RETRY_SECONDS)))})
        raise errors.SidecarError(403, "denied", "receipt_consumed", outcome.message, rule=rule.name)

    def mint_receipt(self, loaded: Loaded, rule: str, correlation: str, trace: Trace) -> str | None:
        """Sign and hold a receipt for an allowed 2xx call; None when the session key can no longer sign."""
        now = datetime.now(UTC)
        session = loaded.session
        if now > session.not_after + core_receipts.SKEW:
            log.warning("session key %s expired; no receipt minted for %s", session.key_id, trace.decision_id)
            return None
        cap = loaded.capability
        if not session.signs_for(cap.qualified_name, loaded.credential.id):
            # Its receipts would be refused elsewhere; holding one here would be the only place it counts.
            log.warning("session key %s is not endorsed for this credential; no receipt minted for %s",
                        session.key_id, trace.decision_id)
            return None
        receipt = core_receipts.mint(session, rule=rule, correlation=correlation, ttl=cap.receipt_ttl,
                                     decision_id=trace.decision_id, now=now)
        self.book.hold(correlation, Held(rule=rule, capability=cap.qualified_name, credential=loaded.credential.id,
                                         expires_at=now + cap.receipt_ttl, id=trace.decision_id),
                       keep=MAX_HELD_PER_RULE if rule in cap.consumed_rules else 1)
        self.metrics.receipts_minted.inc()
        trace.receipt_minted = True
        return receipt

    # -- recording -----------------------------------------------------------------------------
    def finish(self, trace: Trace) -> None:
        """One audit record and the decision metric per request (called once, by the middleware)."""
        if trace.skip or trace.recorded:
            return
        trace.recorded = True
        self.metrics.decision(trace.outcome, trace.reason, trace.upstream)
        self.audit.write(trace.record())


def _token_message(exc: TokenError) -> str:
    """The core's messages name reasons and revocation-id prefixes only; keep it that way."""
    return str(exc)
