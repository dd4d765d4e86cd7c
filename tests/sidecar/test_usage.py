"""The fleet-wide charger: leases from one shared state, no I/O while a lease lasts, fail closed.

The store here is an in-memory compare-and-swap with the API server's answer to a stale write (409);
e2e/test_usage.py runs the same charger against the real API server.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

from capgate.capabilities import keys, spec
from capgate.sidecar import usage
from capgate.sidecar.metrics import Metrics
from tests.sidecar.conftest import MakeSidecar
from tests.sidecar.test_credentials import HeardOnce, write_credential_dir


class MemoryStore:
    def __init__(self) -> None:
        self.version = 1
        self.status: dict[str, Any] = {}
        self.down = False
        self.reads = self.writes = 0

    async def read(self) -> tuple[str, dict[str, Any]]:
        self._check()
        self.reads += 1
        return str(self.version), dict(self.status)

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self._check()
        await asyncio.sleep(0)  # let another charger interleave between read and write
        if version != str(self.version):
            raise usage.Conflict
        self.writes += 1
        self.version += 1
        self.status = status
        return str(self.version), dict(status)

    def _check(self) -> None:
        if self.down:
            raise usage.StateUnavailable("the API server is unreachable (test)")

    async def close(self) -> None:
        pass


def _cap(rate: int | None = None, budget: int = 1000) -> spec.Capability:
    return spec.Capability(
        name="booking-agent", namespace="travel", service_account="booking-agent", upstreams=(), rules=(),
        rate_limit=spec.RateLimit(rate, timedelta(hours=1)) if rate else None,
        budgets=(spec.Budget("payments", "amount", budget, timedelta(hours=24)),))


def _charger(store: MemoryStore, metrics: Metrics | None = None) -> usage.FleetLimits:
    return usage.FleetLimits(store, "travel/booking-agent", metrics or Metrics(), clock=lambda: 1_000_000.0)


async def test_three_sidecars_sharing_one_budget_never_spend_more_than_max() -> None:
    store, cap = MemoryStore(), _cap(budget=1000)
    chargers = [_charger(store) for _ in range(3)]
    results = await asyncio.gather(*[c.charge(cap, "payments", {"amount": 7}) for _ in range(100) for c in chargers])
    allowed = sum(1 for r in results if r is None)
    assert allowed * 7 <= 1000
    assert allowed >= 1000 // 7 - 3 * 7, "slices near the limit shrink to single calls, stranding little"
    assert all(r.reason == "budget_exhausted" for r in results if r is not None)


async def test_calls_within_a_lease_cost_no_api_request() -> None:
    store, cap = MemoryStore(), _cap(budget=80000)
    charger = _charger(store)
    for _ in range(100):
        assert await charger.charge(cap, "payments", {"amount": 10}) is None
    assert store.writes == 1
    assert store.status["windows"]["budget/payments/amount/86400s"]["spent"] == 10000


async def test_a_lease_running_low_is_renewed_in_the_background_before_a_call_needs_it() -> None:
    store, cap = MemoryStore(), _cap(budget=800)
    charger = _charger(store)
    for _ in range(75):  # the first call leases 100; 25 left is a quarter of it
        assert await charger.charge(cap, "payments", {"amount": 1}) is None
    await charger.idle()
    assert store.writes == 2
    key = "budget/payments/amount/86400s"
    assert store.status["windows"][key]["spent"] == 100 + 700 // 8
    writes = store.writes

    class Down(MemoryStore):
        async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            raise AssertionError("no call should wait for a write: the renewal happened ahead of need")

    charger.store = Down()
    for _ in range(25 + 700 // 8 - 30):
        assert await charger.charge(cap, "payments", {"amount": 1}) is None
    assert store.writes == writes


async def test_an_unreachable_state_refuses_budgeted_calls_with_a_reason_and_leaves_others_alone() -> None:
    store, cap, metrics = MemoryStore(), _cap(), Metrics()
    store.down = True
    charger = _charger(store, metrics)
    refused = await charger.charge(cap, "payments", {"amount": 1})
    assert refused is not None
    assert (refused.reason, refused.detail) == ("budget_exhausted", "usage_unavailable")
    assert "cannot be reached" in refused.message
    assert await charger.charge(cap, "flights", None) is None
    assert metrics.usage_refusals.labels("usage_unavailable")._value.get() == 1


async def test_a_rate_limit_is_counted_fleet_wide_per_request() -> None:
    store, cap = MemoryStore(), _cap(rate=5)
    a, b = _charger(store), _charger(store)
    results = [await (a if i % 2 else b).charge(cap, "flights", None) for i in range(8)]
    assert [r is None for r in results].count(True) == 5
    assert {r.reason for r in results if r is not None} == {"rate_limited"}


async def test_a_slice_in_hand_is_still_spent_while_the_state_is_unreachable() -> None:
    store, cap = MemoryStore(), _cap(budget=800)
    charger = _charger(store)
    assert await charger.charge(cap, "payments", {"amount": 1}) is None  # leases 100
    store.down = True
    for _ in range(99):
        assert await charger.charge(cap, "payments", {"amount": 1}) is None
    assert await charger.charge(cap, "payments", {"amount": 1}) is not None


async def test_an_uncountable_amount_is_refused_without_touching_the_state() -> None:
    store = MemoryStore()
    refused = await _charger(store).charge(_cap(), "payments", {"amount": "500"})
    assert refused is not None and refused.reason == "budget_exhausted"
    assert store.reads == store.writes == 0


async def test_leases_and_remaining_are_exported_as_metrics() -> None:
    store, metrics = MemoryStore(), Metrics()
    charger = _charger(store, metrics)
    assert await charger.charge(_cap(budget=800), "payments", {"amount": 40}) is None
    key = "budget/payments/amount/86400s"
    assert metrics.leases_taken.labels(key)._value.get() == 1
    assert metrics.lease_remaining.labels(key)._value.get() == 60
    body, _ = metrics.render()
    assert b"capgate_usage_state_age_seconds" in body


async def test_the_remaining_gauge_counts_a_slice_renewed_in_the_background() -> None:
    store, metrics = MemoryStore(), Metrics()
    charger, cap = _charger(store, metrics), _cap(budget=800)
    for _ in range(75):  # the first call leases 100; at 25 left a renewal of 700 // 8 runs in the background
        assert await charger.charge(cap, "payments", {"amount": 1}) is None
    await charger.idle()
    key = "budget/payments/amount/86400s"
    # What a scrape says this sidecar holds is what it can still spend without the API server.
    assert metrics.lease_remaining.labels(key)._value.get() == 25 + 700 // 8


async def test_in_a_pod_without_api_access_rate_limited_calls_are_refused_not_unmetered(
        sidecar: MakeSidecar, keyset: keys.KeySet, tmp_path: Path) -> None:
    folder = tmp_path / "credential"
    write_credential_dir(folder, keyset)
    sc = await sidecar(capability=None, root_key=None, credential_dir=folder, revocation_source=HeardOnce(),
                       env={"KUBECONFIG": str(tmp_path / "missing.kubeconfig")})
    response = await sc.client.get("/flights/search")
    assert response.status == 429
    body = await response.json()
    assert (body["error"], body["reason"]) == ("rate_limited", "usage_unavailable")
    assert sc.upstream.seen == []


async def test_per_tool_budgets_are_meters_of_their_own_across_sidecars() -> None:
    store = MemoryStore()
    cap = spec.Capability(
        name="booking-agent", namespace="travel", service_account="booking-agent", upstreams=(), rules=(),
        budgets=(spec.Budget("booking", "amount", 100, timedelta(hours=24), tool="charge"),
                 spec.Budget("booking", "amount", 1000, timedelta(hours=24), tool="refund")))
    first, second = _charger(store), _charger(store)
    charge, refund = "mcp://booking/charge", "mcp://booking/refund"
    for charger in (first, second):
        assert await charger.charge(cap, "booking", {"amount": 50}, charge) is None
        assert await charger.charge(cap, "booking", {"amount": 300}, refund) is None
    refused = await second.charge(cap, "booking", {"amount": 1}, "mcp://booking/CHARGE")  # the server's fold
    assert refused is not None and refused.reason == "budget_exhausted"
    assert await first.charge(cap, "booking", {"amount": 1}, None) is None  # not a call of either tool
    assert set(store.status["windows"]) == {"budget/booking/amount/86400s/tool/charge",
                                            "budget/booking/amount/86400s/tool/refund"}


async def test_usage_owed_is_recorded_before_a_new_lease_so_a_spent_window_refuses_at_once() -> None:
    store = MemoryStore()
    cap = spec.Capability(name="booking-agent", namespace="travel", service_account="booking-agent", upstreams=(),
                          rules=(), budgets=(spec.Budget("llm", "usage.total_tokens", 800, timedelta(hours=24),
                                                         "response", 500),))
    charger = _charger(store)
    assert await charger.charge(cap, "llm", None) is None  # the deposit leases 800 // 8 = 100
    charger.settle(cap, [(cap.budgets[0], 900)])  # 801 owed; its background write has not run yet
    refused = await charger.charge(cap, "llm", None)
    assert refused is not None and refused.reason == "budget_exhausted"
    assert store.status["windows"]["budget/llm/response:usage.total_tokens/86400s"]["spent"] == 900
    await charger.close()


async def test_an_idle_sidecars_debt_is_written_once_the_state_is_back_without_another_call() -> None:
    store = MemoryStore()
    cap = spec.Capability(name="booking-agent", namespace="travel", service_account="booking-agent", upstreams=(),
                          rules=(), budgets=(spec.Budget("llm", "usage.total_tokens", 800, timedelta(hours=24),
                                                         "response", 500),))
    charger = _charger(store)
    assert await charger.charge(cap, "llm", None) is None
    store.down = True
    charger.settle(cap, [(cap.budgets[0], 300)])  # 200 owed beyond the lease of 100
    await asyncio.sleep(0.05)  # the first attempt failed; the next is RETRY_SECONDS later
    assert charger.book.debts
    store.down = False
    await asyncio.wait_for(charger.idle(), usage.RETRY_SECONDS * 3)
    assert store.status["windows"]["budget/llm/response:usage.total_tokens/86400s"]["spent"] == 300
    await charger.close()


class SlowStore(MemoryStore):
    """An API server that takes a moment to write: sidecars that read the same version collide."""

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        await asyncio.sleep(0.001)
        return await super().write(version, status)


async def test_sidecars_colliding_near_a_budgets_end_take_turns_instead_of_failing_closed() -> None:
    """Near the end every call needs a write; writers that lost to each other must not keep colliding
    until one refuses usage_unavailable (seen on real pods: 3 replicas, 12 threads)."""
    store, cap = SlowStore(), _cap(budget=600)
    chargers = [_charger(store) for _ in range(3)]
    results = await asyncio.gather(*[c.charge(cap, "payments", {"amount": 7}) for _ in range(40) for c in chargers])
    refusals = {(r.reason, r.detail) for r in results if r is not None}
    assert refusals <= {("budget_exhausted", None)}, refusals
    assert sum(1 for r in results if r is None) * 7 <= 600
