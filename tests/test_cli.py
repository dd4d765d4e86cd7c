"""The ``capgate`` command as a new user runs it: keys, mint, inspect, attenuate, explain, test."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from capgate import cli
from capgate.capabilities import spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "booking-agent.yaml"
AT = "2026-12-01T12:00:00Z"  # before the example's own 2027-01-01 Datalog check


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capgate.cli", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    assert run("keys", "init", "--dir", str(tmp_path / "keys")).returncode == 0
    return tmp_path / "keys"


def test_keys_init_writes_a_private_key_only_its_owner_can_read(keydir: Path) -> None:
    assert stat.S_IMODE((keydir / "root.key").stat().st_mode) == 0o600
    assert json.loads((keydir / "root.pub").read_text())["kind"] == "capgate-trust-bundle"
    assert "private" not in (keydir / "root.pub").read_text()


def test_keys_init_refuses_to_overwrite_without_force(keydir: Path) -> None:
    result = run("keys", "init", "--dir", str(keydir))
    assert result.returncode == 2
    assert "--force" in result.stderr


def test_minted_tokens_can_be_inspected_without_any_key(keydir: Path) -> None:
    token = run("mint", str(EXAMPLE), "--root-key", str(keydir / "root.key")).stdout.strip()
    info = json.loads(run("inspect", token, "--json").stdout)
    assert info["capability"] == "travel/booking-agent"
    assert info["verified"] is False
    assert len(info["revocationIds"]) == 1
    text = run("inspect", token).stdout
    assert 'allow_match("search")' in text
    assert "not verified" in text


def test_attenuate_narrows_a_token_and_refuses_to_widen_it(keydir: Path) -> None:
    token = run("mint", str(EXAMPLE), "--root-key", str(keydir / "root.key")).stdout.strip()
    narrowed = run("attenuate", token, "--trust", str(keydir / "root.pub"), "--rules", "search", "--ttl", "5m")
    assert narrowed.returncode == 0, narrowed.stderr
    assert len(json.loads(run("inspect", narrowed.stdout.strip(), "--json").stdout)["blocks"]) == 2
    widened = run("attenuate", token, "--trust", str(keydir / "root.pub"), "--limit", "charge.amount=99999999")
    assert widened.returncode == 2
    assert "above the parent's 40000" in widened.stderr


def test_attenuate_with_a_limit_beyond_64_bits_is_bad_input_not_a_crash(keydir: Path) -> None:
    token = run("mint", str(EXAMPLE), "--root-key", str(keydir / "root.key")).stdout.strip()
    for limit in ("search.amount=" + str(10**30), "charge.amount=" + str(2**63)):
        result = run("attenuate", token, "--trust", str(keydir / "root.pub"), "--limit", limit)
        assert result.returncode == 2, result.stderr
        assert "must be a non-negative integer up to 9223372036854775807" in result.stderr
        assert "Traceback" not in result.stderr and "PyTerm" not in result.stderr


def test_explain_says_why_a_charge_is_denied_as_json() -> None:
    result = run("explain", str(EXAMPLE), "--request", "POST payments /v1/charges", "--body", '{"amount": 500000}',
                 "--receipt", "search", "--at", AT, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"allowed": False, "rule": "charge", "reason": "limit_exceeded",
                                         "message": "amount 500000 exceeds the limit 40000 of rule 'charge'",
                                         "consumes": []}


def test_explain_shows_that_a_charge_spends_its_search_receipt_and_refuses_a_spent_one() -> None:
    single_use = str(ROOT / "examples" / "single-use-charge.yaml")
    request = ["--request", "POST payments /v1/charges", "--body", '{"amount": 100}']
    allowed = run("explain", single_use, *request, "--receipt", "search")
    assert allowed.returncode == 0, allowed.stderr
    assert "consumes: the receipt of 'search'" in allowed.stdout
    spent = run("explain", single_use, *request, "--consumed", "search", "--json")
    assert spent.returncode == 1
    answer = json.loads(spent.stdout)
    assert (answer["reason"], answer["rule"], answer["consumes"]) == ("receipt_consumed", "charge", [])
    plain = run("explain", str(EXAMPLE), *request, "--receipt", "search", "--at", AT, "--json")
    assert json.loads(plain.stdout)["consumes"] == []


@pytest.mark.parametrize(("extra", "reason"), [
    (["--body", '{"amount":100,"AMOUNT":5000000}'], "ambiguous_body"),
    (["--body", '{"amount": 100} {"amount": 5000000}'], "unreadable_body"),
    (["--body", "{nope"], "unreadable_body"),
    (["--body", "amount=100", "--content-type", "application/x-www-form-urlencoded"], "body_content_type"),
])
def test_explain_refuses_the_bodies_the_sidecar_refuses(extra: list[str], reason: str) -> None:
    result = run("explain", str(EXAMPLE), "--request", "POST payments /v1/charges", *extra, "--receipt", "search",
                 "--at", AT, "--json")
    assert result.returncode == 1, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["allowed"], answer["reason"]) == (False, "bad_request")
    assert answer["message"].startswith(reason)


def test_explain_refuses_a_limited_field_in_the_query() -> None:
    result = run("explain", str(EXAMPLE), "--request", "POST payments /v1/charges?amount=5000000",
                 "--body", '{"amount": 100}', "--receipt", "search", "--at", AT, "--json")
    assert json.loads(result.stdout)["message"].startswith("ambiguous_query")


def test_explain_exits_zero_when_allowed() -> None:
    result = run("explain", str(EXAMPLE), "--request", "GET flights /search", "--at", AT)
    assert result.returncode == 0
    assert result.stdout.startswith("ALLOWED")


def test_explain_says_a_token_budget_is_charged_from_the_response_and_never_reads_the_request_for_it(
        tmp_path: Path) -> None:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["spec"]["budgets"] = [{"upstream": "payments", "field": "usage.total_tokens", "max": 60000, "per": "24h",
                               "from": "response", "worstCase": 4096}]
    cap = tmp_path / "tokens.yaml"
    cap.write_text(yaml.safe_dump(obj))
    result = run("explain", str(cap), "--request", "POST payments /v1/charges", "--body", '{"amount": 100}',
                 "--receipt", "search", "--at", AT)
    assert result.returncode == 0, result.stdout
    assert "budget payments.usage.total_tokens (60000 per 1d) is charged from the response; 4096" in result.stdout
    query = run("explain", str(cap), "--request", "POST payments /v1/charges?usage=1", "--body", '{"amount": 100}',
                "--receipt", "search", "--at", AT)
    assert query.returncode == 0, "a response field in the query is no ambiguity: the request is never read for it"


@pytest.mark.parametrize(("resource", "reason"), [("mcp://payments/%72efund", "deny_rule"),
                                                   ("mcp://payments/../refund", "bad_request")])
def test_explain_reads_resources_with_the_sidecars_reader(resource: str, reason: str) -> None:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["spec"]["rules"] += [{"name": "tools", "effect": "allow", "actions": ["mcp.call"],
                              "resources": ["mcp://payments/**"]},
                             {"name": "no-refunds", "effect": "deny", "resources": ["mcp://payments/refund"]}]
    obj["spec"].pop("datalog", None)
    outcome = cli.evaluate(spec.parse_capability(obj), cli.Case(request=f"mcp.call {resource}"))
    assert (outcome.allowed, outcome.reason) == (False, reason)


def test_the_example_decision_table_passes() -> None:
    result = run("test", str(ROOT / "examples" / "booking-agent.tests.yaml"))
    assert result.returncode == 0, result.stdout
    assert " 0 failed" in result.stdout


def test_a_failing_case_exits_one_with_expected_and_got(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(f"capability: {EXAMPLE}\nat: {AT}\ncases:\n"
                     "  - name: wrong on purpose\n    request: DELETE flights /search\n    expect: allow\n")
    result = run("test", str(cases))
    assert result.returncode == 1
    assert "FAIL  wrong on purpose" in result.stdout
    assert "expected: allow" in result.stdout
    assert "got:      deny (rule=no-deletes, reason=deny_rule)" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["explain", "missing.yaml", "--request", "GET flights /"], "missing.yaml"),
    (["explain", str(EXAMPLE), "--request", "GET"], "expected 'METHOD UPSTREAM PATH'"),
    (["inspect", "not-a-token"], "malformed"),
])
def test_bad_input_exits_two_with_a_message_and_no_traceback(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_spec_error_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace('paths: ["/v1/charges"]', 'paths: ["/v1/../charges"]'))
    result = run("explain", str(bad), "--request", "GET flights /search")
    assert result.returncode == 2
    assert "spec.rules[1].paths[0]: '..' segments are not allowed" in result.stderr


def test_main_is_importable_as_the_console_script() -> None:
    assert cli.main(["test", str(ROOT / "examples" / "booking-agent.tests.yaml")]) == 0
