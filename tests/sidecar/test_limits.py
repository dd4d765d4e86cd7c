"""Token bucket and budget windows, on an explicit clock."""

from __future__ import annotations

import copy

from capgate.capabilities.spec import parse_capability
from capgate.sidecar.limits import Limits
from tests.sidecar.conftest import BASE_SPEC, capability_document


def capability(rate: int = 2, budget: int = 500):
    spec = copy.deepcopy(BASE_SPEC)
    spec["rateLimit"] = {"requests": rate, "per": "10s"}
    spec["budgets"] = [{"upstream": "payments", "field": "amount", "max": budget, "per": "60s"}]
    return parse_capability(capability_document(spec))


def test_the_bucket_refills_at_requests_per_period() -> None:
    cap, limits = capability(), Limits()
    assert limits.check(cap, "flights", None, now=0.0) is None
    assert limits.check(cap, "flights", None, now=0.0) is None
    refused = limits.check(cap, "flights", None, now=1.0)
    assert refused is not None
    assert refused.reason == "rate_limited"
    assert 3.9 < refused.retry_after <= 4.0
    assert limits.check(cap, "flights", None, now=5.0) is None


def test_budget_spending_leaves_the_window_after_per() -> None:
    cap, limits = capability(rate=100), Limits()
    assert limits.check(cap, "payments", {"amount": 400}, now=0.0) is None
    refused = limits.check(cap, "payments", {"amount": 200}, now=10.0)
    assert refused is not None
    assert refused.reason == "budget_exhausted"
    assert refused.retry_after == 50.0
    assert limits.check(cap, "payments", {"amount": 200}, now=61.0) is None


def test_requests_without_the_field_and_to_other_upstreams_cost_nothing() -> None:
    cap, limits = capability(rate=100, budget=1), Limits()
    assert limits.check(cap, "payments", {"note": "x"}, now=0.0) is None
    assert limits.check(cap, "flights", {"amount": 10**6}, now=0.0) is None
    assert limits.check(cap, "payments", {"amount": 1}, now=0.0) is None
