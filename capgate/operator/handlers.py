"""kopf handlers for AgentCapability: mint, rotate, revoke; and the operator's start-up.

Every handler is a thin adapter over one idempotent :func:`reconcile`: read the credential
Secret, ask :mod:`capgate.operator.minting` what must change, write the Secret in one update,
push revocations, patch status. Create, update, resume (after an operator restart) and the
rotation timer all call it, so a crash at any point is repaired by the next call, and a
per-object lock keeps a timer tick and a spec change from minting twice.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio.client.exceptions import ApiException

from capgate import resources, revocation, timestamps, usage
from capgate.capabilities import compiler, keys, spec
from capgate.capabilities.errors import CapabilityError, SpecError
from capgate.capabilities.spec import Capability
from capgate.operator import certificates, manifests, minting
from capgate.operator.config import OperatorConfig
from capgate.operator.kube import Kube, connect
from capgate.operator.metrics import OperatorMetrics, ReadyFlag, serve

ROOT_KEY_FILE = "keyset.json"
KEYSET_CACHE = timedelta(seconds=5)
"""How stale the operator's view of the root key Secret may be (``capgate keys rotate --cluster``)."""
WEBHOOK_TLS_SECRET = "capgate-webhook-tls"
CAPABILITY = (resources.GROUP, resources.VERSION, resources.CAPABILITY_PLURAL)
USAGE = (resources.GROUP, resources.VERSION, resources.USAGE_PLURAL)


@dataclass
class Context:
    """Operator-wide state, created at start-up and shared through kopf's memo."""

    config: OperatorConfig
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    ready: ReadyFlag = field(default_factory=ReadyFlag)
    kube: Kube | None = None
    keyset_cache: tuple[datetime, keys.KeySet] | None = None
    usage: dict[tuple[str, str], object] = field(default_factory=dict)
    """The last status seen of each AgentCapabilityUsage, by (namespace, name), from the watch."""

    def client(self) -> Kube:
        if self.kube is None:
            raise kopf.TemporaryError("operator not started yet", delay=1)
        return self.kube

    async def keyset(self) -> keys.KeySet:
        now = datetime.now(UTC)
        if self.keyset_cache and now - self.keyset_cache[0] < KEYSET_CACHE:
            return self.keyset_cache[1]
        keyset = await ensure_root_keys(self.client(), self.config.namespace)
        self.keyset_cache = (now, keyset.prune(now))
        return self.keyset_cache[1]


def context(memo: Any) -> Context:
    ctx = memo.get("capgate")
    if not isinstance(ctx, Context):
        raise kopf.PermanentError("operator started without its context")
    return ctx


async def ensure_root_keys(kube: Kube, namespace: str) -> keys.KeySet:
    """The root key set, created on first start (a race between replicas keeps the first one)."""
    stored = await kube.create_secret_if_absent(namespace, resources.ROOT_KEY_SECRET,
                                                {ROOT_KEY_FILE: keys.KeySet.generate().to_json().encode()})
    return keys.KeySet.from_json(stored[ROOT_KEY_FILE])


# ---------------------------------------------------------------------------------------- start-up

@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ctx = context(memo)
    settings.persistence.finalizer = f"{resources.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=resources.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=resources.GROUP, key="last-handled-configuration")
    # kopf would post each of its own log lines as an Event (one API write each); our Events are posted
    # explicitly (kopf.info/warn), so only warnings and errors of the framework become Events.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    ctx.kube = Kube(await connect(ctx.config.kubeconfig))
    kube = ctx.client()
    await ctx.keyset()
    now = datetime.now(UTC)
    await kube.update_revocation_list(lambda spec: revocation.pruned(spec, now))
    await kube.apply_cluster_role(manifests.revocation_reader_role())
    ca_path, cert_path, key_path, ca_pem = await webhook_certificate(ctx)
    settings.admission.server = kopf.WebhookServer(
        addr=ctx.config.webhook_listen_host, port=ctx.config.webhook_port, certfile=str(cert_path),
        pkeyfile=str(key_path), cafile=str(ca_path))
    settings.admission.managed = None  # we keep our own configurations: short timeout, namespace exclusion
    if ctx.config.webhook_configs == "create":
        mutating, validating = manifests.webhook_configurations(
            ca_pem, url=ctx.config.webhook_url, service=ctx.config.webhook_service, namespace=ctx.config.namespace)
        await kube.apply_webhook_configs(mutating, validating)
    elif ctx.config.webhook_configs == "patch-ca":
        await kube.patch_webhook_ca(manifests.MUTATING_CONFIG, manifests.VALIDATING_CONFIG, ca_pem)
    ctx.ready.webhook = ("127.0.0.1" if ctx.config.webhook_listen_host in ("0.0.0.0", "") else
                         ctx.config.webhook_listen_host, ctx.config.webhook_port)
    await serve(ctx.metrics, ctx.config.metrics_host, ctx.config.metrics_port, ctx.ready)
    ctx.ready.ready = True
    logger.info("capgate operator ready: namespace %s, webhooks on port %d", ctx.config.namespace,
                ctx.config.webhook_port)


def webhook_hosts(config: OperatorConfig) -> list[str]:
    hosts = ["127.0.0.1", "localhost"]
    if config.webhook_service:
        base = f"{config.webhook_service}.{config.namespace}"
        hosts = [f"{base}.svc", base, f"{base}.svc.cluster.local", *hosts]
    return hosts


async def webhook_certificate(ctx: Context) -> tuple[Path, Path, Path, bytes]:
    """(ca, cert, key, ca PEM): mounted files when given (cert-manager), else the operator's own CA."""
    given = Path(ctx.config.webhook_cert_dir) if ctx.config.webhook_cert_dir else None
    if given is not None and (given / "tls.crt").exists() and (given / "tls.key").exists():
        ca_path = given / "ca.crt"
        return ca_path, given / "tls.crt", given / "tls.key", ca_path.read_bytes() if ca_path.exists() else b""
    tls = await ensure_webhook_tls(ctx)
    ca_path, cert_path, key_path = tls.write(given or Path(tempfile.mkdtemp(prefix="capgate-webhook-")))
    return ca_path, cert_path, key_path, tls.ca_pem


async def ensure_webhook_tls(ctx: Context) -> certificates.WebhookTLS:
    kube = ctx.client()
    hosts = webhook_hosts(ctx.config)
    data = await kube.read_secret(ctx.config.namespace, WEBHOOK_TLS_SECRET)
    tls = certificates.from_secret_data(data) if data else None
    if tls is not None and not tls.needs_renewal(hosts, datetime.now(UTC)):
        return tls
    tls = certificates.issue(hosts, tls.ca_pem if tls else None, tls.ca_key_pem if tls else None)
    await kube.write_secret(ctx.config.namespace, WEBHOOK_TLS_SECRET, tls.as_secret_data())
    return tls


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    ctx = context(memo)
    if ctx.kube is not None:
        await ctx.kube.api.close()


# ---------------------------------------------------------------------------------------- AgentCapability

def owner_reference(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": resources.API_VERSION, "kind": resources.CAPABILITY_KIND, "name": body.meta.name,
            "uid": body.meta.uid, "controller": True, "blockOwnerDeletion": True}


def condition(status: kopf.Status, ready: bool, reason: str, message: str, generation: int,
              kind: str = "Ready") -> list[dict[str, Any]]:
    """A condition (Ready by default), keeping lastTransitionTime while the status value does not change."""
    now = timestamps.iso(datetime.now(UTC))
    value = "True" if ready else "False"
    previous = next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == value else now
    return [{"type": kind, "status": value, "reason": reason, "message": message[:1024],
             "lastTransitionTime": since, "observedGeneration": generation}]


INSECURE_INJECTION = "InsecureInjection"


def insecure_injection(cap: Capability, status: kopf.Status, generation: int) -> dict[str, Any] | None:
    """The InsecureInjection condition while some upstream injects its credential over ``http://``.

    ``inject.allowInsecureTransport`` is an explicit opt-in, yet the key then crosses the pod and
    cluster network readable by anyone who can capture it, so the status keeps saying so (like
    cert-manager's conditions, present while the state lasts) instead of a one-off log line.
    """
    names = cap.cleartext_injections
    if not names:
        return None
    message = (f"upstream(s) {', '.join(names)} inject a credential over cleartext http:// "
               "(inject.allowInsecureTransport: true): anyone who can capture the traffic can read it; "
               "use https:// upstreams")
    previous = next((c for c in status.get("conditions") or [] if c.get("type") == INSECURE_INJECTION), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == "True" else \
        timestamps.iso(datetime.now(UTC))
    return {"type": INSECURE_INJECTION, "status": "True", "reason": "AllowInsecureTransport",
            "message": message[:1024], "lastTransitionTime": since, "observedGeneration": generation}


def _report_insecure_injection(cap: Capability, body: kopf.Body, status: kopf.Status, patch: kopf.Patch,
                               generation: int) -> None:
    found = insecure_injection(cap, status, generation)
    if found is None:
        return
    patch.status["conditions"] = [*patch.status.get("conditions", []), found]
    previous = next((c for c in status.get("conditions") or [] if c.get("type") == INSECURE_INJECTION), None)
    if previous is None or previous.get("message") != found["message"]:
        kopf.warn(body, reason=INSECURE_INJECTION, message=found["message"])


def mediated(cap: Capability, status: kopf.Status, generation: int) -> list[dict[str, Any]]:
    """Whether injected pods' egress is captured: an operator must see that cooperative pods are not."""
    if cap.egress_mode == "enforce":
        return condition(status, True, "Enforced", "capgate-init redirects every TCP connection of the pod "
                         "to the sidecar and drops all other egress", generation, kind=resources.MEDIATED_CONDITION)
    return condition(status, False, "Cooperative", "spec.egress.mode is cooperative: pods are NOT mediated; an "
                     "agent that ignores HTTP_PROXY reaches the network directly (only keys stay out of reach)",
                     generation, kind=resources.MEDIATED_CONDITION)


def _lock(memo: Any) -> asyncio.Lock:
    lock = memo.get("lock")
    if lock is None:
        lock = memo["lock"] = asyncio.Lock()
    return lock  # type: ignore[no-any-return]


@kopf.on.resume(*CAPABILITY)
@kopf.on.create(*CAPABILITY)
@kopf.on.update(*CAPABILITY, field="spec")
async def on_change(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                    logger: kopf.Logger, **_: Any) -> None:
    async with _lock(memo):
        await reconcile(body, status, patch, memo, logger)


@kopf.on.event(*USAGE)
async def on_usage_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Remember each usage object's status as the watch delivers it (no API request, no write)."""
    obj = event.get("object") or {}
    meta = obj.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    if event.get("type") == "DELETED":
        context(memo).usage.pop(key, None)
    else:
        context(memo).usage[key] = obj.get("status") or {}


def usage_summary(cap: Capability, stored: object, now: float) -> resources.CapabilityUsageSummary | None:
    """``status.usage`` from a usage object's status (the same table ``capgate usage`` prints);
    None when the capability meters nothing or the stored state is malformed."""
    try:
        rows = usage.table(cap, stored, now)
    except usage.UsageError:
        return None
    if not rows:
        return None
    return {"summary": usage.summary(rows),
            "meters": [{"meter": r.meter.key, "label": r.meter.label, "windowStart": r.start, "spent": r.spent,
                        "max": r.meter.max, "remaining": r.remaining} for r in rows]}


def _report_usage(ctx: Context, body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo) -> None:
    """Keep ``status.usage`` (the Budget printer column) fresh from the watched usage object: written
    only when it changed, so at most one status patch per capability per tick while it is being spent."""
    generation = int(body.meta.get("generation") or 1)
    cached = memo.get("usage_spec")
    if cached is None or cached[0] != generation:
        try:
            cached = (generation, spec.parse_capability(body))
        except SpecError:
            cached = (generation, None)
        memo["usage_spec"] = cached
    cap = cached[1]
    stored = ctx.usage.get((str(body.meta.namespace), str(body.meta.name)))
    if cap is None or stored is None:
        return
    summary = usage_summary(cap, stored, time.time())
    if summary is not None and status.get("usage") != summary:
        patch.status["usage"] = summary


@kopf.timer(*CAPABILITY, interval=5.0, initial_delay=1.0)
async def on_tick(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                  logger: kopf.Logger, **_: Any) -> None:
    """Rotation and session keys: cheap when nothing is due (an in-memory deadline check); and the
    spending summary, from the usage objects' watch."""
    _report_usage(context(memo), body, status, patch, memo)
    due = memo.get("next_check")
    root_changed = memo.get("root_key_id") != (await context(memo).keyset()).active_id
    if due is not None and datetime.now(UTC) < due and not root_changed:
        return
    async with _lock(memo):
        await reconcile(body, status, patch, memo, logger)


async def reconcile(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                    logger: kopf.Logger) -> None:
    ctx = context(memo)
    generation = int(body.meta.get("generation") or 1)
    try:
        cap = compiler.validate_object(body)
    except SpecError as exc:
        ctx.metrics.reconcile_errors.labels("invalid_spec").inc()
        patch.status["conditions"] = condition(status, False, "InvalidSpec", str(exc), generation)
        patch.status["observedGeneration"] = generation
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        memo["next_check"] = datetime.now(UTC) + timedelta(minutes=5)
        raise kopf.PermanentError(str(exc)) from exc
    try:
        await _reconcile_valid(ctx, cap, body, status, patch, memo, generation, logger)
    except ApiException as exc:
        ctx.metrics.reconcile_errors.labels("api").inc()
        kopf.warn(body, reason="ReconcileFailed", message=f"Kubernetes API error {exc.status}: {exc.reason}")
        raise kopf.TemporaryError(f"Kubernetes API error {exc.status}", delay=2) from exc
    except CapabilityError as exc:
        ctx.metrics.reconcile_errors.labels("mint").inc()
        patch.status["conditions"] = condition(status, False, "MintFailed", str(exc), generation)
        kopf.warn(body, reason="MintFailed", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=10) from exc


async def _reconcile_valid(ctx: Context, cap: Capability, body: kopf.Body, status: kopf.Status, patch: kopf.Patch,
                           memo: kopf.Memo, generation: int, logger: kopf.Logger) -> None:
    kube = ctx.client()
    now = datetime.now(UTC)
    name = minting.secret_name(cap.name)
    stored = minting.Stored.read(await kube.read_secret(cap.namespace, name))
    if cap.revoked:
        await _revoke(ctx, cap, stored, "revoked", body, status, patch, generation)
        memo["next_check"] = now + timedelta(seconds=30)
        return
    keyset = await ctx.keyset()
    plan = minting.plan(cap, generation, stored, keyset.active_id, now, ctx.config.session_key_renew_before)
    if plan.mint or plan.new_session_key or stored.pending:
        minted = minting.build(cap, generation, stored, plan, keyset, now, ctx.config.session_key_lifetime)
        await kube.write_secret(cap.namespace, name, minted.data, owner=owner_reference(body))
        if minted.pending:
            await kube.update_revocation_list(lambda spec: revocation.with_revoked(spec, minted.pending, now))
            await kube.write_secret(cap.namespace, name, minting.without_pending(minted.data),
                                    owner=owner_reference(body))
            ctx.metrics.revoked.labels("spec_changed").inc(len(minted.pending))
            kopf.info(body, reason="Revoked", message=f"revoked {len(minted.pending)} id(s) of the previous credential")
        if plan.new_session_key:
            ctx.metrics.session_keys.inc()
        if plan.mint:
            ctx.metrics.minted.labels(plan.mint).inc()
            kopf.info(body, reason=plan.mint,
                      message=f"credential {minted.credential_id[:16]}… valid until "
                              f"{timestamps.iso(minted.expires_at)}, in Secret {name}")
            logger.info("minted credential %s… for %s (%s)", minted.credential_id[:16], cap.qualified_name,
                        plan.mint)
        stored = minting.Stored.read(minted.data)
    if _access_due(memo, "rbac", cap.service_account, now):
        await kube.apply_cluster_role_binding(manifests.revocation_reader_binding(cap.namespace, cap.service_account))
        memo["rbac"] = (cap.service_account, now)
    await _ensure_usage(kube, cap, body, memo, now)
    _set_ready(cap, stored, status, patch, generation, name, plan.mint or "Current")
    _report_insecure_injection(cap, body, status, patch, generation)
    memo["next_check"] = _next_check(cap, stored, now, ctx.config.session_key_renew_before)
    memo["root_key_id"] = keyset.active_id


async def _ensure_usage(kube: Kube, cap: Capability, body: kopf.Body, memo: kopf.Memo, now: datetime) -> None:
    """The fleet-wide usage object and its sidecars' access to it (DESIGN.md, "Fleet-wide state").

    Created before the capability reports Ready, so no sidecar of it starts without a place to lease from.
    The Role and RoleBinding are redone when the ServiceAccount changes and every :data:`ACCESS_REFRESH`;
    the object itself is never rewritten (it keeps the spending).
    """
    owner = owner_reference(body)
    await kube.create_usage_if_absent(manifests.usage_object(cap.name, cap.namespace, owner))  # a reset recreates it
    if not _access_due(memo, "usage", cap.service_account, now):
        return
    await kube.apply_role(manifests.usage_role(cap.name, cap.namespace, owner))
    await kube.apply_role_binding(manifests.usage_role_binding(cap.name, cap.namespace, cap.service_account, owner))
    memo["usage"] = (cap.service_account, now)


ACCESS_REFRESH = timedelta(minutes=5)
"""How often the sidecars' bindings (the RevocationList reader, the usage Role) are applied again
although this process applied them already: one deleted by hand is back within this (plus a
:data:`RECHECK`), not only after an operator restart. Meanwhile its sidecars fail closed (lockdown,
``usage_unavailable``); an unchanged object costs the API server no etcd write."""


def _access_due(memo: kopf.Memo, key: str, account: str, now: datetime) -> bool:
    """Apply ``key``'s bindings now: never applied by this process, for another ServiceAccount, or stale
    (the caller notes ``(account, now)`` once they are applied, so a failed apply is retried next time)."""
    applied = memo.get(key)
    return applied is None or applied[0] != account or now - applied[1] >= ACCESS_REFRESH


def _set_ready(cap: Capability, stored: minting.Stored, status: kopf.Status, patch: kopf.Patch, generation: int,
               secret: str, reason: str) -> None:
    expires = timestamps.iso(stored.expires_at) if stored.expires_at else ""
    patch.status.update({
        "conditions": condition(status, True, "Issued" if reason == "Current" else reason,
                                f"credential valid until {expires}", generation) + mediated(cap, status, generation),
        "observedGeneration": generation,
        "credentialSecret": secret,
        "issuedAt": timestamps.iso(stored.issued_at) if stored.issued_at else None,
        "expiresAt": expires or None,
        "revocationIds": list(stored.revocation_ids),
        "upstreams": len(cap.upstreams),
        "rules": len(cap.rules),
    })


RECHECK = timedelta(seconds=30)
"""The longest a capability goes unreconciled: what bounds repairing a deleted or edited credential
Secret. (Watching Secrets instead would need list/watch on every Secret in the cluster.)"""


def _next_check(cap: Capability, stored: minting.Stored, now: datetime, renew_before: timedelta) -> datetime:
    candidates = [now + RECHECK]
    rotation = minting.rotate_at(cap, stored)
    if rotation is not None:
        candidates.append(rotation)
    if stored.session is not None:
        candidates.append(stored.session.not_after - renew_before)
    return min(candidates)


async def _revoke(ctx: Context, cap: Capability, stored: minting.Stored, reason: str, body: kopf.Body,
                  status: kopf.Status, patch: kopf.Patch | None, generation: int) -> None:
    now = datetime.now(UTC)
    expires = stored.expires_at or now + cap.credential_ttl
    entries = [revocation.Entry(id=rid, expires_at=expires, capability=cap.qualified_name, reason=reason)
               for rid in stored.revocation_ids]
    entries.extend(stored.pending)
    # Rotated-out credentials still verify, and a pod presents one until the kubelet syncs its volume.
    entries.extend(replace(e, reason=reason) for e in minting.still_valid(stored.retired, now))
    if entries:
        await ctx.client().update_revocation_list(lambda spec: revocation.with_revoked(spec, entries, now))
    already = any(c.get("reason") == "Revoked" for c in status.get("conditions") or [])
    if not already:
        ctx.metrics.revoked.labels(reason).inc(len(entries))
        kopf.info(body, reason="Revoked", message=f"{len(entries)} revocation id(s) pushed to the RevocationList")
    if patch is not None:
        patch.status.update({
            "conditions": condition(status, False, "Revoked", f"credential {reason}; all its tokens are refused",
                                    generation) + mediated(cap, status, generation),
            "observedGeneration": generation,
        })


@kopf.on.delete(*CAPABILITY)
async def on_delete(body: kopf.Body, status: kopf.Status, memo: kopf.Memo, **_: Any) -> None:
    """Revoke before the object (and, through its owner reference, the Secret) goes away."""
    ctx = context(memo)
    name = str(body.meta.name)
    namespace = str(body.meta.namespace)
    stored = minting.Stored.read(await ctx.client().read_secret(namespace, minting.secret_name(name)))
    try:
        cap = compiler.validate_object(body)
    except SpecError:
        return  # never minted: nothing to revoke
    async with _lock(memo):
        await _revoke(ctx, cap, stored, "deleted", body, status, None, int(body.meta.get("generation") or 1))
    await _release_binding(ctx, cap)


async def _release_binding(ctx: Context, cap: Capability) -> None:
    """Drop the RevocationList read binding once no other capability in the namespace uses the account."""
    listing = await ctx.client().custom.list_namespaced_custom_object(*CAPABILITY[:2], cap.namespace, CAPABILITY[2])
    others = [item for item in listing.get("items", [])
              if item["metadata"]["name"] != cap.name and not item["metadata"].get("deletionTimestamp")
              and (item.get("spec") or {}).get("serviceAccountName") == cap.service_account]
    if not others:
        await ctx.client().delete_cluster_role_binding(
            manifests.revocation_reader_binding_name(cap.namespace, cap.service_account))

