"""The RevocationList's content: adding ids, pruning only what can no longer verify, the kill switch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from capgate import revocation

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def entry(rid: str, minutes: int) -> revocation.Entry:
    return revocation.Entry(id=rid, expires_at=NOW + timedelta(minutes=minutes), capability="travel/x")


def test_revoked_ids_appear_in_the_list() -> None:
    spec = revocation.with_revoked({}, [entry("ab12", 30), entry("cd34", 5)], NOW)
    assert revocation.revoked_ids(spec) == {"ab12", "cd34"}


def test_an_id_revoked_twice_keeps_the_later_expiry() -> None:
    spec = revocation.with_revoked({}, [entry("ab12", 5)], NOW)
    spec = revocation.with_revoked(spec, [entry("ab12", 60)], NOW)
    assert [e["expiresAt"] for e in spec["revokedIds"]] == ["2026-12-01T13:00:00Z"]


def test_entries_are_pruned_only_after_expiry_plus_grace() -> None:
    spec = revocation.with_revoked({}, [entry("ab12", 0)], NOW - timedelta(minutes=1))
    assert revocation.revoked_ids(revocation.pruned(spec, NOW)) == {"ab12"}  # within the grace period
    later = NOW + revocation.PRUNE_GRACE + timedelta(seconds=1)
    assert revocation.revoked_ids(revocation.pruned(spec, later)) == frozenset()


def test_an_entry_with_an_unreadable_expiry_is_never_pruned() -> None:
    spec = {"revokedIds": [{"id": "ab12", "expiresAt": "soon"}]}
    assert revocation.revoked_ids(revocation.pruned(spec, NOW + timedelta(days=400))) == {"ab12"}


def test_a_non_hex_id_is_refused() -> None:
    with pytest.raises(ValueError, match="not a revocation id"):
        revocation.with_revoked({}, [revocation.Entry(id="not hex!", expires_at=NOW)], NOW)


def test_the_kill_switch_covers_all_or_some_namespaces() -> None:
    spec = revocation.with_lockdown({}, add=["travel"])
    assert revocation.lockdown_applies(spec, "travel")
    assert not revocation.lockdown_applies(spec, "billing")
    everything = revocation.with_lockdown(spec, all_namespaces=True)
    assert revocation.lockdown_applies(everything, "billing")
    lifted = revocation.with_lockdown(everything, all_namespaces=False, remove=["travel"])
    assert not revocation.lockdown_applies(lifted, "travel")


def test_lockdown_changes_keep_the_revocations() -> None:
    spec = revocation.with_revoked({}, [entry("ab12", 30)], NOW)
    assert revocation.revoked_ids(revocation.with_lockdown(spec, all_namespaces=True)) == {"ab12"}
