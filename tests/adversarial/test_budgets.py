"""Budgets cannot be spent with amounts the sidecar cannot count (found by bench/adversarial.py)."""

from __future__ import annotations

import copy

import pytest

from tests.sidecar.conftest import BASE_SPEC, MakeSidecar


@pytest.mark.parametrize("amount", [1e300, 10**30, "5000000", True, [100]])
async def test_an_amount_the_budget_cannot_count_is_refused_not_charged_as_zero(
        sidecar: MakeSidecar, amount: object) -> None:
    spec = copy.deepcopy(BASE_SPEC)
    spec["rules"].append({"name": "refund", "effect": "allow", "upstream": "payments", "methods": ["POST"],
                          "paths": ["/v1/refunds"]})  # no limit: only the budget stands in the way
    sc = await sidecar(spec)
    response = await sc.client.post("/payments/v1/refunds", json={"amount": amount})
    body = await response.json()
    assert (response.status, body["error"]) == (429, "budget_exhausted")
    assert not [s for s in sc.upstream.seen if s.path == "/v1/refunds"]
    assert (await sc.client.post("/payments/v1/refunds", json={"reason": "no amount"})).status == 200
    assert (await sc.client.post("/payments/v1/refunds", json={"amount": 100})).status == 200
