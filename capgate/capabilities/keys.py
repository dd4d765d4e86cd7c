"""Root key sets and the public trust bundle derived from them.

The operator holds a *set* of Ed25519 root keys, each with a Biscuit ``root_key_id``, so the root
can rotate with overlap: new credentials are signed by the active key while tokens signed by an
older key keep verifying until that key's ``notAfter`` (set, at rotation, past the longest
credential lifetime). Sidecars only ever see the :class:`TrustBundle`: public keys by id.

Serialised as JSON so the same bytes work as a file (``capgate keys init``) and as a Secret value.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from capgate import timestamps
from capgate.capabilities import _biscuit
from capgate.capabilities.errors import KeyFileError

KEYSET_KIND = "capgate-root-keyset"
BUNDLE_KIND = "capgate-trust-bundle"
MAX_KEY_ID = 2**31 - 1
"""Biscuit root key ids are u32; random 31-bit ids keep clear of sign confusion in other clients."""


def _iso(moment: datetime | None) -> str | None:
    return timestamps.iso(moment) if moment else None


def parse_time(text: object, what: str) -> datetime | None:
    """A timestamp field of a key document: absent is None, anything unreadable is an error."""
    if text is None:
        return None
    moment = timestamps.parse(text)
    if moment is None:
        raise KeyFileError(f"{what}: not a timestamp")
    return moment


def _hex(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{what}: expected {size * 2} hex characters")
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise KeyFileError(f"{what}: expected {size * 2} hex characters") from exc
    if len(raw) != size:
        raise KeyFileError(f"{what}: expected {size * 2} hex characters")
    return raw


def _retired(not_after: datetime | None, now: datetime) -> bool:
    return not_after is not None and now > not_after


@dataclass(frozen=True)
class RootKey:
    key_id: int
    public: bytes
    private: bytes | None
    created_at: datetime
    not_after: datetime | None = None

    def sign(self, message: bytes) -> bytes:
        if self.private is None:
            raise KeyFileError(f"root key {self.key_id} has no private part")
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(message)


@dataclass(frozen=True)
class TrustBundle:
    """Public root keys by id: all a verifier needs, nothing it could sign with."""

    keys: Mapping[int, bytes]
    not_after: Mapping[int, datetime | None]

    def public_keys(self, now: datetime) -> dict[int, bytes]:
        """The keys still valid at ``now``; a retired key verifies nothing."""
        return {kid: pub for kid, pub in self.keys.items() if not _retired(self.not_after.get(kid), now)}

    def verify_signature(self, key_id: int, signature: bytes, message: bytes, now: datetime) -> bool:
        public = self.public_keys(now).get(key_id)
        if public is None:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except Exception:  # noqa: BLE001 - any library failure fails closed
            return False
        return True

    def to_json(self) -> str:
        keys = [{"id": kid, "public": pub.hex(), "notAfter": _iso(self.not_after.get(kid))}
                for kid, pub in sorted(self.keys.items())]
        return json.dumps({"kind": BUNDLE_KIND, "keys": keys}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> TrustBundle:
        data = _load_json(text, BUNDLE_KIND)
        keys: dict[int, bytes] = {}
        not_after: dict[int, datetime | None] = {}
        for index, entry in enumerate(_entries(data)):
            kid = _key_id(entry, index)
            keys[kid] = _hex(entry.get("public"), 32, f"keys[{index}].public")
            not_after[kid] = parse_time(entry.get("notAfter"), f"keys[{index}].notAfter")
        if not keys:
            raise KeyFileError("trust bundle holds no keys")
        return cls(keys=keys, not_after=not_after)

    @classmethod
    def from_file(cls, path: str | Path) -> TrustBundle:
        return cls.from_json(_read(path))


@dataclass(frozen=True)
class KeySet:
    keys: tuple[RootKey, ...]
    active_id: int

    @classmethod
    def generate(cls, now: datetime | None = None) -> KeySet:
        key = _new_key(now or datetime.now(UTC), exclude=())
        return cls(keys=(key,), active_id=key.key_id)

    @property
    def active(self) -> RootKey:
        return next(k for k in self.keys if k.key_id == self.active_id)

    def rotate(self, keep_old_for: timedelta, now: datetime | None = None) -> KeySet:
        """A new active key; the previous ones keep verifying for ``keep_old_for``."""
        moment = now or datetime.now(UTC)
        retired = tuple(k if k.not_after else replace(k, not_after=moment + keep_old_for) for k in self.keys)
        fresh = _new_key(moment, exclude=[k.key_id for k in self.keys])
        return KeySet(keys=(*retired, fresh), active_id=fresh.key_id)

    def prune(self, now: datetime) -> KeySet:
        """Drop retired keys past their ``notAfter``; the active key always stays."""
        kept = tuple(k for k in self.keys if k.key_id == self.active_id or not _retired(k.not_after, now))
        return KeySet(keys=kept, active_id=self.active_id)

    def trust_bundle(self) -> TrustBundle:
        return TrustBundle(keys={k.key_id: k.public for k in self.keys},
                           not_after={k.key_id: k.not_after for k in self.keys})

    def to_json(self) -> str:
        keys = [{"id": k.key_id, "public": k.public.hex(), "private": k.private.hex() if k.private else None,
                 "createdAt": _iso(k.created_at), "notAfter": _iso(k.not_after)} for k in self.keys]
        document = {"kind": KEYSET_KIND, "active": self.active_id, "keys": keys}
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> KeySet:
        data = _load_json(text, KEYSET_KIND)
        keys = []
        for index, entry in enumerate(_entries(data)):
            private = _hex(entry.get("private"), 32, f"keys[{index}].private")
            public = _hex(entry.get("public"), 32, f"keys[{index}].public")
            if _biscuit.public_key_of(private) != public:
                raise KeyFileError(f"keys[{index}]: public key does not match the private key")
            keys.append(RootKey(key_id=_key_id(entry, index), public=public, private=private,
                                created_at=parse_time(entry.get("createdAt"), f"keys[{index}].createdAt")
                                or datetime.now(UTC),
                                not_after=parse_time(entry.get("notAfter"), f"keys[{index}].notAfter")))
        active = data.get("active")
        if not any(k.key_id == active for k in keys):
            raise KeyFileError("the active key id names no key in the set")
        return cls(keys=tuple(keys), active_id=int(active))  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str | Path) -> KeySet:
        return cls.from_json(_read(path))

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``root.key`` (mode 0600 before any byte is written) and ``root.pub``."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        private_path = folder / "root.key"
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT: tighten it before writing
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
        public_path = folder / "root.pub"
        public_path.write_text(self.trust_bundle().to_json(), encoding="utf-8")
        return private_path, public_path


def _new_key(now: datetime, exclude: object) -> RootKey:
    while True:
        kid = secrets.randbelow(MAX_KEY_ID) + 1
        if kid not in exclude:  # type: ignore[operator]
            break
    private = _biscuit.new_private_key()
    return RootKey(key_id=kid, public=_biscuit.public_key_of(private), private=private, created_at=now)


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from exc


def _load_json(text: str | bytes, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"not a {kind} document (invalid JSON)") from exc
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise KeyFileError(f"not a {kind} document")
    return data


def _entries(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    keys = data.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, Mapping) for k in keys):
        raise KeyFileError("'keys' must be a list of objects")
    return keys


def _key_id(entry: Mapping[str, Any], index: int) -> int:
    kid = entry.get("id")
    if isinstance(kid, bool) or not isinstance(kid, int) or not 0 <= kid <= 2**32 - 1:
        raise KeyFileError(f"keys[{index}].id must be a 32-bit unsigned integer")
    return kid
