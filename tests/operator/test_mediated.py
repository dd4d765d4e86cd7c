"""The AgentCapability status says whether its pods are mediated (spec.egress.mode)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from capgate.capabilities.spec import load_capability_file
from capgate.operator import handlers

CAP = load_capability_file(Path(__file__).resolve().parents[2] / "examples" / "booking-agent.yaml")


def test_enforce_mode_reports_mediated_pods() -> None:
    [cond] = handlers.mediated(CAP, {}, 3)  # type: ignore[arg-type]
    assert (cond["type"], cond["status"], cond["reason"], cond["observedGeneration"]) == (
        "Mediated", "True", "Enforced", 3)


def test_cooperative_mode_says_plainly_that_pods_are_not_mediated() -> None:
    cooperative = dataclasses.replace(CAP, egress_mode="cooperative")
    [cond] = handlers.mediated(cooperative, {}, 1)  # type: ignore[arg-type]
    assert (cond["status"], cond["reason"]) == ("False", "Cooperative")
    assert "NOT mediated" in cond["message"]


def test_the_transition_time_is_kept_while_the_value_holds() -> None:
    [first] = handlers.mediated(CAP, {}, 1)  # type: ignore[arg-type]
    status = {"conditions": [{**first, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    [again] = handlers.mediated(CAP, status, 2)  # type: ignore[arg-type]
    assert again["lastTransitionTime"] == "2026-01-01T00:00:00Z"
