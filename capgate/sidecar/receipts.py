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

Single-use gates need *which* receipt, not just which rule: both kinds are also offered as
:class:`~capgate.usage.Candidate` (the receipt's id is the decision id that minted it, so a held
receipt and the same receipt carried back are one candidate). Of a rule some gate consumes, up to
:data:`MAX_HELD_PER_RULE` receipts are held per correlation (two searches open a consuming charge
twice), the oldest dropped first; of any other rule, the latest one, as before.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from capgate import usage
from capgate.capabilities import keys
from capgate.capabilities import receipts as core
from capgate.capabilities.errors import ReceiptError

MAX_CARRIED = 16
"""More receipts than any capability has rules is an attack or a bug; the rest are ignored."""
CACHE_SIZE = 4096
MAX_RULES_PER_CORRELATION = 256
MAX_HELD_PER_RULE = MAX_CARRIED
SKEW = core.SKEW


@dataclass(frozen=True)
class Held:
    rule: str
    capability: str
    credential: str
    expires_at: datetime
    id: str = ""
    """The decision id that minted it (see :func:`candidate`); empty: it can open no consuming gate."""


def candidate(receipt_id: str, expires_at: datetime) -> usage.Candidate | None:
    """A receipt as a single-use candidate, or None when its id is not one capgate mints (such a
    receipt, e.g. signed with a stolen session key, still opens plain gates but no consuming one)."""
    if not usage.RECEIPT_ID.fullmatch(receipt_id):
        return None
    return usage.Candidate(receipt_id, math.ceil((expires_at + SKEW).timestamp()))


@dataclass
class Proofs:
    """What the receipts of one request prove: the rules, and per consumed rule the receipts that could
    be spent (only rules in ``consumable``: a capability without single-use gates builds no candidates)."""

    consumable: frozenset[str] = frozenset()
    rules: set[str] = field(default_factory=set)
    candidates: dict[str, set[usage.Candidate]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def add(self, rule: str, receipt_id: str, expires_at: datetime) -> None:
        self.rules.add(rule)
        if rule not in self.consumable:
            return
        found = candidate(receipt_id, expires_at)
        if found is not None:
            self.candidates.setdefault(rule, set()).add(found)


class ReceiptBook:
    def __init__(self, max_correlations: int = 4096) -> None:
        self.max_correlations = max_correlations
        self._held: OrderedDict[str, dict[str, list[Held]]] = OrderedDict()
        self._verified: OrderedDict[tuple[str, str, str], core.Receipt] = OrderedDict()

    # -- held ----------------------------------------------------------------------------------
    def hold(self, correlation: str, held: Held, keep: int = 1) -> None:
        """Hold ``held``, keeping the last ``keep`` receipts of its rule in ``correlation`` (more than one
        only for a rule some gate consumes, so memory stays what it was for every other rule)."""
        rules = self._held.get(correlation)
        if rules is None:
            rules = self._held[correlation] = {}
            while len(self._held) > self.max_correlations:
                self._held.popitem(last=False)
        self._held.move_to_end(correlation)
        if held.rule not in rules and len(rules) >= MAX_RULES_PER_CORRELATION:
            return
        kept = rules.setdefault(held.rule, [])
        kept.append(held)
        del kept[:-max(1, min(keep, MAX_HELD_PER_RULE))]

    def held_rules(self, correlation: str, capability: str, now: datetime, revoked: Container[str]) -> set[str]:
        proofs = Proofs()
        self.held_into(proofs, correlation, capability, now, revoked)
        return proofs.rules

    def held_into(self, proofs: Proofs, correlation: str, capability: str, now: datetime,
                  revoked: Container[str]) -> None:
        """Add the unexpired receipts held for ``correlation`` (dropping the expired and revoked)."""
        rules = self._held.get(correlation)
        if not rules:
            return
        self._held.move_to_end(correlation)
        for name in list(rules):
            alive = [h for h in rules[name] if not core.expired(h.expires_at, now) and h.credential not in revoked]
            if alive:
                rules[name] = alive
            else:
                del rules[name]
        for held_list in rules.values():
            for held in held_list:
                if held.capability == capability:
                    proofs.add(held.rule, held.id, held.expires_at)

    @property
    def correlations(self) -> int:
        return len(self._held)

    # -- carried -------------------------------------------------------------------------------
    def carried_rules(self, values: Iterable[str], *, trust: keys.TrustBundle, correlation: str, capability: str,
                      revoked: Container[str], now: datetime) -> tuple[set[str], list[str]]:
        """Rules proven by carried receipts, and the reasons of those ignored (for the audit record)."""
        proofs = Proofs()
        self.carried_into(proofs, values, trust=trust, correlation=correlation, capability=capability,
                          revoked=revoked, now=now)
        return proofs.rules, proofs.ignored

    def carried_into(self, proofs: Proofs, values: Iterable[str], *, trust: keys.TrustBundle, correlation: str,
                     capability: str, revoked: Container[str], now: datetime) -> None:
        for index, receipt in enumerate(values):
            if index >= MAX_CARRIED:
                proofs.ignored.append("too_many")
                break
            try:
                verified = self._verify(receipt, trust, correlation, capability, revoked, now)
            except ReceiptError as exc:
                proofs.ignored.append(exc.reason)
                continue
            proofs.add(verified.rule, verified.decision_id, verified.expires_at)

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
