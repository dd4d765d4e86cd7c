"""The AgentCapabilityUsage CRD matches the names in capgate.resources and the shapes the core writes.

Its transition rules (the reason an agent cannot reset its own usage) only a real API server can
evaluate: e2e/test_usage.py tries every reset there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from capgate import resources
from tests.test_crds import structural_errors

CRD = Path(__file__).resolve().parents[1] / "crds" / f"{resources.USAGE_PLURAL}.{resources.GROUP}.yaml"


def _crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD.read_text())
    return crd


def _schema() -> dict[str, Any]:
    (version,) = _crd()["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _accepts(status: dict[str, Any]) -> bool:
    obj = {"apiVersion": resources.API_VERSION, "kind": resources.USAGE_KIND,
           "metadata": {"name": "booking-agent"}, "spec": {"capability": "booking-agent"}, "status": status}
    return jsonschema.Draft7Validator(_schema()).is_valid(obj) and not structural_errors(_schema(), obj)


def test_names_agree_with_capgate_resources() -> None:
    crd = _crd()
    assert crd["metadata"]["name"] == f"{resources.USAGE_PLURAL}.{resources.GROUP}"
    assert crd["spec"]["names"]["kind"] == resources.USAGE_KIND
    assert crd["spec"]["names"]["plural"] == resources.USAGE_PLURAL
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == resources.VERSION
    assert version["subresources"] == {"status": {}}, "sidecars write the status subresource only"


def test_the_schema_accepts_windows_and_consumed_ids() -> None:
    assert _accepts({"windows": {"requests/3600s": {"start": 3600, "spent": 12},
                                 "budget/payments/amount/86400s": {"start": 86400, "spent": 0}},
                     "horizon": 100, "consumed": {"0" * 32: 200}})


def test_the_schema_refuses_negative_spending_and_windows_without_a_start() -> None:
    assert not _accepts({"windows": {"requests/3600s": {"start": 3600, "spent": -1}}})
    assert not _accepts({"windows": {"requests/3600s": {"spent": 1}}})
    assert not _accepts({"consumed": {"x": -5}})


def test_every_status_field_is_guarded_by_a_transition_rule() -> None:
    status = _schema()["properties"]["status"]
    rules = " ".join(rule["rule"] for rule in status["x-kubernetes-validations"])
    for name in status["properties"]:
        assert f"oldSelf.{name}" in rules, f"status.{name} could be dropped, which would reset it"
    window = status["properties"]["windows"]["additionalProperties"]
    assert "self.spent >= oldSelf.spent" in window["x-kubernetes-validations"][0]["rule"]
