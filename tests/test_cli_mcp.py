"""`capgate explain --mcp` and `capgate test` cases with `mcp:` decide MCP messages like the sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capgate import cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "mcp-booking-agent.yaml")


def test_the_mcp_example_decision_table_passes() -> None:
    assert cli.main(["test", str(ROOT / "examples" / "mcp-booking-agent.tests.yaml")]) == 0


def test_explain_says_why_a_tool_call_over_its_limit_is_denied(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["explain", EXAMPLE, "--mcp", "tools/call booking charge", "--args",
                     '{"amount": 5000, "currency": "EUR"}', "--receipt", "search", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and (out["rule"], out["reason"]) == ("charge", "limit_exceeded")


def test_explain_allows_a_tool_call_within_its_limit() -> None:
    assert cli.main(["explain", EXAMPLE, "--mcp", "tools/call booking charge", "--args",
                     '{"amount": 400, "currency": "USD"}', "--receipt", "search"]) == 0


@pytest.mark.parametrize("argv", [
    ["--mcp", "tools/call booking"],
    ["--mcp", "tools/call booking charge", "--request", "GET flights /"],
    ["--mcp", "tools/call booking charge", "--body", "{}"],
    ["--mcp", "ping booking extra"],
])
def test_malformed_mcp_requests_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", EXAMPLE, *argv]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_upstream_that_does_not_speak_mcp_is_refused() -> None:
    case = cli.Case(request="", mcp="tools/call nowhere charge")
    outcome = cli.evaluate(cli.spec.load_capability_file(EXAMPLE), case)
    assert (outcome.allowed, outcome.reason) == (False, "unknown_upstream")
