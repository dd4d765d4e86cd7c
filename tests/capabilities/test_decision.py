"""Deciding requests for the booking example: what an agent is allowed, and why it is refused."""

from __future__ import annotations

import math
from datetime import timedelta
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capgate.capabilities import decision, tokens
from capgate.capabilities.errors import SpecError
from capgate.capabilities.spec import Capability

from . import _support
from ._support import NOW, PRINCIPAL, STRANGER, charge, http


def decide(cred: tokens.Credential, request: decision.Request, **kwargs: object) -> decision.Decision:
    return decision.decide([cred], request, **kwargs)  # type: ignore[arg-type]


def verdict(outcome: decision.Decision) -> tuple[bool, str, str]:
    return outcome.allowed, outcome.code, outcome.reason


@pytest.mark.parametrize("path", ["/search", "/search/", "/search/lhr", "/search/lhr/jfk/2026-03-01"])
def test_search_is_allowed(cred: tokens.Credential, path: str) -> None:
    outcome = decide(cred, http("GET", "flights", path))

    assert verdict(outcome) == (True, "allowed", "allowed")
    assert outcome.rule == "search"
    assert outcome.status == 200


def test_charge_without_a_search_receipt_is_denied(cred: tokens.Credential) -> None:
    outcome = decide(cred, charge(100, receipts=frozenset()))

    assert verdict(outcome) == (False, "denied", "missing_receipt")
    assert outcome.rule == "charge"
    assert outcome.status == 403


def test_charge_with_a_search_receipt_in_the_same_correlation_is_allowed(cred: tokens.Credential) -> None:
    outcome = decide(cred, charge(100))

    assert verdict(outcome) == (True, "allowed", "allowed")
    assert outcome.rule == "charge"


def test_a_receipt_of_an_unrelated_rule_does_not_unlock_charge(cred: tokens.Credential) -> None:
    assert decide(cred, charge(100, receipts=frozenset({"charge"}))).reason == "missing_receipt"


@pytest.mark.parametrize("amount", [0, 1, 39_999, 40_000, 39_999.5])
def test_charges_up_to_the_limit_are_allowed(cred: tokens.Credential, amount: float) -> None:
    assert decide(cred, charge(amount)).allowed


@pytest.mark.parametrize("amount", [-1, -0.5, -40_000])
def test_negative_amounts_never_pass_a_limit(cred: tokens.Credential, amount: float) -> None:
    outcome = decide(cred, charge(amount))

    assert verdict(outcome) == (False, "denied", "limit_exceeded")


@pytest.mark.parametrize("amount", [40_001, 40_000.01, 10**12, 2**63 - 1])
def test_a_charge_over_the_limit_is_denied(cred: tokens.Credential, amount: float) -> None:
    outcome = decide(cred, charge(amount))

    assert verdict(outcome) == (False, "denied", "limit_exceeded")
    assert outcome.rule == "charge"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing"),
        pytest.param({"amount": "100"}, id="string"),
        pytest.param({"amount": True}, id="bool"),
        pytest.param({"amount": None}, id="null"),
        pytest.param({"amount": math.nan}, id="nan"),
        pytest.param({"amount": math.inf}, id="inf"),
        pytest.param({"amount": [100]}, id="list"),
        pytest.param({"amount": {"value": 100}}, id="object"),
        pytest.param({"amount": 10**30}, id="beyond-int64"),
        pytest.param({"Amount": 100}, id="wrong-case"),
        pytest.param("amount=100", id="not-json"),
        pytest.param([{"amount": 100}], id="array-body"),
        pytest.param(b'{"amount": 100}', id="raw-bytes"),
        pytest.param(None, id="no-body"),
    ],
)
def test_a_charge_without_a_usable_amount_is_denied(cred: tokens.Credential, body: object) -> None:
    request = http("POST", "payments", "/v1/charges", body=body, receipts=frozenset({"search"}))

    outcome = decide(cred, request)

    assert verdict(outcome) == (False, "denied", "limit_missing")


def test_a_fractional_amount_is_rounded_up_against_the_limit() -> None:
    cap = _support.parse(lambda spec: spec["rules"][1].__setitem__("limits", [{"field": "amount", "max": 400}]))
    cred = _support.credential(cap)

    assert decide(cred, charge(400)).allowed
    assert decide(cred, charge(400.0)).allowed
    assert verdict(decide(cred, charge(400.01))) == (False, "denied", "limit_exceeded")
    assert not decide(cred, charge(400.000001)).allowed


def test_delete_is_denied_by_the_deny_rule_even_where_an_allow_rule_matches() -> None:
    cap = _support.parse(lambda spec: spec["rules"][0].__setitem__("methods", ["GET", "DELETE"]))
    cred = _support.credential(cap)

    outcome = decide(cred, http("DELETE", "flights", "/search"))

    assert verdict(outcome) == (False, "denied", "deny_rule")
    assert outcome.rule == "no-deletes"


@pytest.mark.parametrize("upstream", ["flights", "payments", "anything"])
def test_delete_is_denied_on_every_upstream(cred: tokens.Credential, upstream: str) -> None:
    assert decide(cred, http("DELETE", upstream, "/v1/charges")).reason == "deny_rule"


@pytest.mark.parametrize(
    ("method", "upstream", "path"),
    [
        ("PUT", "flights", "/search"),
        ("POST", "flights", "/search"),
        ("HEAD", "flights", "/search"),
        ("GET", "flights", "/searches"),
        ("GET", "flights", "/admin"),
        ("GET", "payments", "/search"),
        ("GET", "hotels", "/search"),
        ("GET", "payments", "/v1/charges"),
        ("POST", "payments", "/v1/charges/"),
        ("POST", "payments", "/v1/charges/ch_1/refunds"),
        ("get", "flights", "/search"),
    ],
)
def test_a_request_no_rule_names_is_denied(cred: tokens.Credential, method: str, upstream: str, path: str) -> None:
    outcome = decide(cred, http(method, upstream, path, body={"amount": 1}, receipts=frozenset({"search"})))

    assert verdict(outcome) == (False, "denied", "no_matching_rule")
    assert outcome.rule is None


def test_a_request_from_another_service_account_is_an_invalid_token(cred: tokens.Credential) -> None:
    outcome = decide(cred, http("GET", "flights", "/search", principal=STRANGER))

    assert verdict(outcome) == (False, "invalid_token", "identity")
    assert outcome.status == 401


def test_a_request_from_the_same_account_in_another_namespace_is_an_invalid_token(cred: tokens.Credential) -> None:
    outcome = decide(cred, http("GET", "flights", "/search", principal="other/booking-agent"))

    assert verdict(outcome) == (False, "invalid_token", "identity")


def test_an_expired_credential_is_refused_after_the_skew(cred: tokens.Credential) -> None:
    late = NOW + timedelta(hours=1, seconds=31)

    outcome = decide(cred, http("GET", "flights", "/search", now=late))

    assert verdict(outcome) == (False, "invalid_token", "expired")


@pytest.mark.parametrize("after_expiry", [timedelta(0), timedelta(seconds=1), timedelta(seconds=29)])
def test_a_credential_is_still_honoured_within_the_skew(cred: tokens.Credential, after_expiry: timedelta) -> None:
    outcome = decide(cred, http("GET", "flights", "/search", now=NOW + timedelta(hours=1) + after_expiry))

    assert outcome.allowed


def test_a_sidecar_clock_slightly_behind_the_operator_still_accepts_a_fresh_credential(
        cred: tokens.Credential) -> None:
    assert decide(cred, http("GET", "flights", "/search", now=NOW - timedelta(seconds=20))).allowed


def test_a_revoked_credential_is_refused(cred: tokens.Credential) -> None:
    outcome = decide(cred, http("GET", "flights", "/search"), revoked={cred.id})

    assert verdict(outcome) == (False, "invalid_token", "revoked")
    assert cred.id[:16] in outcome.message


def test_revoking_another_credential_changes_nothing(cred: tokens.Credential, booking: Capability) -> None:
    other = _support.credential(booking)

    assert decide(cred, http("GET", "flights", "/search"), revoked={other.id}).allowed


def test_no_credential_at_all_is_an_invalid_token() -> None:
    assert verdict(decision.decide([], http("GET", "flights", "/search"))) == (False, "invalid_token", "malformed")


def test_every_credential_must_allow(cred: tokens.Credential) -> None:
    only_search = _support.narrow(cred, rules=["search"])

    assert decision.decide([cred, only_search], http("GET", "flights", "/search")).allowed
    assert not decision.decide([cred, only_search], charge(100)).allowed
    assert not decision.decide([only_search, cred], charge(100)).allowed


def test_a_decision_explains_itself_without_the_token(cred: tokens.Credential) -> None:
    outcome = decide(cred, charge(50_000))

    document = outcome.as_dict()
    assert document == {"allowed": False, "code": "denied", "reason": "limit_exceeded", "rule": "charge",
                        "message": "amount 50000 exceeds the limit 40000 of rule 'charge'"}
    assert cred.token not in str(document)


def test_action_rules_match_mcp_tools() -> None:
    cap = _support.parse(lambda spec: spec["rules"].append(
        {"name": "tools", "effect": "allow", "actions": ["mcp.call"], "resources": ["mcp://flights/*"]}))
    cred = _support.credential(cap)

    def ask(action: str, resource: str) -> decision.Decision:
        return decide(cred, decision.Request(principal=PRINCIPAL, correlation="c", action=action, resource=resource,
                                             now=NOW))

    assert ask("mcp.call", "mcp://flights/search").allowed
    assert verdict(ask("mcp.call", "mcp://payments/refund")) == (False, "denied", "no_matching_rule")
    assert not ask("mcp.call", "mcp://flights/a/b").allowed
    assert not ask("mcp.list", "mcp://flights/search").allowed


def test_an_action_rule_cannot_be_scoped_with_upstream_which_it_would_ignore() -> None:
    with pytest.raises(SpecError, match=r"spec\.rules\[3\]\.upstream: action rules name their upstream"):
        _support.parse(lambda spec: spec["rules"].append(
            {"name": "tools", "effect": "allow", "upstream": "flights", "actions": ["mcp.call"]}))


def test_http_rules_never_answer_action_requests(cred: tokens.Credential) -> None:
    outcome = decide(cred, decision.Request(principal=PRINCIPAL, correlation="c", action="GET",
                                            resource="/search", now=NOW))

    assert verdict(outcome) == (False, "denied", "no_matching_rule")


def test_the_verifier_stops_trusting_a_retired_root_key(booking: Capability) -> None:
    from capgate.capabilities import keys
    from capgate.capabilities.errors import TokenError

    old = keys.KeySet.generate(NOW)
    token = tokens.mint(booking, old, now=NOW)
    verifier = decision.Verifier(old.rotate(timedelta(minutes=30), now=NOW).trust_bundle())
    verifier.load(token, now=NOW)

    with pytest.raises(TokenError):
        verifier.load(token, now=NOW + timedelta(minutes=31))


def test_the_verifier_forgets_credentials_when_the_trust_bundle_changes(cred: tokens.Credential) -> None:
    from capgate.capabilities import keys
    from capgate.capabilities.errors import TokenError

    verifier = decision.Verifier(_support.trust())
    assert verifier.load(cred.token, now=NOW).id == cred.id

    verifier.replace_trust(keys.KeySet.generate(NOW).trust_bundle())
    with pytest.raises(TokenError):
        verifier.load(cred.token, now=NOW)


def test_the_verifier_bounds_the_token_bytes_it_keeps_not_only_the_entries(cred: tokens.Credential) -> None:
    # An agent can append blocks to make many distinct large tokens; the cache must not keep them all.
    first = tokens.attenuate(cred, rules=["search"], now=NOW)
    second = tokens.attenuate(cred, rules=["charge"], now=NOW)
    verifier = decision.Verifier(_support.trust(), cache_bytes=len(first) + len(second) - 1)
    kept = verifier.load(first, now=NOW)
    assert verifier.load(first, now=NOW) is kept

    verifier.load(second, now=NOW)
    assert verifier.load(first, now=NOW) is not kept  # evicted: verified again


@cache
def _cached_credential() -> tokens.Credential:
    return _support.credential(_support.parse())


BODY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(body=st.one_of(BODY_VALUES, st.dictionaries(st.just("amount"), BODY_VALUES, min_size=1)))
def test_any_body_is_decided_without_a_traceback_and_allowed_only_within_the_limit(body: object) -> None:
    cred = _cached_credential()
    request = http("POST", "payments", "/v1/charges", body=body, receipts=frozenset({"search"}))

    outcome = decision.decide([cred], request)

    amount = body.get("amount") if isinstance(body, dict) else None
    within = (isinstance(amount, int | float) and not isinstance(amount, bool) and math.isfinite(amount)
              and amount >= 0 and math.ceil(amount) <= 40_000)
    assert outcome.allowed is within
    assert outcome.reason in ("allowed", "limit_missing", "limit_exceeded")


def test_a_deeply_nested_body_is_denied_not_crashed(cred: tokens.Credential) -> None:
    body: object = 1
    for _ in range(10_000):
        body = {"amount": body}

    assert verdict(decide(cred, http("POST", "payments", "/v1/charges", body=body,
                                     receipts=frozenset({"search"})))) == (False, "denied", "limit_missing")


def test_a_huge_string_amount_is_denied(cred: tokens.Credential) -> None:
    assert not decide(cred, charge("9" * 1_000_000)).allowed


# -- not before (issue 10 #15) ---------------------------------------------------------------------
def test_a_credential_issued_in_the_future_is_not_yet_valid(booking: Capability) -> None:
    ahead = _support.credential(booking, now=NOW + timedelta(seconds=120))

    outcome = decide(ahead, http("GET", "flights", "/search"))

    assert verdict(outcome) == (False, "invalid_token", "not_yet_valid")
    assert outcome.status == 401


def test_a_credential_issued_within_the_skew_ahead_is_valid(booking: Capability) -> None:
    ahead = _support.credential(booking, now=NOW + timedelta(seconds=29))

    assert decide(ahead, http("GET", "flights", "/search")).allowed


def test_a_narrowed_token_stamped_in_the_future_is_not_yet_valid(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, rules=["search"], now=NOW + timedelta(seconds=120))

    outcome = decision.decide([cred, child], http("GET", "flights", "/search"))

    assert verdict(outcome) == (False, "invalid_token", "not_yet_valid")
    assert decision.decide([cred, child], http("GET", "flights", "/search",
                                               now=NOW + timedelta(seconds=100))).allowed


# -- deny rules match leniently, allow rules exactly (issue 10 #6) ----------------------------------
def _admin_cap() -> Capability:
    return _support.parse(lambda spec: spec["rules"].extend([
        {"name": "flights-all", "effect": "allow", "upstream": "flights", "paths": ["/**"]},
        {"name": "no-admin", "effect": "deny", "upstream": "flights", "paths": ["/admin/**"]},
    ]))


@pytest.mark.parametrize("path", ["/admin/x", "/ADMIN/x", "/admin/", "/admin", "/admin./x", "/admin /x",
                                  "/\uff41dmin/x", "/Admin.json"])
@pytest.mark.parametrize("narrowed", [False, True], ids=["index", "exact-token"])
def test_a_deny_rule_catches_what_a_forgiving_router_routes_to_it(path: str, narrowed: bool) -> None:
    cred = _support.credential(_admin_cap())
    creds = [cred, _support.narrow(cred, rules=["flights-all"])] if narrowed else [cred]

    outcome = decision.decide(creds, http("GET", "flights", path))

    assert (outcome.allowed, outcome.reason, outcome.rule) == (False, "deny_rule", "no-admin")


def test_allow_rules_stay_exact() -> None:
    cred = _support.credential(_support.parse(lambda spec: spec["rules"].append(
        {"name": "admin-read", "effect": "allow", "upstream": "flights", "paths": ["/admin/**"]})))

    assert decide(cred, http("GET", "flights", "/admin/x")).allowed
    assert verdict(decide(cred, http("GET", "flights", "/ADMIN/x"))) == (False, "denied", "no_matching_rule")


# -- resource names are normalized and matched like paths (issue 10 #5) -----------------------------
def _workspace_cap() -> Capability:
    return _support.parse(lambda spec: spec["rules"].extend([
        {"name": "workspace", "effect": "allow", "actions": ["file.read"], "resources": ["file:///workspace/**"]},
        {"name": "no-secrets", "effect": "deny", "resources": ["file:///workspace/secrets/**"]},
    ]))


def ask(cred: tokens.Credential, action: str, resource: str) -> decision.Decision:
    return decide(cred, decision.Request(principal=PRINCIPAL, correlation="c", action=action, resource=resource,
                                         now=NOW))


@pytest.mark.parametrize("resource", ["file:///workspace/../etc/passwd", "file:///workspace/%2e%2e/etc/passwd",
                                      "file:///workspace/./secrets/key", "file:///workspace//etc",
                                      "file:///workspace/a%2fb", "file:///workspace/a\x00b", "file:///workspace/a\nb",
                                      "./secrets/key", "secrets/key"])
def test_an_ambiguous_resource_is_never_allowed(resource: str) -> None:
    assert verdict(ask(_support.credential(_workspace_cap()), "file.read", resource)) == (
        False, "denied", "bad_request")


@pytest.mark.parametrize("resource", ["file:///workspace/secrets/key", "file:///workspace/SECRETS/key",
                                      "file:///workspace/secrets./key", "file:///workspace/secrets/"])
def test_a_deny_resource_rule_catches_its_look_alikes(resource: str) -> None:
    outcome = ask(_support.credential(_workspace_cap()), "file.read", resource)

    assert (outcome.allowed, outcome.reason, outcome.rule) == (False, "deny_rule", "no-secrets")


def test_a_resource_under_an_allowed_glob_is_allowed() -> None:
    assert ask(_support.credential(_workspace_cap()), "file.read", "file:///workspace/src/main.py").allowed


def test_a_request_that_is_an_http_call_and_an_action_is_refused(cred: tokens.Credential) -> None:
    both = decision.Request(principal=PRINCIPAL, correlation="c", method="GET", upstream="flights", path="/search",
                            action="mcp.call", resource="mcp://payments/refund", now=NOW)

    assert verdict(decide(cred, both)) == (False, "denied", "bad_request")


def _consuming() -> tokens.Credential:
    cap = _support.parse(lambda s: s["rules"][1].update(requires=[{"rule": "search", "consume": True}]))
    return _support.credential(cap)


def test_a_consuming_gate_opens_only_with_an_unconsumed_receipt_and_says_why_not() -> None:
    cred = _consuming()
    assert decide(cred, charge(100, unconsumed=frozenset({"search"}))).allowed
    outcome = decide(cred, charge(100))  # a receipt, but every one of them consumed
    assert verdict(outcome) == (False, "denied", "receipt_consumed") and outcome.rule == "charge"
    assert "already used" in outcome.message
    missing = decide(cred, charge(100, receipts=frozenset(), unconsumed=frozenset({"search"})))
    assert verdict(missing) == (False, "denied", "missing_receipt"), "unconsumed without a verified receipt"


def test_a_plain_gate_ignores_consumption(cred: tokens.Credential) -> None:
    assert decide(cred, charge(100, unconsumed=frozenset())).allowed


def test_the_consuming_gate_is_compiled_into_the_credential() -> None:
    from capgate.capabilities import compiler

    cap = _support.parse(lambda s: s["rules"][1].update(requires=[{"rule": "search", "consume": True}]))
    compiled = [code for code, params in compiler.compile_authority(cap, NOW, NOW + timedelta(hours=1))
                if params.get("rule") == "charge"]
    assert compiled and all("unconsumed_receipt({requires0}" in code for code in compiled)
    plain = [code for code, params in compiler.compile_authority(_support.parse(), NOW, NOW + timedelta(hours=1))
             if params.get("rule") == "charge"]
    assert all("unconsumed_receipt" not in code and "receipt({requires0}" in code for code in plain)
