"""The pod's base credential, its receipt-signing session key and trust bundle — and upstream secrets.

Two sources, one shape (:class:`Loaded`):

* **standalone** — the sidecar mints its own credential in memory from ``--capability`` and
  ``--root-key`` (identity from ``--namespace``/``--service-account``), and re-mints it and its
  session key before they expire, so a long local session never silently goes stale;
* **pod** — ``--credential-dir`` is the mounted credential Secret (``token``, ``session.key``,
  ``trust.json``, ``settings.json``). Kubernetes swaps Secret volumes atomically via a symlink, so
  polling the files' stat signature once a second picks up rotations without a restart. A reload
  that fails keeps the last good credential (it still expires on its own) and is logged.

Upstream secrets (the API keys the agent never sees) are read from ``env:``/``file:`` references or
``--upstream-credentials-dir/<upstream>``; values are never logged, and a value with a line break is
refused because it would smuggle a second header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capgate import resources
from capgate.capabilities import decision, keys, receipts, spec, tokens
from capgate.capabilities.errors import CapabilityError
from capgate.sidecar.config import ConfigError, SecretRef, Settings

log = logging.getLogger("capgate.sidecar.credentials")

SESSION_KEY_REFRESH = timedelta(seconds=60)
"""Standalone: issue a new session key this long before the old one stops signing."""


@dataclass(frozen=True)
class Loaded:
    """One consistent generation of credential material."""

    credential: tokens.Credential
    session: receipts.SessionKey
    trust: keys.TrustBundle
    principal: str
    settings: Mapping[str, Any]

    @property
    def capability(self) -> spec.Capability:
        return self.credential.capability


class CredentialStore:
    """Holds the current :class:`Loaded` and the :class:`~decision.Verifier` for its trust bundle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current: Loaded | None = None
        self.error: str | None = None
        self.verifier: decision.Verifier | None = None
        self._keyset: keys.KeySet | None = None
        self._capability: spec.Capability | None = None
        self._signature: tuple[object, ...] | None = None
        self.generation = 0
        self.changed = asyncio.Event()
        """Set (and replaced) whenever a new generation is installed: lets tests and watchers await reloads."""

    # -- loading -------------------------------------------------------------------------------
    def load_initial(self) -> None:
        """Load at start; raises :class:`ConfigError` naming the setting when the material is unusable."""
        if self.settings.standalone:
            self._load_standalone_inputs()
            self._install(self._mint_standalone(datetime.now(UTC)))
        else:
            try:
                self._reload_dir()
            except (CapabilityError, OSError, ValueError) as exc:
                raise ConfigError("--credential-dir", _safe(exc)) from exc

    def _load_standalone_inputs(self) -> None:
        assert self.settings.capability is not None
        assert self.settings.root_key is not None
        try:
            cap = spec.load_capability_file(self.settings.capability)
        except (CapabilityError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError("--capability", _safe(exc)) from exc
        try:
            self._keyset = keys.KeySet.from_file(self.settings.root_key)
        except CapabilityError as exc:
            raise ConfigError("--root-key", _safe(exc)) from exc
        self._capability = replace(cap, namespace=self.settings.namespace or cap.namespace,
                                   service_account=self.settings.service_account or cap.service_account)

    def _mint_standalone(self, now: datetime) -> Loaded:
        assert self._keyset is not None
        assert self._capability is not None
        cap = self._capability
        trust = self._keyset.trust_bundle()
        try:
            token = tokens.mint(cap, self._keyset, now=now)
            credential = tokens.load(token, trust, now=now)
        except CapabilityError as exc:
            raise ConfigError("--capability", _safe(exc)) from exc
        session = receipts.SessionKey.issue(self._keyset, capability=cap.qualified_name, credential=credential.id,
                                            now=now, receipt_ttl=cap.receipt_ttl)
        return Loaded(credential=credential, session=session, trust=trust, principal=cap.principal, settings={})

    def _reload_dir(self) -> None:
        folder = self.settings.credential_dir
        assert folder is not None
        trust = keys.TrustBundle.from_file(folder / resources.TRUST_BUNDLE_FILE)
        token = (folder / resources.TOKEN_FILE).read_text(encoding="utf-8").strip()
        session = receipts.SessionKey.from_json((folder / resources.SESSION_KEY_FILE).read_bytes())
        settings_path = folder / resources.SETTINGS_FILE
        extra: Any = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.exists() else {}
        if not isinstance(extra, dict):
            raise ValueError(f"{resources.SETTINGS_FILE} must hold a JSON object")
        credential = tokens.load(token, trust)
        cap = credential.capability
        namespace = self.settings.namespace or str(extra.get("namespace") or cap.namespace)
        account = self.settings.service_account or str(extra.get("serviceAccount") or cap.service_account)
        self._install(Loaded(credential=credential, session=session, trust=trust,
                             principal=f"{namespace}/{account}", settings=extra))

    def _install(self, loaded: Loaded) -> None:
        if self.verifier is None:
            self.verifier = decision.Verifier(loaded.trust)
        elif self.current is None or loaded.trust != self.current.trust:
            self.verifier.replace_trust(loaded.trust)
        self.current = loaded
        self.error = None
        self.generation += 1
        self.changed.set()
        self.changed = asyncio.Event()
        log.info("credential loaded: capability=%s id=%s… expires=%s session_key=%s",
                 loaded.capability.qualified_name, loaded.credential.id[:16],
                 loaded.credential.expires_at.isoformat(), loaded.session.key_id)
        self._warn_cleartext(loaded.capability)

    def _warn_cleartext(self, cap: spec.Capability) -> None:
        """Say so whenever an injected credential will cross the network unencrypted.

        The capability can only do it with ``inject.allowInsecureTransport``; ``--upstream-url`` is
        the sidecar operator's own setting (local development against loopback mocks), never set by
        the webhook nor reachable by the agent, so it is warned about rather than refused.
        """
        for upstream in cap.upstreams:
            url = self.settings.upstream_urls.get(upstream.name, upstream.url)
            if upstream.inject is not None and urlsplit(url).scheme == "http":
                why = "inject.allowInsecureTransport" if upstream.injects_in_cleartext else "--upstream-url"
                log.warning("upstream %r: its credential is injected over cleartext http:// (%s)", upstream.name, why)

    # -- refreshing ----------------------------------------------------------------------------
    def _dir_signature(self) -> tuple[object, ...]:
        folder = self.settings.credential_dir
        assert folder is not None
        out: list[object] = []
        for name in (resources.TOKEN_FILE, resources.SESSION_KEY_FILE, resources.TRUST_BUNDLE_FILE,
                     resources.SETTINGS_FILE):
            try:
                st = os.stat(folder / name)
            except OSError:
                out.append(None)
                continue
            out.append((st.st_mtime_ns, st.st_ino, st.st_size))
        return tuple(out)

    def refresh(self, now: datetime | None = None) -> None:
        """One poll: re-read a changed directory, or re-mint what is about to expire (standalone)."""
        moment = now or datetime.now(UTC)
        if self.settings.standalone:
            current = self.current
            if current is None or (current.session.not_after - moment < SESSION_KEY_REFRESH
                                   or current.credential.expires_at - moment < current.capability.rotate_before):
                self._install(self._mint_standalone(moment))
            return
        signature = self._dir_signature()
        if signature == self._signature:
            return
        try:
            self._reload_dir()
            self._signature = signature
        except (CapabilityError, OSError, ValueError) as exc:
            self.error = _safe(exc)
            log.warning("credential reload failed, keeping the previous one: %s", self.error)

    async def run(self, interval: float) -> None:
        """Poll forever (cancelled at shutdown); file reads and minting are small and bounded."""
        if not self.settings.standalone:
            self._signature = self._dir_signature()
        while True:
            await asyncio.sleep(interval)
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - any failure here fails closed and is logged
                log.warning("credential refresh failed: %s", _safe(exc))

    def ready(self, now: datetime | None = None) -> tuple[bool, str]:
        """Ready = a credential is loaded and not expired (what /readyz reports)."""
        current = self.current
        if current is None:
            return False, self.error or "no credential loaded"
        if (now or datetime.now(UTC)) > current.credential.expires_at:
            return False, "credential expired"
        return True, "ok"


class UpstreamSecrets:
    """Resolves the value injected for an upstream; values stay in memory, never in logs."""

    def __init__(self, refs: Mapping[str, SecretRef], directory: Path | None,
                 env: Mapping[str, str] | None = None) -> None:
        self.refs = dict(refs)
        self.directory = directory
        self.env = dict(os.environ if env is None else env)
        self._file_cache: dict[Path, tuple[tuple[int, int], str]] = {}

    def check(self) -> None:
        """Fail at start on references that cannot resolve (a missing variable, unreadable file)."""
        for name in self.refs:
            if self.get(name) is None:
                raise ConfigError("--upstream-credential", f"{name}: the referenced value is missing or empty")

    def get(self, upstream: str) -> str | None:
        ref = self.refs.get(upstream)
        if ref is not None:
            raw = self.env.get(ref.where) if ref.kind == "env" else self._read(Path(ref.where))
        elif self.directory is not None:
            raw = self._read(self.directory / upstream)
        else:
            return None
        value = (raw or "").strip()
        if not value or any(c in value for c in "\r\n\0"):
            return None
        return value

    def _read(self, path: Path) -> str | None:
        """Re-read a file when it changes (Secret rotation), cached by stat so requests stay cheap."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_ino)
        cached = self._file_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        self._file_cache[path] = (stamp, value)
        return value


def _safe(exc: BaseException) -> str:
    """An error message fit for logs: core errors never carry secrets; others only show their type."""
    if isinstance(exc, CapabilityError | ConfigError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or type(exc).__name__}".strip(": ")
    return type(exc).__name__
