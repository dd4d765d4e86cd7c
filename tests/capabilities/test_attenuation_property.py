"""A narrowed token never allows what its parent denies, whatever the narrowing and the request.

The parent is a fresh credential (decided through the decision index); narrowed tokens always take
the exact path, so this also checks the two paths against each other from the outside.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from functools import cache
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from capgate.capabilities import decision, tokens
from capgate.capabilities.errors import AttenuationError
from capgate.capabilities.spec import Capability

from . import _support
from ._support import HELPER, NOW, PRINCIPAL, STRANGER

EXTRA_RULES = [
    {"name": "book", "effect": "allow", "upstream": "flights", "methods": ["POST", "PUT"],
     "paths": ["/bookings/*", "/bookings/*/seats"],
     "limits": [{"field": "price.total", "max": 900}, {"field": "amount", "max": 500}]},
    {"name": "read-payments", "effect": "allow", "upstream": "payments", "methods": ["GET"], "paths": ["/v1/**"]},
    {"name": "status", "effect": "allow", "upstream": "flights"},
    {"name": "tools", "effect": "allow", "actions": ["mcp.call"], "resources": ["mcp://flights/*"]},
    {"name": "no-admin", "effect": "deny", "paths": ["/admin/**"]},
]
LIMITS = {("charge", "amount"): 40_000, ("book", "price.total"): 900, ("book", "amount"): 500,
          ("read-payments", "amount"): None, ("search", "amount"): None}


@cache
def capability() -> Capability:
    def mutate(spec: dict[str, Any]) -> None:
        spec["rules"] += EXTRA_RULES
        spec["delegation"] = {"serviceAccounts": ["helper"], "maxDepth": 3}
    return _support.parse(mutate)


@cache
def parent() -> tokens.Credential:
    return _support.credential(capability())


ALLOW_RULES = [r.name for r in capability().rules if r.effect == "allow"]
ALL_RULES = [r.name for r in capability().rules]


@st.composite
def narrowings(draw: st.DrawFn) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if draw(st.booleans()):
        kwargs["rules"] = draw(st.lists(st.sampled_from(ALLOW_RULES), min_size=1, max_size=4, unique=True))
    lowered: dict[str, dict[str, int]] = {}
    for (rule, field), current in LIMITS.items():
        if draw(st.booleans()):
            lowered.setdefault(rule, {})[field] = draw(st.integers(0, current if current is not None else 50_000))
    if lowered:
        kwargs["limits"] = lowered
    if draw(st.booleans()):
        kwargs["ttl"] = timedelta(minutes=draw(st.integers(1, 120)))
    if draw(st.booleans()):
        kwargs["principal"] = draw(st.sampled_from([PRINCIPAL, HELPER]))
    if not kwargs:
        kwargs["ttl"] = timedelta(minutes=30)
    return kwargs


NUMBERS = st.one_of(st.integers(-10, 60_000), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=4), st.none())
BODIES = st.one_of(
    st.none(),
    st.fixed_dictionaries({"amount": NUMBERS}),
    st.fixed_dictionaries({"amount": NUMBERS, "price": st.fixed_dictionaries({"total": NUMBERS})}),
    st.text(max_size=5),
)
PATHS = ["/", "/search", "/search/", "/search/lhr", "/search/lhr/jfk", "/searches", "/v1/charges", "/v1/charges/",
         "/v1/charges/ch_1", "/v1/refunds", "/bookings/1", "/bookings/1/seats", "/bookings/", "/bookings",
         "/admin", "/admin/users", "/status"]


@st.composite
def requests(draw: st.DrawFn) -> decision.Request:
    common: dict[str, Any] = {
        "principal": draw(st.sampled_from([PRINCIPAL, HELPER, STRANGER])),
        "correlation": draw(st.sampled_from(["session-1", "session-2"])),
        "receipts": draw(st.frozensets(st.sampled_from(ALL_RULES), max_size=3)),
        "body": draw(BODIES),
        "now": NOW + timedelta(seconds=draw(st.integers(-60, 2 * 3600))),
    }
    if draw(st.integers(0, 9)) == 0:
        return decision.Request(action=draw(st.sampled_from(["mcp.call", "mcp.list"])),
                                resource=draw(st.sampled_from(["mcp://flights/search", "mcp://payments/refund"])),
                                **common)
    return decision.Request(method=draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"])),
                            upstream=draw(st.sampled_from(["flights", "payments", "hotels"])),
                            path=draw(st.sampled_from(PATHS)), **common)


def narrowed(base: tokens.Credential, kwargs: dict[str, Any]) -> tokens.Credential | None:
    try:
        return _support.narrow(base, now=NOW, **kwargs)
    except AttenuationError:
        return None  # e.g. re-delegating a token bound to HELPER; refusing is always safe


@settings(max_examples=200, deadline=None)
@given(first=narrowings(), second=st.one_of(st.none(), narrowings()), request=requests())
def test_a_narrowed_token_never_allows_what_its_parent_denies(first: dict[str, Any], second: dict[str, Any] | None,
                                                             request: decision.Request) -> None:
    base = parent()
    child = narrowed(base, first)
    assert child is not None, "a first narrowing within the capability is always granted"
    chain = [base, child]
    if second is not None:
        grandchild = narrowed(child, second)
        if grandchild is not None:
            chain.append(grandchild)
    # The parent's holder is its owner: a delegate can only ever use a token narrowed and bound to it.
    parent_allows = decision.decide([base], dataclasses.replace(request, principal=PRINCIPAL)).allowed

    for token in chain[1:]:
        if decision.decide([token], request).allowed:
            assert parent_allows, f"{request.describe()} allowed by a narrowed token only"
        if decision.decide([base, token], request).allowed:
            assert parent_allows
        assert not decision.decide([token], request, revoked={base.id}).allowed
    if len(chain) == 3 and decision.decide([chain[2]], request).allowed:
        # The child's holder: the delegate it is bound to, or else the owner.
        holder = next(iter(chain[1].bound_to), PRINCIPAL)
        assert decision.decide([chain[1]], dataclasses.replace(request, principal=holder)).allowed, \
            "a grandchild allows what its own parent denies"


@settings(max_examples=200, deadline=None)
@given(narrowing=narrowings(), request=requests())
def test_a_narrowed_token_respects_its_own_narrowing(narrowing: dict[str, Any], request: decision.Request) -> None:
    child = narrowed(parent(), narrowing)
    assert child is not None
    outcome = decision.decide([child], request)
    if not outcome.allowed:
        return

    if "principal" in narrowing:
        assert request.principal == narrowing["principal"]
    if "ttl" in narrowing:
        assert request.now - decision.SKEW <= NOW + narrowing["ttl"]
    if "rules" in narrowing:
        assert set(_scoped_rules(request)) & set(narrowing["rules"]), "allowed outside the narrowed rules"


def _scoped_rules(request: decision.Request) -> list[str]:
    return [r.name for r in capability().rules if r.effect == "allow" and decision.scope_matches(r, request)]


def test_a_narrowed_token_never_allows_a_mixed_http_and_action_request_its_parent_denies() -> None:
    request = decision.Request(principal=PRINCIPAL, correlation="c", method="POST", upstream="payments", path="/mcp",
                               action="mcp.call", resource="mcp://flights/search", now=NOW)
    base = parent()
    child = _support.narrow(base, ttl=timedelta(minutes=5))

    assert decision.decide([child], request).allowed <= decision.decide([base], request).allowed
