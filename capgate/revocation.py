"""The RevocationList's content, as pure functions over its ``spec``.

Three writers change it (operator handlers, ``capgate revoke``, ``capgate lockdown``) and every
sidecar reads it, so the rules live here once: entries are keyed by revocation id, carry the
expiry of the token they revoke, and are pruned once that token could no longer verify anyway
(expiry + clock skew), which keeps the object small for ever. Writers apply these functions inside
an optimistic-concurrency loop (read, change, replace with resourceVersion, retry on conflict).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from capgate import resources, timestamps

PRUNE_GRACE = timedelta(minutes=1)
"""Kept past expiry for more than the 30 s verification skew, so pruning never reopens a window."""
REVOCATION_ID = re.compile(r"^[0-9a-f]{2,256}$")


@dataclass(frozen=True)
class Entry:
    id: str
    expires_at: datetime
    capability: str = ""
    reason: str = ""

    def as_dict(self) -> resources.RevokedEntry:
        out: resources.RevokedEntry = {"id": self.id, "expiresAt": timestamps.iso(self.expires_at)}
        if self.capability:
            out["capability"] = self.capability
        if self.reason:
            out["reason"] = self.reason
        return out


def revoked_ids(spec: Mapping[str, Any] | None) -> frozenset[str]:
    """The ids a verifier must refuse. Malformed entries are kept as ids when the id is readable."""
    entries = (spec or {}).get("revokedIds") or []
    return frozenset(str(e["id"]) for e in entries if isinstance(e, Mapping) and isinstance(e.get("id"), str))


def lockdown_applies(spec: Mapping[str, Any] | None, namespace: str) -> bool:
    lockdown = (spec or {}).get("lockdown") or {}
    return bool(lockdown.get("all")) or namespace in (lockdown.get("namespaces") or [])


def with_revoked(spec: Mapping[str, Any] | None, entries: Iterable[Entry], now: datetime) -> dict[str, Any]:
    """``spec`` plus ``entries`` (an id already present keeps the later expiry), pruned at ``now``."""
    current: dict[str, dict[str, Any]] = {}
    for item in (spec or {}).get("revokedIds") or []:
        if isinstance(item, Mapping) and isinstance(item.get("id"), str):
            current[item["id"]] = dict(item)
    for entry in entries:
        if not REVOCATION_ID.match(entry.id):
            raise ValueError(f"{entry.id[:16]!r} is not a revocation id (hex)")
        existing = timestamps.parse(current.get(entry.id, {}).get("expiresAt"))
        if existing is None or existing < entry.expires_at:
            current[entry.id] = dict(entry.as_dict())
    return _with_entries(spec, current.values(), now)


def pruned(spec: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    return _with_entries(spec, list((spec or {}).get("revokedIds") or []), now)


def _with_entries(spec: Mapping[str, Any] | None, entries: Iterable[Mapping[str, Any]],
                  now: datetime) -> dict[str, Any]:
    kept = []
    for item in entries:
        expires = timestamps.parse(item.get("expiresAt"))
        # An unreadable expiry is kept: pruning on a guess could resurrect a revoked token.
        if expires is None or expires + PRUNE_GRACE > now:
            kept.append(dict(item))
    out = dict(spec or {})
    out["revokedIds"] = sorted(kept, key=lambda e: str(e.get("id")))
    return out


def with_lockdown(spec: Mapping[str, Any] | None, *, all_namespaces: bool | None = None,
                  add: Iterable[str] = (), remove: Iterable[str] = ()) -> dict[str, Any]:
    """Turn the kill switch on or off, cluster-wide or for some namespaces."""
    out = dict(spec or {})
    lockdown = dict(out.get("lockdown") or {})
    if all_namespaces is not None:
        lockdown["all"] = all_namespaces
    namespaces = set(lockdown.get("namespaces") or [])
    namespaces.update(add)
    namespaces.difference_update(remove)
    lockdown["namespaces"] = sorted(namespaces)
    lockdown.setdefault("all", False)
    out["lockdown"] = lockdown
    return out


def empty_list() -> dict[str, Any]:
    """A fresh RevocationList object."""
    return {"apiVersion": resources.API_VERSION, "kind": resources.REVOCATION_KIND,
            "metadata": {"name": resources.REVOCATION_LIST_NAME,
                         "labels": {resources.MANAGED_BY_LABEL: resources.MANAGED_BY}},
            "spec": {"revokedIds": [], "lockdown": {"all": False, "namespaces": []}}}
