"""Admission webhooks (served by kopf): validate AgentCapabilities, inject the sidecar into pods.

The mutating webhook answers from kopf's in-memory index of capabilities, not from an API call,
so admission stays in the low milliseconds and keeps working while the API server is busy. Both
webhooks fail closed: an unknown, invalid or revoked capability, or a pod the pure
:mod:`capgate.injection` refuses, is rejected with a message that names what to fix.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import kopf

from capgate import injection, resources
from capgate.capabilities import compiler
from capgate.capabilities.errors import SpecError
from capgate.capabilities.spec import Capability
from capgate.operator import manifests, minting
from capgate.operator.handlers import CAPABILITY, context


# The handlers here are async although they never await: they are pure CPU work of about a millisecond,
# and a sync handler would cost a thread-pool round trip per call (kopf runs those in an executor).
@kopf.index(*CAPABILITY)
async def capabilities_by_name(body: kopf.Body, namespace: str | None, name: str | None,
                               **_: Any) -> dict[tuple[str, str], Capability | str]:
    """(namespace, name) → the parsed capability, or why it does not parse."""
    try:
        value: Capability | str = compiler.validate_object(body)
    except SpecError as exc:
        value = str(exc)
    return {(str(namespace), str(name)): value}


@kopf.on.validate(*CAPABILITY, id=manifests.VALIDATE_HANDLER)
async def validate_capability(body: kopf.Body, memo: Any, old: kopf.Body | None = None,
                              operation: str | None = None, **_: Any) -> None:
    started = time.perf_counter()
    outcome = "allowed"
    try:
        if operation == "DELETE" or body.meta.get("deletionTimestamp"):
            return
        if operation == "UPDATE" and old is not None and old.get("spec") == body.get("spec"):
            return  # metadata-only updates (finalizers, annotations) must never be blocked
        try:
            compiler.validate_object(body)
        except SpecError as exc:
            outcome = "rejected"
            raise kopf.AdmissionError(str(exc), code=422) from exc
    finally:
        context(memo).metrics.webhook_seconds.labels("validate", outcome).observe(time.perf_counter() - started)


@kopf.on.mutate("", "v1", "pods", id=manifests.INJECT_HANDLER, operation="CREATE",
                labels={resources.CAPABILITY_LABEL: kopf.PRESENT})
async def inject_sidecar(body: kopf.Body, patch: kopf.Patch, memo: Any,
                         capabilities_by_name: kopf.Index[tuple[str, str], Capability | str] | None = None,
                         **_: Any) -> None:
    started = time.perf_counter()
    outcome = "rejected"
    ctx = context(memo)
    try:
        pod = dict(body)
        if capabilities_by_name is None:
            raise kopf.AdmissionError("capability index unavailable", code=503)
        cap = _capability_for(pod, capabilities_by_name)
        try:
            mutated = injection.mutated(pod, cap, ctx.config.sidecar, credential_secret=minting.secret_name(cap.name),
                                        namespace=cap.namespace)
        except injection.InjectionError as exc:
            raise kopf.AdmissionError(str(exc), code=403) from exc
        patch.fns.append(_replace_with(mutated))
        outcome = "injected"
    finally:
        ctx.metrics.webhook_seconds.labels("inject", outcome).observe(time.perf_counter() - started)


def _capability_for(pod: dict[str, Any], index: kopf.Index[tuple[str, str], Capability | str]) -> Capability:
    metadata = pod.get("metadata") or {}
    name = (metadata.get("labels") or {}).get(resources.CAPABILITY_LABEL, "")
    namespace = metadata.get("namespace")
    if not namespace:
        raise kopf.AdmissionError("the pod has no namespace; capgate cannot find its AgentCapability", code=400)
    found = list(index.get((namespace, name), ()))
    if not found:
        raise kopf.AdmissionError(
            f"AgentCapability {namespace}/{name} (label {resources.CAPABILITY_LABEL}) does not exist; create it "
            f"first (kubectl get {resources.CAPABILITY_SHORT_NAME} -n {namespace})", code=403)
    value = found[0]
    if isinstance(value, str):
        raise kopf.AdmissionError(f"AgentCapability {namespace}/{name} is invalid: {value}", code=403)
    if value.revoked:
        raise kopf.AdmissionError(f"AgentCapability {namespace}/{name} is revoked (spec.revoked: true)", code=403)
    return value


def _replace_with(target: dict[str, Any]) -> Any:
    """A kopf patch function: kopf diffs the result into the JSONPatch the API server applies."""

    def apply(body: Any) -> None:
        body.clear()
        body.update(copy.deepcopy(target))

    return apply


@kopf.on.validate("", "v1", "pods", id=manifests.GUARD_HANDLER, subresource="ephemeralcontainers",
                  labels={resources.CAPABILITY_LABEL: kopf.PRESENT})
async def guard_ephemeral_containers(body: kopf.Body, memo: Any,
                                     capabilities_by_name: kopf.Index[tuple[str, str], Capability | str] | None = None,
                                     **_: Any) -> None:
    """An ephemeral container may debug the agent, never read or attach to the sidecar."""
    started = time.perf_counter()
    outcome = "rejected"
    ctx = context(memo)
    try:
        if capabilities_by_name is None:
            raise kopf.AdmissionError("capability index unavailable", code=503)
        pod = dict(body)
        cap = _capability_for(pod, capabilities_by_name)
        try:
            injection.validate(pod, cap, ctx.config.sidecar, credential_secret=minting.secret_name(cap.name),
                               namespace=cap.namespace)
        except injection.InjectionError as exc:
            raise kopf.AdmissionError(str(exc), code=403) from exc
        outcome = "allowed"
    finally:
        ctx.metrics.webhook_seconds.labels("ephemeral", outcome).observe(time.perf_counter() - started)

