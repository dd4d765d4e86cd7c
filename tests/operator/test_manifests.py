"""The usage object and the RBAC a capability's sidecars get for it (the e2e checks them with access reviews)."""

from __future__ import annotations

from capgate import resources
from capgate.operator import manifests

OWNER = {"apiVersion": resources.API_VERSION, "kind": resources.CAPABILITY_KIND, "name": "booking-agent",
         "uid": "u-1", "controller": True, "blockOwnerDeletion": True}


def test_the_usage_object_is_named_and_owned_by_its_capability_and_starts_empty() -> None:
    obj = manifests.usage_object("booking-agent", "travel", OWNER)
    assert (obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]) == (
        resources.USAGE_KIND, "booking-agent", "travel")
    assert obj["metadata"]["ownerReferences"] == [OWNER]
    assert "status" not in obj


def test_sidecars_may_read_their_own_usage_object_and_write_only_its_status() -> None:
    role = manifests.usage_role("booking-agent", "travel", OWNER)
    grants = {(rule["resources"][0], verb) for rule in role["rules"] for verb in rule["verbs"]}
    assert grants == {(resources.USAGE_PLURAL, "get"), (f"{resources.USAGE_PLURAL}/status", "get"),
                      (f"{resources.USAGE_PLURAL}/status", "update")}
    assert all(rule["resourceNames"] == ["booking-agent"] for rule in role["rules"])


def test_the_binding_names_the_capability_service_account() -> None:
    binding = manifests.usage_role_binding("booking-agent", "travel", "booking-sa", OWNER)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "booking-sa", "namespace": "travel"}]
    assert binding["roleRef"]["name"] == manifests.usage_role_name("booking-agent")
