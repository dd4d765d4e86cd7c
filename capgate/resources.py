"""The one place for Kubernetes names and payload shapes.

Every adapter (operator, sidecar, CLI, tests) imports its API group, kinds, labels and
annotations from here, so a rename is one edit. The TypedDicts describe what the API server
stores for our custom resources; :mod:`capgate.capabilities.spec` turns a spec into validated
values.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

GROUP = "capgate.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

CAPABILITY_KIND = "AgentCapability"
CAPABILITY_PLURAL = "agentcapabilities"
CAPABILITY_SHORT_NAME = "acap"
REVOCATION_KIND = "RevocationList"
REVOCATION_PLURAL = "revocationlists"
REVOCATION_LIST_NAME = "capgate"
USAGE_KIND = "AgentCapabilityUsage"
USAGE_PLURAL = "agentcapabilityusages"
"""One per AgentCapability, same name and namespace, owned by it: the fleet-wide windows (DESIGN.md,
"Fleet-wide state"). Its status is monotonic, enforced by the API server's transition rules."""

CAPABILITY_LABEL = f"{GROUP}/capability"
"""Pods opt in to injection with this label; its value names the AgentCapability."""
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "capgate"
INJECTED_ANNOTATION = f"{GROUP}/injected"
MEDIATED_CONDITION = "Mediated"
"""Status condition: True when injected pods' egress is captured (spec.egress.mode enforce), False if cooperative."""
ROTATE_ROOT_ANNOTATION = f"{GROUP}/rotate-root"

CREDENTIAL_SECRET_SUFFIX = "-capgate-credential"
ROOT_KEY_SECRET = "capgate-root-key"

# Files inside the credential Secret, mounted into the sidecar container only.
TOKEN_FILE = "token"
SESSION_KEY_FILE = "session.key"
TRUST_BUNDLE_FILE = "trust.json"
SETTINGS_FILE = "settings.json"

Effect = Literal["allow", "deny"]
Mode = Literal["enforce", "audit"]
EgressMode = Literal["enforce", "cooperative"]


class SecretKeyRef(TypedDict):
    name: str
    key: str


class InjectSpec(TypedDict):
    secretRef: SecretKeyRef
    header: NotRequired[str]
    valuePrefix: NotRequired[str]
    allowInsecureTransport: NotRequired[bool]
    """Required (true) to inject into an ``http://`` upstream; the status then warns (InsecureInjection)."""


class McpSpec(TypedDict, total=False):
    """``path`` (streamable HTTP) or ``sse`` + ``messages`` (the old HTTP+SSE transport)."""

    path: str
    sse: str
    messages: str
    pins: dict[str, str]
    """Tool name -> ``sha256:<hex>`` of its canonical definition (``capgate mcp pin``)."""


class UpstreamSpec(TypedDict):
    name: str
    url: str
    inject: NotRequired[InjectSpec]
    mcp: NotRequired[McpSpec]


class LimitSpec(TypedDict):
    field: str
    max: int


ArgSpec = TypedDict("ArgSpec", {"field": str, "in": list[str], "glob": str}, total=False)
"""A string constraint on an action argument: ``field`` with exactly one of ``in`` and ``glob``."""


class RuleSpec(TypedDict):
    name: str
    effect: Effect
    upstream: NotRequired[str]
    methods: NotRequired[list[str]]
    paths: NotRequired[list[str]]
    actions: NotRequired[list[str]]
    resources: NotRequired[list[str]]
    requires: NotRequired[list[str]]
    limits: NotRequired[list[LimitSpec]]
    args: NotRequired[list[ArgSpec]]
    readOnly: NotRequired[bool]


class RateLimitSpec(TypedDict):
    requests: int
    per: str


BudgetSpec = TypedDict("BudgetSpec", {  # functional form: ``from`` is a Python keyword
    "upstream": str, "field": str, "max": int, "per": str,
    "from": NotRequired[Literal["request", "response"]], "worstCase": NotRequired[int]})


class CredentialSpec(TypedDict, total=False):
    ttl: str
    rotateBefore: str


class ReceiptsSpec(TypedDict, total=False):
    ttl: str


class DelegationSpec(TypedDict, total=False):
    serviceAccounts: list[str]
    maxDepth: int


class EgressSpec(TypedDict, total=False):
    mode: EgressMode


class AgentCapabilitySpec(TypedDict):
    serviceAccountName: str
    upstreams: list[UpstreamSpec]
    rules: list[RuleSpec]
    rateLimit: NotRequired[RateLimitSpec]
    budgets: NotRequired[list[BudgetSpec]]
    datalog: NotRequired[str]
    credential: NotRequired[CredentialSpec]
    receipts: NotRequired[ReceiptsSpec]
    delegation: NotRequired[DelegationSpec]
    mode: NotRequired[Mode]
    lockdownAfter: NotRequired[str]
    revoked: NotRequired[bool]
    egress: NotRequired[EgressSpec]


class Condition(TypedDict):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: NotRequired[int]


class AgentCapabilityStatus(TypedDict, total=False):
    conditions: list[Condition]
    observedGeneration: int
    credentialSecret: str
    issuedAt: str
    expiresAt: str
    revocationIds: list[str]
    upstreams: int
    rules: int
    usage: CapabilityUsageSummary


class MeterUsage(TypedDict):
    meter: str
    """The window key in the AgentCapabilityUsage (``budget/payments/amount/86400s``)."""
    label: str
    windowStart: int
    spent: int
    max: int
    remaining: int


class CapabilityUsageSummary(TypedDict):
    """``status.usage`` of an AgentCapability: its AgentCapabilityUsage summarized by the operator."""

    meters: list[MeterUsage]
    summary: str
    """The printer column: ``payments.amount 1200/100000, requests 3/600``."""


class RevokedEntry(TypedDict):
    id: str
    expiresAt: str
    capability: NotRequired[str]
    reason: NotRequired[str]


class LockdownSpec(TypedDict, total=False):
    all: bool
    namespaces: list[str]


class RevocationListSpec(TypedDict, total=False):
    revokedIds: list[RevokedEntry]
    lockdown: LockdownSpec


class UsageWindow(TypedDict):
    start: int
    """Unix seconds the window began, a multiple of its length."""
    spent: int
    """Leased out to sidecars in this window; only grows within a window."""


class AgentCapabilityUsageSpec(TypedDict, total=False):
    capability: str


class AgentCapabilityUsageStatus(TypedDict, total=False):
    windows: dict[str, UsageWindow]
    """Keyed by :func:`capgate.usage.window_key`; never removed."""
    horizon: int
    consumed: dict[str, int]
    """Consumed single-use receipt id -> its expiry (Unix seconds); pruned only once at or before horizon."""
