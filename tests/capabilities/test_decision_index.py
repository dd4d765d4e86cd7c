"""The decision index (prepared, pruned authorizers) decides exactly as the whole signed token does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capgate.capabilities import compiler, decision, keys, spec, tokens
from tests.crd_samples import example

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
KEYSET = keys.KeySet.generate(NOW)


def booking_with_extras() -> spec.Capability:
    obj = example()
    obj["spec"]["rules"] += [
        {"name": "any-method-flights", "effect": "allow", "upstream": "flights", "paths": ["/status"]},
        {"name": "tool", "effect": "allow", "actions": ["mcp.call"], "resources": ["mcp://payments/*"]},
        {"name": "no-admin", "effect": "deny", "paths": ["/admin/**"]},
        {"name": "admin-reads", "effect": "allow", "methods": ["GET"], "paths": ["/admin/**"]},
        {"name": "no-refunds", "effect": "deny", "actions": ["mcp.call"], "resources": ["mcp://payments/refund"]},
        {"name": "wild", "effect": "allow", "methods": ["PUT"], "paths": ["/*/items/**"]},
    ]
    obj["spec"]["datalog"] = "check if time($t), $t < 2027-01-01T00:00:00Z;\ncheck if principal($p), $p != \"x/y\";"
    return spec.parse_capability(obj)


CAP = booking_with_extras()
CREDENTIAL = tokens.load(tokens.mint(CAP, KEYSET, now=NOW), KEYSET.trust_bundle(), now=NOW)

methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])
upstreams = st.sampled_from(["flights", "payments", "hotels"])
# Lenient look-alikes of deny globs too: the index must agree on deny rules matched leniently.
segments = st.sampled_from(["search", "v1", "charges", "admin", "items", "status", "x", "42", "ADMIN", "admin.",
                            "admin ", "Admin.json", "\uff41dmin", "Search"])
request_paths = st.tuples(st.lists(segments, min_size=0, max_size=4), st.booleans()).map(
    lambda drawn: "/" + "/".join(drawn[0]) + ("/" if drawn[1] and drawn[0] else ""))
bodies = st.one_of(st.none(), st.fixed_dictionaries({"amount": st.integers(-10, 100_000)}),
                   st.fixed_dictionaries({"amount": st.text(max_size=3)}))
receipt_sets = st.frozensets(st.sampled_from(["search", "charge", "tool"]), max_size=2)
principals = st.sampled_from(["travel/booking-agent", "travel/other", "x/y"])


def both_paths(request: decision.Request) -> tuple[object, object]:
    globs = (compiler.match_path(CAP, request.path)
             if request.method is not None and request.path else compiler.PathMatch())
    facts = decision.request_facts(CAP, request, globs)
    indexed = CREDENTIAL.index.authorize(request.method, request.upstream, globs, facts)
    exact = CREDENTIAL.parsed.authorize([facts])
    return ((indexed.allowed, set(indexed.allow_rules), set(indexed.deny_rules)),
            (exact.allowed, set(exact.allow_rules), set(exact.deny_rules)))


def test_fresh_credentials_use_the_index() -> None:
    assert not CREDENTIAL.index.exact_only


def test_narrowed_tokens_always_take_the_exact_path() -> None:
    narrowed = tokens.load(tokens.attenuate(CREDENTIAL, rules=["search"], now=NOW), KEYSET.trust_bundle(), now=NOW)
    assert narrowed.index.exact_only


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, upstream=upstreams, path=request_paths, body=bodies, receipts=receipt_sets,
       principal=principals, minutes=st.integers(-5, 90))
def test_index_agrees_with_the_whole_token_on_http_requests(method: str, upstream: str, path: str, body: object,
                                                            receipts: frozenset[str], principal: str,
                                                            minutes: int) -> None:
    request = decision.Request(principal=principal, correlation="c", method=method, upstream=upstream, path=path,
                               body=body, receipts=receipts, now=NOW + timedelta(minutes=minutes))
    indexed, exact = both_paths(request)
    assert indexed == exact


@settings(max_examples=100, deadline=None)
@given(action=st.sampled_from(["mcp.call", "mcp.list", "http.get"]),
       resource=st.sampled_from(["mcp://payments/charge", "mcp://flights/search", "mcp://payments/a/b",
                                 "mcp://payments/refund", "mcp://payments/REFUND", "mcp://Payments/refund/"]))
def test_index_agrees_with_the_whole_token_on_actions(action: str, resource: str) -> None:
    request = decision.Request(principal="travel/booking-agent", correlation="c", action=action, resource=resource,
                               now=NOW)
    indexed, exact = both_paths(request)
    assert indexed == exact
