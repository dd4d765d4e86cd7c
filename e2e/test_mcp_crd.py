"""The MCP fields of an AgentCapability on the real API server: the example is stored as written and
minted; what the schema must refuse is refused at apply, naming the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster import Environment, environment
from e2e.controlplane import ControlPlane

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mcp-booking-agent.yaml"
# Its own namespace: the environment creates the upstream key Secret only where none exists, so sharing
# "travel" would hand this module's key to test_operator.py's sidecars (or theirs to us).
NAMESPACE = "mcp-crd"


def example() -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"]["namespace"] = NAMESPACE
    return obj


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    with environment(control_plane, tmp_path_factory.mktemp("mcp-crd"), NAMESPACE, "sk_unused") as env:
        yield env


def test_the_mcp_example_is_stored_as_written_and_minted(cluster: Environment) -> None:
    obj = example()
    obj["spec"]["budgets"] = [{"upstream": "booking", "tool": "charge", "field": "amount", "max": 1000,
                               "per": "24h"}]
    cluster.apply(obj)
    status = cluster.wait_ready("mcp-booking-agent")
    assert status["upstreams"] == 1 and status["rules"] == len(obj["spec"]["rules"])
    stored = cluster.get_capability("mcp-booking-agent")["spec"]
    # A structural schema silently prunes fields it does not know: every MCP field must survive.
    assert stored["upstreams"][0]["mcp"] == {"path": "/mcp"}
    assert stored["rules"] == obj["spec"]["rules"]
    assert stored["budgets"] == obj["spec"]["budgets"]


def _upstream_mcp(value: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj["spec"]["upstreams"][0]["mcp"] = value
    return mutate


def _first_args(value: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj["spec"]["rules"][1]["args"] = value
    return mutate


def _budget_tool(value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj["spec"]["budgets"] = [{"upstream": "booking", "tool": value, "field": "amount", "max": 1}]
    return mutate


REFUSED = [
    ("both-transports", _upstream_mcp({"path": "/mcp", "sse": "/sse", "messages": "/messages/"}),
     ["spec.upstreams[0].mcp", "oneOf"]),
    ("sse-without-messages", _upstream_mcp({"sse": "/sse"}), ["spec.upstreams[0].mcp", "oneOf"]),
    ("pin-not-sha256", _upstream_mcp({"path": "/mcp", "pins": {"charge": "md5:0cc175b9"}}),
     ["spec.upstreams[0].mcp.pins.charge", "^sha256:[0-9a-f]{64}$"]),
    ("pin-short", _upstream_mcp({"path": "/mcp", "pins": {"charge": "sha256:abc"}}),
     ["spec.upstreams[0].mcp.pins.charge"]),
    ("relative-path", _upstream_mcp({"path": "mcp"}), ["spec.upstreams[0].mcp.path", "'^/'"]),
    ("args-without-in-or-glob", _first_args([{"field": "currency"}]), ["spec.rules[1].args[0]", "oneOf"]),
    ("args-with-in-and-glob", _first_args([{"field": "currency", "in": ["EUR"], "glob": "E*"}]),
     ["spec.rules[1].args[0]", "oneOf"]),
    ("args-empty-in", _first_args([{"field": "currency", "in": []}]), ["spec.rules[1].args[0].in"]),
    ("budget-tool-empty", _budget_tool(""), ["spec.budgets[0].tool"]),
    ("dot-dot-mcp-path", _upstream_mcp({"path": "/a/../mcp"}),
     ["validate.capgate.dev", "spec.upstreams[0].mcp.path"]),  # the webhook, not the schema
    ("budget-tool-ambiguous", _budget_tool("a%2Fb"), ["validate.capgate.dev", "spec.budgets[0].tool"]),
]


@pytest.mark.parametrize(("mutate", "fragments"), [pytest.param(m, f, id=i) for i, m, f in REFUSED])
def test_what_the_schema_or_webhook_must_refuse_is_refused_naming_the_field(
        cluster: Environment, mutate: Callable[[dict[str, Any]], None], fragments: list[str]) -> None:
    obj = copy.deepcopy(example())
    obj["metadata"]["name"] = "mcp-refused"
    mutate(obj)
    result = cluster.apply(obj, check=False)
    try:
        assert result.returncode != 0, f"accepted: {json.dumps(obj['spec'])[:300]}"
        for fragment in fragments:
            assert fragment in result.stderr, result.stderr
    finally:
        cluster.plane.kubectl("delete", "acap", "mcp-refused", "-n", NAMESPACE, "--ignore-not-found", "--wait=false")
