"""The CRD schema and the Python model agree on what a valid AgentCapability is.

A structural schema is read here the way the API server reads it with strict field validation:
JSON Schema keywords, unknown fields rejected, ``x-kubernetes-list-type: map`` keys unique. The
e2e suite replays the same samples against a real API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from capgate import resources
from capgate.capabilities import compiler
from capgate.capabilities.errors import SpecError
from tests.crd_samples import SAMPLES, Sample

CRDS = Path(__file__).resolve().parents[1] / "crds"


def crd_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"{plural}.{resources.GROUP}.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def structural_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Unknown fields and duplicate list-map keys: what jsonschema alone does not check."""
    errors: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                errors.append(f"{path}.{key}: unknown field")
            elif path or key != "metadata":
                errors.extend(structural_errors(schema["properties"][key], item, f"{path}.{key}"))
    if isinstance(value, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            if len(set(keys)) != len(keys):
                errors.append(f"{path}: duplicate entries for key {schema['x-kubernetes-list-map-keys']}")
        for index, item in enumerate(value):
            errors.extend(structural_errors(schema["items"], item, f"{path}[{index}]"))
    return errors


def schema_accepts(obj: dict[str, Any]) -> bool:
    schema = crd_schema(resources.CAPABILITY_PLURAL)
    valid = jsonschema.Draft7Validator(schema).is_valid(obj)
    return valid and not structural_errors(schema, obj)


def model_accepts(obj: dict[str, Any]) -> bool:
    try:
        compiler.validate_object(obj)
    except SpecError:
        return False
    return True


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_schema_and_model_agree_on_sample(sample: Sample) -> None:
    obj = sample.build()
    assert schema_accepts(obj) == sample.schema_accepts
    assert model_accepts(obj) == sample.model_accepts


def test_model_never_accepts_what_the_schema_rejects() -> None:
    for sample in SAMPLES:
        if not sample.schema_accepts:
            assert not sample.model_accepts, sample.name


def test_only_webhook_samples_are_left_to_the_webhook() -> None:
    for sample in SAMPLES:
        assert (sample.schema_accepts and not sample.model_accepts) == sample.webhook, sample.name


def test_capability_crd_names_match_resources_module() -> None:
    crd = yaml.safe_load((CRDS / "agentcapabilities.capgate.dev.yaml").read_text())
    assert crd["spec"]["group"] == resources.GROUP
    assert crd["spec"]["names"]["kind"] == resources.CAPABILITY_KIND
    assert crd["spec"]["names"]["plural"] == resources.CAPABILITY_PLURAL
    assert resources.CAPABILITY_SHORT_NAME in crd["spec"]["names"]["shortNames"]
    assert crd["spec"]["versions"][0]["name"] == resources.VERSION
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:6] == ["Ready", "Upstreams", "Rules", "Expires", "Budget", "Reason"]
    assert "Age" in columns


def test_revocation_list_is_cluster_scoped() -> None:
    crd = yaml.safe_load((CRDS / "revocationlists.capgate.dev.yaml").read_text())
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["kind"] == resources.REVOCATION_KIND


def test_every_schema_property_has_a_description_or_is_self_evident() -> None:
    spec_schema = crd_schema(resources.CAPABILITY_PLURAL)["properties"]["spec"]["properties"]
    undocumented = [name for name, prop in spec_schema.items() if "description" not in prop
                    and name not in ("credential", "receipts")]
    assert undocumented == []
