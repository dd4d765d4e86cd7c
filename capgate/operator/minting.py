"""What a capability's credential Secret should hold, and when it must change (pure, no I/O).

The Secret (mounted into the sidecar container only) holds the Biscuit ``token``, the
receipt-signing ``session.key`` with its root endorsement, the ``trust.json`` bundle, and
``settings.json`` (generation, lifetimes, revocations still to push, and the credentials rotated out
but still valid). Writing all of them in one Secret update is what makes minting crash-safe: a
sidecar either sees the old set or the new.

A rotation leaves the previous credential valid until it expires, and a pod keeps presenting it
until the kubelet syncs its Secret volume (every 60-90 s). Revoking the capability must
therefore cover every credential that can still verify, not just the current one: those are kept
as ``retiredCredentials`` until they expire (found on real pods, where ``revoked: true`` right after
a rotation left one replica working for a minute).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from capgate import resources, revocation, timestamps
from capgate.capabilities import keys, receipts, tokens
from capgate.capabilities.errors import CapabilityError
from capgate.capabilities.spec import Capability

MintReason = Literal["Issued", "Rotated", "SpecChanged", "RootKeyRotated"]
JITTER_FRACTION = 0.1
"""Rotation is spread over the last 10% of the rotateBefore window so a fleet does not re-mint at once."""
SESSION_KEY_LIFETIME = timedelta(minutes=5)
SESSION_KEY_RENEW_BEFORE = timedelta(seconds=150)
"""A new session key is written this long before the current one stops signing. The pod sees it when the
kubelet next syncs the Secret volume: every 60-90 s (``syncFrequency`` 1 m plus up to 50 % jitter), measured
63-92 s on real pods (README "Verified on real pods"); the sidecar may sign for ``receipts.SKEW`` more. 150 s
is the worst seen with about a minute to spare for a busy node or an operator restart."""


def secret_name(capability_name: str) -> str:
    return f"{capability_name}{resources.CREDENTIAL_SECRET_SUFFIX}"


@dataclass(frozen=True)
class Stored:
    """What the credential Secret holds now (anything unreadable reads as absent)."""

    token: str | None = None
    credential_id: str | None = None
    root_key_id: int | None = None
    revocation_ids: tuple[str, ...] = ()
    issued_at: datetime | None = None
    expires_at: datetime | None = None
    generation: int | None = None
    session: receipts.SessionKey | None = None
    pending: tuple[revocation.Entry, ...] = ()
    retired: tuple[revocation.Entry, ...] = ()
    """Credentials rotated out that still verify: a revocation of the capability covers them too."""

    @classmethod
    def read(cls, data: dict[str, bytes] | None) -> Stored:
        if not data:
            return cls()
        try:
            settings = json.loads(data.get(resources.SETTINGS_FILE, b"{}"))
            token = data[resources.TOKEN_FILE].decode("ascii").strip()
            info = tokens.inspect(token)
        except (KeyError, ValueError, CapabilityError, UnicodeDecodeError):
            return cls()
        try:
            session: receipts.SessionKey | None = receipts.SessionKey.from_json(data[resources.SESSION_KEY_FILE])
        except (KeyError, CapabilityError):
            session = None  # unreadable or from an older capgate: a new one is issued, the credential stays
        return cls(token=token, credential_id=info["revocationIds"][0], root_key_id=info["rootKeyId"],
                   revocation_ids=tuple(info["revocationIds"]), issued_at=timestamps.parse(settings.get("issuedAt")),
                   expires_at=timestamps.parse(settings.get("expiresAt")), generation=settings.get("generation"),
                   session=session, pending=_entries(settings.get("pendingRevocations")),
                   retired=_entries(settings.get("retiredCredentials")))


def _entries(listed: object) -> tuple[revocation.Entry, ...]:
    """Revocation entries from settings.json; an entry without a readable expiry counts as expiring now."""
    if not isinstance(listed, list):
        return ()
    return tuple(revocation.Entry(id=str(p["id"]), expires_at=timestamps.parse(p.get("expiresAt")) or datetime.now(UTC),
                                  capability=str(p.get("capability", "")), reason=str(p.get("reason", "")))
                 for p in listed if isinstance(p, dict) and "id" in p)


def still_valid(entries: tuple[revocation.Entry, ...], now: datetime) -> tuple[revocation.Entry, ...]:
    """The entries whose credential could still verify (expiry plus the verification skew, with margin)."""
    return tuple(e for e in entries if e.expires_at + revocation.PRUNE_GRACE > now)


def rotate_at(cap: Capability, stored: Stored) -> datetime | None:
    """When this credential is due for rotation (deterministic per credential, so restarts agree)."""
    if stored.expires_at is None or stored.credential_id is None:
        return None
    spread = cap.rotate_before.total_seconds() * JITTER_FRACTION
    fraction = int(hashlib.sha256(stored.credential_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return stored.expires_at - cap.rotate_before - timedelta(seconds=spread * fraction)


@dataclass(frozen=True)
class Plan:
    mint: MintReason | None
    revoke_previous: bool
    new_session_key: bool


def plan(cap: Capability, generation: int, stored: Stored, active_root_key: int, now: datetime,
         renew_before: timedelta = SESSION_KEY_RENEW_BEFORE) -> Plan:
    """Decide what to change. A spec change revokes the old credential; a rotation does not.

    A session key is endorsed for one credential, so every new credential gets a new session key; an
    unchanged credential gets one ``renew_before`` its current key stops signing.
    """
    session = stored.session
    session_due = (session is None or session.not_after - renew_before <= now
                   or not session.signs_for(cap.qualified_name, stored.credential_id or ""))
    if stored.token is None or stored.expires_at is None:
        return Plan("Issued", False, True)
    if stored.generation != generation:
        return Plan("SpecChanged", True, True)
    if stored.root_key_id != active_root_key:
        return Plan("RootKeyRotated", False, True)
    due = rotate_at(cap, stored)
    if due is None or due <= now or stored.expires_at <= now:
        return Plan("Rotated", False, True)
    return Plan(None, False, session_due)


@dataclass(frozen=True)
class Minted:
    data: dict[str, bytes]
    token: str | None
    credential_id: str
    revocation_ids: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    pending: tuple[revocation.Entry, ...] = field(default=())


def build(cap: Capability, generation: int, stored: Stored, the_plan: Plan, keyset: keys.KeySet,
          now: datetime, session_lifetime: timedelta) -> Minted:
    """The Secret content after ``the_plan``: new token and/or session key, pending revocations."""
    pending = list(stored.pending)
    retired = list(still_valid(stored.retired, now))
    if the_plan.mint is not None:
        token = tokens.mint(cap, keyset, now=now)
        credential = tokens.load(token, keyset.trust_bundle(), now=now)
        if the_plan.revoke_previous and stored.expires_at is not None:
            pending.extend(revocation.Entry(id=rid, expires_at=stored.expires_at, capability=cap.qualified_name,
                                            reason="spec changed") for rid in stored.revocation_ids)
        elif stored.expires_at is not None:  # rotated out, not revoked: still valid until it expires
            retired.extend(revocation.Entry(id=rid, expires_at=stored.expires_at, capability=cap.qualified_name,
                                            reason="rotated") for rid in stored.revocation_ids)
        token_id, ids = credential.id, credential.revocation_ids
        issued, expires = credential.issued_at, credential.expires_at
    else:
        assert stored.token is not None
        assert stored.issued_at is not None
        assert stored.expires_at is not None
        token, token_id, ids = stored.token, stored.credential_id or "", stored.revocation_ids
        issued, expires = stored.issued_at, stored.expires_at
    session = stored.session
    if the_plan.new_session_key or session is None or not session.signs_for(cap.qualified_name, token_id):
        session = receipts.SessionKey.issue(keyset, capability=cap.qualified_name, credential=token_id, now=now,
                                            lifetime=session_lifetime, receipt_ttl=cap.receipt_ttl)
    settings: dict[str, Any] = {
        "capability": cap.qualified_name, "generation": generation, "credentialId": token_id,
        "issuedAt": timestamps.iso(issued), "expiresAt": timestamps.iso(expires),
        "sessionKeyNotAfter": timestamps.iso(session.not_after),
        "revocationList": resources.REVOCATION_LIST_NAME,
        "pendingRevocations": [dict(e.as_dict()) for e in pending],
        "retiredCredentials": [dict(e.as_dict()) for e in retired],
    }
    data = {
        resources.TOKEN_FILE: token.encode("ascii"),
        resources.SESSION_KEY_FILE: session.to_json().encode("utf-8"),
        resources.TRUST_BUNDLE_FILE: keyset.trust_bundle().to_json().encode("utf-8"),
        resources.SETTINGS_FILE: (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    }
    return Minted(data=data, token=token, credential_id=token_id, revocation_ids=ids, issued_at=issued,
                  expires_at=expires, pending=tuple(pending))


def without_pending(data: dict[str, bytes]) -> dict[str, bytes]:
    """The same Secret content once its pending revocations are in the RevocationList."""
    settings = json.loads(data[resources.SETTINGS_FILE])
    settings["pendingRevocations"] = []
    return {**data, resources.SETTINGS_FILE: (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode()}

