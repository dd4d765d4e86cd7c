"""Receipts: proof that an allowed call happened, refused for a distinct reason each way it can be wrong."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capgate.capabilities import keys, receipts, tokens
from capgate.capabilities.errors import KeyFileError, ReceiptError

from . import _support
from ._support import NOW

CAPABILITY = "travel/booking-agent"
CREDENTIAL = "cafe" * 16


def session(keyset: keys.KeySet | None = None, *, capability: str = CAPABILITY,
            credential: str = CREDENTIAL) -> receipts.SessionKey:
    return receipts.SessionKey.issue(keyset or _support.keyset(), capability=capability, credential=credential,
                                     now=NOW)


def mint(key: receipts.SessionKey | None = None, **overrides: object) -> str:
    fields: dict[str, object] = {"rule": "search", "correlation": "session-1", "ttl": timedelta(minutes=5),
                                 "decision_id": "d-1", "now": NOW}
    fields.update(overrides)
    return receipts.mint(key or session(), **fields)  # type: ignore[arg-type]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(key: receipts.SessionKey, **claims: object) -> str:
    """What a compromised sidecar can do with its own session key: sign any payload it likes."""
    payload: dict[str, object] = {"rule": "search", "corr": "session-1", "cap": key.capability,
                                  "cred": key.credential, "iat": int(NOW.timestamp()),
                                  "exp": int((NOW + timedelta(minutes=5)).timestamp()), "did": "d-1",
                                  "sid": key.key_id}
    payload.update(claims)
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return f"v1.{b64(raw)}.{b64(key.sign(raw))}.{key.endorsement}"


def statement(key: receipts.SessionKey) -> dict[str, object]:
    part = key.endorsement.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # type: ignore[no-any-return]


def verify(receipt: str, **overrides: object) -> receipts.Receipt:
    fields: dict[str, object] = {"trust": _support.trust(), "correlation": "session-1", "capability": CAPABILITY,
                                 "now": NOW + timedelta(seconds=1)}
    fields.update(overrides)
    return receipts.verify(receipt, **fields)  # type: ignore[arg-type]


def reason(receipt: str, **overrides: object) -> str:
    with pytest.raises(ReceiptError) as info:
        verify(receipt, **overrides)
    return info.value.reason


def flip(part: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    raw[0] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_a_valid_receipt_verifies_and_says_what_it_proves() -> None:
    proved = verify(mint())

    assert (proved.rule, proved.correlation, proved.capability, proved.credential, proved.decision_id) == (
        "search", "session-1", CAPABILITY, CREDENTIAL, "d-1")
    assert proved.issued_at == NOW
    assert proved.expires_at == NOW + timedelta(minutes=5)


def test_a_receipt_is_one_ascii_header_value() -> None:
    receipt = mint()

    assert receipt.isascii()
    assert receipt.startswith("v1.")
    assert len(receipt.split(".")) == 5
    assert "\n" not in receipt
    assert " " not in receipt


def test_a_receipt_with_a_forged_signature_is_refused() -> None:
    parts = mint().split(".")
    parts[2] = flip(parts[2])

    assert reason(".".join(parts)) == "bad_signature"


def test_a_receipt_whose_payload_was_edited_is_refused() -> None:
    parts = mint().split(".")
    payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    payload["rule"] = "charge"
    parts[1] = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()

    assert reason(".".join(parts)) == "bad_signature"


def test_a_receipt_with_a_forged_session_key_endorsement_is_refused() -> None:
    parts = mint().split(".")
    parts[4] = flip(parts[4])

    assert reason(".".join(parts)) == "bad_signature"


def test_a_receipt_signed_by_a_session_key_it_was_not_endorsed_for_is_refused() -> None:
    genuine, other = session(), session()
    parts = mint(other).split(".")
    parts[3:5] = genuine.endorsement.split(".")

    assert reason(".".join(parts)) == "bad_signature"


def test_an_expired_receipt_is_refused() -> None:
    receipt = mint()

    assert verify(receipt, now=NOW + timedelta(minutes=5, seconds=30)).rule == "search"
    assert reason(receipt, now=NOW + timedelta(minutes=5, seconds=31)) == "expired"


def test_a_receipt_from_the_future_is_refused() -> None:
    assert reason(mint(), now=NOW - timedelta(minutes=1)) == "expired"


def test_a_receipt_from_another_correlation_is_refused() -> None:
    assert reason(mint(), correlation="session-2") == "wrong_correlation"


def test_a_receipt_of_another_capability_is_refused() -> None:
    assert reason(mint(), capability="travel/other-agent") == "wrong_credential"


def test_a_receipt_of_a_revoked_credential_is_refused() -> None:
    assert reason(mint(), revoked={CREDENTIAL}) == "wrong_credential"


# -- a session key signs for one capability's credential, and nothing else -------------------------

def real_credentials() -> tuple[tokens.Credential, tokens.Credential]:
    """Two capabilities' real Biscuit credentials under the same root: A (the example) and B."""
    a = _support.parse()
    b = replace(a, name="refund-agent")
    return _support.credential(a), _support.credential(b)


def session_for(cred: tokens.Credential) -> receipts.SessionKey:
    return receipts.SessionKey.issue(_support.keyset(), capability=cred.capability.qualified_name,
                                     credential=cred.id, now=NOW)


def test_the_root_endorses_a_session_key_for_one_capability_and_credential() -> None:
    a, _ = real_credentials()
    key = session_for(a)

    assert (statement(key)["cap"], statement(key)["cred"]) == ("travel/booking-agent", a.id)
    assert verify(mint(key), capability="travel/booking-agent").credential == a.id


def test_a_session_key_of_one_capability_cannot_sign_receipts_another_capability_accepts() -> None:
    a, b = real_credentials()
    stolen = session_for(a)
    forged = forge(stolen, cap=b.capability.qualified_name, cred=b.id)

    assert reason(forged, capability=b.capability.qualified_name) == "unendorsed"
    assert reason(forge(stolen, cap=b.capability.qualified_name), capability=b.capability.qualified_name) == \
        "unendorsed"


def test_revoking_a_credential_refuses_every_receipt_its_session_key_signs() -> None:
    a, b = real_credentials()
    stolen = session_for(a)
    cap = a.capability.qualified_name
    genuine, renamed = mint(stolen), forge(stolen, cred=b.id)

    assert verify(genuine, capability=cap).rule == "search"
    assert reason(genuine, capability=cap, revoked={a.id}) == "wrong_credential"
    assert reason(renamed, capability=cap, revoked={a.id}) == "unendorsed"
    assert reason(renamed, capability=cap) == "unendorsed"


def test_a_receipt_names_the_capability_and_credential_of_its_session_key() -> None:
    proved = verify(mint(session(capability="travel/other-agent", credential="beef" * 16)),
                    capability="travel/other-agent")

    assert (proved.capability, proved.credential) == ("travel/other-agent", "beef" * 16)


def test_an_endorsement_without_a_scope_is_refused() -> None:
    keyset = _support.keyset()
    key = session()
    unscoped = {k: v for k, v in statement(key).items() if k not in ("cap", "cred")}
    body = json.dumps(unscoped, sort_keys=True, separators=(",", ":")).encode()
    old_style = replace(key, endorsement=f"{b64(body)}.{b64(keyset.active.sign(body))}")

    assert reason(mint(old_style)) == "malformed"
    with pytest.raises(KeyFileError, match="names no capability"):
        receipts.SessionKey.from_json(old_style.to_json())


@pytest.mark.parametrize(("capability", "credential"), [("", CREDENTIAL), (CAPABILITY, "")])
def test_a_session_key_cannot_be_issued_without_a_scope(capability: str, credential: str) -> None:
    with pytest.raises(ValueError, match="one capability and credential"):
        session(capability=capability, credential=credential)


def test_a_receipt_endorsed_by_an_unknown_root_is_refused() -> None:
    stranger = keys.KeySet.generate(NOW)

    assert reason(mint(session(stranger))) == "unknown_key"


def test_a_receipt_endorsed_by_a_retired_root_is_refused() -> None:
    old = keys.KeySet.generate(NOW)
    rotated = old.rotate(timedelta(seconds=10), now=NOW)
    receipt = mint(session(old))

    assert verify(receipt, trust=rotated.trust_bundle()).rule == "search"
    assert reason(receipt, trust=rotated.trust_bundle(), now=NOW + timedelta(seconds=11)) == "unknown_key"


def test_receipts_of_the_previous_session_key_verify_until_they_expire() -> None:
    first = session()
    receipt = mint(first, now=NOW + timedelta(minutes=4, seconds=59))

    assert verify(receipt, now=NOW + timedelta(minutes=9)).rule == "search"
    assert reason(receipt, now=NOW + timedelta(minutes=10, seconds=30)) == "expired"


def test_a_session_key_cannot_sign_after_its_endorsement() -> None:
    late = mint(session(), now=NOW + timedelta(minutes=6))

    assert reason(late, now=NOW + timedelta(minutes=6, seconds=1)) == "bad_signature"


@pytest.mark.parametrize(
    "receipt",
    ["", "v1", "v1.a.b.c", "v2.a.b.c.d", "v1.a.b.c.d.e", "v1.!!!.b.c.d", "x" * 5000, "v1.e30.YQ.bm90IGpzb24.YQ"],
    ids=["empty", "prefix-only", "four-parts", "wrong-version", "six-parts", "not-base64", "oversized", "not-json"],
)
def test_a_malformed_receipt_is_refused(receipt: str) -> None:
    assert reason(receipt) == "malformed"


def test_each_way_a_receipt_fails_has_its_own_reason() -> None:
    parts = mint().split(".")
    parts[2] = flip(parts[2])
    reasons = [
        reason("v1.nope"),
        reason(".".join(parts)),
        reason(mint(session(keys.KeySet.generate(NOW)))),
        reason(forge(session(), cap="travel/other-agent"), capability="travel/other-agent"),
        reason(mint(), now=NOW + timedelta(hours=1)),
        reason(mint(), correlation="session-2"),
        reason(mint(), capability="travel/other-agent"),
    ]

    assert reasons == ["malformed", "bad_signature", "unknown_key", "unendorsed", "expired", "wrong_correlation",
                       "wrong_credential"]


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.text(max_size=300),
    st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-_=", max_size=40),
             min_size=5, max_size=5).map(lambda parts: "v1." + ".".join(parts[1:])),
))
def test_verifying_arbitrary_text_raises_only_receipt_errors(text: str) -> None:
    with pytest.raises(ReceiptError):
        verify(text)


def test_a_session_key_survives_its_file_round_trip() -> None:
    key = session()

    assert receipts.SessionKey.from_json(key.to_json()) == key
    assert verify(mint(receipts.SessionKey.from_json(key.to_json()))).rule == "search"


@pytest.mark.parametrize("text", ["", "{}", '{"kind": "capgate-session-key"}', "[]", "null"])
def test_a_broken_session_key_file_is_a_key_file_error(text: str) -> None:
    with pytest.raises(KeyFileError):
        receipts.SessionKey.from_json(text)


def test_a_session_key_file_holds_no_root_key() -> None:
    keyset = _support.keyset()
    assert keyset.active.private is not None

    assert keyset.active.private.hex() not in session().to_json()
