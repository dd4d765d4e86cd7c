"""Receipts: signed proof that an allowed call happened, for state gates like "charge after search".

A sidecar signs receipts with a short-lived *session key*. The session key is endorsed by a root
key (the root signs the session public key, its validity, and the capability and credential it
signs for), so any sidecar holding the trust bundle can verify a receipt minted by any other —
without ever holding a private root key.

The endorsement's scope is what makes a stolen session key worth little: a receipt is accepted
only when the capability and credential it claims are the ones its key was endorsed for, that
capability is the verifier's, and the endorsed credential is not revoked. Without the scope, the
session key of one compromised sidecar could sign receipts "for" any other capability, naming any
unrevoked credential, and revoking the compromised credential would not stop it.

Wire form (one header value, ASCII)::

    v1.<payload>.<signature>.<endorsement>.<endorsement signature>     (each part base64url)

The payload binds the rule name, the correlation id, the capability (``namespace/name``) and the
credential (its revocation id) that was used, plus issue and expiry times; the endorsement binds
the same capability and credential. Verification failures carry distinct
reasons (:class:`~capgate.capabilities.errors.ReceiptError`) so the audit log says *why* a carried
receipt was ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Container
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from capgate.capabilities.errors import KeyFileError, ReceiptError
from capgate.capabilities.keys import KeySet, TrustBundle, parse_time

PREFIX = "v1"
SESSION_KEY_KIND = "capgate-session-key"
SKEW = timedelta(seconds=30)
SESSION_KEY_LIFETIME = timedelta(minutes=5)
MAX_RECEIPT_BYTES = 4096


def expired(expires_at: datetime, now: datetime) -> bool:
    """The one expiry rule for receipts, carried or held: past ``expires_at`` by more than the skew."""
    return now > expires_at + SKEW


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _ts(moment: datetime) -> int:
    return int(moment.timestamp())


@dataclass(frozen=True)
class SessionKey:
    """A receipt-signing key, endorsed by a root key until ``not_after``."""

    key_id: str
    private: bytes
    not_after: datetime
    endorsement: str
    """``<endorsement>.<signature>``: the root's statement that this key may sign until not_after,
    for ``capability`` and ``credential`` only."""
    capability: str
    """The qualified name (``namespace/name``) of the only capability this key signs receipts for."""
    credential: str
    """The id (first revocation id) of the credential whose receipts this key signs."""

    @classmethod
    def issue(cls, keyset: KeySet, *, capability: str, credential: str, now: datetime | None = None,
              lifetime: timedelta = SESSION_KEY_LIFETIME, receipt_ttl: timedelta = timedelta(minutes=5)) -> SessionKey:
        """A fresh session key for one capability's credential.

        The endorsement outlives signing by ``receipt_ttl`` so its receipts still verify.
        """
        if not capability or not credential:
            raise ValueError("a session key is endorsed for one capability and credential")
        moment = now or datetime.now(UTC)
        private = Ed25519PrivateKey.generate()
        raw_private = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                            serialization.NoEncryption())
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        key_id = secrets.token_hex(8)
        not_after = moment + lifetime
        statement = {"sid": key_id, "pub": public.hex(), "rk": keyset.active_id, "cap": capability,
                     "cred": credential, "signUntil": _ts(not_after), "exp": _ts(not_after + receipt_ttl + SKEW)}
        body = _canonical(statement)
        endorsement = f"{_b64(body)}.{_b64(keyset.active.sign(body))}"
        return cls(key_id=key_id, private=raw_private, not_after=not_after, endorsement=endorsement,
                   capability=capability, credential=credential)

    @cached_property
    def _signer(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.private)

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)

    def to_json(self) -> str:
        return json.dumps({"kind": SESSION_KEY_KIND, "id": self.key_id, "private": self.private.hex(),
                           "notAfter": self.not_after.isoformat(), "endorsement": self.endorsement},
                          sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionKey:
        try:
            data = json.loads(text)
            if data.get("kind") != SESSION_KEY_KIND:
                raise ValueError("kind")
            not_after = parse_time(data["notAfter"], "notAfter")
            private = bytes.fromhex(data["private"])
            if not_after is None or len(private) != 32:
                raise ValueError("fields")
            endorsement = str(data["endorsement"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyFileError("not a capgate session key document") from exc
        # The scope is read from the endorsement itself, so the file cannot claim another one.
        try:
            statement = _json(_unb64(endorsement.split(".")[0]))
        except (ReceiptError, binascii.Error, ValueError) as exc:
            raise KeyFileError("the session key's endorsement is unreadable") from exc
        capability, credential = statement.get("cap"), statement.get("cred")
        if not isinstance(capability, str) or not capability or not isinstance(credential, str) or not credential:
            raise KeyFileError("the session key's endorsement names no capability and credential "
                               "(issued by an older capgate; the operator issues a new one)")
        return cls(key_id=str(data["id"]), private=private, not_after=not_after, endorsement=endorsement,
                   capability=capability, credential=credential)

    def signs_for(self, capability: str, credential: str) -> bool:
        """Whether receipts of this capability's credential can be signed with this key."""
        return (self.capability, self.credential) == (capability, credential)


@dataclass(frozen=True)
class Receipt:
    rule: str
    correlation: str
    capability: str
    credential: str
    issued_at: datetime
    expires_at: datetime
    decision_id: str
    session_key_id: str


def mint(session: SessionKey, *, rule: str, correlation: str, ttl: timedelta, decision_id: str,
         now: datetime | None = None) -> str:
    """Sign a receipt for an allowed call of ``rule`` in ``correlation``.

    The capability and credential are the session key's own: a receipt claims nothing its key was
    not endorsed for.
    """
    moment = now or datetime.now(UTC)
    payload = _canonical({"rule": rule, "corr": correlation, "cap": session.capability, "cred": session.credential,
                          "iat": _ts(moment), "exp": _ts(moment + ttl), "did": decision_id,
                          "sid": session.key_id})
    return f"{PREFIX}.{_b64(payload)}.{_b64(session.sign(payload))}.{session.endorsement}"


def verify(receipt: str, *, trust: TrustBundle, correlation: str, capability: str,
           revoked: Container[str] = (), now: datetime | None = None) -> Receipt:
    """Verify a receipt for use in ``correlation`` by ``capability``; raises :class:`ReceiptError`."""
    moment = now or datetime.now(UTC)
    payload, signature, statement, statement_sig = _split(receipt)
    endorsement = _json(statement)
    root_id = endorsement.get("rk")
    if not isinstance(root_id, int) or root_id not in trust.public_keys(moment):
        raise ReceiptError("unknown_key", "session key endorsed by an untrusted root")
    if not trust.verify_signature(root_id, statement_sig, statement, moment):
        raise ReceiptError("bad_signature", "session key endorsement does not verify")
    data = _json(payload)
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(endorsement["pub"])))
        public.verify(signature, payload)
    except Exception as exc:
        raise ReceiptError("bad_signature", "receipt signature does not verify") from exc
    try:
        issued = datetime.fromtimestamp(int(data["iat"]), UTC)
        expires = datetime.fromtimestamp(int(data["exp"]), UTC)
        sign_until = datetime.fromtimestamp(int(endorsement["signUntil"]), UTC)
        endorsed_until = datetime.fromtimestamp(int(endorsement["exp"]), UTC)
        result = Receipt(rule=str(data["rule"]), correlation=str(data["corr"]), capability=str(data["cap"]),
                         credential=str(data["cred"]), issued_at=issued, expires_at=expires,
                         decision_id=str(data["did"]), session_key_id=str(data["sid"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ReceiptError("malformed", "missing or invalid receipt fields") from exc
    if result.session_key_id != endorsement.get("sid") or issued > sign_until + SKEW:
        raise ReceiptError("bad_signature", "receipt signed outside its session key's endorsement")
    endorsed = (endorsement.get("cap"), endorsement.get("cred"))
    if not all(isinstance(value, str) and value for value in endorsed):
        raise ReceiptError("malformed", "session key endorsement names no capability and credential")
    if (result.capability, result.credential) != endorsed:
        raise ReceiptError("unendorsed", f"receipt of rule {result.rule!r} claims a capability or credential "
                                         "its session key is not endorsed for")
    if expired(expires, moment) or moment > endorsed_until or issued > moment + SKEW:
        raise ReceiptError("expired", f"receipt of rule {result.rule!r} expired")
    if result.correlation != correlation:
        raise ReceiptError("wrong_correlation", f"receipt of rule {result.rule!r} belongs to another correlation")
    if result.capability != capability:
        raise ReceiptError("wrong_credential", f"receipt of rule {result.rule!r} was issued to another capability")
    if result.credential in revoked:
        raise ReceiptError("wrong_credential", f"receipt of rule {result.rule!r} was issued to a revoked credential")
    return result


def _split(receipt: str) -> tuple[bytes, bytes, bytes, bytes]:
    if not isinstance(receipt, str) or len(receipt) > MAX_RECEIPT_BYTES:
        raise ReceiptError("malformed", "receipt missing or oversized")
    parts = receipt.strip().split(".")
    if len(parts) != 5 or parts[0] != PREFIX:
        raise ReceiptError("malformed", "not a capgate v1 receipt")
    try:
        return _unb64(parts[1]), _unb64(parts[2]), _unb64(parts[3]), _unb64(parts[4])
    except (binascii.Error, ValueError) as exc:
        raise ReceiptError("malformed", "receipt is not base64url") from exc


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReceiptError("malformed", "receipt part is not JSON") from exc
    if not isinstance(data, dict):
        raise ReceiptError("malformed", "receipt part is not an object")
    return data
