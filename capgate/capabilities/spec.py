"""An AgentCapability, parsed and validated into frozen values.

This is the strict reading of the custom resource that every other part of capgate works from:
the compiler turns it into Datalog, the sidecar routes and rate-limits by it, the webhook rejects
what fails here. Errors name the field path the way ``kubectl`` users read them
(``spec.rules[2].paths[0]: '..' segments are not allowed``). Unknown fields are errors, not
silently dropped, because a misspelt ``limts:`` must never turn into "no limit".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml

from capgate import resources
from capgate.capabilities import paths
from capgate.capabilities.errors import RequestError, SpecError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_DEPTH = 8
"""The most narrowing blocks any capability allows (``delegation.maxDepth``); a token with more is refused
before its signatures are checked."""
RULE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
FORBIDDEN_INJECT_HEADERS = frozenset(
    {"host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "content-length", "content-type"}
)
MAX_INT64 = 2**63 - 1
MAX_RULES = 256
MAX_UPSTREAMS = 64
MAX_LIST = 64
MAX_DATALOG_BYTES = 16 * 1024
MAX_TOOL = 128

Effect = Literal["allow", "deny"]
Mode = Literal["enforce", "audit"]
EgressMode = Literal["enforce", "cooperative"]
BudgetSource = Literal["request", "response"]


@dataclass(frozen=True)
class Inject:
    secret_name: str
    secret_key: str
    header: str = "Authorization"
    value_prefix: str = ""
    allow_insecure_transport: bool = False
    """``inject.allowInsecureTransport``: the explicit opt-in to send the credential over ``http://``."""


@dataclass(frozen=True)
class UpstreamTLS:
    """``upstreams[].tls``: whom the sidecar trusts for this upstream's certificate.

    ``caSecretRef`` names a PEM bundle in a Secret of the capability's namespace (cert-manager's
    ``ca.crt``, the CA of an Istio DestinationRule's ``tls.caCertificates``). When set, that bundle is
    the *only* trust for the upstream — the system roots no longer verify it — so a private CA's
    service cannot be impersonated by any publicly trusted certificate for the same name.
    """

    ca_secret_name: str
    ca_secret_key: str


@dataclass(frozen=True)
class Mcp:
    """``upstreams[].mcp``: where the upstream speaks MCP, so the sidecar decides each JSON-RPC message.

    ``path`` for streamable HTTP; ``sse`` + ``messages`` for the old HTTP+SSE transport. All are
    normalized paths on the upstream (as the agent sends them after ``/<upstream>``).
    """

    path: str | None = None
    sse: str | None = None
    messages: str | None = None
    pins: tuple[tuple[str, str], ...] = ()
    """``mcp.pins``: tool name -> ``sha256:<hex>`` of its definition (``capgate mcp pin``)."""

    def pin(self, tool: str) -> str | None:
        return next((value for name, value in self.pins if name == tool), None)

    def covers(self, path: str) -> bool:
        """Is ``path`` (normalized) an MCP endpoint of this upstream?

        Read leniently, like deny globs (:func:`paths.lenient_forms`): ``/MCP/`` or ``/mcp.json``
        may reach the MCP endpoint through a forgiving router, so they are decided as MCP
        messages too, never by an HTTP rule that happens to allow the upstream.
        """
        forms = set(paths.lenient_forms(path))
        for endpoint in (self.path, self.sse):
            if endpoint is not None and forms & set(paths.lenient_forms(endpoint)):
                return True
        if self.messages is None:
            return False
        prefix = paths.lenient_forms(self.messages)[0].rstrip("/")
        return any(form == prefix or form.startswith(prefix + "/") for form in forms)


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str
    inject: Inject | None = None
    tls: UpstreamTLS | None = None
    mcp: Mcp | None = None

    @property
    def injects_in_cleartext(self) -> bool:
        """The injected credential travels unencrypted: anyone on the path (or the pod's network
        namespace, with CAP_NET_RAW) can read it. Only possible with ``allowInsecureTransport``."""
        return self.inject is not None and urlsplit(self.url).scheme == "http"


@dataclass(frozen=True)
class Limit:
    field: str
    max: int


@dataclass(frozen=True)
class Arg:
    """``args: [{field, in: [...]}]`` or ``[{field, glob}]``: a string argument of an action (MCP's
    ``params.arguments``). A missing or non-string field never satisfies it."""

    field: str
    one_of: tuple[str, ...] = ()
    glob: str | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    effect: Effect
    upstream: str | None = None
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    """The rules of ``requires`` whose receipt this rule *consumes* (``{rule, consume: true}``): each
    receipt opens such a gate once, fleet-wide (DESIGN.md, "Fleet-wide state")."""
    limits: tuple[Limit, ...] = ()
    args: tuple[Arg, ...] = ()
    read_only: bool = False
    """``readOnly``: what this action rule allows only reads, so it goes on during a lockdown."""

    @property
    def is_http(self) -> bool:
        """HTTP rules match proxied requests; action rules match the decision API and MCP calls."""
        return not (self.actions or self.resources)


@dataclass(frozen=True)
class RateLimit:
    requests: int
    per: timedelta


@dataclass(frozen=True)
class Budget:
    """``budgets[]``: the sum of a JSON field per window, read from the request body (charged before
    forwarding) or from the upstream's response (``from: response``, charged after the call)."""

    upstream: str
    field: str
    max: int
    per: timedelta
    source: BudgetSource = "request"
    worst_case: int | None = None
    """``worstCase`` (``from: response`` only, required there): what a call is charged when its usage
    cannot be read (error status, no such field, not JSON, a truncated stream), so unreadable is never 0."""

    tool: str | None = None
    """``tool``: only MCP calls of this tool (a name or glob) count, each such budget on its own
    meter, instead of every message to the upstream."""

    @property
    def from_response(self) -> bool:
        return self.source == "response"

    @cached_property
    def tool_resource(self) -> str | None:
        return None if self.tool is None else f"mcp://{self.upstream}/{self.tool}"

    def applies(self, upstream: str | None, tool: str | None) -> bool:
        """Does a call to ``upstream`` (``tool``: the ``mcp://`` resource of a ``tools/call``, else None)
        count against this budget?

        The tool is matched leniently, like a deny rule (case-folded, trailing dot or space): a
        budget missing a spelling the server reads as the same tool would be a way around it.
        """
        if upstream != self.upstream:
            return False
        if self.tool_resource is None:
            return True
        return tool is not None and paths.lenient_resource_glob_matches(self.tool_resource, tool)


@dataclass(frozen=True)
class Delegation:
    principals: tuple[str, ...] = ()
    max_depth: int = 3


@dataclass(frozen=True)
class Capability:
    name: str
    namespace: str
    service_account: str
    upstreams: tuple[Upstream, ...]
    rules: tuple[Rule, ...]
    rate_limit: RateLimit | None = None
    budgets: tuple[Budget, ...] = ()
    datalog: str = ""
    credential_ttl: timedelta = timedelta(hours=1)
    rotate_before: timedelta = timedelta(minutes=20)
    receipt_ttl: timedelta = timedelta(minutes=5)
    delegation: Delegation = field(default_factory=Delegation)
    mode: Mode = "enforce"
    lockdown_after: timedelta = timedelta(seconds=60)
    revoked: bool = False
    egress_mode: EgressMode = "enforce"
    """``spec.egress.mode``: enforce = the pod's egress is captured (capgate-init); cooperative = HTTP_PROXY only."""

    @property
    def principal(self) -> str:
        """The identity this capability is bound to, ``namespace/serviceaccount``."""
        return f"{self.namespace}/{self.service_account}"

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def upstream(self, name: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.name == name), None)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    @property
    def cleartext_injections(self) -> tuple[str, ...]:
        """Upstreams whose injected credential is sent over ``http://`` (opted in; status warns)."""
        return tuple(u.name for u in self.upstreams if u.injects_in_cleartext)

    @cached_property
    def limit_fields(self) -> frozenset[str]:
        """Body fields some rule or budget reads; only these are ever extracted from a body."""
        found = {lim.field for rule in self.rules for lim in rule.limits}
        found.update(budget.field for budget in self.budgets if not budget.from_response)
        return frozenset(found)

    @cached_property
    def arg_fields(self) -> frozenset[str]:
        """String argument fields some ``args`` constraint reads."""
        return frozenset(arg.field for rule in self.rules for arg in rule.args)

    @cached_property
    def required_rules(self) -> frozenset[str]:
        """Rules some other rule requires a receipt of."""
        return frozenset(name for rule in self.rules for name in rule.requires)

    @cached_property
    def consumed_rules(self) -> frozenset[str]:
        """Rules some other rule consumes a receipt of (single-use gates)."""
        return frozenset(name for rule in self.rules for name in rule.consumes)

    @cached_property
    def sorted_globs(self) -> tuple[str, ...]:
        return tuple(sorted(self.globs))

    @cached_property
    def globs(self) -> frozenset[str]:
        return frozenset(glob for rule in self.rules for glob in rule.paths)


def parse_duration(text: object, path: str) -> timedelta:
    """Parse ``90s``, ``5m``, ``1h30m``, ``2d`` (Kubernetes-style, no fractions)."""
    if not isinstance(text, str) or not text:
        raise SpecError(path, "must be a duration such as '30s', '5m', '1h' or '1h30m'")
    match = DURATION.fullmatch(text)
    if not match or not any(match.groups()):
        raise SpecError(path, f"{text!r} is not a duration such as '30s', '5m', '1h' or '1h30m'")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def format_duration(value: timedelta) -> str:
    total = int(value.total_seconds())
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            out += f"{total // size}{unit}"
            total %= size
    return out or "0s"


class _Reader:
    """Reads one mapping strictly, naming the field path in every error."""

    def __init__(self, data: object, path: str, allowed: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(path, "must be an object")
        self.data: Mapping[str, Any] = data
        self.path = path
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise SpecError(f"{path}.{unknown[0]}", "unknown field")

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}"

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def string(self, key: str, pattern: re.Pattern[str] | None = None, *, default: str | None = None,
               max_len: int = 253, what: str = "") -> str:
        if not self.has(key):
            if default is None:
                raise SpecError(self.sub(key), "is required")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise SpecError(self.sub(key), "must be a string")
        if len(value) > max_len:
            raise SpecError(self.sub(key), f"must be at most {max_len} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise SpecError(self.sub(key), f"{value!r} is not {what or 'valid'}")
        return value

    def integer(self, key: str, *, minimum: int = 0, maximum: int = MAX_INT64, default: int | None = None) -> int:
        if not self.has(key):
            if default is None:
                raise SpecError(self.sub(key), "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(self.sub(key), "must be an integer")
        if not minimum <= value <= maximum:
            raise SpecError(self.sub(key), f"must be between {minimum} and {maximum}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            raise SpecError(self.sub(key), "must be true or false")
        return value

    def items(self, key: str, *, required: bool = False, max_items: int = MAX_LIST) -> list[tuple[str, Any]]:
        if not self.has(key):
            if required:
                raise SpecError(self.sub(key), "is required")
            return []
        value = self.data[key]
        if not isinstance(value, list):
            raise SpecError(self.sub(key), "must be a list")
        if required and not value:
            raise SpecError(self.sub(key), "must not be empty")
        if len(value) > max_items:
            raise SpecError(self.sub(key), f"must have at most {max_items} items")
        return [(f"{self.sub(key)}[{i}]", item) for i, item in enumerate(value)]

    def strings(self, key: str) -> list[tuple[str, str]]:
        out = []
        for path, item in self.items(key):
            if not isinstance(item, str):
                raise SpecError(path, "must be a string")
            out.append((path, item))
        return out

    def duration(self, key: str, default: timedelta, *, minimum: timedelta, maximum: timedelta) -> timedelta:
        if not self.has(key):
            return default
        value = parse_duration(self.data[key], self.sub(key))
        if not minimum <= value <= maximum:
            raise SpecError(self.sub(key), f"must be between {format_duration(minimum)} and {format_duration(maximum)}")
        return value


def _parse_url(path: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise SpecError(path, "must be an http:// or https:// URL")
    if not parts.hostname:
        raise SpecError(path, "must name a host")
    if parts.username or parts.password:
        raise SpecError(path, "must not carry credentials (use inject.secretRef)")
    if parts.query or parts.fragment:
        raise SpecError(path, "must not have a query or fragment")
    if parts.path not in ("", "/") and paths.validate_glob(parts.path.rstrip("/") or "/") is not None:
        raise SpecError(path, "has an ambiguous path prefix")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise SpecError(path, "has an invalid port") from exc
    return url.rstrip("/")


def _parse_inject(data: object, path: str) -> Inject:
    reader = _Reader(data, path, ("secretRef", "header", "valuePrefix", "allowInsecureTransport"))
    ref = _Reader(reader.data.get("secretRef"), reader.sub("secretRef"), ("name", "key"))
    header = reader.string("header", HEADER_NAME, default="Authorization", max_len=128, what="a header name")
    if header.lower() in FORBIDDEN_INJECT_HEADERS or header.lower().startswith("x-capgate-"):
        raise SpecError(reader.sub("header"), f"{header!r} cannot be injected")
    prefix = reader.string("valuePrefix", default="", max_len=64)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        raise SpecError(reader.sub("valuePrefix"), "must not contain control characters")
    return Inject(
        secret_name=ref.string("name", DNS_SUBDOMAIN, what="a Secret name"),
        secret_key=ref.string("key", SECRET_KEY, what="a Secret key"),
        header=header,
        value_prefix=prefix,
        allow_insecure_transport=reader.boolean("allowInsecureTransport", False),
    )


def _parse_tls(data: object, path: str, url: str) -> UpstreamTLS:
    reader = _Reader(data, path, ("caSecretRef",))
    if urlsplit(url).scheme != "https":
        raise SpecError(path, "applies only to an https:// upstream")
    ref = _Reader(reader.data.get("caSecretRef"), reader.sub("caSecretRef"), ("name", "key"))
    return UpstreamTLS(ca_secret_name=ref.string("name", DNS_SUBDOMAIN, what="a Secret name"),
                       ca_secret_key=ref.string("key", SECRET_KEY, what="a Secret key"))


def _parse_upstreams(spec: _Reader) -> tuple[Upstream, ...]:
    out: list[Upstream] = []
    for path, item in spec.items("upstreams", required=True, max_items=MAX_UPSTREAMS):
        reader = _Reader(item, path, ("name", "url", "inject", "tls", "mcp"))
        name = reader.string("name", DNS_LABEL, max_len=63, what="a DNS label")
        if any(u.name == name for u in out):
            raise SpecError(reader.sub("name"), f"duplicate upstream name {name!r}")
        url = _parse_url(reader.sub("url"), reader.string("url", max_len=2048))
        inject = _parse_inject(reader.data["inject"], reader.sub("inject")) if reader.has("inject") else None
        tls = _parse_tls(reader.data["tls"], reader.sub("tls"), url) if reader.has("tls") else None
        mcp = _parse_mcp(reader.data["mcp"], reader.sub("mcp")) if reader.has("mcp") else None
        upstream = Upstream(name=name, url=url, inject=inject, tls=tls, mcp=mcp)
        if inject is not None and upstream.injects_in_cleartext and not inject.allow_insecure_transport:
            raise SpecError(reader.sub("url"), "injects a credential over cleartext http://; use an https:// URL, "
                                               "or opt in with inject.allowInsecureTransport: true")
        out.append(upstream)
    return tuple(out)


def _mcp_path(reader: _Reader, key: str) -> str | None:
    if not reader.has(key):
        return None
    value = reader.string(key, max_len=paths.MAX_PATH_BYTES)
    try:
        normal = paths.normalize(value)
    except RequestError as exc:
        raise SpecError(reader.sub(key), str(exc)) from None
    if normal != value or "*" in value:
        raise SpecError(reader.sub(key), "must be a plain normalized path (no globs, no percent-encoding)")
    return value


PIN = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_PINS = 256


def _parse_pins(reader: _Reader) -> tuple[tuple[str, str], ...]:
    if not reader.has("pins"):
        return ()
    pins = reader.data["pins"]
    where = reader.sub("pins")
    if not isinstance(pins, Mapping) or len(pins) > MAX_PINS:
        raise SpecError(where, f"must be a map of at most {MAX_PINS} tool names to sha256:<hex> pins")
    out = []
    for tool, pin in pins.items():
        if not isinstance(tool, str) or not tool or len(tool) > 1024 or any(c in tool for c in "%?#/"):
            raise SpecError(where, f"{tool!r} is not a tool name")
        if not isinstance(pin, str) or not PIN.fullmatch(pin):
            raise SpecError(f"{where}.{tool}", "must be sha256:<64 lowercase hex digits> (capgate mcp pin)")
        out.append((tool, pin))
    return tuple(sorted(out))


def _parse_mcp(data: object, path: str) -> Mcp:
    reader = _Reader(data, path, ("path", "sse", "messages", "pins"))
    mcp = Mcp(path=_mcp_path(reader, "path"), sse=_mcp_path(reader, "sse"), messages=_mcp_path(reader, "messages"),
              pins=_parse_pins(reader))
    if (mcp.path is None) == (mcp.sse is None and mcp.messages is None):
        raise SpecError(path, "needs either path (streamable HTTP) or sse and messages (HTTP+SSE)")
    if (mcp.sse is None) != (mcp.messages is None):
        raise SpecError(path, "the HTTP+SSE transport needs both sse and messages")
    if mcp.sse is not None and mcp.sse == mcp.messages:
        raise SpecError(path, "sse and messages must be different paths")
    return mcp


def _parse_args(reader: _Reader) -> tuple[Arg, ...]:
    out = []
    for path, item in reader.items("args"):
        arg = _Reader(item, path, ("field", "in", "glob"))
        field_path = arg.string("field", FIELD_PATH, max_len=256, what="a dotted JSON field path")
        if arg.has("in") == arg.has("glob"):
            raise SpecError(path, "needs exactly one of 'in' (a non-empty list) and 'glob'")
        values = arg.strings("in")
        for vpath, value in values:
            if len(value) > paths.MAX_PATH_BYTES:
                raise SpecError(vpath, f"longer than {paths.MAX_PATH_BYTES} characters")
        one_of = tuple(dict.fromkeys(value for _, value in values))
        glob = None
        if arg.has("glob"):
            glob = arg.string("glob", max_len=paths.MAX_PATH_BYTES)
            problem = paths.validate_name_glob(glob)
            if problem:
                raise SpecError(arg.sub("glob"), problem)
        if bool(one_of) == (glob is not None):
            raise SpecError(path, "needs exactly one of 'in' (a non-empty list) and 'glob'")
        out.append(Arg(field=field_path, one_of=one_of, glob=glob))
    return tuple(out)


def _parse_limits(reader: _Reader) -> tuple[Limit, ...]:
    out = []
    for path, item in reader.items("limits"):
        lim = _Reader(item, path, ("field", "max"))
        out.append(Limit(field=lim.string("field", FIELD_PATH, max_len=256, what="a dotted JSON field path"),
                         max=lim.integer("max")))
    return tuple(out)


def _parse_requires(reader: _Reader) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``requires: [search, {rule: quote, consume: true}]``: the rules, and those whose receipt is consumed.

    A rule named twice is required once, and consumed if either entry says so (the stricter reading).
    """
    names: list[str] = []
    consumed: list[str] = []
    for path, item in reader.items("requires"):
        if isinstance(item, str):
            names.append(item)
            continue
        if not isinstance(item, Mapping):
            raise SpecError(path, "must be a rule name or {rule: NAME, consume: true}")
        entry = _Reader(item, path, ("rule", "consume"))
        name = entry.string("rule", max_len=63)
        names.append(name)
        if entry.boolean("consume", False):
            consumed.append(name)
    return tuple(dict.fromkeys(names)), tuple(dict.fromkeys(consumed))


def _parse_rule(path: str, item: object, upstreams: tuple[Upstream, ...]) -> Rule:
    reader = _Reader(item, path, ("name", "effect", "upstream", "methods", "paths", "actions", "resources",
                                  "requires", "limits", "args", "readOnly"))
    name = reader.string("name", RULE_NAME, max_len=63, what="a rule name (lowercase, digits, '-', '_', '.')")
    effect = reader.string("effect")
    if effect not in ("allow", "deny"):
        raise SpecError(reader.sub("effect"), "must be 'allow' or 'deny'")
    upstream = None
    if reader.has("upstream"):
        upstream = reader.string("upstream", DNS_LABEL, max_len=63, what="an upstream name")
    if upstream is not None and not any(u.name == upstream for u in upstreams):
        raise SpecError(reader.sub("upstream"), f"names unknown upstream {upstream!r}")
    methods = []
    for mpath, method in reader.strings("methods"):
        if method not in METHODS:
            raise SpecError(mpath, f"{method!r} is not one of {', '.join(METHODS)}")
        methods.append(method)
    globs = []
    for gpath, glob in reader.strings("paths"):
        problem = paths.validate_glob(glob)
        if problem:
            raise SpecError(gpath, problem)
        globs.append(glob)
    names: dict[str, list[str]] = {}
    for key in ("actions", "resources"):
        names[key] = []
        validate = paths.validate_resource_glob if key == "resources" else paths.validate_name_glob
        for npath, value in reader.strings(key):
            problem = validate(value)
            if problem:
                raise SpecError(npath, problem)
            names[key].append(value)
    requires, consumes = _parse_requires(reader)
    limits = _parse_limits(reader)
    args = _parse_args(reader)
    rule = Rule(name=name, effect=cast(Effect, effect), upstream=upstream, methods=tuple(dict.fromkeys(methods)),
                paths=tuple(dict.fromkeys(globs)), actions=tuple(names["actions"]),
                resources=tuple(names["resources"]), requires=requires, consumes=consumes, limits=limits, args=args,
                read_only=reader.boolean("readOnly", False))
    if not (rule.upstream or rule.methods or rule.paths or rule.actions or rule.resources):
        raise SpecError(path, "a rule must name at least one of upstream, methods, paths, actions, resources")
    if not rule.is_http and (rule.methods or rule.paths):
        raise SpecError(path, "a rule uses either methods/paths (HTTP) or actions/resources, not both")
    if not rule.is_http and rule.upstream:
        raise SpecError(f"{path}.upstream", "action rules name their upstream in the resource "
                                            "(mcp://<upstream>/<tool>), not in 'upstream'")
    if rule.read_only and (rule.is_http or rule.effect != "allow"):
        raise SpecError(f"{path}.readOnly", "only action allow rules are marked readOnly (HTTP reads are GET/HEAD)")
    if rule.args and rule.is_http:
        raise SpecError(f"{path}.args", "args constrain action arguments (MCP params.arguments); "
                                        "use actions/resources")
    if rule.effect == "deny" and (rule.requires or rule.limits):
        raise SpecError(path, "requires and limits only apply to allow rules")
    return rule


def _parse_rules(spec: _Reader, upstreams: tuple[Upstream, ...]) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for path, item in spec.items("rules", required=True, max_items=MAX_RULES):
        rule = _parse_rule(path, item, upstreams)
        if any(r.name == rule.name for r in rules):
            raise SpecError(f"{path}.name", f"duplicate rule name {rule.name!r}")
        rules.append(rule)
    by_name = {r.name: r for r in rules}
    for index, rule in enumerate(rules):
        for rindex, required in enumerate(rule.requires):
            target = by_name.get(required)
            rpath = f"spec.rules[{index}].requires[{rindex}]"
            if target is None:
                raise SpecError(rpath, f"names unknown rule {required!r}")
            if target.effect != "allow" or target is rule:
                raise SpecError(rpath, f"must name another allow rule, not {required!r}")
    return tuple(rules)


def _parse_delegation(spec: _Reader, namespace: str) -> Delegation:
    if not spec.has("delegation"):
        return Delegation()
    reader = _Reader(spec.data["delegation"], spec.sub("delegation"), ("serviceAccounts", "maxDepth"))
    principals = []
    for path, value in reader.strings("serviceAccounts"):
        ns, _, sa = value.rpartition("/")
        ns = ns or namespace
        if not DNS_LABEL.fullmatch(ns) or not DNS_SUBDOMAIN.fullmatch(sa):
            raise SpecError(path, f"{value!r} is not 'serviceaccount' or 'namespace/serviceaccount'")
        principals.append(f"{ns}/{sa}")
    return Delegation(principals=tuple(principals),
                      max_depth=reader.integer("maxDepth", maximum=MAX_DEPTH, default=3))


def _parse_budgets(spec: _Reader, upstreams: tuple[Upstream, ...]) -> tuple[Budget, ...]:
    out = []
    for path, item in spec.items("budgets"):
        reader = _Reader(item, path, ("upstream", "tool", "field", "max", "per", "from", "worstCase"))
        upstream = reader.string("upstream", DNS_LABEL, max_len=63, what="an upstream name")
        declared = next((u for u in upstreams if u.name == upstream), None)
        if declared is None:
            raise SpecError(reader.sub("upstream"), f"names unknown upstream {upstream!r}")
        tool = None
        if reader.has("tool"):
            tool = reader.string("tool", max_len=MAX_TOOL, what="an MCP tool name or glob")
            if declared.mcp is None:
                raise SpecError(reader.sub("tool"), f"upstream {upstream!r} does not declare mcp, so it has no tools")
            problem = "must be a non-empty tool name" if not tool or tool.startswith("/") else None
            problem = problem or next((f"{char!r} is ambiguous in a tool name" for char in "%?#" if char in tool), None)
            problem = problem or paths.validate_resource_glob(f"mcp://{upstream}/{tool}")
            if problem:
                raise SpecError(reader.sub("tool"), problem)
        source = reader.string("from", default="request")
        if source not in ("request", "response"):
            raise SpecError(reader.sub("from"), "must be 'request' or 'response'")
        worst_case = None
        if source == "response":
            if not reader.has("worstCase"):
                raise SpecError(reader.sub("worstCase"), "is required with from: response: what a call whose usage "
                                                         "cannot be read is charged (never 0)")
            worst_case = reader.integer("worstCase", minimum=1)
            if declared.mcp is not None:
                raise SpecError(reader.sub("from"), f"upstream {upstream!r} speaks MCP; from: response reads HTTP "
                                                    "responses (JSON or text/event-stream), not JSON-RPC results")
        elif reader.has("worstCase"):
            raise SpecError(reader.sub("worstCase"), "only applies to from: response (a request budget reads its "
                                                     "amount before the call)")
        out.append(Budget(
            tool=tool,
            upstream=upstream,
            field=reader.string("field", FIELD_PATH, max_len=256, what="a dotted JSON field path"),
            max=reader.integer("max"),
            per=reader.duration("per", timedelta(hours=24), minimum=timedelta(seconds=1), maximum=timedelta(days=31)),
            source=cast(BudgetSource, source),
            worst_case=worst_case,
        ))
    return tuple(out)


def parse_capability(obj: Mapping[str, Any]) -> Capability:
    """Parse a whole AgentCapability object (apiVersion, kind, metadata, spec)."""
    top = _Reader(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if top.data.get("apiVersion") != resources.API_VERSION or top.data.get("kind") != resources.CAPABILITY_KIND:
        raise SpecError("apiVersion",
                        f"expected apiVersion {resources.API_VERSION} and kind {resources.CAPABILITY_KIND}")
    metadata = top.data.get("metadata")
    if not isinstance(metadata, Mapping):
        raise SpecError("metadata", "must be an object")
    name = metadata.get("name")
    if not isinstance(name, str) or not DNS_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        raise SpecError("metadata.name", "must be a DNS subdomain name")
    namespace = metadata.get("namespace") or "default"
    if not isinstance(namespace, str) or not DNS_LABEL.fullmatch(namespace) or len(namespace) > 63:
        raise SpecError("metadata.namespace", "must be a DNS label")
    return parse_spec(top.data.get("spec"), name=name, namespace=namespace)


def parse_spec(data: object, *, name: str, namespace: str) -> Capability:
    """Parse ``spec`` of an AgentCapability named ``namespace/name``."""
    spec = _Reader(data, "spec", ("serviceAccountName", "upstreams", "rules", "rateLimit", "budgets", "datalog",
                                  "credential", "receipts", "delegation", "mode", "lockdownAfter", "revoked",
                                  "egress"))
    upstreams = _parse_upstreams(spec)
    rate_limit = None
    if spec.has("rateLimit"):
        rl = _Reader(spec.data["rateLimit"], spec.sub("rateLimit"), ("requests", "per"))
        rate_limit = RateLimit(requests=rl.integer("requests", minimum=1, maximum=10_000_000),
                               per=rl.duration("per", timedelta(hours=1), minimum=timedelta(seconds=1),
                                               maximum=timedelta(days=31)))
    credential = _Reader(spec.data.get("credential") or {}, spec.sub("credential"), ("ttl", "rotateBefore"))
    ttl = credential.duration("ttl", timedelta(hours=1), minimum=timedelta(seconds=10), maximum=timedelta(days=30))
    rotate_before = credential.duration("rotateBefore", min(timedelta(minutes=20), ttl / 3),
                                        minimum=timedelta(seconds=1), maximum=timedelta(days=30))
    if rotate_before >= ttl:
        raise SpecError("spec.credential.rotateBefore", "must be shorter than spec.credential.ttl")
    receipts = _Reader(spec.data.get("receipts") or {}, spec.sub("receipts"), ("ttl",))
    mode = spec.string("mode", default="enforce")
    if mode not in ("enforce", "audit"):
        raise SpecError(spec.sub("mode"), "must be 'enforce' or 'audit'")
    datalog = spec.string("datalog", default="", max_len=MAX_DATALOG_BYTES)
    egress = _Reader(spec.data.get("egress") or {}, spec.sub("egress"), ("mode",))
    egress_mode = egress.string("mode", default="enforce")
    if egress_mode not in ("enforce", "cooperative"):
        raise SpecError(egress.sub("mode"), "must be 'enforce' or 'cooperative'")
    return Capability(
        name=name,
        namespace=namespace,
        service_account=spec.string("serviceAccountName", DNS_SUBDOMAIN, what="a ServiceAccount name"),
        upstreams=upstreams,
        rules=_parse_rules(spec, upstreams),
        rate_limit=rate_limit,
        budgets=_parse_budgets(spec, upstreams),
        datalog=datalog,
        credential_ttl=ttl,
        rotate_before=rotate_before,
        receipt_ttl=receipts.duration("ttl", timedelta(minutes=5), minimum=timedelta(seconds=1),
                                      maximum=timedelta(hours=24)),
        delegation=_parse_delegation(spec, namespace),
        mode=cast(Mode, mode),
        lockdown_after=spec.duration("lockdownAfter", timedelta(seconds=60), minimum=timedelta(seconds=1),
                                     maximum=timedelta(days=1)),
        revoked=spec.boolean("revoked", False),
        egress_mode=cast(EgressMode, egress_mode),
    )


def load_capability_file(path: str | Path) -> Capability:
    """Read an AgentCapability manifest (YAML or JSON; the first AgentCapability document)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(str(path), f"not valid YAML: {exc}") from exc
    for document in documents:
        if isinstance(document, Mapping) and document.get("kind") == resources.CAPABILITY_KIND:
            return parse_capability(document)
    raise SpecError(str(path), f"no {resources.CAPABILITY_KIND} document found")


def to_spec(cap: Capability) -> dict[str, Any]:
    """Render the canonical spec back (defaults made explicit): the compiler embeds it, whoami shows it."""
    def rule_dict(rule: Rule) -> dict[str, Any]:
        out: dict[str, Any] = {"name": rule.name, "effect": rule.effect}
        for key, value in (("upstream", rule.upstream), ("methods", list(rule.methods)), ("paths", list(rule.paths)),
                           ("actions", list(rule.actions)), ("resources", list(rule.resources)),
                           ("requires", [{"rule": name, "consume": True} if name in rule.consumes else name
                                         for name in rule.requires])):
            if value:
                out[key] = value
        if rule.limits:
            out["limits"] = [{"field": lim.field, "max": lim.max} for lim in rule.limits]
        if rule.read_only:
            out["readOnly"] = True
        if rule.args:
            out["args"] = [{"field": a.field, "in": list(a.one_of)} if a.one_of else {"field": a.field, "glob": a.glob}
                           for a in rule.args]
        return out

    def upstream_dict(up: Upstream) -> dict[str, Any]:
        out: dict[str, Any] = {"name": up.name, "url": up.url}
        if up.inject:
            out["inject"] = {"secretRef": {"name": up.inject.secret_name, "key": up.inject.secret_key},
                             "header": up.inject.header, "valuePrefix": up.inject.value_prefix}
            if up.inject.allow_insecure_transport:
                out["inject"]["allowInsecureTransport"] = True
        if up.tls:
            out["tls"] = {"caSecretRef": {"name": up.tls.ca_secret_name, "key": up.tls.ca_secret_key}}
        if up.mcp:
            out["mcp"] = {k: v for k, v in (("path", up.mcp.path), ("sse", up.mcp.sse), ("messages", up.mcp.messages))
                          if v is not None}
            if up.mcp.pins:
                out["mcp"]["pins"] = dict(up.mcp.pins)
        return out

    spec: dict[str, Any] = {
        "serviceAccountName": cap.service_account,
        "upstreams": [upstream_dict(u) for u in cap.upstreams],
        "rules": [rule_dict(r) for r in cap.rules],
        "credential": {"ttl": format_duration(cap.credential_ttl), "rotateBefore": format_duration(cap.rotate_before)},
        "receipts": {"ttl": format_duration(cap.receipt_ttl)},
        "delegation": {"serviceAccounts": list(cap.delegation.principals), "maxDepth": cap.delegation.max_depth},
        "mode": cap.mode,
        "lockdownAfter": format_duration(cap.lockdown_after),
        "revoked": cap.revoked,
        "egress": {"mode": cap.egress_mode},
    }
    if cap.rate_limit:
        spec["rateLimit"] = {"requests": cap.rate_limit.requests, "per": format_duration(cap.rate_limit.per)}
    if cap.budgets:
        spec["budgets"] = [_budget_dict(b) for b in cap.budgets]
    if cap.datalog:
        spec["datalog"] = cap.datalog
    return spec


def _budget_dict(budget: Budget) -> dict[str, Any]:
    out: dict[str, Any] = {"upstream": budget.upstream, **({"tool": budget.tool} if budget.tool is not None else {}),
                           "field": budget.field, "max": budget.max, "per": format_duration(budget.per)}
    if budget.from_response:
        out.update({"from": "response", "worstCase": budget.worst_case})
    return out


def numeric_field(body: object, dotted: str) -> int | None:
    """The integer a limit compares, or None when the field is missing or not a finite number.

    Non-integral numbers round away from zero, so ``400.01`` never passes a ``max: 400`` limit and
    ``-0.5`` stays negative (negative amounts never pass a limit).
    """
    _, value = field_value(body, dotted)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = math.ceil(value) if value > 0 else math.floor(value)
    if not -MAX_INT64 <= value <= MAX_INT64:
        return None
    return int(value)


def string_field(body: object, dotted: str) -> str | None:
    """The string an ``args`` constraint compares, or None when missing or not a string."""
    _, value = field_value(body, dotted)
    return value if isinstance(value, str) else None


def field_value(body: object, dotted: str) -> tuple[bool, object]:
    """``(present, value)`` of a dotted field path in a parsed JSON body: the one walk every limit,
    budget, ``args`` constraint and response budget reads a field with (value None when absent)."""
    value: object = body
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value
