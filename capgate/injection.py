"""Sidecar injection: a pure function from (pod, capability, settings) to an RFC 6902 JSONPatch.

The operator's mutating admission webhook is a thin adapter over this module; so is the e2e
harness that runs the sidecar locally "as the pod would". Nothing here does I/O.

Public API::

    SidecarSettings                    frozen values from the operator config / Helm values
    InjectionError                     the pod cannot get a capability; the message is the denial reason
    inject(pod, cap, settings, *, credential_secret, namespace=None) -> list[PatchOp]
    mutated(pod, cap, settings, *, credential_secret, namespace=None) -> dict   (pod after the patch)
    validate(pod, cap, settings, *, credential_secret, namespace=None) -> None  (checks an injected pod;
                                       call it again when ephemeral containers are added)
    apply_patch(obj, ops) -> dict      minimal add/replace/remove applier with ~0/~1 pointer escaping
    sidecar_invocation(pod, ...) -> SidecarInvocation(args, env, mounts)
    sidecar_secret_files(pod, ...) -> list[SecretFile]

Decisions, and why:

* **Native sidecar** (an init container with ``restartPolicy: Always``, right after ``capgate-init``):
  it starts before the other init containers and the agent, and its startup probe on ``/readyz`` holds them back until
  it can answer.
* **The proxy variables are a convenience, not the boundary.** The agent is untrusted and may
  ignore them; what stops it is the pod's egress rules (enforce mode) and that it never holds a
  credential (both modes). ``HTTP_PROXY``/``http_proxy``
  point at the sidecar; ``HTTPS_PROXY`` is *not* set because the sidecar refuses ``CONNECT`` (it
  cannot inspect a tunnel): agents reach https upstreams through ``CAPGATE_UPSTREAM_<NAME>_URL``
  (plain http to 127.0.0.1, the sidecar speaks TLS upstream) or, in enforce mode, by their real
  ``https://`` URL (captured and intercepted with the pod CA). ``NO_PROXY`` is only
  ``localhost,127.0.0.1,::1``: the sidecar's own base URLs must be called directly, never in
  absolute form, while cluster names such as ``flights.travel.svc`` must *not* be listed because
  upstreams live there. Our variables go first in ``env`` (so the user's may reference them as
  ``$(CAPGATE_URL)``) and replace same-named user entries; ``env`` wins over ``envFrom``.
* **File mode 0444** on both Secret volumes: Secret files are owned by root, the sidecar runs as
  65532, and setting the pod's ``fsGroup`` would change file ownership for the agent's volumes too.
  World-readable is safe because only the sidecar container mounts these volumes and the pods
  that could otherwise reach its filesystem (shared process namespace, hostPID, an agent mounting
  the same Secrets, an ephemeral container targeting the sidecar) are refused. Whole-volume mounts,
  never ``subPath``, so credential rotations reach the running sidecar.
* **Complete mediation** (``spec.egress.mode: enforce``, the default): ``capgate-init`` runs first
  (``initContainers[0]``, root, NET_ADMIN + NET_RAW only) and programs the pod's network so every
  TCP connection of every UID but the sidecar's reaches the sidecar's outbound listener; then the
  native sidecar, Ready before anything else starts. Agent containers get the pod CA (an emptyDir,
  read-only for them) and ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``/
  ``NODE_EXTRA_CA_CERTS``. The sidecar's UID is the rules' only exemption, so an agent container must
  have a UID the pod spec states and that is not the sidecar's, must not escalate privileges (a
  set-user-ID file of that UID) and loses SETUID/SETGID (a root agent could ``setuid(65532)``); one
  whose UID is left to its image is refused, not guessed at. ``cooperative`` keeps only the proxy
  variables and says so in status (the pod is not mediated).
* **No agent container may sniff or rewrite the pod network**, in either mode: NET_RAW and NET_ADMIN
  are dropped (added to ``capabilities.drop``), adding them, ``privileged`` and ``hostNetwork`` are
  refused. Ephemeral containers cannot be mutated, so they must state the same themselves
  (``kubectl debug --profile=restricted`` does).
* **Idempotent by strict equality**: every field the API server would default is spelled out, so a
  re-invocation (``reinvocationPolicy: IfNeeded``) yields no ops, and a look-alike container named
  like the sidecar (say, with a ``postStart`` hook that reads the credential) is always overwritten.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, NotRequired, TypedDict

from capgate import resources
from capgate.capabilities.spec import Capability

DEFAULT_CONTAINER_NAME = "capgate-sidecar"
INIT_CONTAINER_NAME = "capgate-init"
CA_VOLUME = "capgate-ca"
CA_FILE = "ca.crt"
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
"""OpenSSL-based clients (Python ssl, curl, Go's crypto/x509 reads SSL_CERT_FILE too), requests, curl, Node."""
AGENT_DROPPED = ("NET_ADMIN", "NET_RAW")
"""Dropped from every agent container in every mode: NET_RAW sniffs the pod network (the sidecar's
cleartext requests to http:// upstreams carry injected keys), NET_ADMIN rewrites its firewall."""
ENFORCE_DROPPED = ("SETUID", "SETGID")
"""Also dropped in enforce mode: a root agent with CAP_SETUID becomes the sidecar's UID, which the egress
rules exempt."""
REFUSED_ADDS = frozenset({"ALL", "NET_ADMIN", "NET_RAW", "SETUID", "SETGID"})
CREDENTIAL_VOLUME = "capgate-credential"
UPSTREAMS_VOLUME = "capgate-upstreams"
API_TOKEN_VOLUME = "capgate-api-token"
API_TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TOKEN_SECONDS = 3607
"""The sidecar's own projected ServiceAccount token, for its RevocationList watch: it works in pods that
set ``automountServiceAccountToken: false`` for the agent, and the kubelet refreshes it (3607 s is the
kubelet's own default for projected tokens)."""
ADMIN_PORT_NAME = "capgate-admin"
SECRET_FILE_MODE = 0o444
NO_PROXY = "localhost,127.0.0.1,::1"
DOWNWARD_ENV: tuple[tuple[str, str], ...] = (
    ("CAPGATE_NAMESPACE", "metadata.namespace"),        # read by the sidecar as --namespace
    ("CAPGATE_SERVICE_ACCOUNT", "spec.serviceAccountName"),  # read by the sidecar as --service-account
    ("CAPGATE_POD_NAME", "metadata.name"),
    ("CAPGATE_POD_UID", "metadata.uid"),
    ("CAPGATE_NODE_NAME", "spec.nodeName"),
)
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True)
class SidecarSettings:
    """How the sidecar container looks; from the operator's config (Helm ``sidecar:`` values)."""

    image: str = "ghcr.io/capgate/capgate:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    listen_port: int = 15080
    admin_port: int = 15090
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "500m"
    memory_limit: str = "128Mi"
    run_as_user: int = 65532  # the distroless "nonroot" user
    credential_mount: str = "/var/run/capgate/credential"
    upstream_credentials_mount: str = "/var/run/capgate/upstreams"
    container_name: str = DEFAULT_CONTAINER_NAME
    extra_args: tuple[str, ...] = ()
    outbound_port: int = 15001
    """The sidecar's outbound listener, where capgate-init redirects the agent's TCP (enforce mode)."""
    ca_mount: str = "/var/run/capgate/ca"
    """The pod CA certificate's emptyDir: written by the sidecar, read-only in agent containers."""
    init_container_name: str = INIT_CONTAINER_NAME


class InjectionError(Exception):
    """The pod cannot be given its capability; ``str(error)`` is the webhook's denial message."""


class PatchOp(TypedDict):
    op: Literal["add", "replace", "remove"]
    path: str
    value: NotRequired[Any]


class SidecarInvocation(NamedTuple):
    """How the pod runs the sidecar: ``args`` after ``capgate-sidecar``, resolved env, volume -> mount path."""

    args: list[str]
    env: dict[str, str]
    mounts: dict[str, str]


@dataclass(frozen=True)
class SecretFile:
    """One Secret projected into the sidecar; ``key=None`` means every key of the Secret, one file each."""

    volume: str
    directory: str
    secret: str
    key: str | None
    path: str | None


# --- building the desired pod ---------------------------------------------------------------------

def _upstream_keys(cap: Capability) -> list[tuple[str, str, str]]:
    """(upstream, secret, key) for every upstream whose API key the sidecar injects."""
    return [(u.name, u.inject.secret_name, u.inject.secret_key) for u in cap.upstreams if u.inject]


def _enforced(cap: Capability) -> bool:
    return cap.egress_mode == "enforce"


def _volumes(cap: Capability, credential_secret: str) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [{"name": CREDENTIAL_VOLUME, "secret": {
        "secretName": credential_secret, "defaultMode": SECRET_FILE_MODE, "optional": False}}]
    sources = [{"secret": {"name": secret, "items": [{"key": key, "path": upstream}], "optional": False}}
               for upstream, secret, key in _upstream_keys(cap)]
    if sources:  # the sidecar refuses a missing --upstream-credentials-dir, so no keys = no flag, no volume
        volumes.append({"name": UPSTREAMS_VOLUME, "projected": {"defaultMode": SECRET_FILE_MODE, "sources": sources}})
    volumes.append({"name": API_TOKEN_VOLUME, "projected": {"defaultMode": SECRET_FILE_MODE, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": API_TOKEN_SECONDS}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}})
    if _enforced(cap):  # a certificate, never a key: the pod CA's key stays in the sidecar's memory
        volumes.append({"name": CA_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    return volumes


_ALL_OURS = (CREDENTIAL_VOLUME, UPSTREAMS_VOLUME, API_TOKEN_VOLUME, CA_VOLUME)


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": ADMIN_PORT_NAME, "scheme": "HTTP"}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": 1, "successThreshold": 1}


def sidecar_container(cap: Capability, settings: SidecarSettings) -> dict[str, Any]:
    """The sidecar container, with every field the API server would default spelled out."""
    args = ["--credential-dir", settings.credential_mount]
    mounts = [{"name": CREDENTIAL_VOLUME, "mountPath": settings.credential_mount, "readOnly": True}]
    if _upstream_keys(cap):
        args += ["--upstream-credentials-dir", settings.upstream_credentials_mount]
        mounts.append({"name": UPSTREAMS_VOLUME, "mountPath": settings.upstream_credentials_mount, "readOnly": True})
    # Its own token at the standard path: the ServiceAccount plugin then leaves this container alone.
    mounts.append({"name": API_TOKEN_VOLUME, "mountPath": API_TOKEN_MOUNT, "readOnly": True})
    # The admin port binds 0.0.0.0 because the kubelet probes the pod IP; it serves no secrets.
    args += ["--listen", f"127.0.0.1:{settings.listen_port}", "--admin-listen", f"0.0.0.0:{settings.admin_port}"]
    if _enforced(cap):
        args += ["--outbound-listen", f"127.0.0.1:{settings.outbound_port}", "--ca-dir", settings.ca_mount]
        mounts.append({"name": CA_VOLUME, "mountPath": settings.ca_mount})
    args += settings.extra_args
    return {
        "name": settings.container_name,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["capgate-sidecar"],
        "args": args,
        "env": [{"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}
                for name, path in DOWNWARD_ENV],
        "ports": [{"name": ADMIN_PORT_NAME, "containerPort": settings.admin_port, "protocol": "TCP"}],
        # Startup: up to 120 x 1 s for the first credential load; liveness: 3 misses x 10 s before a restart.
        "startupProbe": _probe("/readyz", 1, 120),
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": _probe("/healthz", 10, 3),
        "resources": {"requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
                      "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": settings.run_as_user, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def init_container(settings: SidecarSettings) -> dict[str, Any]:
    """``capgate-init``: programs the pod's network namespace, then exits (see :mod:`capgate.netinit`).

    The only container capgate runs as root, with NET_ADMIN and NET_RAW and nothing else; it runs our
    command from our image before any other container, so nothing of the user's runs with those
    capabilities. This is what Pod Security "baseline" forbids; see the README ("Egress").
    """
    return {
        "name": settings.init_container_name,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["capgate-init"],
        "args": ["--proxy-uid", str(settings.run_as_user), "--outbound-port", str(settings.outbound_port),
                 "--sidecar-ports", f"{settings.listen_port},{settings.admin_port}"],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "200m", "memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def agent_env(cap: Capability, settings: SidecarSettings) -> list[dict[str, Any]]:
    """The variables every other container gets; see the module docstring for NO_PROXY and HTTPS_PROXY."""
    base = f"http://127.0.0.1:{settings.listen_port}"
    pairs = [("HTTP_PROXY", base), ("http_proxy", base), ("NO_PROXY", NO_PROXY), ("no_proxy", NO_PROXY),
             ("CAPGATE_URL", base)]
    pairs += [(upstream_url_variable(u.name), f"{base}/{u.name}") for u in cap.upstreams]
    if _enforced(cap):
        pairs += [(name, f"{settings.ca_mount}/{CA_FILE}") for name in CA_ENV]
    return [{"name": name, "value": value} for name, value in pairs]


def _capability_name(name: object) -> str:
    """``net_raw`` / ``CAP_NET_RAW`` -> ``NET_RAW``: compare capabilities the way runtimes accept them."""
    text = str(name).upper()
    return text[4:] if text.startswith("CAP_") else text


def agent_security(container: Mapping[str, Any], cap: Capability) -> dict[str, Any]:
    """The container's securityContext with what capgate needs added; nothing the user set is loosened."""
    context = dict(container.get("securityContext") or {})
    capabilities = dict(context.get("capabilities") or {})
    drop = list(capabilities.get("drop") or [])
    dropped = {_capability_name(c) for c in drop}
    for name in AGENT_DROPPED + (ENFORCE_DROPPED if _enforced(cap) else ()):
        if name not in dropped and "ALL" not in dropped:
            drop.append(name)
    capabilities["drop"] = drop
    context["capabilities"] = capabilities
    if _enforced(cap) and "allowPrivilegeEscalation" not in context:
        # no_new_privs: a set-user-ID file owned by the sidecar's UID would otherwise make it that UID.
        context["allowPrivilegeEscalation"] = False
    return context


def _agent_mounts(container: Mapping[str, Any], cap: Capability, settings: SidecarSettings) -> list[dict[str, Any]]:
    mounts = [m for m in container.get("volumeMounts") or []
              if m.get("name") != CA_VOLUME and m.get("mountPath") != settings.ca_mount]
    if _enforced(cap):
        mounts.append({"name": CA_VOLUME, "mountPath": settings.ca_mount, "readOnly": True})
    return mounts


def upstream_url_variable(upstream: str) -> str:
    """``payments-v2`` -> ``CAPGATE_UPSTREAM_PAYMENTS_V2_URL``."""
    return f"CAPGATE_UPSTREAM_{upstream.upper().replace('-', '_')}_URL"


def _agent(container: Mapping[str, Any], cap: Capability, settings: SidecarSettings) -> dict[str, Any]:
    """An agent (or user init) container as injected: our env first, the pod CA mounted, capabilities dropped."""
    ours = agent_env(cap, settings)
    names = {e["name"] for e in ours}
    out = dict(container)
    out["env"] = ours + [e for e in container.get("env") or [] if e.get("name") not in names]
    out["securityContext"] = agent_security(container, cap)
    mounts = _agent_mounts(container, cap, settings)
    if mounts or "volumeMounts" in container:
        out["volumeMounts"] = mounts
    return out


def _desired(pod: Mapping[str, Any], cap: Capability, settings: SidecarSettings,
             credential_secret: str) -> dict[str, Any]:
    spec = pod.get("spec") or {}
    reserved = {settings.container_name, settings.init_container_name}
    others = [c for c in spec.get("initContainers") or [] if c.get("name") not in reserved]
    first = [init_container(settings)] if _enforced(cap) else []
    desired_spec = dict(spec)
    # capgate-init programs the network, then the native sidecar starts (and must be Ready), then the rest.
    desired_spec["initContainers"] = [*first, sidecar_container(cap, settings),
                                      *(_agent(c, cap, settings) for c in others)]
    desired_spec["containers"] = [_agent(c, cap, settings) for c in spec.get("containers") or []]
    desired_spec["volumes"] = [v for v in spec.get("volumes") or [] if v.get("name") not in _ALL_OURS]
    desired_spec["volumes"] += _volumes(cap, credential_secret)
    metadata = dict(pod.get("metadata") or {})
    metadata["annotations"] = {**(metadata.get("annotations") or {}), resources.INJECTED_ANNOTATION: cap.name}
    return {**pod, "metadata": metadata, "spec": desired_spec}


# --- refusing pods ----------------------------------------------------------------------------------

def _fail_pod_level(pod: Mapping[str, Any], cap: Capability, namespace: str | None) -> None:
    spec = pod.get("spec") or {}
    ns = namespace or (pod.get("metadata") or {}).get("namespace")
    if not ns:
        raise InjectionError("cannot tell which namespace the pod is created in")
    if ns != cap.namespace:
        raise InjectionError(f"pod is in namespace {ns!r} but AgentCapability {cap.qualified_name} "
                             f"applies only to pods in namespace {cap.namespace!r}")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if account != cap.service_account:
        raise InjectionError(f"pod runs as ServiceAccount {account!r} but AgentCapability {cap.qualified_name} "
                             f"is bound to {cap.service_account!r}")
    for flag, why in (("shareProcessNamespace", "let the agent read the sidecar's credential through /proc"),
                      ("hostPID", "let the agent read the sidecar's credential through the node's /proc"),
                      ("hostNetwork", "expose the sidecar's 127.0.0.1 port on the node and let traffic bypass it")):
        if spec.get(flag) is True:
            raise InjectionError(f"spec.{flag}: true would {why}; capgate refuses such pods")


def _protected(cap: Capability, credential_secret: str) -> dict[str, str]:
    """Secret name -> what it holds, for every Secret only the sidecar may read."""
    out = {secret: f"the API key of upstream {upstream!r}" for upstream, secret, _ in _upstream_keys(cap)}
    out[credential_secret] = f"the credential of AgentCapability {cap.qualified_name}"
    return out


def _volume_secrets(volume: Mapping[str, Any]) -> list[str]:
    secrets = [(volume.get("secret") or {}).get("secretName")]
    secrets += [(s.get("secret") or {}).get("name") for s in (volume.get("projected") or {}).get("sources") or []]
    return [s for s in secrets if s]


def _secret_uses(container: Mapping[str, Any], volumes: Mapping[str, list[str]]) -> Iterator[tuple[str, str]]:
    """(secret, how) for every Secret the container can read."""
    for mount in container.get("volumeMounts") or []:
        for secret in volumes.get(mount.get("name"), []):
            yield secret, f"mounts it (volume {mount.get('name')!r})"
    for var in container.get("env") or []:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef") or {}
        if ref.get("name"):
            yield ref["name"], f"reads it into env {var.get('name')!r}"
    for source in container.get("envFrom") or []:
        if (source.get("secretRef") or {}).get("name"):
            yield source["secretRef"]["name"], "reads it through envFrom"


def _others(spec: Mapping[str, Any], settings: SidecarSettings) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(list name, container) for every container but the injected head of initContainers
    (``capgate-init`` then ``capgate-sidecar``, or the sidecar alone in cooperative mode)."""
    ours = {settings.init_container_name, settings.container_name}
    for kind in CONTAINER_LISTS:
        leading = kind == "initContainers"
        for container in spec.get(kind) or []:
            name = container.get("name")
            if leading and name in ours:
                ours = ours - {name}
                continue
            leading = False
            yield kind, container


def validate(pod: Mapping[str, Any], cap: Capability, settings: SidecarSettings, *, credential_secret: str,
             namespace: str | None = None) -> None:
    """Raise :class:`InjectionError` unless the *injected* pod keeps the capability's Secrets sidecar-only."""
    _fail_pod_level(pod, cap, namespace)
    spec = pod.get("spec") or {}
    protected = _protected(cap, credential_secret)
    volumes = {v.get("name"): _volume_secrets(v) for v in spec.get("volumes") or []}
    reserved_ports = {settings.listen_port, settings.admin_port, settings.outbound_port}
    for kind, container in _others(spec, settings):
        name = container.get("name")
        if name in (settings.container_name, settings.init_container_name):
            raise InjectionError(f"{kind} name {name!r} is reserved for capgate")
        if kind == "ephemeralContainers" and container.get("targetContainerName") == settings.container_name:
            raise InjectionError(f"ephemeral container {name!r} may not target the capgate sidecar")
        for secret, how in _secret_uses(container, volumes):
            if secret in protected:
                raise InjectionError(f"container {name!r} {how} from Secret {secret!r}, which holds "
                                     f"{protected[secret]}; only the capgate sidecar may read it")
        for port in container.get("ports") or []:
            if port.get("containerPort") in reserved_ports:
                raise InjectionError(f"container {name!r} declares port {port['containerPort']}, "
                                     "which the capgate sidecar uses")
        _check_agent_security(spec, kind, container, cap, settings)


def _check_agent_security(spec: Mapping[str, Any], kind: str, container: Mapping[str, Any], cap: Capability,
                          settings: SidecarSettings) -> None:
    """Refuse a container that could undo the egress rules, sniff the pod network, or be the sidecar's UID.

    The UID is the egress rules' whole exemption (``capgate.netinit``). An agent container whose UID is
    not in the pod spec runs as its image's USER — which may be the sidecar's 65532, the distroless
    "nonroot" user many agent images use — so in enforce mode it is refused rather than guessed at.
    """
    name = container.get("name")
    context = container.get("securityContext") or {}
    what = f"{kind} {name!r}"
    if context.get("privileged") is True:
        raise InjectionError(f"{what} is privileged, which would let it rewrite the pod's network; "
                             "capgate refuses such pods")
    added = {_capability_name(c) for c in (context.get("capabilities") or {}).get("add") or []}
    if added & REFUSED_ADDS:
        raise InjectionError(f"{what} adds capabilities {sorted(added & REFUSED_ADDS)}, which would let it "
                             "sniff or rewrite the pod's network or become the capgate sidecar's user")
    dropped = {_capability_name(c) for c in (context.get("capabilities") or {}).get("drop") or []}
    need = AGENT_DROPPED + (ENFORCE_DROPPED if _enforced(cap) else ())
    if "ALL" not in dropped and not set(need) <= dropped:
        raise InjectionError(f"{what} must drop capabilities {list(need)} (securityContext.capabilities.drop; "
                             "for kubectl debug use --profile=restricted)")
    for mount in container.get("volumeMounts") or []:
        if mount.get("name") == CA_VOLUME and mount.get("readOnly") is not True:
            raise InjectionError(f"{what} mounts the pod CA volume writable; only the capgate sidecar writes it")
    if not _enforced(cap):
        return
    if "SYS_ADMIN" in added:  # the API server rejects it with allowPrivilegeEscalation: false; say why here
        raise InjectionError(f"{what} adds SYS_ADMIN, which cannot be combined with "
                             "allowPrivilegeEscalation: false (required in egress mode enforce)")
    if context.get("allowPrivilegeEscalation") is not False:
        raise InjectionError(f"{what} must set securityContext.allowPrivilegeEscalation: false in "
                             "egress mode enforce (a set-user-ID file could make it the sidecar's user)")
    uid = context.get("runAsUser", (spec.get("securityContext") or {}).get("runAsUser"))
    if uid is None:
        raise InjectionError(f"{what} sets no runAsUser (neither it nor the pod does), so it runs as its "
                             f"image's user, which could be {settings.run_as_user}, the capgate sidecar's UID "
                             "that egress rules exempt; set securityContext.runAsUser (any other UID) or use "
                             "spec.egress.mode: cooperative")
    if uid == settings.run_as_user:
        raise InjectionError(f"{what} runs as UID {uid}, the capgate sidecar's UID, whose traffic is not "
                             "captured; run it as any other UID")


# --- the patch ------------------------------------------------------------------------------------

def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _set(ops: list[PatchOp], parent: Mapping[str, Any], parts: Sequence[str | int], value: Any) -> None:
    """Add ``parent[parts[-1]]`` if missing, replace it if different, leave it alone if equal."""
    key = str(parts[-1])  # always a member name: the arrays themselves are set whole
    if key not in parent:
        ops.append({"op": "add", "path": _pointer(*parts), "value": value})
    elif parent[key] != value:
        ops.append({"op": "replace", "path": _pointer(*parts), "value": value})


def inject(pod: Mapping[str, Any], cap: Capability, settings: SidecarSettings, *, credential_secret: str,
           namespace: str | None = None) -> list[PatchOp]:
    """The JSONPatch giving ``pod`` its sidecar; ``[]`` for a pod already injected the same way.

    ``namespace`` is the admission request's namespace (the pod object may not carry one yet).
    Arrays and maps are added whole when missing, so the patch applies to pods without
    ``initContainers``, ``volumes``, ``env`` or annotations.
    """
    desired = _desired(pod, cap, settings, credential_secret)
    validate(desired, cap, settings, credential_secret=credential_secret, namespace=namespace)
    ops: list[PatchOp] = []
    metadata = pod.get("metadata")
    if not isinstance(metadata, Mapping):
        ops.append({"op": "add", "path": "/metadata", "value": desired["metadata"]})
    elif not isinstance(metadata.get("annotations"), Mapping):
        _set(ops, metadata, ("metadata", "annotations"), {resources.INJECTED_ANNOTATION: cap.name})
    else:
        _set(ops, metadata["annotations"], ("metadata", "annotations", resources.INJECTED_ANNOTATION), cap.name)
    spec, want = pod.get("spec") or {}, desired["spec"]
    _set(ops, spec, ("spec", "initContainers"), want["initContainers"])
    for index, container in enumerate(spec.get("containers") or []):
        for key in ("env", "securityContext", "volumeMounts"):
            if key in want["containers"][index]:
                _set(ops, container, ("spec", "containers", index, key), want["containers"][index][key])
    _set(ops, spec, ("spec", "volumes"), want["volumes"])
    return ops


def mutated(pod: Mapping[str, Any], cap: Capability, settings: SidecarSettings, *, credential_secret: str,
            namespace: str | None = None) -> dict[str, Any]:
    """``pod`` with :func:`inject`'s patch applied (a new object)."""
    return apply_patch(pod, inject(pod, cap, settings, credential_secret=credential_secret, namespace=namespace))


def _split(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"JSON pointer {pointer!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def _index(container: list[Any], token: str, *, insert: bool) -> int:
    if insert and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise ValueError(f"{token!r} is not an array index")
    index = int(token)
    if index > len(container) - (0 if insert else 1):
        raise ValueError(f"array index {index} is out of range")
    return index


def apply_patch(obj: Mapping[str, Any], ops: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Apply RFC 6902 ``add``/``replace``/``remove`` ops to a deep copy of ``obj``; ValueError on a bad op."""
    root: dict[str, Any] = copy.deepcopy(dict(obj))
    for op in ops:
        *parents, last = _split(op["path"])
        target: Any = root
        for token in parents:
            target = target[_index(target, token, insert=False)] if isinstance(target, list) else target[token]
        kind = op["op"]
        if isinstance(target, list):
            index = _index(target, last, insert=kind == "add")
            if kind == "add":
                target.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                target[index] = copy.deepcopy(op["value"])
            else:
                del target[index]
        elif kind == "add":
            target[last] = copy.deepcopy(op["value"])
        elif last not in target:
            raise ValueError(f"{op['path']}: cannot {kind} a member that does not exist")
        elif kind == "replace":
            target[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del target[last]
        else:
            raise ValueError(f"unsupported JSONPatch op {kind!r}")
    return root


# --- running the sidecar the way the pod would (e2e) -----------------------------------------------

def _sidecar(pod: Mapping[str, Any], container_name: str) -> Mapping[str, Any]:
    for container in (pod.get("spec") or {}).get("initContainers") or []:
        if container.get("name") == container_name:
            return container  # type: ignore[no-any-return]
    raise InjectionError(f"pod has no {container_name!r} init container; was it injected?")


def _field(pod: Mapping[str, Any], path: str, given: Mapping[str, str]) -> str:
    if path in given:
        return given[path]
    value: Any = pod
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None and path == "spec.serviceAccountName":
        return "default"  # what the API server fills in
    return "" if value is None else str(value)


def sidecar_invocation(pod: Mapping[str, Any], *, container_name: str = DEFAULT_CONTAINER_NAME,
                       field_values: Mapping[str, str] | None = None) -> SidecarInvocation:
    """The sidecar's args, env (downward-API ``fieldRef``s resolved from ``pod``) and mounts.

    ``field_values`` supplies fields a pod object not yet scheduled lacks (``{"spec.nodeName": "local"}``);
    other missing fields resolve to ``""`` as the kubelet would.
    """
    container = _sidecar(pod, container_name)
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "fieldRef" in (var.get("valueFrom") or {}):
            env[var["name"]] = _field(pod, var["valueFrom"]["fieldRef"]["fieldPath"], field_values or {})
        else:
            raise InjectionError(f"env {var.get('name')!r} of the sidecar has a source this helper cannot resolve")
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
    return SidecarInvocation(list(container.get("args") or []), env, mounts)


def sidecar_secret_files(pod: Mapping[str, Any], *, container_name: str = DEFAULT_CONTAINER_NAME) -> list[SecretFile]:
    """Which Secret keys appear as which files in the sidecar, so a harness can lay them out on disk."""
    mounts = sidecar_invocation(pod, container_name=container_name).mounts
    out: list[SecretFile] = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        name = volume.get("name")
        if name not in mounts:
            continue
        if "secret" in volume:
            out.append(SecretFile(name, mounts[name], volume["secret"]["secretName"], None, None))
        for source in (volume.get("projected") or {}).get("sources") or []:
            for item in (source.get("secret") or {}).get("items") or []:
                out.append(SecretFile(name, mounts[name], source["secret"]["name"], item["key"], item["path"]))
    return out
