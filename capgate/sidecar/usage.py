"""Fleet-wide rate limits and budgets: :mod:`capgate.usage`'s leases over the API server.

In a pod, every sidecar of a capability shares its ``AgentCapabilityUsage`` (same name and namespace,
created by the operator). :class:`FleetLimits` is the gate's :class:`~capgate.sidecar.limits.Charger`
there: a call whose meters the leases in hand cover costs no I/O; otherwise one renewal at a time
(an :class:`asyncio.Lock`) reads the object, plans a claim and writes the status back with the
resourceVersion it read. A 409 means another sidecar (or the agent) wrote first: read again and
re-plan. A lease down to a quarter of its last slice is renewed in the background (one task at a
time), so in steady use no call waits for the API server. The grant counts only once the API
server accepted the write, so a write that timed out either took effect (that slice is lost) or
did not (nothing was taken) — never double-spent.

Response budgets (``from: response``) take a one-unit deposit with the call and are settled after it
(:meth:`FleetLimits.settle`): usage the lease in hand covers costs no I/O; the rest is debt, written
in the background and always before this sidecar takes any new lease, so one that cannot record
what its calls used refuses further budgeted calls instead of spending unrecorded.

Fail closed: when the object cannot be read or written (API server down, object missing, a
malformed status), a call that needs a new lease is refused with 429 and reason
``usage_unavailable``; after a failure, renewals wait :data:`RETRY_SECONDS` before asking again, so
an unreachable API server costs a budgeted call nothing but the refusal. Slices already leased stay
spendable (they were taken from the shared window, so spending them never overspends), and calls
under no rate limit or budget never touch this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from capgate import resources, usage
from capgate.capabilities import spec
from capgate.sidecar.limits import Refusal, Settlement, budget_amount
from capgate.sidecar.metrics import Metrics
from capgate.sidecar.state import MAX_ATTEMPTS, RETRY_SECONDS, Conflict, StateUnavailable, UsageStore, after_conflict

__all__ = ["MAX_ATTEMPTS", "RETRY_SECONDS", "Conflict", "FleetLimits", "KubeUsageStore", "StateUnavailable",
           "UsageStore"]

log = logging.getLogger("capgate.sidecar.usage")

REQUEST_TIMEOUT = 2.0
"""A renewal is on a request's path: an API server slower than this is treated as unreachable."""
CACHE_SECONDS = 2.0
"""How long the last state read or written may stand in for a fresh read. Writes from a stale copy
fail with 409 anyway; this bounds how long a refusal can rest on it (an admin's reset is seen then)."""


class KubeUsageStore:
    """The AgentCapabilityUsage of one capability, through the pod's own ServiceAccount token."""

    def __init__(self, kubeconfig: str | None, namespace: str, name: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.name = name
        self._api: client.ApiClient | None = None

    async def _custom(self) -> client.CustomObjectsApi:
        if self._api is None:
            try:
                if self.kubeconfig:
                    await config.load_kube_config(config_file=self.kubeconfig)
                else:
                    config.load_incluster_config()  # type: ignore[no-untyped-call]
            except (config.ConfigException, OSError) as exc:
                raise StateUnavailable(f"no Kubernetes API access ({type(exc).__name__})") from exc
            self._api = client.ApiClient()
        return client.CustomObjectsApi(self._api)

    def _args(self) -> tuple[str, str, str, str, str]:
        return resources.GROUP, resources.VERSION, self.namespace, resources.USAGE_PLURAL, self.name

    async def read(self) -> tuple[str, dict[str, Any]]:
        custom = await self._custom()
        obj = await self._call(custom.get_namespaced_custom_object(*self._args(), _request_timeout=REQUEST_TIMEOUT))
        return _unpack(obj)

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        custom = await self._custom()
        body = {"apiVersion": resources.API_VERSION, "kind": resources.USAGE_KIND,
                "metadata": {"name": self.name, "namespace": self.namespace, "resourceVersion": version},
                "status": status}
        obj = await self._call(custom.replace_namespaced_custom_object_status(
            *self._args(), body, _request_timeout=REQUEST_TIMEOUT))
        return _unpack(obj)

    @staticmethod
    async def _call(request: Any) -> Any:
        try:
            return await request
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict from exc
            raise StateUnavailable(f"the API server answered {exc.status} {exc.reason}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise StateUnavailable(f"the API server is unreachable ({type(exc).__name__})") from exc

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None


def _unpack(obj: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise StateUnavailable("the usage object is not an object")
    version = (obj.get("metadata") or {}).get("resourceVersion")
    status = obj.get("status") or {}
    if not isinstance(version, str) or not isinstance(status, dict):
        raise StateUnavailable("the usage object has no resourceVersion or a malformed status")
    return version, status


class FleetLimits:
    """The gate's charger in a pod: fleet-wide windows leased from one :class:`UsageStore`."""

    def __init__(self, store: UsageStore, capability: str, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.capability = capability
        """``namespace/name`` the store's object belongs to; any other capability is refused."""
        self.metrics = metrics
        self.clock = clock
        self.book = usage.LeaseBook()
        self._cached: tuple[str, dict[str, Any]] | None = None
        self._cached_at = 0.0
        self._lock = asyncio.Lock()
        self._retry_at = 0.0
        self._renewing: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[None] | None = None
        self.last_contact: float | None = None
        """Monotonic time of the last successful read or write (the state age metric)."""
        metrics.usage_state_age.set_function(lambda: -1.0 if self.last_contact is None else self.age() or 0.0)

    async def charge(self, cap: spec.Capability, upstream: str | None, body: object,
                     tool: str | None = None) -> Refusal | None:
        demands = _demands(cap, upstream, body, tool)
        if isinstance(demands, Refusal):
            return self._refused(demands)
        if not demands:
            return None
        if self.book.spend_local(demands, self.clock()):
            self._observe(demands)
            return None
        if cap.qualified_name != self.capability:
            return self._refused(_unavailable(demands, f"this sidecar keeps usage for {self.capability} only"))
        async with self._lock:
            refusal = await self._acquire(demands, spend=True)
        if refusal is not None:
            return self._refused(refusal)
        self._observe(demands)
        return None

    def settle(self, cap: spec.Capability, settlements: Sequence[Settlement], *, deposited: bool = True) -> None:
        """After a response-charged call: what it used less its deposit, from the lease or as debt."""
        if cap.qualified_name != self.capability:
            return  # its call was refused up front (charge), so nothing was forwarded for it
        by_budget = dict(zip(cap.budgets, usage.meters(cap)[1 if cap.rate_limit is not None else 0:], strict=True))
        now = self.clock()
        for budget, amount in settlements:
            meter = by_budget[budget]
            self.book.adjust(meter, amount - (usage.DEPOSIT if deposited else 0), now)
            self.metrics.lease_remaining.labels(meter.key).set(self.book.balance(meter, now))
        if self.book.debts and self._settling is None:
            self._settling = asyncio.create_task(self._settle_debts(), name="capgate-usage-settlement")

    async def _settle_debts(self) -> None:
        """Write what is owed, retrying every :data:`RETRY_SECONDS` while the state is unreachable (an
        idle agent's debt is recorded too; meanwhile any call needing a new lease retries it, and is refused)."""
        try:
            while self.book.debts:
                async with self._lock:
                    refusal = await self._acquire([], spend=False)
                if refusal is not None:
                    log.warning("usage of %s beyond the lease in hand is not yet recorded: %s", self.capability,
                                refusal.message)
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            self._settling = None

    async def _pay_debts(self) -> None:
        """Record response usage owed to the shared windows; raises like a lease write."""
        for attempt in range(MAX_ATTEMPTS):
            if not self.book.debts:
                return
            version, status = await self._state()
            claim = self.book.settle(usage.parse_windows(status), self.clock())
            self._cached = None
            try:
                written = await self.store.write(version, usage.apply(status, claim))
            except Conflict:
                await after_conflict(attempt)
                continue
            self._remember(written)
            self.book.settled(claim)
            return
        raise StateUnavailable(f"the shared usage state kept changing ({MAX_ATTEMPTS} conflicts in a row)")

    async def _acquire(self, demands: list[usage.Demand], *, spend: bool) -> Refusal | None:
        """Lease enough for ``demands`` (and spend them, for a call), after recording any debt; under the lock."""
        if self.book.debts:
            if time.monotonic() < self._retry_at:
                return _unavailable(demands, "the shared usage state was unreachable moments ago")
            try:
                await self._pay_debts()
            except (StateUnavailable, usage.UsageError) as exc:
                self._retry_at = time.monotonic() + RETRY_SECONDS
                log.warning("fleet-wide usage of %s unavailable: %s; refusing calls that need a new lease",
                            self.capability, exc)
                return _unavailable(demands, f"the shared usage state cannot be reached: {exc}")
        for attempt in range(MAX_ATTEMPTS):
            now = self.clock()
            if self.book.covers(demands, now):  # another call renewed while we waited for the lock
                if spend:
                    self.book.spend_local(demands, now)
                return None
            if time.monotonic() < self._retry_at:
                return _unavailable(demands, "the shared usage state was unreachable moments ago")
            try:
                version, status = await self._state()
                claim = self.book.claim(demands, usage.parse_windows(status), now)
                if isinstance(claim, usage.Refusal):
                    return _from_core(claim)
                self._cached = None
                written = await self.store.write(version, usage.apply(status, claim))
            except Conflict:
                await after_conflict(attempt)
                continue
            except (StateUnavailable, usage.UsageError) as exc:
                self._retry_at = time.monotonic() + RETRY_SECONDS
                log.warning("fleet-wide usage of %s unavailable: %s; refusing calls that need a new lease",
                            self.capability, exc)
                return _unavailable(demands, f"the shared usage state cannot be reached: {exc}")
            self._remember(written)
            self.book.granted(claim)
            for meter, _ in demands:  # a background renewal has no call to update the gauge after it
                if meter.key in claim.grants:
                    self.metrics.leases_taken.labels(meter.key).inc()
                    self.metrics.lease_remaining.labels(meter.key).set(self.book.balance(meter, now))
            if not spend or self.book.spend_local(demands, now):
                return None
        return _unavailable(demands, f"the shared usage state kept changing ({MAX_ATTEMPTS} conflicts in a row)")

    def _prefetch(self, demands: list[usage.Demand]) -> None:
        """Renew leases running low in the background, one renewal at a time (never on a call's path)."""
        if self._renewing is not None or time.monotonic() < self._retry_at:
            return
        now = self.clock()
        low = [(meter, self.book.balance(meter, now) + 1) for meter, _ in demands
               if self.book.running_low(meter, now)]
        if low:
            self._renewing = asyncio.create_task(self._renew_ahead(low), name="capgate-usage-renewal")

    async def _renew_ahead(self, wanted: list[usage.Demand]) -> None:
        try:
            async with self._lock:
                await self._acquire(wanted, spend=False)  # a refusal here is met again by the call that needs it
        finally:
            self._renewing = None

    async def idle(self) -> None:
        """Wait for a background renewal or settlement in flight (tests and shutdown)."""
        for task in (self._renewing, self._settling):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)

    async def _state(self) -> tuple[str, dict[str, Any]]:
        if self._cached is not None and time.monotonic() - self._cached_at < CACHE_SECONDS:
            return self._cached
        state = await self.store.read()
        self._remember(state)
        return state

    def _remember(self, state: tuple[str, dict[str, Any]]) -> None:
        self._cached = state
        self._cached_at = self.last_contact = time.monotonic()

    def _observe(self, demands: list[usage.Demand]) -> None:
        now = self.clock()
        for meter, _ in demands:
            self.metrics.lease_remaining.labels(meter.key).set(self.book.balance(meter, now))
        self._prefetch(demands)

    def _refused(self, refusal: Refusal) -> Refusal:
        self.metrics.usage_refusals.labels(refusal.detail or refusal.reason).inc()
        return refusal

    def age(self) -> float | None:
        return None if self.last_contact is None else time.monotonic() - self.last_contact

    async def close(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
            await asyncio.gather(self._settling, return_exceptions=True)
        if self.book.debts:  # what the last calls used, once more before going away (a lost debt undercharges)
            self._retry_at = 0.0
            async with self._lock:
                await self._acquire([], spend=False)
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        await self.store.close()


def _demands(cap: spec.Capability, upstream: str | None, body: object,
             tool: str | None = None) -> list[usage.Demand] | Refusal:
    """The meters one forwarded request charges: the rate limit always, each budget that applies
    (:meth:`spec.Budget.applies`: its upstream, and its tool if it names one)."""
    meters = usage.meters(cap)
    out: list[usage.Demand] = []
    index = 0
    if cap.rate_limit is not None:
        out.append((meters[0], 1))
        index = 1
    for budget, meter in zip(cap.budgets, meters[index:], strict=True):
        if not budget.applies(upstream, tool):
            continue
        if budget.from_response:
            out.append((meter, usage.DEPOSIT))  # the rest is settled from the response
            continue
        amount = budget_amount(budget, body)
        if isinstance(amount, Refusal):
            return amount
        out.append((meter, amount))
    return out


def _error(meter: usage.Meter) -> str:
    return "rate_limited" if meter.key.startswith("requests/") else "budget_exhausted"


def _from_core(refusal: usage.Refusal) -> Refusal:
    detail = "usage_ahead" if refusal.reason == "ahead" else None
    return Refusal(_error(refusal.meter), refusal.message, refusal.retry_after, detail)


def _unavailable(demands: list[usage.Demand], why: str) -> Refusal:
    if not demands:  # a background settlement: nobody is refused, the message is logged
        return Refusal("budget_exhausted", why, RETRY_SECONDS, "usage_unavailable")
    meter = demands[0][0]
    return Refusal(_error(meter), f"{meter.label}: {why}; refused rather than spent unmetered",
                   RETRY_SECONDS, "usage_unavailable")
