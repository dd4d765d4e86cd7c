"""Action rules over MCP tool calls: limits, args and requires read ``params.arguments``."""

from __future__ import annotations

from pathlib import Path

import pytest

from capgate.capabilities import compiler, decision, mcp, tokens
from capgate.capabilities.errors import SpecError
from capgate.capabilities.spec import Capability, load_capability_file, parse_capability
from tests.capabilities import _support

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mcp-booking-agent.yaml"


@pytest.fixture(scope="module")
def cap() -> Capability:
    return load_capability_file(EXAMPLE)


@pytest.fixture(scope="module")
def cred(cap: Capability) -> tokens.Credential:
    return _support.credential(cap)


def call(cred: tokens.Credential, tool: str, arguments: dict[str, object] | None = None,
         receipts: frozenset[str] = frozenset()) -> decision.Decision:
    raw = mcp.parse(f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}"}}}}'.encode())
    target = mcp.target(raw, "booking")
    return decision.decide([cred], decision.Request(
        principal=_support.PRINCIPAL, correlation="c1", action=target.action, resource=target.resource,
        body=arguments if arguments is not None else {}, receipts=receipts, now=_support.NOW))


def test_an_allowed_tool_is_allowed(cred: tokens.Credential) -> None:
    assert call(cred, "search_flights").allowed


def test_a_deny_rule_wins_over_the_allow_rule_naming_the_tool(cred: tokens.Credential) -> None:
    outcome = call(cred, "delete_booking", {"booking_id": "b1"})
    assert (outcome.allowed, outcome.reason, outcome.rule) == (False, "deny_rule", "no-deletes")


def test_a_tool_no_rule_names_is_denied(cred: tokens.Credential) -> None:
    assert call(cred, "transfer_funds").reason == "no_matching_rule"


def test_charge_needs_a_search_receipt(cred: tokens.Credential) -> None:
    assert call(cred, "charge", {"amount": 100, "currency": "EUR"}).reason == "missing_receipt"


def test_charge_within_the_argument_limit_is_allowed(cred: tokens.Credential) -> None:
    assert call(cred, "charge", {"amount": 400, "currency": "EUR"}, frozenset({"search"})).allowed


@pytest.mark.parametrize(("arguments", "reason"), [
    ({"amount": 5000, "currency": "EUR"}, "limit_exceeded"),
    ({"amount": -1, "currency": "EUR"}, "limit_exceeded"),
    ({"amount": "5000", "currency": "EUR"}, "limit_missing"),
    ({"currency": "EUR"}, "limit_missing"),
    ({"amount": 100, "currency": "GBP"}, "limit_exceeded"),
    ({"amount": 100}, "limit_missing"),
    ({"amount": 100, "currency": ["EUR"]}, "limit_missing"),
])
def test_charge_outside_its_argument_constraints_is_denied(cred: tokens.Credential, arguments: dict[str, object],
                                                           reason: str) -> None:
    outcome = call(cred, "charge", arguments, frozenset({"search"}))
    assert (outcome.allowed, outcome.reason, outcome.rule) == (False, reason, "charge")


def test_a_deny_rule_with_args_denies_only_matching_values(cred: tokens.Credential) -> None:
    assert call(cred, "add_note", {"trip": "t-1", "text": "hi"}).allowed
    outcome = call(cred, "add_note", {"trip": "vip-7", "text": "hi"})
    assert (outcome.reason, outcome.rule) == ("deny_rule", "no-vip-notes")


def test_args_compile_to_parameterised_datalog(cap: Capability) -> None:
    sources = [source for source, _ in compiler.compile_rule(cap.rule("charge"))]  # type: ignore[arg-type]
    assert any("arg_str({afield0}, $a0), {avalues0}.contains($a0)" in s for s in sources)
    denies = [params for _, params in compiler.compile_rule(cap.rule("no-vip-notes"))]  # type: ignore[arg-type]
    assert denies[0]["aglob0"] == "vip-*"


def _with_rule(rule: dict[str, object], upstream_mcp: object = None) -> Capability:
    obj = _support.manifest()
    if upstream_mcp is not None:
        obj["spec"]["upstreams"][0]["mcp"] = upstream_mcp
    obj["spec"]["rules"].append(rule)
    return parse_capability(obj)


@pytest.mark.parametrize("arg", [
    {"field": "env"}, {"field": "env", "in": []}, {"field": "env", "in": ["a"], "glob": "b"},
    {"field": "env..x", "in": ["a"]}, {"field": "env", "in": [1]}, {"field": "env", "glob": "a\x00"},
    {"field": "env", "values": ["a"]},
])
def test_malformed_args_are_spec_errors(arg: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        _with_rule({"name": "x", "effect": "allow", "actions": ["mcp.call"], "args": [arg]})


def test_args_on_an_http_rule_are_a_spec_error() -> None:
    with pytest.raises(SpecError, match="args"):
        _with_rule({"name": "x", "effect": "allow", "methods": ["GET"], "args": [{"field": "a", "in": ["b"]}]})


@pytest.mark.parametrize("value", [{"path": "/mcp"}, {"sse": "/sse", "messages": "/messages/"}])
def test_an_upstream_declares_its_mcp_transport(value: dict[str, str]) -> None:
    cap = _with_rule({"name": "x", "effect": "allow", "actions": ["mcp.call"]}, value)
    assert cap.upstreams[0].mcp is not None
    assert cap.upstreams[0].mcp.covers(next(iter(value.values())))


@pytest.mark.parametrize("value", [
    {}, {"path": "/mcp", "sse": "/sse"}, {"sse": "/sse"}, {"path": "mcp"}, {"path": "/a/../mcp"},
    {"path": "/m*"}, {"path": "/m%63p"}, {"sse": "/x", "messages": "/x"}, {"path": "/mcp", "extra": 1},
])
def test_a_malformed_mcp_transport_is_a_spec_error(value: dict[str, str]) -> None:
    with pytest.raises(SpecError):
        _with_rule({"name": "x", "effect": "allow", "actions": ["mcp.call"]}, value)


def test_the_mcp_transport_and_args_survive_the_canonical_spec(cap: Capability) -> None:
    document = compiler.spec_document(cap, _support.NOW, _support.NOW)
    assert document["spec"]["upstreams"][0]["mcp"] == {"path": "/mcp"}
    again = parse_capability({"apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
                              "metadata": {"name": cap.name, "namespace": cap.namespace}, "spec": document["spec"]})
    assert again.rules == cap.rules and again.upstreams == cap.upstreams


@pytest.mark.parametrize(("path", "covered"), [
    ("/mcp", True), ("/MCP", True), ("/mcp/", True), ("/mcp.json", True), ("/mcpx", False), ("/mcp/x", False),
    ("/other", False),
])
def test_paths_a_forgiving_router_reads_as_the_mcp_endpoint_are_mcp(cap: Capability, path: str,
                                                                    covered: bool) -> None:
    upstream = cap.upstream("booking")
    assert upstream is not None and upstream.mcp is not None
    assert upstream.mcp.covers(path) is covered


def test_the_old_transport_covers_its_stream_and_every_message_path() -> None:
    cap = _with_rule({"name": "x", "effect": "allow", "actions": ["mcp.call"]},
                     {"sse": "/sse", "messages": "/messages/"})
    mcp_ = cap.upstreams[0].mcp
    assert mcp_ is not None
    assert [mcp_.covers(p) for p in ("/sse", "/SSE/", "/messages/", "/messages", "/Messages/x", "/message")] == [
        True, True, True, True, True, False]


@pytest.mark.parametrize("trip", ["VIP-7", " vip-7", "ｖｉｐ-7"])
def test_a_deny_rule_reads_argument_values_leniently(cred: tokens.Credential, trip: str) -> None:
    assert call(cred, "add_note", {"trip": trip, "text": "x"}).reason == "deny_rule"


@pytest.mark.parametrize(("env", "denied"), [("prod", True), ("PROD", True), ("prod ", True), ("staging", False)])
def test_a_deny_rule_with_in_compares_folded_values(env: str, denied: bool) -> None:
    obj = _support.manifest()
    obj["spec"]["rules"] = [{"name": "tools", "effect": "allow", "actions": ["mcp.call"]},
                            {"name": "no-prod", "effect": "deny", "actions": ["mcp.call"],
                             "args": [{"field": "env", "in": ["prod"]}]}]
    cap = parse_capability(obj)
    outcome = decision.decide([_support.credential(cap)], decision.Request(
        principal=_support.PRINCIPAL, correlation="c", action="mcp.call", resource="mcp://flights/deploy",
        body={"env": env}, now=_support.NOW))
    assert (outcome.reason == "deny_rule") is denied


def test_an_allow_rule_reads_argument_values_exactly(cred: tokens.Credential) -> None:
    outcome = call(cred, "charge", {"amount": 100, "currency": "eur"}, frozenset({"search"}))
    assert (outcome.allowed, outcome.reason) == (False, "limit_exceeded")


def test_read_only_marks_action_allow_rules_only() -> None:
    marked = _with_rule({"name": "x", "effect": "allow", "actions": ["mcp.call"], "readOnly": True}).rule("x")
    assert marked is not None and marked.read_only
    for rule in ({"name": "x", "effect": "deny", "actions": ["mcp.call"], "readOnly": True},
                 {"name": "x", "effect": "allow", "methods": ["GET"], "readOnly": True}):
        with pytest.raises(SpecError, match="readOnly"):
            _with_rule(rule)
