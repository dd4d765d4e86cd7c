"""The one typed adapter over ``biscuit_auth``; ``Any`` never escapes this module.

Everything capgate does with Biscuit goes through the handful of functions here, so the
fail-closed rules live in one place:

* values reach Datalog only as parameters (``{name}``), never formatted into source;
* a token is parsed unverified only to learn its root key id, then verified against exactly that
  key; an unknown id fails before any signature work;
* every authorization runs under explicit limits (:data:`LIMITS_*`), and *any* exception from the
  library is a failure, never an allow;
* the blocks a holder appended are vetted by the caller's ``check_blocks`` and counted against
  ``max_blocks`` inside :func:`verify`, before any of their Datalog is loaded into an authorizer.
  The library's limits are checked only between fixpoint iterations (not within one rule's join)
  and not at all for checks, and evaluation holds the GIL, so they cannot bound a hostile block:
  only refusing its shape beforehand can (see :mod:`capgate.capabilities.narrowing`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import biscuit_auth as _biscuit_auth

from capgate.capabilities.errors import TokenError

Term: TypeAlias = str | int | bool | datetime | bytes | frozenset[str] | frozenset[int]
Params: TypeAlias = Mapping[str, Term]
Code: TypeAlias = tuple[str, Params]
"""A Datalog snippet and the values of its ``{parameters}``."""

LIMITS_MAX_FACTS = 1000
LIMITS_MAX_ITERATIONS = 100
LIMITS_MAX_TIME = timedelta(milliseconds=200)
"""A wall-clock backstop, not the bound: facts and iterations bound the trusted authority code
deterministically, and agent-supplied blocks are bounded by their shape before they are evaluated
(:func:`verify`). The library's default (1 ms), and the 20 ms used before, turned a busy 2-core machine's
scheduling delay into a spurious deny (seen: a sidecar refusing its own freshly minted credential while
CI and four test runs shared the cores); our policies evaluate in well under a millisecond."""

POLICIES = "deny if deny_match($rule); allow if allow_match($rule);"
"""Deny rules win; with no matching allow, no policy matches and the library denies."""

ba: Any = _biscuit_auth
"""The library's shipped stubs lag its API (limits, Algorithm, build_unauthenticated), so it is
typed as Any here, and only here."""

_INERT = re.compile(r"[A-Za-z0-9._:/*@=+~-]{0,256}")
"""Strings that cannot leave a Datalog string literal: no quote, no backslash, no control or space."""


class Facts:
    """Request facts for an authorizer, assembled here so every value is encoded in one place.

    Binding a parameter costs this library ~7 µs per value, more than the rest of a decision's
    fact loading, so values that provably cannot escape a literal (:data:`_INERT` strings,
    integers, UTC datetimes) are written as literals; anything else still goes in as a parameter.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._params: dict[str, Term] = {}

    def add(self, predicate: str, *values: str | int | datetime) -> None:
        rendered = []
        for value in values:
            if isinstance(value, bool):
                rendered.append("true" if value else "false")
            elif isinstance(value, int):
                rendered.append(str(value))
            elif isinstance(value, datetime) and value.utcoffset() == timedelta(0):
                rendered.append(value.replace(microsecond=0, tzinfo=None).isoformat() + "Z")
            elif isinstance(value, str) and _INERT.fullmatch(value):
                rendered.append(f'"{value}"')
            else:
                name = f"p{len(self._params)}"
                self._params[name] = value
                rendered.append("{" + name + "}")
        self._parts.append(f"{predicate}({', '.join(rendered)});")

    def code(self) -> Code:
        return " ".join(self._parts), dict(self._params)


_CHECK_RE = re.compile(r"Check n°(\d+) in (?:block n°(\d+)|(authorizer)): ")


def _convert(params: Params | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {key: (set(value) if isinstance(value, frozenset) else value) for key, value in params.items()}


@dataclass(frozen=True)
class FailedCheck:
    block: int | None  # None: the authorizer's own check
    source: str


@dataclass(frozen=True)
class AuthzResult:
    """What the library concluded; ``allowed`` is only true when an allow policy matched and no check failed."""

    allowed: bool
    allow_rules: tuple[str, ...]
    deny_rules: tuple[str, ...]
    failed_checks: tuple[FailedCheck, ...]
    error: str | None


class Token:
    """A Biscuit whose signatures were verified against a known root key."""

    def __init__(self, biscuit: Any, root_key_id: int | None) -> None:
        self._biscuit = biscuit
        self.root_key_id = root_key_id
        self.revocation_ids: tuple[str, ...] = tuple(str(r) for r in biscuit.revocation_ids)
        self.block_count: int = int(biscuit.block_count())

    def to_base64(self) -> str:
        return str(self._biscuit.to_base64())

    def block_source(self, index: int) -> str:
        return str(self._biscuit.block_source(index))

    def append(self, code: Sequence[Code]) -> Token:
        """Return a new token with one more (attenuation) block."""
        block = ba.BlockBuilder("")
        for source, params in code:
            block.add_code(source, _convert(params))
        return Token(self._biscuit.append(block), self.root_key_id)

    def query_authority(self, rule: str, params: Params | None = None) -> list[tuple[Term, ...]]:
        """Facts derived from the authority block only (the default trust scope)."""
        authorizer = ba.AuthorizerBuilder("")
        authorizer.set_limits(_limits(authorizer))
        built = authorizer.build(self._biscuit)
        return [tuple(fact.terms) for fact in built.query(ba.Rule(rule, _convert(params)))]

    def authorize(self, facts: Sequence[Code]) -> AuthzResult:
        """Run the policies of :data:`POLICIES` against this token plus the request ``facts``."""
        try:
            builder = ba.AuthorizerBuilder(POLICIES)
            for source, params in facts:
                builder.add_code(source, _convert(params))
            builder.set_limits(_limits(builder))
            authorizer = builder.build(self._biscuit)
        except Exception as exc:  # noqa: BLE001 - any library failure fails closed
            return AuthzResult(False, (), (), (), f"authorizer setup failed: {type(exc).__name__}")
        return _run(authorizer)

    def authority_equals(self, code: Sequence[Code]) -> bool:
        """Does ``code`` print exactly as this token's verified authority block does?"""
        try:
            probe = ba.BiscuitBuilder()
            for source, params in code:
                probe.add_code(source, _convert(params))
            return str(probe.build(ba.KeyPair().private_key).block_source(0)) == self.block_source(0)
        except Exception:  # noqa: BLE001 - any library failure fails closed
            return False


class Prepared:
    """An authorizer pre-loaded with a verified authority block's code, for the hot path.

    Loading a token into an authorizer and evaluating every compiled rule dominates a decision.
    A :class:`Prepared` holds a snapshot of an authorizer that already contains the authority
    code (regenerated from the verified spec and proven identical with
    :meth:`Token.authority_equals`), so a request only adds its facts. Callers may leave out rules
    that cannot fire for a request (see ``compiler.prune``); the fixpoint is unchanged.
    """

    def __init__(self, code: Sequence[Code]) -> None:
        builder = ba.AuthorizerBuilder(POLICIES)
        for source, params in code:
            builder.add_code(source, _convert(params))
        builder.set_limits(_limits(builder))
        self._snapshot: bytes = bytes(builder.raw_snapshot())

    def authorize(self, facts: Sequence[Code]) -> AuthzResult:
        try:
            builder = ba.AuthorizerBuilder.from_raw_snapshot(self._snapshot)
            for source, params in facts:
                builder.add_code(source, _convert(params))
            authorizer = builder.build_unauthenticated()
        except Exception as exc:  # noqa: BLE001 - any library failure fails closed
            return AuthzResult(False, (), (), (), f"authorizer setup failed: {type(exc).__name__}")
        return _run(authorizer)


def _run(authorizer: Any) -> AuthzResult:
    error: str | None = None
    try:
        authorizer.authorize()
        allowed = True
    except Exception as exc:  # noqa: BLE001 - any library failure fails closed
        allowed = False
        error = str(exc.args[0]) if exc.args else type(exc).__name__
    # Only ask what the outcome can contain: an allow names its rule, a deny policy names its rule.
    try:
        allow_rules = tuple(str(f.terms[0]) for f in authorizer.query(_ALLOW_QUERY)) if allowed else ()
        deny_rules = (tuple(str(f.terms[0]) for f in authorizer.query(_DENY_QUERY))
                      if error and "deny policy matched" in error else ())
    except Exception:  # noqa: BLE001 - any library failure fails closed
        return AuthzResult(False, (), (), (), error or "query failed")
    return AuthzResult(allowed, allow_rules, deny_rules, _failed_checks(error), error)


_ALLOW_QUERY = ba.Rule("q($r) <- allow_match($r)")
_DENY_QUERY = ba.Rule("q($r) <- deny_match($r)")


def _limits(builder: Any) -> Any:
    limits = builder.limits()
    limits.max_facts = LIMITS_MAX_FACTS
    limits.max_iterations = LIMITS_MAX_ITERATIONS
    limits.max_time = LIMITS_MAX_TIME
    return limits


def _failed_checks(error: str | None) -> tuple[FailedCheck, ...]:
    if not error or "following checks failed" not in error:
        return ()
    tail = error.split("following checks failed: ", 1)[1]
    marks = list(_CHECK_RE.finditer(tail))
    out = []
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(tail)
        source = tail[mark.end():end].rstrip(", ")
        block = None if mark.group(3) else int(mark.group(2))
        out.append(FailedCheck(block=block, source=source))
    return tuple(out)


@dataclass(frozen=True)
class Unverified:
    """What can be read from a token without any key: for ``capgate inspect`` and key selection."""

    root_key_id: int | None
    block_sources: tuple[str, ...]
    revocation_ids: tuple[str, ...]


def read_unverified(token: str) -> Unverified:
    unverified = _parse_unverified(token)
    count = int(unverified.block_count())
    return Unverified(
        root_key_id=unverified.root_key_id(),
        block_sources=tuple(str(unverified.block_source(i)) for i in range(count)),
        revocation_ids=tuple(str(r) for r in unverified.revocation_ids),
    )


def _parse_unverified(token: str) -> Any:
    if not token or len(token) > 64 * 1024:
        raise TokenError("malformed", "empty or oversized token")
    try:
        return ba.UnverifiedBiscuit.from_base64(token.strip())
    except Exception as exc:
        raise TokenError("malformed", "not a Biscuit token") from exc


def verify(token: str, public_keys: Mapping[int, bytes], *, max_blocks: int,
           check_blocks: Callable[[Sequence[str]], None]) -> Token:
    """Verify ``token`` against the root key its id names; unknown ids and bad signatures fail.

    More than ``max_blocks`` blocks is ``too_deep`` before any signature work; the printed sources
    of the blocks after the authority block go to ``check_blocks``, which raises
    :class:`TokenError` to refuse them, before the token can reach an authorizer.
    """
    unverified = _parse_unverified(token)
    try:
        count = int(unverified.block_count())
    except Exception as exc:
        raise TokenError("malformed", "not a Biscuit token") from exc
    if count > max_blocks:
        raise TokenError("too_deep", f"{count} blocks; at most {max_blocks} are accepted")
    key_id = unverified.root_key_id()
    if key_id is None or key_id not in public_keys:
        raise TokenError("unknown_root", f"root key id {key_id} is not trusted")
    try:
        public = ba.PublicKey.from_bytes(public_keys[key_id], ba.Algorithm.Ed25519)
        biscuit = unverified.verify(public)
    except Exception as exc:
        raise TokenError("bad_signature", f"signature does not verify under root key id {key_id}") from exc
    check_blocks([str(biscuit.block_source(index)) for index in range(1, count)])
    return Token(biscuit, key_id)


def mint(code: Sequence[Code], private_key: bytes, key_id: int) -> Token:
    """Sign an authority block made of ``code`` with the root key ``key_id``."""
    builder = ba.BiscuitBuilder()
    for source, params in code:
        builder.add_code(source, _convert(params))
    builder.set_root_key_id(key_id)
    return Token(builder.build(ba.PrivateKey.from_bytes(private_key, ba.Algorithm.Ed25519)), key_id)


def parse_error(source: str) -> str | None:
    """Why ``source`` is not valid block Datalog, or None."""
    try:
        ba.BlockBuilder(source)
    except Exception as exc:  # noqa: BLE001 - any library failure fails closed
        return str(exc.args[0]) if exc.args else type(exc).__name__
    return None


def canonical_source(source: str) -> str:
    """The library's own printing of a block, used to inspect user Datalog for reserved names."""
    key = ba.KeyPair()
    builder = ba.BiscuitBuilder(source)
    return str(builder.build(key.private_key).block_source(0))


def new_private_key() -> bytes:
    """32 raw bytes of a fresh Ed25519 private key."""
    return bytes(ba.KeyPair().private_key.to_bytes())


def public_key_of(private_key: bytes) -> bytes:
    pair = ba.KeyPair.from_private_key(ba.PrivateKey.from_bytes(private_key, ba.Algorithm.Ed25519))
    return bytes(pair.public_key.to_bytes())
