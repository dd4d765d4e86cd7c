"""Reading an AgentCapability: the example parses, and every mistake names its field path."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta

import pytest

from capgate.capabilities import decision, spec
from capgate.capabilities.errors import SpecError
from capgate.capabilities.spec import UpstreamTLS, parse_capability, parse_spec, to_spec

from . import _support
from ._support import Manifest


def _both_set(*changes: tuple[object, ...]) -> Callable[[Manifest], None]:
    def mutate(spec_: Manifest) -> None:
        for *path, value in changes:
            setter(*path, value=value)(spec_)  # type: ignore[arg-type]
    return mutate


def spec_error(mutate: Callable[[Manifest], object]) -> SpecError:
    with pytest.raises(SpecError) as info:
        _support.parse(mutate)
    return info.value


def setter(*path: str | int, value: object) -> Callable[[Manifest], None]:
    """``setter("rules", 0, "methods", value=["get"])`` sets spec.rules[0].methods."""
    def mutate(spec_: Manifest) -> None:
        target = spec_
        for key in path[:-1]:
            target = target[key]  # type: ignore[index]
        target[path[-1]] = value  # type: ignore[index]
    return mutate


def test_the_example_parses_into_the_documented_capability() -> None:
    cap = spec.load_capability_file(_support.EXAMPLE)

    assert cap.qualified_name == "travel/booking-agent"
    assert cap.principal == "travel/booking-agent"
    assert [u.name for u in cap.upstreams] == ["flights", "payments"]
    assert cap.upstream("flights").url == "http://flights.travel.svc:8080"  # type: ignore[union-attr]
    inject = cap.upstream("payments").inject  # type: ignore[union-attr]
    assert (inject.secret_name, inject.secret_key, inject.header, inject.value_prefix) == (  # type: ignore[union-attr]
        "payments-api-key", "token", "Authorization", "Bearer ")
    assert [(r.name, r.effect) for r in cap.rules] == [("search", "allow"), ("charge", "allow"),
                                                       ("no-deletes", "deny")]
    assert cap.rule("search").paths == ("/search", "/search/**")  # type: ignore[union-attr]
    charge = cap.rule("charge")
    assert charge is not None
    assert charge.requires == ("search",)
    assert [(lim.field, lim.max) for lim in charge.limits] == [("amount", 40000)]
    assert cap.rule("no-deletes").methods == ("DELETE",)  # type: ignore[union-attr]
    assert cap.rate_limit == spec.RateLimit(requests=600, per=timedelta(hours=1))
    assert cap.budgets == (spec.Budget(upstream="payments", field="amount", max=100000, per=timedelta(hours=24)),)
    assert "2027-01-01T00:00:00Z" in cap.datalog
    assert (cap.credential_ttl, cap.rotate_before, cap.receipt_ttl) == (
        timedelta(hours=1), timedelta(minutes=20), timedelta(minutes=5))
    assert (cap.mode, cap.lockdown_after, cap.revoked) == ("enforce", timedelta(seconds=60), False)
    assert cap.limit_fields == frozenset({"amount"})


def test_the_canonical_spec_reads_back_as_the_same_capability() -> None:
    cap = _support.parse()

    assert parse_spec(to_spec(cap), name=cap.name, namespace=cap.namespace) == cap


def test_a_minted_credential_carries_the_capability_it_was_minted_from() -> None:
    cap = _support.parse(setter("delegation", value={"serviceAccounts": ["helper"], "maxDepth": 2}))

    assert _support.credential(cap).capability == cap


def test_dot_dot_glob_error_names_the_exact_field_path() -> None:
    error = spec_error(setter("rules", 2, "paths", value=["/a/../b"]))

    assert str(error) == "spec.rules[2].paths[0]: '..' segments are not allowed"
    assert error.path == "spec.rules[2].paths[0]"


SPEC_ERRORS = [
    # (id, mutation, exact field path, fragment of the message)
    ("duplicate-rule", setter("rules", 1, "name", value="search"), "spec.rules[1].name",
     "duplicate rule name 'search'"),
    ("duplicate-upstream", setter("upstreams", 1, "name", value="flights"), "spec.upstreams[1].name",
     "duplicate upstream name 'flights'"),
    ("unknown-upstream", setter("rules", 0, "upstream", value="hotels"), "spec.rules[0].upstream",
     "names unknown upstream 'hotels'"),
    ("budget-unknown-upstream", setter("budgets", 0, "upstream", value="hotels"), "spec.budgets[0].upstream",
     "names unknown upstream 'hotels'"),
    ("budget-tool-without-mcp", setter("budgets", 0, "tool", value="charge"), "spec.budgets[0].tool",
     "does not declare mcp"),
    ("requires-unknown", setter("rules", 1, "requires", value=["book"]), "spec.rules[1].requires[0]",
     "names unknown rule 'book'"),
    ("requires-deny-rule", setter("rules", 1, "requires", value=["search", "no-deletes"]),
     "spec.rules[1].requires[1]", "must name another allow rule"),
    ("requires-itself", setter("rules", 1, "requires", value=["charge"]), "spec.rules[1].requires[0]",
     "must name another allow rule"),
    ("limits-on-deny", setter("rules", 2, "limits", value=[{"field": "amount", "max": 1}]), "spec.rules[2]",
     "requires and limits only apply to allow rules"),
    ("requires-on-deny", setter("rules", 2, "requires", value=["search"]), "spec.rules[2]",
     "requires and limits only apply to allow rules"),
    ("consume-unknown-rule", setter("rules", 1, "requires", value=[{"rule": "book", "consume": True}]),
     "spec.rules[1].requires[0]", "names unknown rule 'book'"),
    ("consume-misspelt", setter("rules", 1, "requires", value=[{"rule": "search", "consumed": True}]),
     "spec.rules[1].requires[0].consumed", "unknown field"),
    ("consume-not-boolean", setter("rules", 1, "requires", value=[{"rule": "search", "consume": "yes"}]),
     "spec.rules[1].requires[0].consume", "must be true or false"),
    ("consume-without-rule", setter("rules", 1, "requires", value=[{"consume": True}]),
     "spec.rules[1].requires[0].rule", "is required"),
    ("requires-a-number", setter("rules", 1, "requires", value=[7]), "spec.rules[1].requires[0]",
     "must be a rule name or {rule: NAME, consume: true}"),
    ("misspelt-limits", setter("rules", 0, "limts", value=[{"field": "amount", "max": 1}]), "spec.rules[0].limts",
     "unknown field"),
    ("misspelt-spec-key", setter("ratelimit", value={"requests": 1}), "spec.ratelimit", "unknown field"),
    ("misspelt-limit-key", setter("rules", 1, "limits", value=[{"field": "amount", "maximum": 1}]),
     "spec.rules[1].limits[0].maximum", "unknown field"),
    ("misspelt-inject-key", setter("upstreams", 1, "inject", "secretref", value={}),
     "spec.upstreams[1].inject.secretref", "unknown field"),
    ("ttl-words", setter("credential", "ttl", value="1 hour"), "spec.credential.ttl", "is not a duration"),
    ("ttl-no-unit", setter("credential", "ttl", value="3600"), "spec.credential.ttl", "is not a duration"),
    ("ttl-fraction", setter("credential", "ttl", value="1.5h"), "spec.credential.ttl", "is not a duration"),
    ("ttl-negative", setter("credential", "ttl", value="-1h"), "spec.credential.ttl", "is not a duration"),
    ("ttl-upper-case", setter("credential", "ttl", value="1H"), "spec.credential.ttl", "is not a duration"),
    ("ttl-integer", setter("credential", "ttl", value=3600), "spec.credential.ttl", "must be a duration"),
    ("ttl-empty", setter("credential", "ttl", value=""), "spec.credential.ttl", "must be a duration"),
    ("ttl-too-short", setter("credential", "ttl", value="5s"), "spec.credential.ttl", "must be between"),
    ("rate-per-years", setter("rateLimit", "per", value="1y"), "spec.rateLimit.per", "is not a duration"),
    ("receipt-ttl-zero", setter("receipts", "ttl", value="0s"), "spec.receipts.ttl", "must be between"),
    ("lockdown-garbage", setter("lockdownAfter", value="soon"), "spec.lockdownAfter", "is not a duration"),
    ("rotate-equals-ttl", setter("credential", value={"ttl": "1h", "rotateBefore": "1h"}),
     "spec.credential.rotateBefore", "must be shorter than spec.credential.ttl"),
    ("rotate-above-ttl", setter("credential", value={"ttl": "1h", "rotateBefore": "2h"}),
     "spec.credential.rotateBefore", "must be shorter than spec.credential.ttl"),
    ("lowercase-method", setter("rules", 0, "methods", value=["get"]), "spec.rules[0].methods[0]",
     "'get' is not one of GET"),
    ("unknown-method", setter("rules", 0, "methods", value=["GET", "TRACE"]), "spec.rules[0].methods[1]",
     "'TRACE' is not one of"),
    ("method-not-string", setter("rules", 0, "methods", value=[1]), "spec.rules[0].methods[0]", "must be a string"),
    ("partial-star", setter("rules", 0, "paths", value=["/search", "/search/*foo"]), "spec.rules[0].paths[1]",
     "'*' and '**' must be whole segments"),
    ("partial-double-star", setter("rules", 0, "paths", value=["/search**"]), "spec.rules[0].paths[0]",
     "'*' and '**' must be whole segments"),
    ("empty-segment", setter("rules", 0, "paths", value=["/search//x"]), "spec.rules[0].paths[0]",
     "empty segment ('//') is not allowed"),
    ("encoded-dot", setter("rules", 0, "paths", value=["/%2e%2e/admin"]), "spec.rules[0].paths[0]",
     "percent-encoding is not allowed"),
    ("dot-segment", setter("rules", 0, "paths", value=["/search/./x"]), "spec.rules[0].paths[0]",
     "'.' segments are not allowed"),
    ("relative-glob", setter("rules", 0, "paths", value=["search"]), "spec.rules[0].paths[0]",
     "must start with '/'"),
    ("backslash-glob", setter("rules", 0, "paths", value=["/search\\x"]), "spec.rules[0].paths[0]",
     "backslashes and control characters are not allowed"),
    ("semicolon-glob", setter("rules", 0, "paths", value=["/search;x"]), "spec.rules[0].paths[0]",
     "';' is not allowed"),
    ("three-double-stars", setter("rules", 0, "paths", value=["/**/a/**/b/**"]), "spec.rules[0].paths[0]",
     "at most 2 '**' segments"),
    ("bad-effect", setter("rules", 0, "effect", value="maybe"), "spec.rules[0].effect", "must be 'allow' or 'deny'"),
    ("missing-effect", setter("rules", 0, "effect", value=None), "spec.rules[0].effect", "is required"),
    ("upper-case-rule-name", setter("rules", 2, "name", value="No-Deletes"), "spec.rules[2].name",
     "is not a rule name"),
    ("empty-rule", setter("rules", 2, value={"name": "nothing", "effect": "deny"}), "spec.rules[2]",
     "must name at least one of"),
    ("http-and-actions", setter("rules", 0, "actions", value=["mcp.call"]), "spec.rules[0]",
     "either methods/paths (HTTP) or actions/resources"),
    ("no-rules", setter("rules", value=[]), "spec.rules", "must not be empty"),
    ("rules-not-list", setter("rules", value={"name": "x"}), "spec.rules", "must be a list"),
    ("no-upstreams", setter("upstreams", value=None), "spec.upstreams", "is required"),
    ("negative-limit", setter("rules", 1, "limits", value=[{"field": "amount", "max": -1}]),
     "spec.rules[1].limits[0].max", "must be between 0 and"),
    ("bool-limit", setter("rules", 1, "limits", value=[{"field": "amount", "max": True}]),
     "spec.rules[1].limits[0].max", "must be an integer"),
    ("float-limit", setter("rules", 1, "limits", value=[{"field": "amount", "max": 1.5}]),
     "spec.rules[1].limits[0].max", "must be an integer"),
    ("bad-limit-field", setter("rules", 1, "limits", value=[{"field": "a..b", "max": 1}]),
     "spec.rules[1].limits[0].field", "is not a dotted JSON field path"),
    ("ftp-upstream", setter("upstreams", 0, "url", value="ftp://flights"), "spec.upstreams[0].url",
     "must be an http:// or https:// URL"),
    ("url-with-credentials", setter("upstreams", 0, "url", value="http://u:p@flights"), "spec.upstreams[0].url",
     "must not carry credentials"),
    ("url-with-query", setter("upstreams", 0, "url", value="http://flights/?x=1"), "spec.upstreams[0].url",
     "must not have a query or fragment"),
    ("url-without-host", setter("upstreams", 0, "url", value="http:///x"), "spec.upstreams[0].url",
     "must name a host"),
    ("url-bad-port", setter("upstreams", 0, "url", value="http://flights:99999"), "spec.upstreams[0].url",
     "has an invalid port"),
    ("url-dot-dot-prefix", setter("upstreams", 0, "url", value="http://flights/a/../b"), "spec.upstreams[0].url",
     "has an ambiguous path prefix"),
    ("inject-host-header", setter("upstreams", 1, "inject", "header", value="Host"), "spec.upstreams[1].inject.header",
     "'Host' cannot be injected"),
    ("inject-capgate-header", setter("upstreams", 1, "inject", "header", value="X-Capgate-Token"),
     "spec.upstreams[1].inject.header", "cannot be injected"),
    ("inject-header-with-space", setter("upstreams", 1, "inject", "header", value="X Api"),
     "spec.upstreams[1].inject.header", "is not a header name"),
    ("prefix-with-newline", setter("upstreams", 1, "inject", "valuePrefix", value="Bearer\r\nX: y"),
     "spec.upstreams[1].inject.valuePrefix", "must not contain control characters"),
    ("secret-name-upper", setter("upstreams", 1, "inject", "secretRef", "name", value="Payments"),
     "spec.upstreams[1].inject.secretRef.name", "is not a Secret name"),
    ("inject-over-http", setter("upstreams", 1, "url", value="http://payments.example.com"),
     "spec.upstreams[1].url", "injects a credential over cleartext http://"),
    ("inject-over-uppercase-http", setter("upstreams", 1, "url", value="HTTP://payments.example.com"),
     "spec.upstreams[1].url", "injects a credential over cleartext http://"),
    ("insecure-opt-in-string", setter("upstreams", 1, "inject", "allowInsecureTransport", value="true"),
     "spec.upstreams[1].inject.allowInsecureTransport", "must be true or false"),
    ("tls-on-http", setter("upstreams", 0, "tls", value={"caSecretRef": {"name": "flights-ca", "key": "ca.crt"}}),
     "spec.upstreams[0].tls", "applies only to an https:// upstream"),
    ("tls-without-ca", setter("upstreams", 1, "tls", value={}), "spec.upstreams[1].tls.caSecretRef",
     "must be an object"),
    ("tls-unknown-field", setter("upstreams", 1, "tls", value={"insecureSkipVerify": True}),
     "spec.upstreams[1].tls.insecureSkipVerify", "unknown field"),
    ("mode", setter("mode", value="permissive"), "spec.mode", "must be 'enforce' or 'audit'"),
    ("revoked-string", setter("revoked", value="yes"), "spec.revoked", "must be true or false"),
    ("bad-delegate", setter("delegation", value={"serviceAccounts": ["a/b/c"]}),
     "spec.delegation.serviceAccounts[0]", "is not 'serviceaccount' or 'namespace/serviceaccount'"),
    ("delegation-too-deep", setter("delegation", value={"maxDepth": 9}), "spec.delegation.maxDepth",
     "must be between 0 and 8"),
    ("rate-limit-zero", setter("rateLimit", "requests", value=0), "spec.rateLimit.requests", "must be between 1"),
    ("response-budget-without-worst-case", setter("budgets", 0, "from", value="response"), "spec.budgets[0].worstCase",
     "is required with from: response"),
    ("response-budget-worst-case-zero", _both_set(("budgets", 0, "from", "response"), ("budgets", 0, "worstCase", 0)),
     "spec.budgets[0].worstCase", "must be between 1"),
    ("request-budget-with-worst-case", setter("budgets", 0, "worstCase", value=10), "spec.budgets[0].worstCase",
     "only applies to from: response"),
    ("budget-from-elsewhere", setter("budgets", 0, "from", value="headers"), "spec.budgets[0].from",
     "must be 'request' or 'response'"),
    ("response-budget-on-mcp", _both_set(("upstreams", 1, "mcp", {"path": "/mcp"}), ("budgets", 0, "from", "response"),
                                         ("budgets", 0, "worstCase", 5)), "spec.budgets[0].from", "speaks MCP"),
    ("sa-missing", setter("serviceAccountName", value=None), "spec.serviceAccountName", "is required"),
]


def test_a_response_budget_reads_back_and_never_makes_the_request_body_read() -> None:
    def tokens(spec_: Manifest) -> None:
        spec_["budgets"] = [{"upstream": "payments", "field": "usage.total_tokens", "max": 60000, "per": "24h",
                             "from": "response", "worstCase": 4096}]

    cap = _support.parse(tokens)
    (budget,) = cap.budgets
    assert (budget.from_response, budget.worst_case, budget.field) == (True, 4096, "usage.total_tokens")
    assert "usage.total_tokens" not in cap.limit_fields, "a response field is never looked for in request bodies"
    rendered = to_spec(cap)
    assert rendered["budgets"][0]["from"] == "response" and rendered["budgets"][0]["worstCase"] == 4096
    assert "from" not in to_spec(_support.parse())["budgets"][0]
    assert parse_spec(rendered, name=cap.name, namespace=cap.namespace) == cap


@pytest.mark.parametrize(("mutate", "path", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in SPEC_ERRORS])
def test_an_invalid_spec_is_rejected_naming_the_field(mutate: Callable[[Manifest], object], path: str,
                                                      fragment: str) -> None:
    error = spec_error(mutate)

    assert error.path == path
    assert fragment in error.message
    assert str(error).startswith(f"{path}: ")


def cleartext_payments(spec_: Manifest) -> None:
    spec_["upstreams"][1]["url"] = "http://payments.travel.svc:8080"
    spec_["upstreams"][1]["inject"]["allowInsecureTransport"] = True


def test_injecting_over_http_needs_the_explicit_opt_in_and_is_reported() -> None:
    cap = _support.parse(cleartext_payments)

    assert cap.upstream("payments").inject.allow_insecure_transport  # type: ignore[union-attr]
    assert cap.cleartext_injections == ("payments",)
    assert _support.parse().cleartext_injections == ()  # https with inject, http without: nothing to warn of


def test_the_insecure_transport_opt_in_survives_the_canonical_spec() -> None:
    cap = _support.parse(cleartext_payments)
    rendered = to_spec(cap)

    assert rendered["upstreams"][1]["inject"]["allowInsecureTransport"] is True
    assert "allowInsecureTransport" not in to_spec(_support.parse())["upstreams"][1]["inject"]
    assert parse_spec(rendered, name=cap.name, namespace=cap.namespace) == cap


def mcp_payments(spec_: Manifest) -> None:
    spec_["upstreams"][1]["mcp"] = {"path": "/mcp"}


@pytest.mark.parametrize(("tool", "fragment"), [("a%2Fb", "'%' is ambiguous"), ("x/../y", "'..'"), ("", "")])
def test_a_budgets_tool_is_read_like_a_resource(tool: str, fragment: str) -> None:
    def mutate(spec_: Manifest) -> None:
        mcp_payments(spec_)
        spec_["budgets"][0]["tool"] = tool

    error = spec_error(mutate)
    assert error.path == "spec.budgets[0].tool" and fragment in error.message


def test_a_per_tool_budget_survives_the_canonical_spec_and_matches_its_tool_leniently() -> None:
    def mutate(spec_: Manifest) -> None:
        mcp_payments(spec_)
        spec_["budgets"][0]["tool"] = "charge"

    cap = _support.parse(mutate)
    assert parse_spec(to_spec(cap), name=cap.name, namespace=cap.namespace) == cap
    budget = cap.budgets[0]
    assert budget.tool == "charge"
    assert [budget.applies("payments", t) for t in ("mcp://payments/charge", "mcp://payments/Charge.",
                                                    "mcp://payments/refund", None)] == [True, True, False, False]
    assert not budget.applies("flights", "mcp://payments/charge")


def test_an_upstream_ca_from_a_secret_survives_the_canonical_spec() -> None:
    def private_ca(spec_: Manifest) -> None:
        spec_["upstreams"][1]["tls"] = {"caSecretRef": {"name": "payments-ca", "key": "ca.crt"}}

    cap = _support.parse(private_ca)
    rendered = to_spec(cap)

    assert cap.upstream("payments").tls == UpstreamTLS("payments-ca", "ca.crt")  # type: ignore[union-attr]
    assert rendered["upstreams"][1]["tls"] == {"caSecretRef": {"name": "payments-ca", "key": "ca.crt"}}
    assert "tls" not in to_spec(_support.parse())["upstreams"][1]
    assert parse_spec(rendered, name=cap.name, namespace=cap.namespace) == cap


def test_only_the_first_unknown_field_is_named_and_it_is_the_sorted_first() -> None:
    error = spec_error(setter("rules", 0, "zz", value=1))

    assert error.path == "spec.rules[0].zz"


def test_metadata_must_name_an_agent_capability() -> None:
    obj = _support.manifest()
    obj["kind"] = "Pod"
    with pytest.raises(SpecError, match=r"^apiVersion: expected apiVersion capgate\.dev/v1alpha1"):
        parse_capability(obj)


def test_metadata_name_must_be_a_dns_name() -> None:
    obj = _support.manifest()
    obj["metadata"]["name"] = "Booking_Agent"
    with pytest.raises(SpecError, match=r"^metadata\.name: "):
        parse_capability(obj)


def test_a_missing_namespace_means_default() -> None:
    obj = _support.manifest()
    del obj["metadata"]["namespace"]

    assert parse_capability(obj).principal == "default/booking-agent"


def test_durations_combine_units() -> None:
    assert spec.parse_duration("1d2h3m4s", "x") == timedelta(days=1, hours=2, minutes=3, seconds=4)
    assert spec.parse_duration("1h30m", "x") == timedelta(minutes=90)
    assert spec.format_duration(timedelta(minutes=90)) == "1h30m"


def test_rotate_before_defaults_to_a_third_of_a_short_ttl() -> None:
    cap = _support.parse(setter("credential", value={"ttl": "30m"}))

    assert cap.rotate_before == timedelta(minutes=10)


def test_delegates_are_qualified_with_the_capability_namespace() -> None:
    cap = _support.parse(setter("delegation", value={"serviceAccounts": ["helper", "other-ns/worker"]}))

    assert cap.delegation.principals == ("travel/helper", "other-ns/worker")


def test_manifest_file_without_an_agent_capability_is_rejected(tmp_path) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", encoding="utf-8")

    with pytest.raises(SpecError, match="no AgentCapability document found"):
        spec.load_capability_file(path)


def test_manifest_file_that_is_not_yaml_is_rejected(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [unclosed\n", encoding="utf-8")

    with pytest.raises(SpecError, match="not valid YAML"):
        spec.load_capability_file(path)


TRAILING_NEWLINE = [
    ("rule-name", setter("rules", 2, "name", value="no-deletes\n")),
    ("upstream-name", lambda s: (setter("upstreams", 0, "name", value="flights\n")(s),
                                 setter("rules", 0, "upstream", value="flights\n")(s))),
    ("service-account", setter("serviceAccountName", value="booking-agent\n")),
    ("inject-header", setter("upstreams", 1, "inject", "header", value="X-Api-Key\n")),
    ("secret-name", setter("upstreams", 1, "inject", "secretRef", "name", value="payments-api-key\n")),
    ("duration", setter("credential", "ttl", value="1h\n")),
]


@pytest.mark.parametrize("mutate", [pytest.param(m, id=i) for i, m in TRAILING_NEWLINE])
def test_a_name_with_a_trailing_newline_is_rejected(mutate: Callable[[Manifest], object]) -> None:
    spec_error(mutate)


INJECTIONS = [
    # (id, mutation, "rejected" by validation or "inert" once minted)
    ("glob-closing-string", setter("rules", 0, "paths", value=['/x") or allow_match("search']), "inert"),
    ("glob-with-statement", setter("rules", 0, "paths", value=['/x"); allow_match("search']), "rejected"),
    ("upstream-url-quote", setter("upstreams", 1, "url", value='https://pay.example.com/a"),allow_match("charge'),
     "inert"),
    ("upstream-url-statement", setter("upstreams", 1, "url", value='https://p.example.com/x");allow_match("x")'),
     "rejected"),
    ("secret-name", setter("upstreams", 1, "inject", "secretRef", "name", value='k"); allow_match("charge'),
     "rejected"),
    ("value-prefix", setter("upstreams", 1, "inject", "valuePrefix", value='"); allow_match("charge"); x("'),
     "inert"),
    ("limit-field", setter("rules", 1, "limits", value=[{"field": 'amount"), allow_match("charge', "max": 1}]),
     "rejected"),
    ("rule-name", setter("rules", 0, "name", value='search"); allow_match("charge'), "rejected"),
    ("requires", setter("rules", 1, "requires", value=['search", $c), allow_match("charge']), "rejected"),
    ("action", setter("rules", 2, value={"name": "tools", "effect": "allow",
                                         "actions": ['mcp.call"); allow_match("charge"); x("']}), "inert"),
    ("resource", setter("rules", 2, value={"name": "tools", "effect": "allow", "actions": ["mcp.call"],
                                           "resources": ['mcp://x/*") <- true; allow_match("charge']}), "rejected"),
    ("resource-quote", setter("rules", 2, value={"name": "tools", "effect": "allow", "actions": ["mcp.call"],
                                                 "resources": ['mcp://x/a") <- true, allow_match("charge']}), "inert"),
    ("service-account", setter("serviceAccountName", value='booking-agent"); allow_match("charge'), "rejected"),
    ("delegate", setter("delegation", value={"serviceAccounts": ['h"); allow_match("charge']}), "rejected"),
    ("datalog-fact", setter("datalog", value='check if true; allow_match("charge");'), "rejected"),
    ("datalog-rule", setter("datalog", value='allow_match($r) <- receipt($r, $c);'), "rejected"),
    ("datalog-close-string", setter("datalog", value='check if true"); allow_match("charge");'), "rejected"),
    ("datalog-policy", setter("datalog", value="allow if true;"), "rejected"),
]


@pytest.mark.parametrize(("mutate", "outcome"), [pytest.param(*case[1:], id=case[0]) for case in INJECTIONS])
def test_datalog_smuggled_through_spec_strings_is_rejected_or_inert(mutate: Callable[[Manifest], object],
                                                                   outcome: str) -> None:
    try:
        cap = _support.parse(mutate)
        cred = _support.credential(cap)
    except SpecError:
        assert outcome == "rejected"
        return
    assert outcome == "inert"
    # Had any of these injections worked, these requests would now be allowed.
    for request in (
        _support.charge(100, receipts=frozenset()),
        _support.http("PUT", "payments", "/v1/refunds", body={"amount": 1}),
        _support.http("GET", "flights", "/x"),
    ):
        assert not decision.decide([cred], request).allowed, request.describe()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5), (0, 0), (-3, -3), (400.01, 401), (400.0, 400), (True, None), (False, None), (math.nan, None),
        (math.inf, None), (-math.inf, None), ("5", None), (None, None), ([5], None), ({"v": 5}, None),
        (10**30, None), (1e300, None),
    ],
)
def test_a_limit_reads_only_finite_numbers_rounding_up(value: object, expected: int | None) -> None:
    assert spec.numeric_field({"amount": value}, "amount") == expected


def test_a_limit_reads_nested_fields_by_dotted_path() -> None:
    body = {"price": {"total": 7}}

    assert spec.numeric_field(body, "price.total") == 7
    assert spec.numeric_field(body, "price.tax") is None
    assert spec.numeric_field({"price.total": 7}, "price.total") is None
    assert spec.numeric_field("not an object", "price.total") is None


def test_egress_mode_defaults_to_enforce_and_reads_back() -> None:
    assert _support.parse().egress_mode == "enforce"
    cooperative = _support.parse(setter("egress", value={"mode": "cooperative"}))
    assert cooperative.egress_mode == "cooperative"
    assert parse_spec(to_spec(cooperative), name=cooperative.name, namespace=cooperative.namespace) == cooperative


@pytest.mark.parametrize(("egress", "path"), [({"mode": "off"}, "spec.egress.mode"),
                                              ({"mode": "enforce", "bypass": True}, "spec.egress.bypass")])
def test_egress_accepts_only_its_two_modes(egress: object, path: str) -> None:
    assert spec_error(setter("egress", value=egress)).path == path


def test_a_consuming_requirement_is_read_and_rendered_back_and_a_plain_one_stays_plain() -> None:
    def consuming(spec_: Manifest) -> None:
        spec_["rules"][1]["requires"] = [{"rule": "search", "consume": True}]
        spec_["rules"].append({"name": "quote", "effect": "allow", "upstream": "payments", "methods": ["POST"],
                               "paths": ["/v1/quotes"], "requires": ["search", {"rule": "charge"}]})

    cap = _support.parse(consuming)
    charge, quote = cap.rule("charge"), cap.rule("quote")
    assert charge is not None and quote is not None
    assert (charge.requires, charge.consumes) == (("search",), ("search",))
    assert (quote.requires, quote.consumes) == (("search", "charge"), ())
    assert cap.consumed_rules == frozenset({"search"})
    rendered = spec.to_spec(cap)["rules"]
    assert rendered[1]["requires"] == [{"rule": "search", "consume": True}]
    assert rendered[3]["requires"] == ["search", "charge"]
    assert spec.parse_spec(spec.to_spec(cap), name=cap.name, namespace=cap.namespace) == cap


def test_a_rule_named_twice_is_consumed_if_either_entry_says_so() -> None:
    cap = _support.parse(lambda s: s["rules"][1].update(requires=["search", {"rule": "search", "consume": True}]))
    charge = cap.rule("charge")
    assert charge is not None and (charge.requires, charge.consumes) == (("search",), ("search",))
