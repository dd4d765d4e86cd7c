"""Receipts in the sidecar: those the agent carries, and those the sidecar holds for it.

Carried receipts (``X-Capgate-Receipt``, repeated or comma-separated) are verified with the trust
bundle — they may come from another sidecar — and the verification is cached per
(receipt, correlation, capability) because it costs two signature checks; expiry and revocation
are re-checked on every use.

Held receipts are the ones this sidecar minted, remembered per correlation so an unmodified agent
(which never echoes headers) still passes state gates like "charge after search" within its
default correlation (the pod session). They expire with the capability's receipt TTL (and the same
30 s skew as carried receipts: :func:`capgate.capabilities.receipts.expired`), die with a
revoked credential, and at most ``max_correlations`` correlations are kept (least recently used
dropped first), so an agent inventing correlation ids cannot grow memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from capgate.capabilities import keys
from capgate.capabilities import receipts as core
from capgate.capabilities.errors import ReceiptError

MAX_CARRIED = 16
"""More receipts than any capability has rules is an attack or a bug; the rest are ignored."""
CACHE_SIZE = 4096
MAX_RULES_PER_CORRELATION = 256
SKEW = core.SKEW


@dataclass(frozen=True)
class Held:
    rule: str
    capability: str
    credential: str
    expires_at: datetime


class ReceiptBook:
    def __init__(self, max_correlations: int = 4096) -> None:
        self.max_correlations = max_correlations
        self._held: OrderedDict[str, dict[str, Held]] = OrderedDict()
        self._verified: OrderedDict[tuple[str, str, str], core.Receipt] = OrderedDict()

    # -- held ----------------------------------------------------------------------------------
    def hold(self, correlation: str, held: Held) -> None:
        rules = self._held.get(correlation)
        if rules is None:
            rules = self._held[correlation] = {}
            while len(self._held) > self.max_correlations:
                self._held.popitem(last=False)
        self._held.move_to_end(correlation)
        if held.rule in rules or len(rules) < MAX_RULES_PER_CORRELATION:
            rules[held.rule] = held

    def held_rules(self, correlation: str, capability: str, now: datetime, revoked: Container[str]) -> set[str]:
        rules = self._held.get(correlation)
        if not rules:
            return set()
        self._held.move_to_end(correlation)
        for name in [n for n, h in rules.items() if core.expired(h.expires_at, now) or h.credential in revoked]:
            del rules[name]
        return {h.rule for h in rules.values() if h.capability == capability}

    @property
    def correlations(self) -> int:
        return len(self._held)

    # -- carried -------------------------------------------------------------------------------
    def carried_rules(self, values: Iterable[str], *, trust: keys.TrustBundle, correlation: str, capability: str,
                      revoked: Container[str], now: datetime) -> tuple[set[str], list[str]]:
        """Rules proven by carried receipts, and the reasons of those ignored (for the audit record)."""
        rules: set[str] = set()
        ignored: list[str] = []
        for index, receipt in enumerate(values):
            if index >= MAX_CARRIED:
                ignored.append("too_many")
                break
            try:
                rules.add(self._verify(receipt, trust, correlation, capability, revoked, now).rule)
            except ReceiptError as exc:
                ignored.append(exc.reason)
        return rules, ignored

    def _verify(self, receipt: str, trust: keys.TrustBundle, correlation: str, capability: str,
                revoked: Container[str], now: datetime) -> core.Receipt:
        key = (receipt, correlation, capability)
        cached = self._verified.get(key)
        if cached is None:
            cached = core.verify(receipt, trust=trust, correlation=correlation, capability=capability,
                                 revoked=revoked, now=now)
            self._verified[key] = cached
            if len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
            return cached
        if core.expired(cached.expires_at, now):
            raise ReceiptError("expired", f"receipt of rule {cached.rule!r} expired")
        if cached.credential in revoked:
            raise ReceiptError("wrong_credential",
                               f"receipt of rule {cached.rule!r} was issued to a revoked credential")
        return cached

    def forget_verified(self) -> None:
        """A new trust bundle: receipts verified under the old one must be verified again."""
        self._verified.clear()


def split_header(values: Iterable[str]) -> list[str]:
    """``X-Capgate-Receipt`` values, repeated and/or comma-separated (receipts never contain commas)."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def expiry(now: datetime, ttl: timedelta) -> datetime:
    return now + ttl
