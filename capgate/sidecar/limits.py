"""Rate limits and budgets: the counters the stateless Datalog verdict cannot keep.

* **Rate limit** — a token bucket per capability (``rateLimit: {requests, per}``): capacity
  ``requests``, refilled continuously at ``requests/per``. Keyed by the capability, not the
  credential id, so a credential rotation does not hand out a fresh bucket.
* **Budget** — per ``budgets[]`` entry, the sum of the body field over *forwarded* requests to that
  upstream (only calls of its MCP ``tool``, when it names one) within a sliding window ``per``. A
  request is refused when it would take the sum past ``max``. The body is the document
  :mod:`capgate.capabilities.bodies` read — the same one the limits judged, whatever the method;
  a body it cannot read unambiguously never gets here (400).
  A document without the field, or no body at all, contributes 0 (limits, not budgets, are where
  a missing field denies); a field that is present but not countable (``1e300``, ``"500"``) is
  refused, never counted as 0.

* **Response budget** (``from: response``) — the same window, charged *after* the call with what the
  upstream's answer says it used (:mod:`capgate.capabilities.responses`; the worst case when that
  cannot be read). A call is refused once the window holds ``max``; the call that reaches it may
  take the window past ``max`` by its own usage (and by that of calls still in flight).

Both are charged only for requests that are about to be forwarded, so denied calls do not eat an
agent's allowance. State is in memory, per sidecar: a restart resets it, which the short credential
lifetime bounds. Memory is bounded by the number of capabilities × budget entries × requests per
window (the rate limit caps the latter).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from capgate.capabilities import spec


@dataclass
class TokenBucket:
    capacity: float
    rate: float
    """Tokens per second."""
    tokens: float
    updated: float

    def take(self, now: float) -> float | None:
        """Take one token; None when taken, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate


@dataclass
class BudgetWindow:
    budget: spec.Budget
    spent: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def expire(self, now: float) -> None:
        horizon = now - self.budget.per.total_seconds()
        while self.spent and self.spent[0][0] <= horizon:
            self.total -= self.spent.popleft()[1]

    def retry_after(self, now: float, amount: int) -> float:
        """Seconds until enough spending leaves the window for ``amount`` to fit (the window if never)."""
        need = self.total + amount - self.budget.max
        freed = 0
        for moment, value in self.spent:
            freed += value
            if freed >= need:
                return max(1.0, moment + self.budget.per.total_seconds() - now)
        return self.budget.per.total_seconds()


@dataclass(frozen=True)
class Refusal:
    reason: str
    """``rate_limited`` or ``budget_exhausted``."""
    message: str
    retry_after: float
    detail: str | None = None
    """The reason when it is not the error itself (fleet-wide state: ``usage_unavailable``, ``usage_ahead``)."""


def budget_amount(budget: spec.Budget, body: object) -> int | Refusal:
    """What one request charges a budget (shared by these in-memory windows and the fleet-wide leases)."""
    value = spec.numeric_field(body, budget.field)
    if value is None and spec.field_value(body, budget.field)[0]:
        # 1e300, 2**64, "500", NaN: not countable here, yet an upstream may read it as a big charge.
        return Refusal("budget_exhausted", f"budget {budget.upstream}.{budget.field}: the body's "
                                           f"{budget.field} is not a number the budget can count",
                       budget.per.total_seconds())
    return max(0, value or 0)


Settlement = tuple[spec.Budget, int]
"""A response budget and what one call used (read from its response, or the worst case)."""


class Charger(Protocol):
    """What the gate needs: refuse, or charge one request that is about to be forwarded; after the
    call, settle its response budgets (never fails: what was used is recorded, or owed)."""

    async def charge(self, cap: spec.Capability, upstream: str | None, body: object,
                     tool: str | None = None) -> Refusal | None:
        """``tool``: the ``mcp://<upstream>/<tool>`` resource when the request is an MCP tool call."""

    def settle(self, cap: spec.Capability, settlements: Sequence[Settlement], *, deposited: bool = True) -> None:
        """``deposited``: the call's charge took its deposits (False when audit mode forwarded a refusal)."""


class Limits:
    """All buckets and budget windows of this sidecar."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._budgets: dict[tuple[str, int], BudgetWindow] = {}

    async def charge(self, cap: spec.Capability, upstream: str | None, body: object,
                     tool: str | None = None) -> Refusal | None:
        """The :class:`Charger` interface the gate awaits (fleet-wide leases may need the API server)."""
        return self.check(cap, upstream, body, tool=tool)

    def check(self, cap: spec.Capability, upstream: str | None, body: object,
              now: float | None = None, *, tool: str | None = None) -> Refusal | None:
        """Refuse, or charge the rate limit and the budgets for one forwarded request."""
        moment = time.monotonic() if now is None else now
        wait = self._take_rate(cap, moment)
        if wait is not None:
            assert cap.rate_limit is not None
            return Refusal("rate_limited", f"more than {cap.rate_limit.requests} requests per "
                                           f"{spec.format_duration(cap.rate_limit.per)}", wait)
        charges: list[tuple[BudgetWindow, int]] = []
        for index, budget in enumerate(cap.budgets):
            if not budget.applies(upstream, tool):
                continue
            if budget.from_response:
                window = self._budgets.setdefault((cap.qualified_name, index), BudgetWindow(budget))
                window.expire(moment)
                if window.total >= budget.max:
                    return Refusal("budget_exhausted", f"budget {budget.upstream}.{budget.field}: {window.total} of "
                                                       f"{budget.max} used in {spec.format_duration(budget.per)}",
                                   window.retry_after(moment, 1))
                continue
            amount = budget_amount(budget, body)
            if isinstance(amount, Refusal):
                return amount
            window = self._budgets.setdefault((cap.qualified_name, index), BudgetWindow(budget))
            window.expire(moment)
            if window.total + amount > budget.max:
                return Refusal("budget_exhausted",
                               f"budget {budget.upstream}.{budget.field}: {window.total} of {budget.max} spent in "
                               f"{spec.format_duration(budget.per)}; {amount} more does not fit",
                               window.retry_after(moment, amount))
            charges.append((window, amount))
        for window, amount in charges:
            if amount:
                window.spent.append((moment, amount))
                window.total += amount
        return None

    def settle(self, cap: spec.Capability, settlements: Sequence[Settlement], *, deposited: bool = True,
               now: float | None = None) -> None:
        """Charge response budgets what their calls used (after the calls; may pass ``max``)."""
        moment = time.monotonic() if now is None else now
        for budget, amount in settlements:
            index = cap.budgets.index(budget)
            window = self._budgets.setdefault((cap.qualified_name, index), BudgetWindow(budget))
            if amount > 0:
                window.spent.append((moment, amount))
                window.total += amount

    def _take_rate(self, cap: spec.Capability, now: float) -> float | None:
        limit = cap.rate_limit
        if limit is None:
            return None
        bucket = self._buckets.get(cap.qualified_name)
        rate = limit.requests / limit.per.total_seconds()
        if bucket is None or bucket.capacity != limit.requests or bucket.rate != rate:
            bucket = TokenBucket(capacity=float(limit.requests), rate=rate, tokens=float(limit.requests),
                                 updated=now)
            self._buckets[cap.qualified_name] = bucket
        return bucket.take(now)

