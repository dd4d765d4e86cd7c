"""Mint, load, attenuate and inspect capgate credentials.

A credential is a Biscuit whose authority block is the compiled capability
(:mod:`capgate.capabilities.compiler`). Loading verifies it once and reads the embedded spec, so
callers cache the returned :class:`Credential` and decide many requests against it.

Attenuation appends one block of *checks* only. Biscuit guarantees a block can add checks but
never facts the authorizer trusts, so a narrowed token can never grant more than its parent; the
validation here only turns "would be pointless" into a clear error for the person asking.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from capgate import timestamps
from capgate.capabilities import _biscuit, compiler, narrowing
from capgate.capabilities.errors import AttenuationError, SpecError, TokenError
from capgate.capabilities.keys import KeySet, TrustBundle, parse_time
from capgate.capabilities.spec import MAX_DEPTH, MAX_INT64, Capability, parse_spec


class DecisionIndex:
    """Prepared authorizers for one credential, keyed by the request's (method, upstream, matched globs).

    The exact path (``Token.authorize``) loads the whole token and evaluates every rule for every
    request. For a credential that is just its authority block, the code is regenerated from the
    verified spec, proven to print identically to the signed block, and kept as one prepared
    authorizer per (method, upstream, matched globs) holding only the rules that can fire for it
    (the key is what decides which rules can fire, so it is exact). Narrowed tokens,
    and any credential whose regenerated code differs, always take the exact path.
    """

    MAX_PATHS = 4096
    MAX_ENTRIES = 256
    """Bounds memory when an agent sprays methods and upstream names; beyond it, the exact path."""

    def __init__(self, parsed: _biscuit.Token, code: list[_biscuit.Code] | None, capability: Capability) -> None:
        self._parsed = parsed
        self._code = code
        self._capability = capability
        self._globs: dict[str, compiler.PathMatch] = {}
        self._prepared: dict[tuple[str | None, str | None, compiler.PathMatch], _biscuit.Prepared] = {}

    @property
    def exact_only(self) -> bool:
        return self._code is None

    def globs_for(self, path: str) -> compiler.PathMatch:
        """The capability's globs that match ``path`` (agents repeat paths, so this is remembered)."""
        found = self._globs.get(path)
        if found is None:
            found = compiler.match_path(self._capability, path)
            if len(self._globs) >= self.MAX_PATHS:
                self._globs.clear()
            self._globs[path] = found
        return found

    def authorize(self, method: str | None, upstream: str | None, globs: compiler.PathMatch,
                  facts: _biscuit.Code) -> _biscuit.AuthzResult:
        """Authorize a request whose path matched exactly ``globs`` of the capability."""
        if self._code is None:
            return self._parsed.authorize([facts])
        key = (method, upstream, globs) if method is not None else (None, None, compiler.PathMatch())
        prepared = self._prepared.get(key)
        if prepared is None:
            if len(self._prepared) >= self.MAX_ENTRIES:
                return self._parsed.authorize([facts])
            prepared = _biscuit.Prepared(compiler.prune(self._code, method=method, upstream=upstream, globs=globs))
            self._prepared[key] = prepared
        return prepared.authorize([facts])


@dataclass(frozen=True)
class Credential:
    """A verified token and the capability its authority block carries."""

    token: str
    parsed: _biscuit.Token
    capability: Capability
    issued_at: datetime
    expires_at: datetime
    not_before: datetime
    """The latest issue time of its blocks (authority ``issuedAt``, narrowing ``notBefore``): a token
    used earlier than this (minus the skew) is refused, so a credential minted by a clock that runs
    ahead, or a narrowed token stamped in the future, does not work early."""
    principals: frozenset[str]
    index: DecisionIndex
    bound_to: frozenset[str] = frozenset()
    """Principals a narrowing block binds this token to; a delegate may only use a token bound to it."""

    @property
    def owner(self) -> str:
        return self.capability.principal

    @property
    def id(self) -> str:
        """The authority block's revocation id: names this credential in logs, receipts and revocations."""
        return self.parsed.revocation_ids[0]

    @property
    def revocation_ids(self) -> tuple[str, ...]:
        return self.parsed.revocation_ids

    @property
    def depth(self) -> int:
        """How many times this token was narrowed."""
        return self.parsed.block_count - 1

    @property
    def root_key_id(self) -> int | None:
        return self.parsed.root_key_id


def mint(cap: Capability, keyset: KeySet, *, now: datetime | None = None, ttl: timedelta | None = None) -> str:
    """Sign a fresh credential for ``cap`` with the active root key."""
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    expires = issued + (ttl or cap.credential_ttl)
    compiler.validate(cap)
    root = keyset.active
    assert root.private is not None
    try:
        token = _biscuit.mint(compiler.compile_authority(cap, issued, expires), root.private, root.key_id)
    except Exception as exc:
        raise SpecError("spec", f"cannot be compiled: {type(exc).__name__}") from exc
    return token.to_base64()


def load(token: str, trust: TrustBundle, *, now: datetime | None = None) -> Credential:
    """Verify ``token`` and read its capability; raises :class:`TokenError` (never a partial result)."""
    moment = now or datetime.now(UTC)
    narrowing.check_encoded(token)
    parsed = _biscuit.verify(token, trust.public_keys(moment), max_blocks=1 + MAX_DEPTH,
                             check_blocks=narrowing.check_blocks)
    try:
        rows = parsed.query_authority("q($j) <- spec($j)")
        versions = parsed.query_authority("q($v) <- capgate_version($v)")
        if len(rows) != 1 or versions != [(compiler.FORMAT_VERSION,)]:
            raise TokenError("malformed", "not a capgate credential")
        document = json.loads(str(rows[0][0]))
        capability = parse_spec(document["spec"], name=document["name"], namespace=document["namespace"])
        issued = parse_time(document["issuedAt"], "issuedAt")
        expires = parse_time(document["expiresAt"], "expiresAt")
        principals = frozenset(str(p) for p in document["principals"])
    except TokenError:
        raise
    except Exception as exc:
        raise TokenError("malformed", "unreadable capability in authority block") from exc
    if issued is None or expires is None:
        raise TokenError("malformed", "credential without lifetime")
    narrowed = [parsed.block_source(index) for index in range(1, parsed.block_count)]
    expires = min([expires, *(_block_expiries(narrowed))])
    not_before = max([issued, *_block_not_befores(narrowed)])
    code: list[_biscuit.Code] | None = None
    if parsed.block_count == 1:
        regenerated = compiler.compile_authority(capability, issued, expires)
        code = regenerated if parsed.authority_equals(regenerated) else None
    return Credential(token=token.strip(), parsed=parsed, capability=capability, issued_at=issued,
                      expires_at=expires, principals=principals, index=DecisionIndex(parsed, code, capability),
                      bound_to=frozenset(_block_bindings(narrowed)), not_before=not_before)


_EXPIRY_CHECK = re.compile(r"^check if time\(\$t\), \$t <= (\S+);$", re.MULTILINE)
_BINDING_CHECK = re.compile(r'^check if principal\("([^"]+)"\);$', re.MULTILINE)
_NOT_BEFORE = re.compile(r'^attenuation\(".*"notBefore": "([^"]+)".*"\);$', re.MULTILINE)


def _block_expiries(sources: list[str]) -> list[datetime]:
    """Expiries that narrowing blocks enforce in Datalog, read back so callers can show and pre-check them."""
    found = []
    for source in sources:
        for match in _EXPIRY_CHECK.finditer(source):
            moment = parse_time(match.group(1), "expiry")
            if moment is not None:
                found.append(moment)
    return found


def _block_not_befores(sources: list[str]) -> list[datetime]:
    """``notBefore`` of narrowing blocks (in their ``attenuation`` description; Biscuit prints strings
    unescaped). A block anyone appended can only make its token valid *later*, so reading it is safe."""
    found = []
    for source in sources:
        for match in _NOT_BEFORE.finditer(source):
            moment = timestamps.parse(match.group(1))
            if moment is not None:  # an unreadable claim restricts nothing
                found.append(moment)
    return found


def _block_bindings(sources: list[str]) -> list[str]:
    return [match.group(1) for source in sources for match in _BINDING_CHECK.finditer(source)]


def attenuate(
    parent: Credential,
    *,
    rules: Sequence[str] | None = None,
    limits: Mapping[str, Mapping[str, int]] | None = None,
    ttl: timedelta | None = None,
    principal: str | None = None,
    now: datetime | None = None,
) -> str:
    """A narrowed token: a subset of rules, lower limits, a shorter life, another holder.

    ``limits`` maps rule name → field → new maximum. ``principal`` (``namespace/serviceaccount``)
    must be one the capability lists under ``delegation.serviceAccounts``.
    """
    cap = parent.capability
    if parent.depth >= cap.delegation.max_depth:
        raise AttenuationError(
            f"already narrowed {parent.depth} times; the capability allows {cap.delegation.max_depth}")
    code: list[_biscuit.Code] = []
    description: dict[str, Any] = {}
    allow_names = [r.name for r in cap.rules if r.effect == "allow"]
    if rules is not None:
        unknown = [r for r in rules if r not in allow_names]
        if unknown:
            raise AttenuationError(f"not allow rules of {cap.qualified_name}: {', '.join(sorted(unknown))}")
        if not rules:
            raise AttenuationError("a narrowed token needs at least one rule")
        code.append(("check if allow_match($r), {rules}.contains($r);", {"rules": frozenset(rules)}))
        description["rules"] = sorted(rules)
    for rule_name, fields in (limits or {}).items():
        rule = cap.rule(rule_name)
        if rule is None or rule.effect != "allow":
            raise AttenuationError(f"no allow rule {rule_name!r} to lower limits on")
        for field, maximum in fields.items():
            if isinstance(maximum, bool) or not isinstance(maximum, int) or not 0 <= maximum <= MAX_INT64:
                raise AttenuationError(f"limit {rule_name}.{field} must be a non-negative integer up to {MAX_INT64}")
            current = next((lim.max for lim in rule.limits if lim.field == field), None)
            if current is not None and maximum > current:
                raise AttenuationError(f"limit {rule_name}.{field}={maximum} is above the parent's {current}")
            code.append(("check if allow_match($r), $r != {rule} or body_num({field}, $v), $v >= 0, $v <= {max};",
                         {"rule": rule_name, "field": field, "max": maximum}))
            description.setdefault("limits", {}).setdefault(rule_name, {})[field] = maximum
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    description["notBefore"] = timestamps.iso(moment)
    if ttl is not None:
        if ttl <= timedelta(0):
            raise AttenuationError("ttl must be positive")
        expires = min(moment + ttl, parent.expires_at)
        code.append(("check if time($t), $t <= {exp};", {"exp": expires}))
        description["expiresAt"] = timestamps.iso(expires)
    if principal is not None:
        if principal not in parent.principals:
            raise AttenuationError(
                f"{principal!r} is not a delegate of {cap.qualified_name} (spec.delegation.serviceAccounts)")
        code.append(("check if principal({p});", {"p": principal}))
        description["principal"] = principal
    if not code:
        raise AttenuationError("nothing to narrow: give rules, limits, ttl or principal")
    code.insert(0, ("attenuation({json});", {"json": json.dumps(description, sort_keys=True)}))
    _check_room(parent, len(code))
    return parent.parsed.append(code).to_base64()


def _check_room(parent: Credential, adding: int) -> None:
    """Never hand out a token that loading would refuse (:data:`narrowing.MAX_STATEMENTS`)."""
    held = sum(narrowing.statements(parent.parsed.block_source(i)) for i in range(1, parent.parsed.block_count))
    if held + adding > narrowing.MAX_STATEMENTS:
        raise AttenuationError(f"a narrowed token holds at most {narrowing.MAX_STATEMENTS} checks; "
                               f"this one would hold {held + adding}")


def inspect(token: str) -> dict[str, Any]:
    """Blocks, expiry and revocation ids, readable without any key (and not verified)."""
    info = _biscuit.read_unverified(token)
    blocks = []
    for index, source in enumerate(info.block_sources):
        blocks.append({"index": index, "revocationId": info.revocation_ids[index], "datalog": source})
    summary: dict[str, Any] = {"verified": False, "rootKeyId": info.root_key_id, "blocks": blocks,
                               "revocationIds": list(info.revocation_ids)}
    authority = info.block_sources[0] if info.block_sources else ""
    for line in authority.splitlines():
        # Biscuit prints strings without escaping, so the JSON stands between the quotes as is.
        if line.startswith('spec("') and line.endswith('");'):
            try:
                document = json.loads(line[len('spec("'):-len('");')])
            except ValueError:
                break
            summary.update(capability=f"{document.get('namespace')}/{document.get('name')}",
                           issuedAt=document.get("issuedAt"), expiresAt=document.get("expiresAt"),
                           principals=document.get("principals"))
    return summary
