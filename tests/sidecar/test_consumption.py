"""Single-use receipts through real sidecars: a consuming gate opens once per receipt.

The sidecars here share one in-memory compare-and-swap store (the boundary e2e/test_usage.py
replaces with the real API server); everything in front of it — receipts, Datalog, the gate, the
proxy, the MCP handler — is the real thing.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from mcp import Client
from mcp.shared.exceptions import MCPError

from capgate import usage
from capgate.sidecar import consumption
from capgate.sidecar.metrics import Metrics
from capgate.sidecar.state import Conflict, StateUnavailable
from tests.sidecar.conftest import BASE_SPEC, MakeSidecar, Sidecar
from tests.sidecar.mcp_server import Booking, running
from tests.sidecar.test_mcp import example_spec, mcp_records, url_of

CHARGE = "/payments/v1/charges"
CORR = {"X-Capgate-Correlation-Id": "trip-7"}


def consuming_spec() -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    charge = next(rule for rule in spec["rules"] if rule["name"] == "charge")
    charge["requires"] = [{"rule": "search", "consume": True}]
    return spec


class SharedStore(consumption.MemoryUsageStore):
    """One object for several sidecars; each write yields first, so concurrent writers interleave."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.writes = 0

    async def read(self) -> tuple[str, dict[str, Any]]:
        if self.down:
            raise StateUnavailable("the API server is unreachable (test)")
        return await super().read()

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if self.down:
            raise StateUnavailable("the API server is unreachable (test)")
        await asyncio.sleep(0)
        self.writes += 1
        return await super().write(version, status)


async def _search(sc: Sidecar) -> tuple[str, str]:
    response = await sc.client.get("/flights/search", headers=CORR)
    assert response.status == 200
    return response.headers["X-Capgate-Receipt"], response.headers["X-Capgate-Decision-Id"]


async def _charge(sc: Sidecar, receipt: str | None = None, amount: int = 100) -> tuple[int, dict[str, Any]]:
    headers = {**CORR, **({"X-Capgate-Receipt": receipt} if receipt else {})}
    response = await sc.client.post(CHARGE, json={"amount": amount}, headers=headers)
    return response.status, await response.json()


def _charges(sc: Sidecar) -> int:
    return sum(1 for seen in sc.upstream.seen if seen.path == "/v1/charges")


async def _fleet(sidecar: MakeSidecar, store: SharedStore, count: int, spec: dict[str, Any] | None = None
                 ) -> list[Sidecar]:
    out = []
    for _ in range(count):
        metrics = Metrics()
        side = await sidecar(spec or consuming_spec(), single_use=consumption.SingleUse(store, metrics))
        side.gate.single_use.metrics = side.gate.metrics  # count on the app's own registry
        out.append(side)
    return out


async def test_one_receipt_opens_a_consuming_gate_once_across_sidecars_presenting_it_at_once(
        sidecar: MakeSidecar) -> None:
    store = SharedStore()
    sidecars = await _fleet(sidecar, store, 3)
    receipt, receipt_id = await _search(sidecars[0])

    results = await asyncio.gather(*[_charge(sidecars[i % 3], receipt) for i in range(9)])

    assert [status for status, _ in results].count(200) == 1
    assert {(body["error"], body["reason"], body["rule"]) for status, body in results if status != 200} == {
        ("denied", "receipt_consumed", "charge")}
    assert _charges(sidecars[0]) == 1, "exactly one charge reached the upstream"
    assert list(store.status["consumed"]) == [receipt_id]
    spent = [r for side in sidecars for r in side.decisions() if r.get("receipts_consumed")]
    assert [(r["receipts_consumed"], r["outcome"], r["rule"]) for r in spent] == [([receipt_id], "allowed", "charge")]


async def test_an_unmodified_agent_gets_one_charge_per_search(sidecar: MakeSidecar) -> None:
    sc = await sidecar(consuming_spec())  # standalone: the sidecar's own memory
    await _search(sc)
    await _search(sc)
    assert (await _charge(sc))[0] == 200  # held receipts, no header echoed
    assert (await _charge(sc))[0] == 200
    status, body = await _charge(sc)
    assert (status, body["reason"]) == (403, "receipt_consumed")
    assert "call 'search' again" in body["message"]
    assert _charges(sc) == 2
    await _search(sc)
    assert (await _charge(sc))[0] == 200


async def test_an_agent_carrying_two_receipts_spends_one_per_call(sidecar: MakeSidecar) -> None:
    sc = await sidecar(consuming_spec())
    first, first_id = await _search(sc)
    second, second_id = await _search(sc)
    both = f"{first},{second}"
    assert (await _charge(sc, both))[0] == 200
    assert (await _charge(sc, both))[0] == 200
    assert (await _charge(sc, both))[1]["reason"] == "receipt_consumed"
    spent = [r["receipts_consumed"] for r in sc.decisions() if r.get("receipts_consumed")]
    assert sorted(spent) == sorted([[first_id], [second_id]])
    assert _charges(sc) == 2


async def test_a_plain_requires_is_not_single_use_even_when_another_rule_consumes(sidecar: MakeSidecar) -> None:
    spec = consuming_spec()
    spec["rules"].append({"name": "quote", "effect": "allow", "upstream": "payments", "methods": ["POST"],
                          "paths": ["/v1/quotes"], "requires": ["search"]})
    sc = await sidecar(spec)
    receipt, _ = await _search(sc)
    assert (await _charge(sc, receipt))[0] == 200
    for _ in range(3):
        response = await sc.client.post("/payments/v1/quotes", json={}, headers={**CORR, "X-Capgate-Receipt": receipt})
        assert response.status == 200


async def test_a_call_refused_by_its_limit_or_its_budget_spends_no_receipt(sidecar: MakeSidecar) -> None:
    spec = consuming_spec()
    spec["budgets"] = [{"upstream": "payments", "field": "amount", "max": 50, "per": "24h"}]
    sc = await sidecar(spec)
    receipt, _ = await _search(sc)
    status, body = await _charge(sc, receipt, amount=50_000)  # over the rule's limit: the verdict refuses
    assert (status, body["reason"]) == (403, "limit_exceeded")
    status, body = await _charge(sc, receipt, amount=60)  # allowed by the rule, over the budget: 429
    assert (status, body["error"]) == (429, "budget_exhausted")
    assert (await _charge(sc, receipt, amount=40))[0] == 200
    assert _charges(sc) == 1


async def test_an_unreachable_state_refuses_consuming_calls_and_leaves_others_alone(sidecar: MakeSidecar) -> None:
    store = SharedStore()
    (sc,) = await _fleet(sidecar, store, 1)
    receipt, _ = await _search(sc)
    store.down = True
    response = await sc.client.post(CHARGE, json={"amount": 100}, headers={**CORR, "X-Capgate-Receipt": receipt})
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (503, "usage_unavailable", "usage_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert (await sc.client.get("/flights/search", headers=CORR)).status == 200
    assert _charges(sc) == 0
    store.down = False
    sc.gate.single_use._retry_at = 0.0  # skip the back-off instead of sleeping through it
    assert (await _charge(sc, receipt))[0] == 200, "refused, not spent: the receipt still opens the gate once"
    metrics = (await (await sc.admin.get("/metrics")).text())
    assert 'capgate_receipt_consumption_refusals_total{reason="usage_unavailable"} 1.0' in metrics
    assert "capgate_receipts_consumed_total 1.0" in metrics


async def test_a_conflicting_write_is_read_again_and_finds_the_receipt_spent() -> None:
    class Racing(SharedStore):
        """Another pod consumes the same receipt between our read and our write."""

        async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            if not self.status:
                await super().write(version, status)
                raise Conflict
            return await super().write(version, status)

    store = Racing()
    single = consumption.SingleUse(store, Metrics(), clock=lambda: 1_000.0)
    receipt = usage.Candidate("a" * 32, 2_000)
    outcome = await single.consume([consumption.Gate("search", frozenset({receipt}))])
    assert isinstance(outcome, consumption.Refused) and outcome.reason == "receipt_consumed"
    assert single.known(receipt)


async def test_audit_mode_logs_a_second_use_and_forwards_it(sidecar: MakeSidecar) -> None:
    spec = consuming_spec()
    spec["mode"] = "audit"
    sc = await sidecar(spec)
    receipt, _ = await _search(sc)
    assert (await _charge(sc, receipt))[0] == 200
    assert (await _charge(sc, receipt))[0] == 200
    last = sc.decisions()[-1]
    assert (last["outcome"], last["reason"]) == ("would_deny", "receipt_consumed")


async def test_an_mcp_tool_call_consumes_its_search_receipt(sidecar: MakeSidecar) -> None:
    booking = Booking()
    spec = example_spec()
    charge = next(rule for rule in spec["rules"] if rule["name"] == "charge")
    charge["requires"] = [{"rule": "search", "consume": True}]
    async with running(booking) as url:
        sc = await sidecar(spec, upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        async with Client(url_of(sc)) as client:
            await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
            assert not (await client.call_tool("charge", {"amount": 100, "currency": "EUR"})).is_error
            try:
                await client.call_tool("charge", {"amount": 100, "currency": "EUR"})
            except MCPError as exc:
                refused = exc.data
            else:
                raise AssertionError("a second charge on one search receipt was forwarded")
    assert (refused["reason"], refused["rule"]) == ("receipt_consumed", "charge")
    assert booking.tools() == ["search_flights", "charge"]
    consumed = [r for r in mcp_records(sc) if r.get("receipts_consumed")]
    assert len(consumed) == 1 and consumed[0]["mcp"]["name"] == "charge"


async def test_whoami_says_which_rules_consume_their_receipt(sidecar: MakeSidecar) -> None:
    sc = await sidecar(consuming_spec())
    rules = {rule["name"]: rule for rule in (await (await sc.client.get("/_capgate/v1/whoami")).json())["rules"]}
    assert rules["charge"]["requires"] == ["search"] and rules["charge"]["consumes"] == ["search"]
    assert "consumes" not in rules["search"]
