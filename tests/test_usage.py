"""The lease algorithm never lets a fleet spend more than ``max`` in a window, whatever interleaves.

The model: one stored object with a resourceVersion (compare-and-swap like the API server), several
sidecars that each read it at some moment and write later from what they read (so writes race and
go stale), crashes that lose a sidecar's leases, a clock that jumps across 1h and 24h windows, and
an agent that writes whatever the CRD's transition rules allow. Every write the sidecars plan must
itself pass those transition rules.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from capgate import usage
from capgate.capabilities import spec

RATE = usage.Meter("requests/3600s", 13, 3600, "rate limit")
BUDGET = usage.Meter("budget/payments/amount/86400s", 300, 86400, "budget payments.amount")
SIDECARS = 3


def transition_allowed(old: dict[str, usage.Window], new: dict[str, usage.Window]) -> bool:
    """The CRD's rules for status.windows, in Python (e2e/test_usage.py checks the real ones)."""
    if any(key not in new for key in old):
        return False
    return all(new[k].start > old[k].start or (new[k].start == old[k].start and new[k].spent >= old[k].spent)
               for k in old)


def spent_transition_allowed(old: usage.Spent, new: usage.Spent) -> bool:
    """The CRD's rules for status.horizon and status.consumed: the horizon only grows, an id keeps its
    expiry and is removed only once it is at or before the new horizon."""
    return new.horizon >= old.horizon and all(
        new.consumed[k] == v if k in new.consumed else v <= new.horizon for k, v in old.consumed.items())


class Store:
    def __init__(self) -> None:
        self.version = 0
        self.status: dict[str, Any] = {}

    def windows(self) -> dict[str, usage.Window]:
        return usage.parse_windows(self.status)

    def write(self, version: int, status: dict[str, Any]) -> bool:
        if version != self.version:
            return False  # 409 Conflict
        new = usage.parse_windows(status)
        assert transition_allowed(self.windows(), new), "a sidecar planned a write the API server refuses"
        spent = usage.parse_spent(status)
        assert spent_transition_allowed(usage.parse_spent(self.status), spent), "a consumed id was reset"
        assert len(spent.consumed) <= usage.MAX_CONSUMED, "more consumed ids than the CRD holds"
        self.status, self.version = status, self.version + 1
        return True


class Fleet(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        self.store = Store()
        self.books = [usage.LeaseBook() for _ in range(SIDECARS)]
        self.snapshots: list[tuple[int, dict[str, Any]] | None] = [None] * SIDECARS
        self.used: dict[tuple[str, int], int] = defaultdict(int)
        """What sidecars let through, per meter and window: the agent's real spending."""
        self.receipts: list[usage.Candidate] = []
        """Receipts minted so far (any sidecar may be shown any of them)."""
        self.opened: dict[str, int] = defaultdict(int)
        """How many forwarded calls each receipt opened a consuming gate for."""

    @rule(ttl=st.sampled_from([30, 330, 3600]))
    def mint(self, ttl: int) -> None:
        self.receipts.append(usage.Candidate(f"{len(self.receipts):032x}", int(self.now) + ttl))

    @precondition(lambda self: bool(self.receipts))
    @rule(sidecar=st.integers(0, SIDECARS - 1), data=st.data(), gates=st.integers(1, 2))
    def consuming_call(self, sidecar: int, data: st.DataObject, gates: int) -> None:
        """A call whose rule consumes ``gates`` receipts, each from some subset of the minted ones,
        planned from the sidecar's (maybe stale) snapshot and written with compare-and-swap."""
        snapshot = self.snapshots[sidecar]
        if snapshot is None:
            return
        version, status = snapshot
        shown = [data.draw(st.lists(st.sampled_from(self.receipts), min_size=1, max_size=4)) for _ in range(gates)]
        plan = usage.consume(usage.parse_spent(status), shown, self.now, capacity=5)
        if isinstance(plan, usage.Unopened):
            return
        new_status = usage.apply_consumption(status, plan)
        if not self.store.write(version, new_status):
            self.snapshots[sidecar] = None
            return
        self.snapshots[sidecar] = (self.store.version, new_status)
        for candidate in plan.picked:
            assert candidate.expiry > self.now, "an expired receipt opened a gate"
            self.opened[candidate.id] += 1

    @rule(more=st.integers(0, 3), forward=st.integers(0, 100), prune=st.booleans())
    def agent_spends_receipts(self, more: int, forward: int, prune: bool) -> None:
        """The agent may consume its own receipts, raise the horizon and prune what it passed."""
        old = usage.parse_spent(self.store.status)
        horizon = old.horizon + forward
        consumed = {k: v for k, v in old.consumed.items() if not (prune and v <= horizon)}
        for candidate in self.receipts[-more:] if more else []:
            consumed.setdefault(candidate.id, candidate.expiry)
        status = {**self.store.status, "horizon": horizon, "consumed": consumed}
        if len(consumed) <= usage.MAX_CONSUMED:
            assert self.store.write(self.store.version, status)

    @invariant()
    def every_receipt_opens_a_consuming_gate_at_most_once(self) -> None:
        assert all(count <= 1 for count in self.opened.values()), dict(self.opened)

    @rule(sidecar=st.integers(0, SIDECARS - 1))
    def read(self, sidecar: int) -> None:
        self.snapshots[sidecar] = (self.store.version, dict(self.store.status))

    @precondition(lambda self: any(s is not None for s in self.snapshots))
    @rule(sidecar=st.integers(0, SIDECARS - 1), amount=st.integers(0, 3) | st.integers(0, 60))
    def call(self, sidecar: int, amount: int) -> None:
        """One budgeted call: spend locally, or claim from the (maybe stale) snapshot and CAS."""
        book, snapshot = self.books[sidecar], self.snapshots[sidecar]
        demands = [(RATE, 1), (BUDGET, amount)]
        if book.spend_local(demands, self.now):
            self._used(demands)
            return
        if snapshot is None:
            return
        version, status = snapshot
        claim = book.claim(demands, usage.parse_windows(status), self.now)
        if isinstance(claim, usage.Refusal):
            return
        new_status = usage.apply(status, claim)
        if not self.store.write(version, new_status):
            self.snapshots[sidecar] = None  # stale: must read again
            return
        self.snapshots[sidecar] = (self.store.version, new_status)
        book.granted(claim)
        assert book.spend_local(demands, self.now), "a granted claim must cover the call it was taken for"
        self._used(demands)

    def _used(self, demands: list[usage.Demand]) -> None:
        for meter, amount in demands:
            self.used[(meter.key, usage.window_start(self.now, meter.per))] += amount

    @rule(sidecar=st.integers(0, SIDECARS - 1))
    def crash(self, sidecar: int) -> None:
        self.books[sidecar] = usage.LeaseBook()
        self.snapshots[sidecar] = None

    @rule(seconds=st.sampled_from([1.0, 1.0, 59.0, 59.0, 1800.0, 3600.0, 86400.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule(meter=st.sampled_from([RATE, BUDGET]), forward=st.sampled_from([0, 0, 0, 1]), more=st.integers(0, 5))
    def agent_writes(self, meter: usage.Meter, forward: int, more: int) -> None:
        """The agent shares the ServiceAccount: it may write anything the transition rules allow."""
        windows = self.store.windows()
        old = windows.get(meter.key)
        start = usage.window_start(self.now, meter.per) + forward * meter.per
        if old is not None and start < old.start:
            start = old.start
        spent = (old.spent if old is not None and old.start == start else 0) + more
        status = dict(self.store.status)
        status["windows"] = {**(status.get("windows") or {}), meter.key: {"start": start, "spent": spent}}
        assert self.store.write(self.store.version, status)

    @invariant()
    def never_more_than_max_in_any_window(self) -> None:
        for (key, _start), used in self.used.items():
            limit = RATE.max if key == RATE.key else BUDGET.max
            assert used <= limit, f"{key}: {used} used of {limit}"

    @invariant()
    def what_was_used_and_what_is_still_leased_fit_in_max(self) -> None:
        for meter in (RATE, BUDGET):
            start = usage.window_start(self.now, meter.per)
            leased = sum(book.balance(meter, self.now) for book in self.books)
            assert self.used.get((meter.key, start), 0) + leased <= meter.max

    @invariant()
    def what_was_used_was_leased(self) -> None:
        for key, window in self.store.windows().items():
            assert self.used.get((key, window.start), 0) <= window.spent


Fleet.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
test_no_interleaving_of_sidecars_crashes_and_rollovers_overspends = Fleet.TestCase


# ------------------------------------------------------------------------------ plain behaviour

def _cap(**changes: Any) -> spec.Capability:
    base = dict(name="booking-agent", namespace="travel", service_account="booking-agent", upstreams=(), rules=(),
                rate_limit=spec.RateLimit(600, timedelta(hours=1)),
                budgets=(spec.Budget("payments", "amount", 60000, timedelta(hours=24)),))
    base.update(changes)
    return spec.Capability(**base)  # type: ignore[arg-type]


def test_meters_are_keyed_by_what_they_count_and_their_window() -> None:
    rate, budget = usage.meters(_cap())
    assert (rate.key, rate.max, rate.per) == ("requests/3600s", 600, 3600)
    assert (budget.key, budget.max, budget.per) == ("budget/payments/amount/86400s", 60000, 86400)


def test_a_lease_is_large_far_from_the_limit_and_single_units_near_it() -> None:
    book = usage.LeaseBook()
    claim = book.claim([(BUDGET, 1)], {}, 0.0)
    assert isinstance(claim, usage.Claim) and claim.grants[BUDGET.key] == BUDGET.max // usage.SHARE
    near = book.claim([(BUDGET, 1)], {BUDGET.key: usage.Window(0, BUDGET.max - 5)}, 0.0)
    assert isinstance(near, usage.Claim) and near.grants[BUDGET.key] == 1


def test_a_call_that_does_not_fit_the_fleet_window_is_refused_until_the_window_ends() -> None:
    book = usage.LeaseBook()
    refused = book.claim([(BUDGET, 31)], {BUDGET.key: usage.Window(86400, 270)}, 86400.0 + 600)
    assert isinstance(refused, usage.Refusal) and refused.reason == "exhausted"
    assert refused.retry_after == 86400 - 600
    assert "270 of 300" in refused.message


def test_a_new_window_starts_from_nothing_and_an_old_lease_is_worthless_in_it() -> None:
    book = usage.LeaseBook()
    first = book.claim([(RATE, 1)], {}, 10.0)
    assert isinstance(first, usage.Claim)
    book.granted(first)
    assert book.spend_local([(RATE, 1)], 10.0)
    assert not book.spend_local([(RATE, 1)], 3600.0)
    second = book.claim([(RATE, 1)], {RATE.key: usage.Window(0, RATE.max)}, 3600.0)
    assert isinstance(second, usage.Claim) and second.windows[RATE.key].start == 3600


def test_a_window_ahead_of_the_clock_refuses_instead_of_resetting() -> None:
    refused = usage.LeaseBook().claim([(RATE, 1)], {RATE.key: usage.Window(7200, 0)}, 100.0)
    assert isinstance(refused, usage.Refusal) and refused.reason == "ahead"


def test_spending_is_all_or_nothing_across_meters() -> None:
    book = usage.LeaseBook({RATE.key: usage.Lease(0, 5), BUDGET.key: usage.Lease(0, 10)})
    assert not book.spend_local([(RATE, 1), (BUDGET, 11)], 5.0)
    assert book.balance(RATE, 5.0) == 5


@pytest.mark.parametrize("status", [
    {"windows": []}, {"windows": {"k": {"start": -1, "spent": 0}}}, {"windows": {"k": {"start": 0}}},
    {"windows": {"k": {"start": True, "spent": 0}}}, {"windows": {"k": {"start": 0, "spent": 1.5}}}, [],
])
def test_a_malformed_stored_state_is_refused_never_read_as_zero(status: Any) -> None:
    with pytest.raises(usage.UsageError):
        usage.parse_windows(status)


def test_the_usage_table_counts_an_ended_window_as_empty_and_marks_one_ahead() -> None:
    cap = _cap()
    status = {"windows": {"requests/3600s": {"start": 0, "spent": 600},
                          "budget/payments/amount/86400s": {"start": 86400, "spent": 10}}}
    rate, budget = usage.table(cap, status, 4000.0)
    assert (rate.start, rate.spent, rate.remaining) == (3600, 0, 600)
    assert budget.ahead and budget.remaining == 0
    rate, budget = usage.table(cap, status, 86400.0 + 5)
    assert (budget.spent, budget.remaining) == (10, 59990)


# ------------------------------------------------------------------------------ single-use receipts

def _receipt(n: int, expiry: int) -> usage.Candidate:
    return usage.Candidate(f"{n:032x}", expiry)


def test_a_gate_spends_the_receipt_that_expires_first_and_records_it() -> None:
    late, early = _receipt(1, 900), _receipt(2, 500)
    plan = usage.consume(usage.Spent(), [[late, early]], 100.0)
    assert isinstance(plan, usage.Consumption)
    assert plan.picked == (early,) and plan.consumed == {early.id: 500} and plan.horizon == 100


def test_a_consumed_or_expired_receipt_opens_nothing_and_nothing_is_spent() -> None:
    used, expired, fresh = _receipt(1, 900), _receipt(2, 50), _receipt(3, 900)
    spent = usage.Spent(0, {used.id: 900})
    assert usage.consume(spent, [[used, expired]], 100.0) == usage.Unopened(0)
    assert usage.consume(spent, [[fresh], [used]], 100.0) == usage.Unopened(1), "all gates or none"


def test_ids_at_or_before_the_horizon_count_as_consumed_even_when_pruned() -> None:
    assert usage.consume(usage.Spent(horizon=600), [[_receipt(1, 600)]], 100.0) == usage.Unopened(0)


def test_expired_ids_are_pruned_and_a_full_list_advances_the_horizon_past_the_earliest() -> None:
    spent = usage.Spent(0, {_receipt(n, 100 + n).id: 100 + n for n in range(10)})
    plan = usage.consume(spent, [[_receipt(99, 1000)]], 105.0, capacity=3)
    assert isinstance(plan, usage.Consumption)
    assert plan.horizon == 107 and sorted(plan.consumed.values()) == [108, 109, 1000]
    assert all(expiry <= plan.horizon for key, expiry in spent.consumed.items() if key not in plan.consumed)


def test_a_write_keeps_the_windows_and_a_window_write_keeps_the_consumed_ids() -> None:
    status = {"windows": {"requests/3600s": {"start": 0, "spent": 4}}, "horizon": 1, "consumed": {"a" * 32: 90}}
    plan = usage.consume(usage.parse_spent(status), [[_receipt(1, 80)]], 10.0)
    assert isinstance(plan, usage.Consumption)
    written = usage.apply_consumption(status, plan)
    assert written["windows"] == status["windows"] and written["consumed"] == {"a" * 32: 90, f"{1:032x}": 80}
    claim = usage.LeaseBook().claim([(RATE, 1)], usage.parse_windows(written), 10.0)
    assert isinstance(claim, usage.Claim)
    assert usage.apply(written, claim)["consumed"] == written["consumed"]


@pytest.mark.parametrize("status", [{"horizon": -1}, {"horizon": "5"}, {"consumed": []}, {"consumed": {"a": -1}},
                                    {"consumed": {"a": True}}])
def test_a_malformed_consumed_state_is_refused_never_read_as_empty(status: Any) -> None:
    with pytest.raises(usage.UsageError):
        usage.parse_spent(status)


def test_the_consumed_capacity_is_the_crds() -> None:
    from tests.test_usage_crd import _schema

    consumed = _schema()["properties"]["status"]["properties"]["consumed"]
    assert consumed["maxProperties"] == usage.MAX_CONSUMED


# ------------------------------------------------------------------------------ response budgets

TOKENS = usage.Meter("budget/llm/response:usage.total_tokens/86400s", 1000, 86400, "budget llm.usage.total_tokens")


def _tokens_cap() -> spec.Capability:
    return _cap(budgets=(spec.Budget("payments", "amount", 60000, timedelta(hours=24)),
                         spec.Budget("llm", "usage.total_tokens", 1000, timedelta(hours=24), "response", 4096)))


def test_a_response_budget_has_its_own_window_key_and_label() -> None:
    _, amount, tokens = usage.meters(_tokens_cap())
    assert amount.key == "budget/payments/amount/86400s"
    assert tokens.key == TOKENS.key
    assert tokens.label == "budget llm.usage.total_tokens (response)"


def test_usage_within_the_lease_costs_no_write_and_an_unused_deposit_goes_back_to_it() -> None:
    book = usage.LeaseBook({TOKENS.key: usage.Lease(0, 100, 100)})
    assert book.spend_local([(TOKENS, usage.DEPOSIT)], 5.0)
    assert book.adjust(TOKENS, 60 - usage.DEPOSIT, 5.0) == 0
    assert book.balance(TOKENS, 5.0) == 40
    assert book.spend_local([(TOKENS, usage.DEPOSIT)], 5.0)
    assert book.adjust(TOKENS, 0 - usage.DEPOSIT, 5.0) == 0  # the call used nothing
    assert book.balance(TOKENS, 5.0) == 40
    assert book.debts == {}


def test_usage_beyond_the_lease_is_owed_and_recorded_past_max_in_the_shared_window() -> None:
    book = usage.LeaseBook({TOKENS.key: usage.Lease(0, 30, 30)})
    assert book.adjust(TOKENS, 1200, 5.0) == 1170
    assert book.balance(TOKENS, 5.0) == 0
    stored = {TOKENS.key: usage.Window(0, 900)}
    claim = book.settle(stored, 5.0)
    assert claim.windows[TOKENS.key] == usage.Window(0, 2070), "what was used was used: spent passes max"
    assert claim.grants == {}
    assert transition_allowed(stored, {**stored, **claim.windows})
    book.adjust(TOKENS, 5, 6.0)  # another call settled while the write was in flight
    book.settled(claim)
    assert book.debts == {TOKENS.key: (TOKENS, 5)}
    refused = book.claim([(TOKENS, usage.DEPOSIT)], claim.windows, 6.0)
    assert isinstance(refused, usage.Refusal) and refused.reason == "exhausted"


def test_debt_goes_to_the_current_window_or_to_one_stored_ahead_never_backwards() -> None:
    book = usage.LeaseBook()
    book.adjust(TOKENS, 50, 86400.0 + 10)
    ended = {TOKENS.key: usage.Window(0, 1000)}
    assert book.settle(ended, 86400.0 + 10).windows[TOKENS.key] == usage.Window(86400, 50)
    ahead = {TOKENS.key: usage.Window(2 * 86400, 7)}
    claim = book.settle(ahead, 86400.0 + 10)
    assert claim.windows[TOKENS.key] == usage.Window(2 * 86400, 57)
    assert transition_allowed(ahead, claim.windows)


def test_the_printer_column_summarizes_every_meter_as_spent_over_max() -> None:
    status = {"windows": {"requests/3600s": {"start": 3600, "spent": 3},
                          TOKENS.key: {"start": 0, "spent": 1200}}}
    rows = usage.table(_tokens_cap(), status, 4000.0)
    assert usage.summary(rows) == "requests 3/600, payments.amount 0/60000, llm.usage.total_tokens 1200/1000"
    assert [r.remaining for r in rows] == [597, 60000, 0]
    assert usage.summary([]) == "-"


class TokenFleet(RuleBasedStateMachine):
    """Response budgets: calls take a deposit, end later with any usage, and owe what the lease lacks.

    Within one window (rollovers are the model above's), whatever interleaves: every token used is
    recorded in the shared window or still owed (lost only with a crashed sidecar's debt), and the
    slices leased up front never take the window past ``max`` — only recorded usage does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        self.store = Store()
        self.books = [usage.LeaseBook() for _ in range(SIDECARS)]
        self.snapshots: list[tuple[int, dict[str, Any]] | None] = [None] * SIDECARS
        self.in_flight: list[int] = []
        self.used = self.lost = self.debt_written = self.agent_added = 0

    @rule(sidecar=st.integers(0, SIDECARS - 1))
    def read(self, sidecar: int) -> None:
        self.snapshots[sidecar] = (self.store.version, dict(self.store.status))

    def _write(self, sidecar: int, claim: usage.Claim) -> bool:
        snapshot = self.snapshots[sidecar]
        assert snapshot is not None
        new_status = usage.apply(snapshot[1], claim)
        if not self.store.write(snapshot[0], new_status):
            self.snapshots[sidecar] = None
            return False
        self.snapshots[sidecar] = (self.store.version, new_status)
        return True

    @rule(sidecar=st.integers(0, SIDECARS - 1))
    def start(self, sidecar: int) -> None:
        book, demands = self.books[sidecar], [(TOKENS, usage.DEPOSIT)]
        if not book.spend_local(demands, self.now):
            if self.snapshots[sidecar] is None or book.debts:
                return  # the adapter pays debts first (the pay rule)
            claim = book.claim(demands, usage.parse_windows(self.snapshots[sidecar][1]), self.now)  # type: ignore[index]
            if isinstance(claim, usage.Refusal) or not self._write(sidecar, claim):
                return
            book.granted(claim)
            assert book.spend_local(demands, self.now)
        self.in_flight.append(sidecar)
        self.used += usage.DEPOSIT

    @precondition(lambda self: self.in_flight)
    @rule(index=st.integers(0, 10), tokens=st.integers(0, 3) | st.integers(0, 200))
    def finish(self, index: int, tokens: int) -> None:
        sidecar = self.in_flight.pop(index % len(self.in_flight))
        self.books[sidecar].adjust(TOKENS, tokens - usage.DEPOSIT, self.now)
        self.used += tokens - usage.DEPOSIT

    @rule(sidecar=st.integers(0, SIDECARS - 1))
    def pay(self, sidecar: int) -> None:
        book, snapshot = self.books[sidecar], self.snapshots[sidecar]
        if not book.debts or snapshot is None:
            return
        claim = book.settle(usage.parse_windows(snapshot[1]), self.now)
        if self._write(sidecar, claim):
            book.settled(claim)
            self.debt_written += sum(claim.debts.values())

    @rule(sidecar=st.integers(0, SIDECARS - 1))
    def crash(self, sidecar: int) -> None:
        self.lost += sum(owed for _, owed in self.books[sidecar].debts.values())
        self.books[sidecar] = usage.LeaseBook()
        self.snapshots[sidecar] = None

    @rule(more=st.integers(0, 50))
    def agent_writes(self, more: int) -> None:
        window = self.store.windows().get(TOKENS.key)
        start = usage.window_start(self.now, TOKENS.per)
        status = dict(self.store.status)
        status["windows"] = {**(status.get("windows") or {}),
                             TOKENS.key: {"start": start, "spent": (window.spent if window else 0) + more}}
        assert self.store.write(self.store.version, status)
        self.agent_added += more

    def _spent(self) -> int:
        window = self.store.windows().get(TOKENS.key)
        return window.spent if window else 0

    @invariant()
    def every_token_used_is_recorded_or_owed(self) -> None:
        owed = sum(owed for book in self.books for _, owed in book.debts.values())
        leased_unused = sum(book.balance(TOKENS, self.now) for book in self.books)
        assert self.used <= self._spent() - self.agent_added - leased_unused + owed + self.lost

    @invariant()
    def slices_leased_up_front_never_pass_max(self) -> None:
        assert self._spent() - self.debt_written - self.agent_added <= TOKENS.max


TokenFleet.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
test_no_interleaving_of_response_charged_calls_loses_a_token_or_leases_past_max = TokenFleet.TestCase
