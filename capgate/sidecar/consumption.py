"""Single-use receipts: :mod:`capgate.usage`'s consumed ids over the capability's usage object.

A rule with ``requires: [{rule: search, consume: true}]`` is opened by a receipt of ``search`` that
no pod of the capability has consumed. The gate decides with the receipts this sidecar does not
*know* to be consumed (:meth:`SingleUse.known`); when the allowing rule consumes, :meth:`SingleUse.consume`
records the receipt's id in ``status.consumed`` with a compare-and-swap on the object's
resourceVersion, and only then is the call forwarded. Two pods presenting one receipt at once both
write from a state without the id; the API server accepts one write and answers the other 409, which
re-reads, finds the id consumed, tries the agent's next receipt of that rule if it holds one, and
otherwise refuses (403 ``receipt_consumed``). A write that timed out may or may not have landed, so
after any failure the next attempt reads the object again instead of trusting what it last saw.

Fail closed: when the object cannot be read or written, a consuming call is refused with 503
``usage_unavailable``; every call that consumes nothing is unaffected. After a failure, attempts
wait :data:`~capgate.sidecar.state.RETRY_SECONDS` before asking again.

In a pod the store is the capability's ``AgentCapabilityUsage`` (shared with the fleet-wide budgets,
whose status fields every write keeps); standalone it is :class:`MemoryUsageStore`, one process's
memory, so a receipt opens a consuming gate once per sidecar process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from capgate import usage
from capgate.sidecar.metrics import Metrics
from capgate.sidecar.state import (
    MAX_ATTEMPTS,
    RETRY_SECONDS,
    Conflict,
    StateUnavailable,
    UsageStore,
    after_conflict,
)

log = logging.getLogger("capgate.sidecar.consumption")


@dataclass(frozen=True)
class Gate:
    """One consuming requirement of the allowing rule: the required rule and the receipts that could open it."""

    rule: str
    candidates: frozenset[usage.Candidate]


@dataclass(frozen=True)
class Consumed:
    """Recorded before forwarding: the receipt ids spent, one per gate."""

    ids: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    reason: str
    """``receipt_consumed`` (no receipt of ``rule`` is left) or ``usage_unavailable``."""
    message: str
    rule: str | None = None


class MemoryUsageStore:
    """A usage object in this process's memory, for a standalone sidecar (same compare-and-swap)."""

    def __init__(self) -> None:
        self.version = 0
        self.status: dict[str, Any] = {}

    async def read(self) -> tuple[str, dict[str, Any]]:
        return str(self.version), dict(self.status)

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if version != str(self.version):
            raise Conflict
        self.version += 1
        self.status = dict(status)
        return str(self.version), dict(status)

    async def close(self) -> None:
        pass


class SingleUse:
    """Consumes receipts in one :class:`~capgate.sidecar.usage.UsageStore`, remembering what it saw consumed."""

    def __init__(self, store: UsageStore, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._seen = usage.Spent()
        """The consumed ids and horizon of the last state read or written."""
        self._state: tuple[str, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0

    def known(self, candidate: usage.Candidate) -> bool:
        """Known to be consumed (by any pod, as of the last contact): such a receipt opens no consuming gate."""
        return self._seen.used(candidate)

    async def consume(self, gates: Sequence[Gate]) -> Consumed | Refused:
        """Record one receipt per gate as consumed, all or none, before the call is forwarded."""
        async with self._lock:  # our own calls queue here instead of conflicting with each other
            outcome = await self._consume(gates)
        if isinstance(outcome, Consumed):
            self.metrics.receipts_consumed.inc(len(outcome.ids))
        else:
            self.metrics.receipt_refusals.labels(outcome.reason).inc()
        return outcome

    async def _consume(self, gates: Sequence[Gate]) -> Consumed | Refused:
        if time.monotonic() < self._retry_at:
            return _unavailable("the shared usage state was unreachable moments ago")
        state = self._state
        for attempt in range(MAX_ATTEMPTS):
            try:
                if state is None:
                    state = await self.store.read()
                version, status = state
                spent = usage.parse_spent(status)
                self._seen = spent
                plan = usage.consume(spent, [gate.candidates for gate in gates], self.clock())
                if isinstance(plan, usage.Unopened):
                    self._state = state
                    rule = gates[plan.index].rule
                    return Refused("receipt_consumed", f"every receipt of rule {rule!r} in this correlation was "
                                                       "already used (a consuming gate opens once per receipt, "
                                                       f"across every pod); call {rule!r} again", rule)
                # A write that fails may still have landed (a timeout): the next attempt reads the
                # object again, which is the truth either way; nothing is assumed here.
                self._state = None
                state = await self.store.write(version, usage.apply_consumption(status, plan))
            except Conflict:
                state = None  # someone wrote first: read what they wrote and plan again
                await after_conflict(attempt)
                continue
            except (StateUnavailable, usage.UsageError) as exc:
                self._retry_at = time.monotonic() + RETRY_SECONDS
                log.warning("single-use receipts unavailable: %s; refusing consuming calls", exc)
                return _unavailable(f"the shared usage state cannot be reached: {exc}")
            self._state = state
            self._seen = usage.Spent(plan.horizon, dict(plan.consumed))
            return Consumed(tuple(c.id for c in plan.picked))
        return _unavailable(f"the shared usage state kept changing ({MAX_ATTEMPTS} conflicts in a row)")

    async def close(self) -> None:
        await self.store.close()


def _unavailable(why: str) -> Refused:
    return Refused("usage_unavailable", f"single-use receipts: {why}; a consuming call is refused rather than "
                                        "forwarded without recording its receipt")
