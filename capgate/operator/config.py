"""Operator settings, read once at start from flags and ``CAPGATE_*`` environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, cast

from capgate.capabilities.errors import SpecError
from capgate.capabilities.spec import format_duration, parse_duration
from capgate.injection import SidecarSettings
from capgate.operator.minting import SESSION_KEY_LIFETIME, SESSION_KEY_RENEW_BEFORE

WebhookConfigs = Literal["create", "patch-ca", "none"]


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str = "capgate-system"
    """Where the root key, the webhook certificate and the operator itself live (never injected)."""
    kubeconfig: str | None = None
    webhook_listen_host: str = "0.0.0.0"
    webhook_port: int = 9443
    webhook_url: str | None = None
    """Development: the API server calls the webhooks at this URL (e.g. https://127.0.0.1:9443)."""
    webhook_service: str | None = None
    """In a cluster: the Service in front of the operator's webhook port."""
    webhook_cert_dir: str | None = None
    """Serving certificate from here (tls.crt, tls.key, ca.crt: e.g. cert-manager); else the operator's own CA."""
    webhook_configs: WebhookConfigs = "create"
    """create: the operator writes both webhook configurations (development); patch-ca: they come from the
    Helm chart and the operator only fills in caBundle; none: someone else (cert-manager's cainjector) does."""
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8080
    timer_interval: float = 5.0
    session_key_lifetime: timedelta = SESSION_KEY_LIFETIME
    """How long a receipt-signing session key signs (its endorsement lasts a receipt TTL longer)."""
    session_key_renew_before: timedelta = SESSION_KEY_RENEW_BEFORE
    """A new session key is written this long before the current one stops signing: more than the
    kubelet's Secret volume sync (60-90 s), or receipts go unsigned until the pod sees the new key."""
    root_key_overlap: timedelta = timedelta(days=31)
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CAPGATE_{name}", default)


def parse(argv: Sequence[str] | None = None) -> OperatorConfig:
    parser = argparse.ArgumentParser(prog="capgate-operator", description="The capgate Kubernetes operator.")
    parser.add_argument("--namespace", default=_env("OPERATOR_NAMESPACE", "capgate-system"))
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--webhook-listen", default=_env("WEBHOOK_LISTEN", "0.0.0.0:9443"))
    parser.add_argument("--webhook-url", default=_env("WEBHOOK_URL"))
    parser.add_argument("--webhook-service", default=_env("WEBHOOK_SERVICE"))
    parser.add_argument("--webhook-cert-dir", default=_env("WEBHOOK_CERT_DIR"))
    parser.add_argument("--webhook-configs", choices=("create", "patch-ca", "none"),
                        default=_env("WEBHOOK_CONFIGS", "create"))
    parser.add_argument("--metrics-listen", default=_env("METRICS_LISTEN", "0.0.0.0:8080"))
    parser.add_argument("--timer-interval", type=float, default=float(_env("TIMER_INTERVAL", "5") or 5))
    parser.add_argument("--sidecar-image", default=_env("SIDECAR_IMAGE", SidecarSettings.image))
    parser.add_argument("--sidecar-image-pull-policy", default=_env("SIDECAR_IMAGE_PULL_POLICY", "IfNotPresent"))
    parser.add_argument("--session-key-lifetime", default=_env("SESSION_KEY_LIFETIME",
                                                               format_duration(SESSION_KEY_LIFETIME)),
                        help="how long a receipt-signing session key signs, e.g. 5m")
    parser.add_argument("--session-key-renew-before", default=_env("SESSION_KEY_RENEW_BEFORE",
                                                                   format_duration(SESSION_KEY_RENEW_BEFORE)),
                        help="write its successor this long before it stops signing (> the kubelet's "
                             "Secret sync, 60-90 s), e.g. 150s")
    args = parser.parse_args(argv)
    try:
        lifetime = parse_duration(args.session_key_lifetime, "--session-key-lifetime")
        renew_before = parse_duration(args.session_key_renew_before, "--session-key-renew-before")
    except SpecError as exc:
        parser.error(str(exc))
    if not timedelta(0) < renew_before < lifetime:
        parser.error("--session-key-renew-before must be above 0s and below --session-key-lifetime (else "
                     "keys are renewed only once expired, or on every reconcile)")
    if not args.webhook_url and not args.webhook_service:
        parser.error("one of --webhook-url (development) or --webhook-service (in a cluster) is required")
    host, _, port = str(args.webhook_listen).rpartition(":")
    metrics_host, _, metrics_port = str(args.metrics_listen).rpartition(":")
    if not port.isdigit() or not metrics_port.isdigit():
        parser.error("--webhook-listen and --metrics-listen take HOST:PORT")
    return OperatorConfig(
        namespace=args.namespace,
        kubeconfig=args.kubeconfig,
        webhook_listen_host=host or "0.0.0.0",
        webhook_port=int(port),
        webhook_url=args.webhook_url,
        webhook_service=args.webhook_service,
        webhook_cert_dir=args.webhook_cert_dir,
        webhook_configs=cast(WebhookConfigs, args.webhook_configs),
        metrics_host=metrics_host or "0.0.0.0",
        metrics_port=int(metrics_port),
        timer_interval=args.timer_interval,
        session_key_lifetime=lifetime,
        session_key_renew_before=renew_before,
        sidecar=_sidecar_settings(args.sidecar_image, args.sidecar_image_pull_policy),
    )


def _sidecar_settings(image: str, pull_policy: str) -> SidecarSettings:
    """Sidecar defaults from the chart (``CAPGATE_SIDECAR_*``); unset values keep the built-in defaults."""
    defaults = SidecarSettings()
    ports = {}
    for name in ("listen_port", "admin_port"):
        value = _env(f"SIDECAR_{name.upper()}")
        if value is not None:
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise SystemExit(f"capgate-operator: CAPGATE_SIDECAR_{name.upper()} must be a port number")
            ports[name] = int(value)
    resources = {name: _env(f"SIDECAR_{name.upper()}") or getattr(defaults, name)
                 for name in ("cpu_request", "memory_request", "cpu_limit", "memory_limit")}
    return SidecarSettings(image=image, image_pull_policy=pull_policy, **ports, **resources)  # type: ignore[arg-type]

