"""Credentials: minted, loaded, refused when broken, narrowed without ever widening."""

from __future__ import annotations

import base64
from datetime import timedelta
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capgate.capabilities import decision, tokens
from capgate.capabilities.errors import AttenuationError, TokenError
from capgate.capabilities.spec import Capability

from . import _support
from ._support import HELPER, NOW, PRINCIPAL, STRANGER


def delegating(max_depth: int = 3) -> Capability:
    return _support.parse(lambda spec: spec.__setitem__(
        "delegation", {"serviceAccounts": ["helper"], "maxDepth": max_depth}))


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def load_error(token: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        tokens.load(token, _support.trust(), now=NOW)
    return info.value


def test_a_minted_credential_loads_with_its_lifetime_and_identity(cred: tokens.Credential) -> None:
    assert cred.issued_at == NOW
    assert cred.expires_at == NOW + timedelta(hours=1)
    assert cred.principals == frozenset({PRINCIPAL})
    assert cred.depth == 0
    assert cred.root_key_id == _support.keyset().active_id
    assert cred.id == cred.revocation_ids[0]
    assert len(cred.revocation_ids) == 1


def test_a_mint_ttl_overrides_the_capabilitys(booking: Capability) -> None:
    token = tokens.mint(booking, _support.keyset(), now=NOW, ttl=timedelta(minutes=5))

    assert tokens.load(token, _support.trust(), now=NOW).expires_at == NOW + timedelta(minutes=5)


def test_two_credentials_of_one_capability_have_distinct_revocation_ids(booking: Capability) -> None:
    assert _support.credential(booking).id != _support.credential(booking).id


def test_inspect_reads_a_token_without_any_key(cred: tokens.Credential) -> None:
    info = tokens.inspect(cred.token)

    assert info["verified"] is False
    assert info["capability"] == "travel/booking-agent"
    assert info["expiresAt"] == "2026-03-01T13:00:00Z"
    assert info["principals"] == [PRINCIPAL]
    assert info["revocationIds"] == list(cred.revocation_ids)
    assert info["rootKeyId"] == cred.root_key_id
    assert 'allow_match("search")' in info["blocks"][0]["datalog"]


def test_surrounding_whitespace_in_a_token_is_tolerated(cred: tokens.Credential) -> None:
    assert tokens.load(f"  {cred.token}\n", _support.trust(), now=NOW).id == cred.id


@pytest.mark.parametrize(
    "token",
    ["", "not a token", "!!!!", "AAAA", "x" * 70_000, base64.urlsafe_b64encode(b"\x00" * 64).decode()],
    ids=["empty", "words", "not-base64", "tiny", "oversized", "zeros"],
)
def test_garbage_is_a_malformed_token(token: str) -> None:
    assert load_error(token).reason == "malformed"


def test_a_truncated_token_is_malformed(cred: tokens.Credential) -> None:
    assert load_error(cred.token[: len(cred.token) // 2]).reason == "malformed"
    assert load_error(cred.token[:-8]).reason in ("malformed", "bad_signature")


def test_a_token_with_a_changed_limit_fails_its_signature(cred: tokens.Credential) -> None:
    raw = unb64(cred.token)
    assert raw.count(b"payments-api-key") >= 1
    tampered = raw.replace(b"payments-api-key", b"payments-api-kez", 1)

    assert load_error(b64(tampered)).reason == "bad_signature"


@cache
def _token_for_flipping() -> str:
    return _support.credential(_support.parse()).token


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_flipping_any_bit_of_a_token_invalidates_it(data: st.DataObject) -> None:
    raw = bytearray(unb64(_token_for_flipping()))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] ^= data.draw(st.sampled_from([0x01, 0x02, 0x10, 0x80]), label="bit")

    original = tokens.load(_token_for_flipping(), _support.trust(), now=NOW)
    try:
        flipped = tokens.load(b64(bytes(raw)), _support.trust(), now=NOW)
    except TokenError:
        return  # TokenError is the invalid_token family
    # Protobuf decodes the u32 root key id from a wider varint, so a flip in its unused high bits
    # re-encodes the *same* token: the same key id, blocks and signatures. Anything else must fail.
    assert (flipped.root_key_id, flipped.revocation_ids) == (original.root_key_id, original.revocation_ids)
    assert [flipped.parsed.block_source(i) for i in range(flipped.parsed.block_count)] == [
        original.parsed.block_source(i) for i in range(original.parsed.block_count)]


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode())))
def test_loading_arbitrary_text_raises_only_token_errors(text: str) -> None:
    with pytest.raises(TokenError):
        tokens.load(text, _support.trust(), now=NOW)


def test_a_bare_biscuit_signed_by_our_root_is_not_a_capgate_credential() -> None:
    from capgate.capabilities import _biscuit

    ks = _support.keyset()
    assert ks.active.private is not None
    token = _biscuit.mint([("hello(1);", {})], ks.active.private, ks.active_id).to_base64()

    assert load_error(token).reason == "malformed"


# --- attenuation -----------------------------------------------------------------------------


def test_a_narrowed_token_keeps_the_parents_capability_and_grows_one_block(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, rules=["search"])

    assert child.depth == 1
    assert child.capability == cred.capability
    assert child.revocation_ids[0] == cred.id
    assert len(child.revocation_ids) == 2


def test_a_rule_subset_allows_only_those_rules(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, rules=["search"])

    assert decision.decide([cred, child], _support.http("GET", "flights", "/search")).allowed
    outcome = decision.decide([cred, child], _support.charge(100))
    assert not outcome.allowed
    assert outcome.reason == "check_failed"
    assert decision.decide([cred], _support.charge(100)).allowed


def test_a_lowered_limit_denies_what_the_parent_allows(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, limits={"charge": {"amount": 500}})

    assert decision.decide([child], _support.charge(500)).allowed
    assert not decision.decide([child], _support.charge(501)).allowed
    assert not decision.decide([child], _support.charge(500.5)).allowed
    assert decision.decide([cred], _support.charge(501)).allowed


def test_a_lowered_limit_still_denies_a_missing_amount(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, limits={"charge": {"amount": 500}})

    assert not decision.decide([child], _support.charge("500")).allowed


def test_a_lowered_limit_leaves_other_rules_alone(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, limits={"charge": {"amount": 500}})

    assert decision.decide([child], _support.http("GET", "flights", "/search/lhr")).allowed


def test_raising_a_limit_above_the_parents_is_refused(cred: tokens.Credential) -> None:
    with pytest.raises(AttenuationError, match="above the parent's 40000"):
        tokens.attenuate(cred, limits={"charge": {"amount": 40001}}, now=NOW)


def test_raising_a_limit_a_narrowed_parent_lowered_cannot_widen(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, limits={"charge": {"amount": 500}})
    grandchild = _support.narrow(child, limits={"charge": {"amount": 40000}})

    assert not decision.decide([grandchild], _support.charge(1000)).allowed


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rules": ["no-deletes"]}, "not allow rules"),
        ({"rules": ["refund"]}, "not allow rules"),
        ({"rules": []}, "at least one rule"),
        ({"limits": {"refund": {"amount": 1}}}, "no allow rule 'refund'"),
        ({"limits": {"charge": {"amount": -1}}}, "non-negative integer"),
        ({"limits": {"charge": {"amount": True}}}, "non-negative integer"),
        ({"ttl": timedelta(0)}, "ttl must be positive"),
        ({}, "nothing to narrow"),
    ],
)
def test_a_pointless_or_widening_narrowing_is_refused(cred: tokens.Credential, kwargs: dict, fragment: str) -> None:
    with pytest.raises(AttenuationError, match=fragment):
        tokens.attenuate(cred, now=NOW, **kwargs)


def test_a_shorter_ttl_expires_the_narrowed_token_first(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, ttl=timedelta(minutes=5))
    search = _support.http("GET", "flights", "/search")

    assert decision.decide([child], search).allowed
    assert decision.decide([child], _support.http("GET", "flights", "/search",
                                                 now=NOW + timedelta(minutes=5, seconds=29))).allowed
    late = decision.decide([child], _support.http("GET", "flights", "/search", now=NOW + timedelta(minutes=6)))
    assert (late.allowed, late.code, late.reason) == (False, "invalid_token", "expired")
    assert decision.decide([cred], _support.http("GET", "flights", "/search", now=NOW + timedelta(minutes=6))).allowed


def test_a_longer_ttl_is_capped_at_the_parents_expiry(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, ttl=timedelta(days=7))

    late = decision.decide([child], _support.http("GET", "flights", "/search", now=NOW + timedelta(hours=2)))
    assert (late.allowed, late.reason) == (False, "expired")


def test_delegation_to_an_unlisted_service_account_is_refused(cred: tokens.Credential) -> None:
    with pytest.raises(AttenuationError, match=r"spec\.delegation\.serviceAccounts"):
        tokens.attenuate(cred, principal=HELPER, now=NOW)


def test_a_delegated_token_works_only_for_its_delegate() -> None:
    parent = _support.credential(delegating())
    child = _support.narrow(parent, principal=HELPER)

    assert decision.decide([child], _support.http("GET", "flights", "/search", principal=HELPER)).allowed
    for principal in (PRINCIPAL, STRANGER):
        outcome = decision.decide([child], _support.http("GET", "flights", "/search", principal=principal))
        assert (outcome.allowed, outcome.code, outcome.reason) == (False, "invalid_token", "identity")


def test_a_delegated_token_cannot_be_redelegated_to_a_stranger() -> None:
    child = _support.narrow(_support.credential(delegating()), principal=HELPER)

    with pytest.raises(AttenuationError):
        tokens.attenuate(child, principal=STRANGER, now=NOW)


def test_narrowing_stops_at_the_capabilitys_max_depth() -> None:
    parent = _support.credential(delegating(max_depth=2))
    child = _support.narrow(parent, rules=["search", "charge"])
    grandchild = _support.narrow(child, rules=["search"])

    assert decision.decide([grandchild], _support.http("GET", "flights", "/search")).allowed
    with pytest.raises(AttenuationError, match="already narrowed 2 times"):
        tokens.attenuate(grandchild, rules=["search"], now=NOW)


def test_a_token_narrowed_past_max_depth_by_hand_is_refused_as_too_deep() -> None:
    parent = _support.credential(delegating(max_depth=1))
    later = ("check if time($t), $t <= {exp};", {"exp": NOW + timedelta(hours=1)})  # a shape capgate writes
    deep = parent.parsed.append([later]).append([later]).to_base64()
    loaded = tokens.load(deep, _support.trust(), now=NOW)

    outcome = decision.decide([loaded], _support.http("GET", "flights", "/search"))
    assert (outcome.allowed, outcome.code, outcome.reason) == (False, "invalid_token", "too_deep")


def test_revoking_the_parent_denies_the_narrowed_token(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, rules=["search"])

    outcome = decision.decide([child], _support.http("GET", "flights", "/search"), revoked={cred.id})

    assert (outcome.allowed, outcome.code, outcome.reason) == (False, "invalid_token", "revoked")


def test_revoking_the_narrowed_token_leaves_the_parent_working(cred: tokens.Credential) -> None:
    child = _support.narrow(cred, rules=["search"])
    search = _support.http("GET", "flights", "/search")

    assert not decision.decide([child], search, revoked={child.revocation_ids[-1]}).allowed
    assert decision.decide([cred], search, revoked={child.revocation_ids[-1]}).allowed


def test_a_narrowed_token_records_what_was_narrowed(cred: tokens.Credential) -> None:
    child = tokens.attenuate(cred, rules=["search"], ttl=timedelta(minutes=5), now=NOW)

    source = tokens.inspect(child)["blocks"][1]["datalog"]
    assert "attenuation(" in source
    assert "2026-03-01T12:05:00Z" in source


def test_a_narrowed_token_survives_a_trip_through_text(cred: tokens.Credential) -> None:
    token = tokens.attenuate(cred, rules=["search"], now=NOW)

    assert tokens.load(token, _support.trust(), now=NOW).depth == 1
    assert load_error(token[:-6] + "AAAAAA").reason in ("malformed", "bad_signature")


def test_the_base_credential_is_not_usable_by_a_delegate_without_narrowing() -> None:
    parent = _support.credential(delegating())

    outcome = decision.decide([parent], _support.http("GET", "flights", "/search", principal=HELPER))

    assert not outcome.allowed
