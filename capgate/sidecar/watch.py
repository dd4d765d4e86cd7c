"""Revocations and lockdown: what the control plane tells this sidecar, and how fresh that news is.

:class:`RevocationState` is the one object the request path reads: the revoked ids, the kill
switch, and ``last_contact``. A *source* feeds it. Standalone there is either none (nothing is
ever revoked; no heartbeat, so no staleness lockdown) or :class:`FileSource`, a local JSON file
in the RevocationList ``spec`` shape, polled. In a pod the operator issue adds a Kubernetes watch
of the ``RevocationList`` custom resource implementing the same :class:`RevocationSource`
protocol; every event it delivers is also a heartbeat.

Fail closed: when a source exists but has not been heard from for the capability's
``lockdownAfter``, the sidecar locks down exactly as if the kill switch were thrown. Lockdown
refuses writes (503 ``lockdown``); reads (GET, HEAD, OPTIONS) are still decided by policy, so an
agent can keep looking while it can no longer change anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("capgate.sidecar.watch")

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FILE_BYTES = 16 * 1024 * 1024
"""A RevocationList with ~100k entries; anything bigger is refused rather than parsed."""


@dataclass
class RevocationState:
    """Mutable by its source only; the request path reads it."""

    revoked_ids: frozenset[str] = frozenset()
    lockdown_all: bool = False
    lockdown_namespaces: frozenset[str] = frozenset()
    last_contact: float | None = None
    """``time.monotonic()`` of the last successful read/event; None = never heard."""
    has_source: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def apply(self, spec: Mapping[str, Any], now: float | None = None) -> None:
        """Install a RevocationList ``spec`` (raises ValueError on a malformed one; state unchanged)."""
        ids, everything, namespaces = parse_spec(spec)
        self.revoked_ids = ids
        self.lockdown_all = everything
        self.lockdown_namespaces = namespaces
        self.contact(now)

    def contact(self, now: float | None = None) -> None:
        self.last_contact = time.monotonic() if now is None else now
        self.changed.set()
        self.changed = asyncio.Event()

    def age(self, now: float | None = None) -> float | None:
        if self.last_contact is None:
            return None
        return (time.monotonic() if now is None else now) - self.last_contact

    def lockdown_reason(self, namespace: str, lockdown_after: timedelta, now: float | None = None) -> str | None:
        """Why this sidecar is locked down for ``namespace``, or None."""
        if self.lockdown_all:
            return "kill switch: all namespaces locked down"
        if namespace in self.lockdown_namespaces:
            return f"kill switch: namespace {namespace!r} locked down"
        if self.has_source:
            age = self.age(now)
            if age is None or age > lockdown_after.total_seconds():
                return "control plane not heard from within lockdownAfter"
        return None

    @staticmethod
    def blocks(method: str | None) -> bool:
        """Lockdown refuses everything but reads (and anything not an HTTP method, e.g. actions)."""
        return method not in READ_METHODS


def parse_spec(spec: Mapping[str, Any]) -> tuple[frozenset[str], bool, frozenset[str]]:
    """``revokedIds`` (entries ``{id, expiresAt}`` or bare id strings) and ``lockdown``."""
    if not isinstance(spec, Mapping):
        raise ValueError("spec must be an object")
    entries = spec.get("revokedIds") or []
    if not isinstance(entries, list):
        raise ValueError("revokedIds must be a list")
    ids = frozenset(_entry_id(e) for e in entries)
    lockdown = spec.get("lockdown") or {}
    if not isinstance(lockdown, Mapping):
        raise ValueError("lockdown must be an object")
    everything = lockdown.get("all", False)
    namespaces = lockdown.get("namespaces") or []
    if not isinstance(everything, bool) or not isinstance(namespaces, list):
        raise ValueError("lockdown.all must be a boolean and lockdown.namespaces a list")
    return ids, everything, frozenset(_strings(namespaces))


def _entry_id(entry: object) -> str:
    value = entry.get("id") if isinstance(entry, Mapping) else entry
    if not isinstance(value, str) or not value or not all(c in "0123456789abcdef" for c in value.lower()):
        raise ValueError("revokedIds entries must be hex revocation ids")
    return value.lower()


def _strings(items: Iterable[object]) -> list[str]:
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("lockdown.namespaces must be strings")
        out.append(item)
    return out


class RevocationSource(Protocol):
    """Feeds a :class:`RevocationState` until cancelled (the Kubernetes watch implements this too)."""

    async def run(self, state: RevocationState) -> None: ...


class FileSource:
    """Polls a local JSON (or YAML-free JSON) file: a RevocationList object or just its ``spec``.

    Each successful read counts as contact; an unreadable or malformed file keeps the last good
    state and stops counting as contact, so a broken file ends in lockdown, not in "nothing revoked".
    """

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval

    def read(self, state: RevocationState) -> bool:
        try:
            if os.stat(self.path).st_size > MAX_FILE_BYTES:
                raise ValueError("file too large")
            document = json.loads(self.path.read_text(encoding="utf-8"))
            spec = document.get("spec", document) if isinstance(document, dict) else document
            state.apply(spec)
        except (OSError, ValueError) as exc:
            log.warning("revocations file %s unusable, keeping the previous state: %s", self.path,
                        exc.strerror if isinstance(exc, OSError) else exc)
            return False
        return True

    async def run(self, state: RevocationState) -> None:
        state.has_source = True
        while True:
            self.read(state)
            await asyncio.sleep(self.interval)
