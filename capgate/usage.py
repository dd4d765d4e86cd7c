"""Fleet-wide leases on rate limits and budgets: the pure algorithm, no Kubernetes, no I/O.

Every sidecar of a capability shares one ``AgentCapabilityUsage`` object (DESIGN.md, "Fleet-wide
state"). Asking the API server on every call would put a write on every request path, so a sidecar
*leases* a slice of each window in advance and spends it locally:

* **Meters.** The rate limit counts requests (1 each) and every budget counts its body field, each in
  a *fixed* window of its ``per`` aligned to the Unix epoch (so ``24h`` rolls over at 00:00 UTC and
  every sidecar, whatever its start time, agrees on which window it is in). A fixed window is what the
  fleet can agree on without per-call timestamps in the object; across a boundary an agent can spend
  up to ``max`` on each side. Standalone (no cluster) keeps the in-memory sliding window and token
  bucket of :mod:`capgate.sidecar.limits`.
* **Slices.** The stored ``spent`` is what was *leased out*, not what was used. A lease takes
  ``max(need, remaining // SHARE)``: an eighth of what is left when far from the limit (few writes),
  down to exactly the amount of the call near it (nothing stranded). The write is a compare-and-swap
  on the object's resourceVersion, so two sidecars never both take the same units; a sidecar's unused
  slice is never returned (a crashed pod's slice is simply lost), hence ``sum(used) <= spent <= max``.
* **Monotonic.** Every write this module plans only grows ``spent`` within a window or moves a window
  forward, which is exactly what the CRD's transition rules allow: the agent, which shares the
  sidecar's ServiceAccount and so can write the same object, can spend more but never reset. A window
  stored *ahead* of this sidecar's clock (an agent moved it, or another sidecar's clock runs fast) is
  a window whose spending in *our* window is unknown: refused until our clock reaches it.

Meters are keyed by what they count and their length (``requests/3600s``,
``budget/payments/amount/86400s``; a per-tool budget appends ``/tool/<tool>``; a budget read from
responses is ``budget/llm/response:usage.total_tokens/86400s``), so raising ``max`` keeps the spending,
while changing ``per`` starts a new meter.

**Response budgets** (``from: response``, LLM token usage) cannot be charged before the call: its
amount is in the answer. A call needs one unit of the window up front (the *deposit*: a call is
refused once nothing is left) and is settled after the response with what it used less the deposit
(:meth:`LeaseBook.adjust`). Usage beyond the lease in hand becomes *debt*, written to the shared
window as a plain increment that may take ``spent`` past ``max`` (:meth:`LeaseBook.settle`): the
window ends above ``max`` by at most the usage of the calls in flight when it ran out. Debt is
written before any new lease is taken, so a sidecar that cannot record what was used takes no more.

The same object records single-use receipts (``status.consumed``, ``status.horizon``; see the last
section): a consumed id is only ever added, and pruned only once it expired, so the agent can spend
its own receipts through that object but never un-spend one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from capgate.capabilities import spec

SHARE = 8
"""A lease takes this fraction of what is left: a crash loses at most 1/8 of the remainder, and a
budget of N takes about ln(N)/ln(8/7) + 8 writes to exhaust (~90 for 60,000) however many calls spend it."""


LOW_WATER = 4
"""A lease with a quarter of its last slice left is renewed in the background, so the call that would
have run it dry does not wait for the API server (the adapter does the renewing)."""


class UsageError(ValueError):
    """The stored usage state is not what the CRD schema allows: callers refuse (fail closed)."""


@dataclass(frozen=True)
class Meter:
    """One fleet-wide counter: its key in ``status.windows``, its limit per window and the window length."""

    key: str
    max: int
    per: int
    """Seconds."""
    label: str
    """For messages: ``rate limit`` or ``budget payments.amount``."""


@dataclass(frozen=True)
class Window:
    start: int
    spent: int


@dataclass
class Lease:
    """What this sidecar may still spend of one meter's window without asking the API server."""

    start: int
    balance: int
    granted: int = 0
    """The size of the last slice taken (what "running low" is measured against)."""


@dataclass(frozen=True)
class Refusal:
    meter: Meter
    reason: str
    """``exhausted`` (the window has no room) or ``ahead`` (the stored window is later than our clock's)."""
    message: str
    retry_after: float


@dataclass(frozen=True)
class Claim:
    """A planned write: the new windows (only those that change) and the slice each adds to our leases."""

    windows: dict[str, Window]
    grants: dict[str, int]
    debts: dict[str, int] = field(default_factory=dict)
    """Response usage beyond the leases in hand that this write records (see :meth:`LeaseBook.settle`)."""


Demand = tuple[Meter, int]

DEPOSIT = 1
"""What a call under a response budget takes up front: a window with nothing left refuses it."""


def meters(cap: spec.Capability) -> tuple[Meter, ...]:
    """The rate limit and the budgets of a capability, as fleet-wide meters (in that order)."""
    out: list[Meter] = []
    if cap.rate_limit is not None:
        per = _seconds(cap.rate_limit.per.total_seconds())
        out.append(Meter(f"requests/{per}s", cap.rate_limit.requests, per, "rate limit"))
    for budget in cap.budgets:
        per = _seconds(budget.per.total_seconds())
        # ':' is not in a field path, so a response budget never shares a request budget's window; a
        # tool's budget is its own meter, its key keeping the upstream-wide form as its prefix.
        counted = f"response:{budget.field}" if budget.from_response else budget.field
        tool = f"/tool/{budget.tool}" if budget.tool is not None else ""
        label = (f"budget {budget.upstream}.{budget.field}" + (" (response)" if budget.from_response else "")
                 + (f" (tool {budget.tool})" if budget.tool is not None else ""))
        out.append(Meter(f"budget/{budget.upstream}/{counted}/{per}s{tool}", budget.max, per, label))
    return tuple(out)


def _seconds(value: float) -> int:
    return max(1, int(value))


def window_start(now: float, per: int) -> int:
    """The epoch-aligned start of the window ``now`` falls in."""
    return int(now // per) * per


def parse_windows(status: object) -> dict[str, Window]:
    """``status.windows`` as stored; raises :class:`UsageError` for anything the schema would not allow."""
    if status is None:
        return {}
    if not isinstance(status, Mapping):
        raise UsageError("status is not an object")
    raw = status.get("windows")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise UsageError("status.windows is not an object")
    windows: dict[str, Window] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, Mapping):
            raise UsageError("status.windows holds a malformed entry")
        start, spent = _count(value.get("start")), _count(value.get("spent"))
        if start is None or spent is None:
            raise UsageError(f"status.windows[{key!r}] needs non-negative integers start and spent")
        windows[key] = Window(start, spent)
    return windows


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def grant_size(remaining: int, need: int) -> int:
    """Large when far from the limit, exactly ``need`` near it (see :data:`SHARE`); callers ensure
    ``need <= remaining``, so a grant never takes the window past ``max``."""
    return max(need, remaining // SHARE)


@dataclass
class LeaseBook:
    """One sidecar's leases, one per meter, valid only in the window they were taken in."""

    leases: dict[str, Lease] = field(default_factory=dict)
    debts: dict[str, tuple[Meter, int]] = field(default_factory=dict)
    """Used but not yet recorded in the shared window: response usage beyond the lease in hand."""

    def balance(self, meter: Meter, now: float) -> int:
        lease = self.leases.get(meter.key)
        if lease is None or lease.start != window_start(now, meter.per):
            return 0
        return lease.balance

    def covers(self, demands: Sequence[Demand], now: float) -> bool:
        return all(amount <= self.balance(meter, now) for meter, amount in _merged(demands))

    def spend_local(self, demands: Sequence[Demand], now: float) -> bool:
        """Spend every demand from the leases, or nothing at all when one does not fit."""
        merged = _merged(demands)
        if not self.covers(merged, now):
            return False
        for meter, amount in merged:
            if amount:
                self.leases[meter.key].balance -= amount
        return True

    def claim(self, demands: Sequence[Demand], stored: Mapping[str, Window], now: float) -> Claim | Refusal:
        """The write that gives this sidecar enough for every demand, or why none can."""
        windows: dict[str, Window] = {}
        grants: dict[str, int] = {}
        for meter, amount in _merged(demands):
            need = amount - self.balance(meter, now)
            if need <= 0:
                continue
            current = window_start(now, meter.per)
            window = stored.get(meter.key)
            if window is not None and window.start > current:
                return Refusal(meter, "ahead", f"{meter.label}: the shared usage window starts after this "
                                               "sidecar's clock; refused until it is reached",
                               max(1.0, window.start - now))
            spent = window.spent if window is not None and window.start == current else 0
            remaining = meter.max - spent
            if need > remaining:
                return Refusal(meter, "exhausted", f"{meter.label}: {spent} of {meter.max} taken in this "
                                                   f"{meter.per}s window across the fleet; {amount} more does not fit",
                               max(1.0, current + meter.per - now))
            grant = grant_size(remaining, need)
            windows[meter.key] = Window(current, spent + grant)
            grants[meter.key] = grant
        return Claim(windows, grants)

    def adjust(self, meter: Meter, delta: int, now: float) -> int:
        """Settle a response-charged call: ``delta`` (usage less the deposit) from the lease, the
        rest as debt; a negative ``delta`` returns the unused deposit to the lease. Returns the debt added."""
        lease = self.leases.get(meter.key)
        current = lease is not None and lease.start == window_start(now, meter.per)
        if delta <= 0:
            if current and lease is not None:
                lease.balance -= delta
            return 0
        covered = min(delta, lease.balance) if current and lease is not None else 0
        if covered and lease is not None:
            lease.balance -= covered
        owed = delta - covered
        if owed:
            previous = self.debts.get(meter.key)
            self.debts[meter.key] = (meter, owed + (previous[1] if previous else 0))
        return owed

    def settle(self, stored: Mapping[str, Window], now: float) -> Claim:
        """The write that records every debt: each window's ``spent`` grows by it, past ``max`` if need be
        (what was used was used). A window stored ahead of our clock takes it too: windows never move back."""
        windows: dict[str, Window] = {}
        debts: dict[str, int] = {}
        for key, (meter, owed) in self.debts.items():
            current = window_start(now, meter.per)
            window = stored.get(key)
            if window is not None and window.start >= current:
                windows[key] = Window(window.start, window.spent + owed)
            else:
                windows[key] = Window(current, owed)
            debts[key] = owed
        return Claim(windows, {}, debts)

    def settled(self, claim: Claim) -> None:
        """Forget the debts a claim's accepted write recorded (more may have been added meanwhile)."""
        for key, owed in claim.debts.items():
            meter, total = self.debts[key]
            if total > owed:
                self.debts[key] = (meter, total - owed)
            else:
                del self.debts[key]

    def running_low(self, meter: Meter, now: float) -> bool:
        """Worth renewing ahead of need: a quarter of the last slice or less is left in this window."""
        lease = self.leases.get(meter.key)
        if lease is None or lease.start != window_start(now, meter.per):
            return False
        return lease.balance <= lease.granted // LOW_WATER

    def granted(self, claim: Claim) -> None:
        """Record the slices of a claim whose write the API server accepted."""
        for key, grant in claim.grants.items():
            start = claim.windows[key].start
            lease = self.leases.get(key)
            if lease is None or lease.start != start:
                self.leases[key] = Lease(start, grant, grant)
            else:
                lease.balance += grant
                lease.granted = grant


def _merged(demands: Iterable[Demand]) -> list[Demand]:
    """Two demands on one meter (never today, but cheap to get right) are one demand of their sum."""
    totals: dict[str, Demand] = {}
    for meter, amount in demands:
        previous = totals.get(meter.key)
        totals[meter.key] = (meter, amount + (previous[1] if previous else 0))
    return list(totals.values())


def apply(status: object, claim: Claim) -> dict[str, object]:
    """The status to write: the stored one with the claim's windows replaced (everything else kept)."""
    base = dict(status) if isinstance(status, Mapping) else {}
    windows = dict(base.get("windows") or {})
    for key, window in claim.windows.items():
        windows[key] = {"start": window.start, "spent": window.spent}
    base["windows"] = windows
    return base


@dataclass(frozen=True)
class Row:
    """One line of ``capgate usage``: a meter's current window across the fleet."""

    meter: Meter
    start: int
    spent: int
    """Leased out in the current window (an upper bound of what the agent spent)."""
    remaining: int
    ahead: bool = False
    """The stored window is later than ``now``: nothing can be spent until then."""


def table(cap: spec.Capability, status: object, now: float) -> list[Row]:
    """What each meter of ``cap`` has left now, from a stored status (a window that ended counts as empty)."""
    stored = parse_windows(status)
    rows: list[Row] = []
    for meter in meters(cap):
        current = window_start(now, meter.per)
        window = stored.get(meter.key)
        if window is not None and window.start > current:
            rows.append(Row(meter, window.start, window.spent, 0, ahead=True))
            continue
        spent = window.spent if window is not None and window.start == current else 0
        rows.append(Row(meter, current, spent, max(0, meter.max - spent)))
    return rows


def short_label(meter: Meter) -> str:
    """The meter in a printer column: ``requests``, ``payments.amount``, ``llm.usage.total_tokens``."""
    if meter.key.startswith("requests/"):
        return "requests"
    return meter.label.removeprefix("budget ").removesuffix(" (response)")


def summary(rows: Sequence[Row]) -> str:
    """One line for ``kubectl get acap``: ``payments.amount 1200/100000, requests 3/600`` (``-`` with no meter)."""
    return ", ".join(f"{short_label(r.meter)} {r.spent}/{r.meter.max}" for r in rows) or "-"


# ------------------------------------------------------------------------------ single-use receipts
#
# ``requires: [{rule: search, consume: true}]``: a receipt opens such a gate once across the fleet.
# The object's ``status.consumed`` maps each consumed receipt id to the last moment the receipt could
# still verify; ``status.horizon`` is the time up to which ids may have been pruned, so an id expiring
# at or before it counts as consumed whether or not it is listed. Writes only add ids, prune ids at
# or before a horizon that only grows (the CRD's transition rules), and go through the same
# compare-and-swap as the windows: two sidecars consuming one receipt at once cannot both succeed,
# because the second write is planned from a state that already holds the id.

MAX_CONSUMED = 4096
"""The CRD's ``status.consumed`` maxProperties. A full list advances the horizon past the ids that
expire first: they stay consumed (the horizon says so), and the receipts still unused that expire by
then are refused early, which is failing closed, never open."""

RECEIPT_ID = re.compile(r"^[0-9a-f]{32}$")
"""A receipt's id is the decision id of the call that minted it (128 random bits, 32 hex): the audit
record of the consuming call names the very decision whose receipt it spent."""


@dataclass(frozen=True)
class Candidate:
    """A verified receipt that could open a consuming gate: its id and the Unix second after which no
    sidecar accepts it (its expiry plus the receipt skew)."""

    id: str
    expiry: int


@dataclass(frozen=True)
class Spent:
    """``status.horizon`` and ``status.consumed`` as stored."""

    horizon: int = 0
    consumed: Mapping[str, int] = field(default_factory=dict)

    def used(self, candidate: Candidate) -> bool:
        return candidate.id in self.consumed or candidate.expiry <= self.horizon


@dataclass(frozen=True)
class Consumption:
    """A planned write: the receipts it consumes, one per gate, and the new horizon and consumed ids."""

    picked: tuple[Candidate, ...]
    horizon: int
    consumed: dict[str, int]


@dataclass(frozen=True)
class Unopened:
    """Gate ``index`` has no receipt that is unexpired and not yet consumed."""

    index: int


def parse_spent(status: object) -> Spent:
    """``status.horizon`` and ``status.consumed``; raises :class:`UsageError` for what the schema forbids."""
    if status is None:
        return Spent()
    if not isinstance(status, Mapping):
        raise UsageError("status is not an object")
    horizon = status.get("horizon", 0)
    if _count(horizon) is None:
        raise UsageError("status.horizon is not a non-negative integer")
    raw = status.get("consumed")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UsageError("status.consumed is not an object")
    consumed: dict[str, int] = {}
    for key, value in raw.items():
        expiry = _count(value)
        if not isinstance(key, str) or expiry is None:
            raise UsageError("status.consumed holds a malformed entry")
        consumed[key] = expiry
    return Spent(int(horizon), consumed)


def order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Which receipt a gate spends first: the one that expires first (it would be lost soonest), the
    smaller id on a tie, so every sidecar spends a given set of receipts in the same order."""
    return sorted(set(candidates), key=lambda c: (c.expiry, c.id))


def consume(spent: Spent, gates: Sequence[Iterable[Candidate]], now: float,
            capacity: int = MAX_CONSUMED) -> Consumption | Unopened:
    """Pick one unconsumed, unexpired receipt per gate and plan the write that records them all.

    All or nothing: when one gate has no receipt left, nothing is consumed. Ids that can no longer
    verify (expiry before ``now``) are pruned and the horizon moves up to ``now``; if the list would
    still be longer than ``capacity``, the horizon moves further, to the expiries that come first.
    """
    picked: list[Candidate] = []
    for index, candidates in enumerate(gates):
        choice = next((c for c in order(candidates) if c.expiry > now and not spent.used(c)
                       and all(p.id != c.id for p in picked)), None)
        if choice is None:
            return Unopened(index)
        picked.append(choice)
    horizon = max(spent.horizon, int(now))
    consumed = {key: expiry for key, expiry in spent.consumed.items() if expiry > horizon}
    for candidate in picked:
        consumed[candidate.id] = candidate.expiry
    if len(consumed) > capacity:
        expiries = sorted(consumed.values())
        horizon = max(horizon, expiries[len(consumed) - capacity - 1])
        consumed = {key: expiry for key, expiry in consumed.items() if expiry > horizon}
    return Consumption(tuple(picked), horizon, consumed)


def apply_consumption(status: object, plan: Consumption) -> dict[str, object]:
    """The status to write: the stored one with the consumed ids and horizon replaced (windows kept)."""
    base = dict(status) if isinstance(status, Mapping) else {}
    base["horizon"] = plan.horizon
    base["consumed"] = dict(plan.consumed)
    return base
