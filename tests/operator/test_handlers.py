"""The status an AgentCapability shows when an upstream injects its credential in cleartext."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from capgate.operator import handlers
from tests.capabilities import _support


def cleartext(spec: dict[str, Any]) -> None:
    spec["upstreams"][1]["url"] = "http://payments.travel.svc:8080"
    spec["upstreams"][1]["inject"]["allowInsecureTransport"] = True


def test_an_opted_in_cleartext_injection_is_a_standing_condition() -> None:
    found = handlers.insecure_injection(_support.parse(cleartext), kopf.Status({}), 3)

    assert found is not None
    assert (found["type"], found["status"], found["reason"], found["observedGeneration"]) == (
        "InsecureInjection", "True", "AllowInsecureTransport", 3)
    assert "payments" in found["message"] and "http://" in found["message"]


def test_the_condition_keeps_its_transition_time_while_it_lasts() -> None:
    first = handlers.insecure_injection(_support.parse(cleartext), kopf.Status({}), 1)
    assert first is not None
    first["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    again = handlers.insecure_injection(_support.parse(cleartext), kopf.Status({"status": {"conditions": [first]}}), 2)

    assert again is not None and again["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_tls_upstreams_carry_no_insecure_injection_condition() -> None:
    assert handlers.insecure_injection(_support.parse(), kopf.Status({}), 1) is None


def test_the_sidecars_bindings_are_applied_again_when_stale_or_for_another_account() -> None:
    """A RoleBinding deleted by hand must come back without an operator restart (its sidecars fail closed meanwhile)."""
    memo = kopf.Memo()
    start = datetime(2026, 12, 2, tzinfo=UTC)
    assert handlers._access_due(memo, "usage", "booking-agent", start)
    memo["usage"] = ("booking-agent", start)
    assert not handlers._access_due(memo, "usage", "booking-agent", start + handlers.RECHECK)
    assert handlers._access_due(memo, "usage", "other-account", start + handlers.RECHECK)
    assert handlers._access_due(memo, "usage", "booking-agent", start + handlers.ACCESS_REFRESH)
