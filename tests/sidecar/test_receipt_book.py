"""The sidecar's receipt book: receipts it holds and receipts the agent carries expire alike."""

from __future__ import annotations

from datetime import timedelta

import pytest

from capgate.capabilities import receipts as core
from capgate.sidecar.receipts import Held, ReceiptBook
from tests.capabilities import _support
from tests.capabilities._support import NOW

CAPABILITY = "travel/booking-agent"
CREDENTIAL = "cafe" * 16
TTL = timedelta(minutes=5)


def mint() -> str:
    key = core.SessionKey.issue(_support.keyset(), capability=CAPABILITY, credential=CREDENTIAL, now=NOW)
    return core.mint(key, rule="search", correlation="c", ttl=TTL, decision_id="d", now=NOW)


def both_ways(at: timedelta) -> tuple[bool, bool]:
    """(held receipt still counts, carried receipt still counts) ``at`` after minting."""
    book = ReceiptBook()
    book.hold("c", Held(rule="search", capability=CAPABILITY, credential=CREDENTIAL, expires_at=NOW + TTL))
    receipt = mint()
    held = "search" in book.held_rules("c", CAPABILITY, NOW + at, revoked=())
    carried, _ = ReceiptBook().carried_rules([receipt], trust=_support.trust(), correlation="c",
                                             capability=CAPABILITY, revoked=(), now=NOW + at)
    return held, "search" in carried


@pytest.mark.parametrize(("at", "valid"), [(TTL, True), (TTL + timedelta(seconds=29), True),
                                           (TTL + timedelta(seconds=31), False)])
def test_held_and_carried_receipts_expire_with_the_same_skew(at: timedelta, valid: bool) -> None:
    assert both_ways(at) == (valid, valid)


def test_a_cached_carried_receipt_expires_like_a_fresh_one() -> None:
    book = ReceiptBook()
    receipt = mint()
    ask = dict(trust=_support.trust(), correlation="c", capability=CAPABILITY, revoked=())
    assert book.carried_rules([receipt], now=NOW, **ask)[0] == {"search"}  # type: ignore[arg-type]

    rules, ignored = book.carried_rules([receipt], now=NOW + TTL + timedelta(seconds=31), **ask)  # type: ignore[arg-type]

    assert (rules, ignored) == (set(), ["expired"])


def test_several_receipts_of_one_rule_are_held_as_candidates_the_oldest_dropped_first() -> None:
    from capgate.sidecar.receipts import MAX_HELD_PER_RULE, Proofs

    book = ReceiptBook()
    for n in range(MAX_HELD_PER_RULE + 4):
        for rule, keep in (("search", MAX_HELD_PER_RULE), ("browse", 1)):
            book.hold("c", Held(rule=rule, capability=CAPABILITY, credential=CREDENTIAL, expires_at=NOW + TTL,
                                id=f"{n:032x}"), keep=keep)
    proofs = Proofs(frozenset({"search", "browse"}))
    book.held_into(proofs, "c", CAPABILITY, NOW, revoked=())
    ids = sorted(c.id for c in proofs.candidates["search"])
    assert ids == [f"{n:032x}" for n in range(4, MAX_HELD_PER_RULE + 4)]
    assert [c.id for c in proofs.candidates["browse"]] == [f"{MAX_HELD_PER_RULE + 3:032x}"], "others: the latest"


def test_a_receipt_whose_id_capgate_never_mints_opens_no_consuming_gate() -> None:
    from capgate.sidecar.receipts import Proofs

    proofs = Proofs(frozenset({"search"}))
    proofs.add("search", "forged", NOW + TTL)
    assert proofs.rules == {"search"} and proofs.candidates == {}
