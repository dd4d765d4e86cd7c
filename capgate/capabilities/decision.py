"""verify → revocation → authorize → :class:`Decision`.

The verdict always comes from Biscuit Datalog (deny rules first, then allow, default deny); this
module builds the request facts, runs the authorizer once per token (the pod's credential and,
when the agent sends one, its narrowed token: both must allow) and turns the library's answer
into a decision a person can read. The explanation of a denial is computed *after* the verdict
and never changes it.

Time: every time-bounded check is evaluated with a 30 s skew both ways: expiry at ``now - skew``
(a sidecar whose clock runs a little ahead of the operator's does not reject fresh credentials),
not-before at ``now + skew`` (nor one whose clock runs a little behind), and a token issued further
in the future is refused (401 ``not_yet_valid``).

Names: a request reaches :func:`decide` normalized (:mod:`capgate.capabilities.paths`); one that
is not, or that is an HTTP call *and* an action at once, is refused here too (``bad_request``),
so no caller can get a raw name matched. Allow globs match exactly, deny globs leniently.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal

from capgate.capabilities import _biscuit, compiler, paths, tokens
from capgate.capabilities.errors import RequestError, TokenError
from capgate.capabilities.keys import TrustBundle
from capgate.capabilities.spec import Arg, Capability, Rule, numeric_field, string_field

SKEW = timedelta(seconds=30)
# The exact shapes of capgate's own identity and expiry checks, as Biscuit prints them; a user check
# that merely mentions principal() or time() is a policy denial, not a token problem.
_OWNER_CHECK = re.compile(r"^check if principal\(\$p\), \{.*\}\.contains\(\$p\)$")
_BOUND_CHECK = re.compile(r'^check if principal\("[^"]+"\)$')
_NARROWED_EXPIRY = re.compile(r"^check if time\(\$t\), \$t <= \S+$")

Code = Literal["allowed", "invalid_token", "denied"]
Reason = Literal[
    "allowed", "no_matching_rule", "deny_rule", "limit_exceeded", "limit_missing", "missing_receipt",
    "receipt_consumed", "check_failed", "policy_error", "malformed", "bad_signature", "unknown_root", "expired",
    "revoked", "too_deep", "identity", "bad_request", "unknown_upstream", "not_yet_valid",
]
_STATUS = {"allowed": 200, "invalid_token": 401, "denied": 403}


@dataclass(frozen=True)
class Request:
    """What is being asked, with everything the policy may look at.

    HTTP calls set ``method``/``upstream``/``path`` (already normalized); the decision API and MCP
    tools set ``action``/``resource`` (normalized: :func:`paths.normalize_resource`), never both:
    a question about both is two requests, and both must allow. ``receipts`` names rules with a
    verified receipt in ``correlation``; ``unconsumed`` those of them with a receipt the caller has not
    seen consumed (what a single-use gate reads; the sidecar then records the consumption before it
    forwards). ``body`` is the parsed JSON body, only when a limit needs it.
    """

    principal: str
    correlation: str
    method: str | None = None
    upstream: str | None = None
    path: str | None = None
    action: str | None = None
    resource: str | None = None
    body: object = None
    receipts: frozenset[str] = frozenset()
    unconsumed: frozenset[str] = frozenset()
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def describe(self) -> str:
        if self.method is not None:
            return f"{self.method} {self.upstream} {self.path}"
        return f"{self.action} {self.resource}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    code: Code
    reason: Reason
    message: str
    rule: str | None = None

    @property
    def status(self) -> int:
        return _STATUS[self.code]

    def as_dict(self) -> dict[str, object]:
        return {"allowed": self.allowed, "code": self.code, "reason": self.reason, "rule": self.rule,
                "message": self.message}


def _deny(reason: Reason, message: str, rule: str | None = None) -> Decision:
    return Decision(False, "denied", reason, message, rule)


def _invalid(error: TokenError) -> Decision:
    return Decision(False, "invalid_token", error.reason, str(error))


def decide(credentials: Sequence[tokens.Credential], request: Request, *,
           revoked: Container[str] = frozenset(), skew: timedelta = SKEW) -> Decision:
    """Decide ``request`` under every credential given; all must allow, the first refusal wins."""
    if not credentials:
        return Decision(False, "invalid_token", "malformed", "no credential")
    problem = malformed(request)
    if problem is not None:
        return _deny("bad_request", problem)
    allowed: Decision | None = None
    for credential in credentials:
        outcome = decide_one(credential, request, revoked=revoked, skew=skew)
        if not outcome.allowed:
            return outcome
        allowed = allowed or outcome
    assert allowed is not None
    return allowed


def malformed(request: Request) -> str | None:
    """Why ``request`` cannot be decided as given (it must arrive normalized), or None."""
    http = request.method is not None or request.upstream is not None or request.path is not None
    if http and (request.action is not None or request.resource is not None):
        return "a request is an HTTP call or an action, not both"
    if request.path is not None:
        return _not_normal(request.path, resource=False)
    if request.resource is not None:
        return _not_normal(request.resource, resource=True)
    return None


@lru_cache(maxsize=4096)
def _not_normal(name: str, *, resource: bool) -> str | None:
    """Agents repeat names, so the check costs a cache lookup on the hot path, not a second parse."""
    try:
        normal = paths.normalize_resource(name) if resource else paths.normalize(name)
    except RequestError as exc:
        return f"ambiguous name refused: {exc}"
    return None if normal == name else f"the {'resource name' if resource else 'path'} is not normalized"


def decide_one(credential: tokens.Credential, request: Request, *, revoked: Container[str] = frozenset(),
               skew: timedelta = SKEW) -> Decision:
    try:
        check_validity(credential, request.now, revoked=revoked, skew=skew)
        check_holder(credential, request.principal)
    except TokenError as error:
        return _invalid(error)
    cap = credential.capability
    globs = (credential.index.globs_for(request.path) if request.method is not None and request.path
             else compiler.PathMatch())
    result = credential.index.authorize(request.method, request.upstream, globs,
                                        request_facts(cap, request, globs, skew))
    for check in result.failed_checks:
        if check.block and _NARROWED_EXPIRY.match(check.source):
            return Decision(False, "invalid_token", "expired", "narrowed token expired")
        identity_check = _BOUND_CHECK if check.block else _OWNER_CHECK
        if check.block is not None and identity_check.match(check.source):
            return Decision(False, "invalid_token", "identity",
                            f"token is not valid for identity {request.principal!r}")
    if result.deny_rules:
        rule = _first_in_order(cap, result.deny_rules)
        return _deny("deny_rule", f"denied by rule {rule!r}", rule)
    if result.failed_checks:
        check = result.failed_checks[0]
        where = "the narrowed token forbids this" if check.block else "a capability check failed"
        return _deny("check_failed", f"{where}: {check.source}")
    if result.allowed and result.allow_rules:
        rule = _first_in_order(cap, result.allow_rules)
        return Decision(True, "allowed", "allowed", f"allowed by rule {rule!r}", rule)
    if result.error and "no matching policy" not in result.error:
        return _deny("policy_error", "policy evaluation failed")
    return explain_denial(cap, request)


def check_validity(credential: tokens.Credential, now: datetime, *, revoked: Container[str],
                   skew: timedelta = SKEW) -> None:
    """Revocation, lifetime and depth: what makes a token unusable regardless of the request."""
    revoked_id = next((rid for rid in credential.revocation_ids if rid in revoked), None)
    if revoked_id is not None:
        raise TokenError("revoked", f"revocation id {revoked_id[:16]}… is revoked")
    if now - skew > credential.expires_at:
        raise TokenError("expired", f"credential expired at {credential.expires_at.isoformat()}")
    if now + skew < credential.not_before:
        raise TokenError("not_yet_valid", f"credential is not valid before {credential.not_before.isoformat()}")
    if credential.depth > credential.capability.delegation.max_depth:
        raise TokenError("too_deep", f"narrowed {credential.depth} times; at most "
                                     f"{credential.capability.delegation.max_depth} allowed")


def check_holder(credential: tokens.Credential, principal: str) -> None:
    """The owner may use its credential; a delegate only a token narrowed *and bound* to it."""
    if principal == credential.owner:
        return
    if principal not in credential.principals or principal not in credential.bound_to:
        raise TokenError("identity", f"token is not valid for identity {principal!r}")


def request_facts(cap: Capability, request: Request, globs: compiler.PathMatch | None = None,
                  skew: timedelta = SKEW) -> _biscuit.Code:
    """The authorizer facts for ``request`` (see :mod:`capgate.capabilities.compiler`)."""
    facts = _biscuit.Facts()
    facts.add("principal", request.principal)
    facts.add("time", request.now - skew)
    required = cap.required_rules
    if required or cap.datalog:
        facts.add("correlation", request.correlation)
    if request.method is not None and request.upstream is not None:
        facts.add("req", request.method, request.upstream)
        if request.path is not None:
            matched = globs if globs is not None else compiler.match_path(cap, request.path)
            for glob in sorted(matched.exact):
                facts.add("path_match", glob)
            for glob in sorted(matched.lenient):
                facts.add("deny_path_match", glob)
    elif request.method is None:  # a request is HTTP or an action, never both
        _action_facts(facts, cap, request)
    for rule_name in sorted(request.receipts):
        if rule_name in required or cap.datalog:
            facts.add("receipt", rule_name, request.correlation)
    consumed = cap.consumed_rules
    for rule_name in sorted(request.unconsumed & request.receipts):
        if rule_name in consumed or cap.datalog:
            facts.add("unconsumed_receipt", rule_name, request.correlation)
    if request.body is not None:
        for field_path in sorted(cap.limit_fields):
            number = numeric_field(request.body, field_path)
            if number is not None:
                facts.add("body_num", field_path, number)
        if request.action is not None:
            _arg_facts(facts, cap, request.body)
    return facts.code()


def _action_facts(facts: _biscuit.Facts, cap: Capability, request: Request) -> None:
    """``action_match``/``resource_match`` for every glob matched exactly, ``deny_*`` for deny globs
    matched leniently (or exactly)."""
    if request.action is not None:
        action = request.action
        for glob in sorted({g for rule in cap.rules for g in rule.actions}):
            if paths.name_glob_matches(glob, action):
                facts.add("action_match", glob)
        for glob in compiler.deny_globs(cap, "actions"):
            if paths.lenient_name_glob_matches(glob, action):
                facts.add("deny_action_match", glob)
    if request.resource is not None:
        resource = request.resource
        for glob in sorted({g for rule in cap.rules for g in rule.resources}):
            if paths.resource_glob_matches(glob, resource):
                facts.add("resource_match", glob)
        for glob in compiler.deny_globs(cap, "resources"):
            if paths.lenient_resource_glob_matches(glob, resource):
                facts.add("deny_resource_match", glob)


def _arg_facts(facts: _biscuit.Facts, cap: Capability, arguments: object) -> None:
    """``arg_str``/``arg_match`` for the string arguments ``args`` constraints read (actions only),
    and their lenient ``deny_*`` forms for deny rules."""
    for field_path in sorted(cap.arg_fields):
        value = string_field(arguments, field_path)
        if value is None:
            continue
        facts.add("arg_str", field_path, value)
        facts.add("deny_arg_str", field_path, paths.fold_name(value))
        for rule in cap.rules:
            for arg in rule.args:
                if arg.field != field_path or arg.glob is None:
                    continue
                if rule.effect == "allow" and paths.name_glob_matches(arg.glob, value):
                    facts.add("arg_match", field_path, arg.glob)
                if rule.effect == "deny" and paths.lenient_name_glob_matches(arg.glob, value):
                    facts.add("deny_arg_match", field_path, arg.glob)


def matching_globs(cap: Capability, path: str) -> list[str]:
    """The capability's globs ``path`` matches exactly (what allow rules read)."""
    return sorted(compiler.match_path(cap, path).exact)


def _first_in_order(cap: Capability, names: Sequence[str]) -> str:
    order = {rule.name: index for index, rule in enumerate(cap.rules)}
    return min(names, key=lambda name: order.get(name, len(order)))


def scope_matches(rule: Rule, request: Request) -> bool:
    """Does ``rule`` address this request (ignoring limits and receipts)? For explanations only."""
    if rule.is_http:
        if request.method is None:
            return False
        return ((not rule.upstream or rule.upstream == request.upstream)
                and (not rule.methods or request.method in rule.methods)
                and (not rule.paths or any(paths.glob_matches(g, request.path or "") for g in rule.paths)))
    return ((not rule.actions or any(paths.name_glob_matches(g, request.action or "\0") for g in rule.actions))
            and (not rule.resources
                 or any(paths.resource_glob_matches(g, request.resource or "\0") for g in rule.resources))
            and request.action is not None and request.method is None)


def explain_denial(cap: Capability, request: Request) -> Decision:
    """Why no allow rule matched: the closest rule and the first requirement it missed."""
    candidates = [r for r in cap.rules if r.effect == "allow" and scope_matches(r, request)]
    for rule in candidates:
        for required in rule.requires:
            if required not in request.receipts:
                return _deny("missing_receipt", f"rule {rule.name!r} requires a receipt of rule {required!r} "
                                                f"in this correlation", rule.name)
            if required in rule.consumes and required not in request.unconsumed:
                return _deny("receipt_consumed", f"rule {rule.name!r} consumes a receipt of rule {required!r}, and "
                                                 f"every one in this correlation was already used; call "
                                                 f"{required!r} again for a new one", rule.name)
    for rule in candidates:
        for limit in rule.limits:
            value = numeric_field(request.body, limit.field)
            if value is None:
                return _deny("limit_missing", f"rule {rule.name!r} needs a numeric body field {limit.field!r}",
                             rule.name)
            if value > limit.max:
                return _deny("limit_exceeded", f"{limit.field} {value} exceeds the limit {limit.max} of rule "
                                               f"{rule.name!r}", rule.name)
            if value < 0:
                return _deny("limit_exceeded", f"{limit.field} {value} is negative (rule {rule.name!r} allows "
                                               f"0 to {limit.max})", rule.name)
    for rule in candidates:
        for arg in rule.args:
            problem = _arg_problem(arg, request.body if request.action is not None else None)
            if problem:
                return _deny(problem[0], f"rule {rule.name!r}: {problem[1]}", rule.name)
    if candidates:
        return _deny("check_failed", f"rule {candidates[0].name!r} did not allow the request", candidates[0].name)
    return _deny("no_matching_rule", f"no rule allows {request.describe()}")


def _arg_problem(arg: Arg, arguments: object) -> tuple[Reason, str] | None:
    """Why an ``args`` constraint fails (reported like a limit: missing, or out of bounds)."""
    value = string_field(arguments, arg.field)
    if value is None:
        return "limit_missing", f"argument {arg.field!r} is missing or not a string"
    if arg.one_of and value not in arg.one_of:
        return "limit_exceeded", f"argument {arg.field!r} is not one of {', '.join(map(repr, arg.one_of))}"
    if arg.glob is not None and not paths.name_glob_matches(arg.glob, value):
        return "limit_exceeded", f"argument {arg.field!r} does not match {arg.glob!r}"
    return None


class Verifier:
    """Verifies tokens against a trust bundle, caching parsed credentials (parse+verify is the slow part)."""

    CACHE_BYTES = 8 * 1024 * 1024
    """Token text the cache may hold. Entry count alone is no bound: an agent can append blocks to make
    1,024 distinct 64 KiB tokens, and each entry also holds the parsed token and its capability."""

    def __init__(self, trust: TrustBundle, *, cache_size: int = 1024, cache_bytes: int = CACHE_BYTES) -> None:
        self.trust = trust
        self._cache: OrderedDict[str, tokens.Credential] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._held = 0

    def load(self, token: str, now: datetime | None = None) -> tokens.Credential:
        key = token.strip()
        cached = self._cache.get(key)
        moment = now or datetime.now(UTC)
        if cached is not None and cached.root_key_id in self.trust.public_keys(moment):
            self._cache.move_to_end(key)
            return cached
        credential = tokens.load(key, self.trust, now=moment)
        if self._cache.pop(key, None) is not None:
            self._held -= len(key)
        self._cache[key] = credential
        self._held += len(key)
        while len(self._cache) > self._cache_size or self._held > self._cache_bytes:
            evicted, _ = self._cache.popitem(last=False)
            self._held -= len(evicted)
        return credential

    def replace_trust(self, trust: TrustBundle) -> None:
        """A new trust bundle (root rotation): forget what was verified under the old one."""
        self.trust = trust
        self._cache.clear()
        self._held = 0
