"""What the operator writes into a credential Secret: a session key endorsed for that credential only."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

from capgate import resources
from capgate.capabilities import receipts, tokens
from capgate.operator import minting
from tests.capabilities import _support
from tests.capabilities._support import NOW

LIFETIME = timedelta(minutes=5)


def issue(stored: minting.Stored, *, now: datetime = NOW, lifetime: timedelta = LIFETIME) -> minting.Minted:
    cap = _support.parse()
    keyset = _support.keyset()
    plan = minting.plan(cap, 1, stored, keyset.active_id, now)
    return minting.build(cap, 1, stored, plan, keyset, now, lifetime)


def session_of(minted: minting.Minted) -> receipts.SessionKey:
    return receipts.SessionKey.from_json(minted.data[resources.SESSION_KEY_FILE])


def test_the_session_key_is_endorsed_for_the_capability_and_the_credential_beside_it() -> None:
    minted = issue(minting.Stored())
    key = session_of(minted)
    token = minted.data[resources.TOKEN_FILE].decode()

    assert (key.capability, key.credential) == ("travel/booking-agent", minted.credential_id)
    assert tokens.load(token, _support.trust(), now=NOW).id == key.credential


def test_a_rotated_credential_gets_a_session_key_endorsed_for_it() -> None:
    first = issue(minting.Stored(), lifetime=timedelta(hours=1))
    stored = minting.Stored.read(first.data)
    rotation = minting.rotate_at(_support.parse(), stored)
    assert rotation is not None
    later = rotation + timedelta(seconds=1)
    assert later < session_of(first).not_after - minting.SESSION_KEY_RENEW_BEFORE  # not due by its own clock
    rotated = issue(stored, now=later, lifetime=timedelta(hours=1))

    assert rotated.credential_id != first.credential_id
    assert session_of(rotated).credential == rotated.credential_id


def test_a_renewed_session_key_keeps_naming_the_unchanged_credential() -> None:
    first = issue(minting.Stored())
    stored = minting.Stored.read(first.data)
    assert stored.session is not None
    renewed = issue(stored, now=stored.session.not_after - minting.SESSION_KEY_RENEW_BEFORE)

    assert renewed.credential_id == first.credential_id
    assert session_of(renewed).key_id != stored.session.key_id
    assert session_of(renewed).credential == first.credential_id


def test_a_session_key_without_a_scope_is_replaced_and_the_credential_kept() -> None:
    first = issue(minting.Stored())
    document = json.loads(first.data[resources.SESSION_KEY_FILE])
    keyset = _support.keyset()
    unscoped = {"sid": document["id"], "pub": "00" * 32, "rk": keyset.active_id, "signUntil": 0, "exp": 0}
    body = json.dumps(unscoped, sort_keys=True, separators=(",", ":")).encode()
    document["endorsement"] = f"{receipts._b64(body)}.{receipts._b64(keyset.active.sign(body))}"
    old_style = {**first.data, resources.SESSION_KEY_FILE: json.dumps(document).encode()}
    stored = minting.Stored.read(old_style)

    assert stored.token is not None and stored.session is None
    replaced = issue(stored, now=NOW + timedelta(seconds=10))
    assert replaced.credential_id == first.credential_id
    assert session_of(replaced).credential == first.credential_id


def test_a_session_key_of_another_credential_is_replaced() -> None:
    first = issue(minting.Stored())
    stored = minting.Stored.read(first.data)
    assert stored.session is not None
    stray = replace(stored, session=receipts.SessionKey.issue(_support.keyset(), capability="travel/booking-agent",
                                                              credential="ab" * 64, now=NOW))
    plan = minting.plan(_support.parse(), 1, stray, _support.keyset().active_id, NOW + timedelta(seconds=10))

    assert plan.mint is None and plan.new_session_key


def test_a_rotated_out_credential_stays_revocable_until_it_expires() -> None:
    first = issue(minting.Stored(), lifetime=timedelta(hours=1))
    stored = minting.Stored.read(first.data)
    rotation = minting.rotate_at(_support.parse(), stored)
    assert rotation is not None and stored.expires_at is not None
    rotated = minting.Stored.read(issue(stored, now=rotation + timedelta(seconds=1), lifetime=timedelta(hours=1)).data)

    # A pod keeps presenting the first credential until the kubelet syncs its volume: revoking must cover it.
    assert [(e.id, e.expires_at, e.reason) for e in rotated.retired] == [
        (rid, stored.expires_at, "rotated") for rid in stored.revocation_ids]
    assert rotated.revocation_ids != stored.revocation_ids
    assert minting.still_valid(rotated.retired, stored.expires_at) == rotated.retired
    # Once it could no longer verify anyway, it is dropped at the next write of the Secret.
    gone = stored.expires_at + timedelta(minutes=2)
    assert minting.still_valid(rotated.retired, gone) == ()
    renewed = minting.Stored.read(issue(rotated, now=gone, lifetime=timedelta(hours=1)).data)
    assert stored.credential_id not in {e.id for e in renewed.retired}


def test_a_session_key_is_renewed_as_long_before_its_end_as_the_operator_is_told() -> None:
    """--session-key-renew-before: the successor must reach the pod before the kubelet's next Secret sync."""
    first = issue(minting.Stored(), lifetime=timedelta(seconds=120))
    stored = minting.Stored.read(first.data)
    assert stored.session is not None
    cap, root = _support.parse(), _support.keyset().active_id
    just_before = stored.session.not_after - timedelta(seconds=81)

    assert not minting.plan(cap, 1, stored, root, just_before, timedelta(seconds=80)).new_session_key
    assert minting.plan(cap, 1, stored, root, just_before + timedelta(seconds=1), timedelta(seconds=80)).new_session_key
    # The default alone outlasts the kubelet's worst-case sync (90 s: syncFrequency 1m + 50 % jitter) by a minute.
    assert timedelta(seconds=150) <= minting.SESSION_KEY_RENEW_BEFORE
    default_due = stored.session.not_after - minting.SESSION_KEY_RENEW_BEFORE
    assert minting.plan(cap, 1, stored, root, default_due).new_session_key
