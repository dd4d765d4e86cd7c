"""The ``capgate`` commands that act on a cluster: revoke, lockdown, and root key rotation.

They use the caller's kubeconfig (so RBAC decides who may pull the kill switch: the chart's
``capgate-admin`` ClusterRole) and the same pure RevocationList functions as the operator, under the
same optimistic concurrency: read, change, replace with resourceVersion, retry on conflict.
"""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from capgate import resources, revocation
from capgate.capabilities import keys, spec

CONFLICT_RETRIES = 8
UNKNOWN_EXPIRY = timedelta(days=31)
"""A bare revocation id carries no expiry; keep it past the longest credential lifetime (30 days)."""


class ClusterError(Exception):
    """A cluster command failed; printed as ``capgate: <message>``."""


def _api(kubeconfig: str | None) -> Any:
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - kubeconfig problems come in many types
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except Exception:  # noqa: BLE001
            raise ClusterError(f"no usable kubeconfig: {exc}") from exc
    return client.ApiClient()


def _custom(api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api)


def update_revocation_list(api: Any, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    custom = _custom(api)
    args = (resources.GROUP, resources.VERSION, resources.REVOCATION_PLURAL)
    for _ in range(CONFLICT_RETRIES):
        try:
            current = custom.get_cluster_custom_object(*args, resources.REVOCATION_LIST_NAME)
        except ApiException as exc:
            if exc.status != 404:
                raise ClusterError(f"cannot read the RevocationList: {exc.status} {exc.reason}") from exc
            fresh = revocation.empty_list()
            fresh["spec"] = change(fresh["spec"])
            try:
                return dict(custom.create_cluster_custom_object(*args, fresh))
            except ApiException as create_exc:
                if create_exc.status == 409:
                    continue
                raise ClusterError(f"cannot create the RevocationList: {create_exc.status}") from create_exc
        current["spec"] = change(dict(current.get("spec") or {}))
        try:
            return dict(custom.replace_cluster_custom_object(*args, resources.REVOCATION_LIST_NAME, current))
        except ApiException as exc:
            if exc.status != 409:
                raise ClusterError(f"cannot update the RevocationList: {exc.status} {exc.reason}") from exc
    raise ClusterError("the RevocationList kept changing under us; try again")


def cmd_revoke(args: argparse.Namespace) -> int:
    api = _api(args.kubeconfig)
    started = time.monotonic()
    if args.token:
        now = datetime.now(UTC)
        entries = [revocation.Entry(id=rid.lower(), expires_at=now + UNKNOWN_EXPIRY, reason="capgate revoke --token")
                   for rid in args.token]
        try:
            update_revocation_list(api, lambda s: revocation.with_revoked(s, entries, now))
        except ValueError as exc:
            raise ClusterError(str(exc)) from exc
        print(f"revoked {len(entries)} token id(s); sidecars refuse them as soon as their watch delivers the change")
        return 0
    if not args.name:
        raise ClusterError("give an AgentCapability NAME or --token REVOCATION_ID")
    from kubernetes.client.exceptions import ApiException

    custom = _custom(api)
    try:
        custom.patch_namespaced_custom_object(resources.GROUP, resources.VERSION, args.namespace,
                                              resources.CAPABILITY_PLURAL, args.name, {"spec": {"revoked": True}})
    except ApiException as exc:
        raise ClusterError(f"cannot revoke {args.namespace}/{args.name}: {exc.status} {exc.reason}") from exc
    print(f"AgentCapability {args.namespace}/{args.name}: spec.revoked=true")
    if args.wait:
        _wait_revoked(custom, args.namespace, args.name, args.timeout)
        print(f"credential ids in the RevocationList after {time.monotonic() - started:.2f}s")
    return 0


def _wait_revoked(custom: Any, namespace: str, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object(resources.GROUP, resources.VERSION, namespace,
                                                  resources.CAPABILITY_PLURAL, name)
        conditions = (obj.get("status") or {}).get("conditions") or []
        ready: dict[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
        if ready.get("reason") == "Revoked":
            return
        time.sleep(0.1)
    raise ClusterError(f"the operator did not confirm the revocation within {timeout:.0f}s (is it running?)")


def cmd_lockdown(args: argparse.Namespace) -> int:
    if not args.all and not args.namespace:
        raise ClusterError("give --all or --namespace NS")
    api = _api(args.kubeconfig)
    on = not args.off
    namespaces = args.namespace or []

    def change(current: dict[str, Any]) -> dict[str, Any]:
        if args.all:
            return revocation.with_lockdown(current, all_namespaces=on, remove=() if on else namespaces)
        return revocation.with_lockdown(current, add=namespaces if on else (), remove=() if on else namespaces)

    listed = update_revocation_list(api, change)
    state = listed["spec"].get("lockdown", {})
    scope = "all namespaces" if state.get("all") else ", ".join(state.get("namespaces") or []) or "nothing"
    print(f"lockdown {'on' if on else 'off'}; now locked down: {scope}")
    return 0


def cmd_keys_rotate_cluster(args: argparse.Namespace) -> int:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(_api(args.kubeconfig))
    for _ in range(CONFLICT_RETRIES):
        try:
            secret = core.read_namespaced_secret(resources.ROOT_KEY_SECRET, args.operator_namespace)
        except ApiException as exc:
            raise ClusterError(f"cannot read Secret {args.operator_namespace}/{resources.ROOT_KEY_SECRET}: "
                               f"{exc.status} {exc.reason}") from exc
        data = secret.data or {}
        if "keyset.json" not in data:
            raise ClusterError(f"Secret {args.operator_namespace}/{resources.ROOT_KEY_SECRET} holds no key set")
        keyset = keys.KeySet.from_json(base64.b64decode(data["keyset.json"]))
        rotated = keyset.rotate(spec.parse_duration(args.keep_old_for, "--keep-old-for")).prune(datetime.now(UTC))
        data["keyset.json"] = base64.b64encode(rotated.to_json().encode()).decode()
        secret.data = data
        try:
            core.replace_namespaced_secret(resources.ROOT_KEY_SECRET, args.operator_namespace, secret)
        except ApiException as exc:
            if exc.status == 409:
                continue
            raise ClusterError(f"cannot update the root key Secret: {exc.status} {exc.reason}") from exc
        print(f"new active root key id {rotated.active_id}; the operator re-mints every credential with it, and "
              f"tokens signed by older keys verify until their keys' notAfter")
        return 0
    raise ClusterError("the root key Secret kept changing under us; try again")


def cmd_usage(args: argparse.Namespace) -> int:
    """The fleet-wide spending of one AgentCapability: each rate limit and budget in its current window."""
    import json

    from kubernetes.client.exceptions import ApiException

    from capgate import timestamps, usage
    from capgate.capabilities import compiler

    custom = _custom(_api(args.kubeconfig))
    try:
        cap_obj = custom.get_namespaced_custom_object(resources.GROUP, resources.VERSION, args.namespace,
                                                      resources.CAPABILITY_PLURAL, args.name)
        usage_obj = custom.get_namespaced_custom_object(resources.GROUP, resources.VERSION, args.namespace,
                                                        resources.USAGE_PLURAL, args.name)
    except ApiException as exc:
        raise ClusterError(f"cannot read {args.namespace}/{args.name}: {exc.status} {exc.reason}") from exc
    try:
        rows = usage.table(compiler.validate_object(cap_obj), usage_obj.get("status"), time.time())
    except usage.UsageError as exc:
        raise ClusterError(f"the stored usage of {args.namespace}/{args.name} is malformed: {exc}") from exc
    if args.json:
        print(json.dumps([{"meter": r.meter.key, "windowStart": r.start, "spent": r.spent, "max": r.meter.max,
                           "remaining": r.remaining, "ahead": r.ahead} for r in rows], indent=2))
        return 0
    lines = [("METER", "WINDOW START", "SPENT", "MAX", "REMAINING")]
    for row in rows:
        start = timestamps.iso(datetime.fromtimestamp(row.start, UTC))
        lines.append((row.meter.label, start + (" (ahead of now)" if row.ahead else ""), str(row.spent),
                      str(row.meter.max), str(row.remaining)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(no rate limit or budget)")
    return 0


def register(sub: Any) -> None:
    use = sub.add_parser("usage", help="fleet-wide spending of an AgentCapability's rate limit and budgets")
    use.add_argument("name", help="AgentCapability name")
    use.add_argument("-n", "--namespace", default="default")
    use.add_argument("--json", action="store_true")
    use.add_argument("--kubeconfig")
    use.set_defaults(func=cmd_usage)

    revoke = sub.add_parser("revoke", help="revoke an AgentCapability's credentials, or token ids, now")
    revoke.add_argument("name", nargs="?", help="AgentCapability name")
    revoke.add_argument("-n", "--namespace", default="default")
    revoke.add_argument("--token", action="append", metavar="REVOCATION_ID", help="revoke a token id (repeatable)")
    revoke.add_argument("--wait", action="store_true", help="wait until the operator has pushed the ids")
    revoke.add_argument("--timeout", type=float, default=30.0)
    revoke.add_argument("--kubeconfig")
    revoke.set_defaults(func=cmd_revoke)

    lockdown = sub.add_parser("lockdown", help="the kill switch: sidecars refuse writes (503)")
    lockdown.add_argument("--all", action="store_true", help="every namespace")
    lockdown.add_argument("--namespace", action="append", help="a namespace (repeatable)")
    lockdown.add_argument("--off", action="store_true", help="lift the lockdown")
    lockdown.add_argument("--kubeconfig")
    lockdown.set_defaults(func=cmd_lockdown)
