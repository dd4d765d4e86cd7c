"""What a capability *means*, written from DESIGN.md alone — the judge of the adversarial suite.

This module deliberately imports nothing from ``capgate``: it reads capabilities as plain dicts
(the CR's ``spec``) and requests as plain values, and states the outcome DESIGN.md promises.
If it and the sidecar disagree, one of them misreads the design; a request the sidecar forwards
while this says "refuse" is a **false allow**.

The semantics, in the order DESIGN.md's request flow lists them:

1. route ``/<upstream>/<rest>``: the first segment, *as sent*, must name an upstream (else 403);
2. ``rest`` must decode one way only (no dot or empty segments, no segments of only dots and
   spaces, no encoded ``/ . \\ % ; NUL``, no backslash, ``;``, control characters — C0, DEL, C1,
   U+2028/9 — or bad UTF-8, and its NFKC form must have the same shape), else 400;
3. at most one valid ``X-Capgate-Correlation-Id`` (else 400) and at most one ``X-Capgate-Token``
   (else 400), which must be a token we know to be valid (else 401);
4. every header value is UTF-8 (else 400); neither the query nor a URL-encoded form body (read on
   every upstream, at most 1 MiB) names ``_method`` (else 400);
5. where a limit or budget reads this upstream's bodies, the query never names a field (its top
   key or dotted path, any case) and a body of any method is at most 1 MiB (else 413) and exactly one
   strict JSON document in UTF-8 with one JSON Content-Type, no Content-Encoding, no keys that
   collide case-insensitively, no top-level ``_method`` and the field spelled exactly (else 400);
   an empty body is no document;
6. deny rules first — matched leniently: case-insensitive (NFKC + case folding), trailing ``/``,
   trailing dots and whitespace of a segment, format characters, IIS's ``::$DATA`` and a
   last-segment extension tolerated — then allow rules, matched exactly (scope, limits on the JSON body, required
   receipts in the correlation), default deny (403) — under the base capability and under the
   narrowed one;
7. budgets (429); then the upstream sees the request, without method-override headers.

On an upstream's declared MCP endpoint (``mcp.path``, read leniently like a deny glob) the
request is one JSON-RPC message instead (DESIGN.md "MCP", README "MCP"), judged by
:meth:`Agent.decide_mcp`: POST carries the message, GET and DELETE are plumbing, anything else is
405; the message is exactly one strict JSON object (no batch) with a JSON Content-Type and no
Content-Encoding, ``jsonrpc: "2.0"``, no other members, a string or integer id, object params;
``Mcp-Method``/``Mcp-Name`` agree with the body (the name exactly as the SDK encodes it),
``Mcp-Param-*`` only for a tool a list declared them for (never here), a tool name without
``% ? #`` that reads as one path; argument names a limit or ``args`` reads spelled exactly —
all 400. Then tokens (400/401) and sessions (an id no one opened here: 404); plumbing and lists
pass; answers to no server request are 403; a tool call is ``mcp.call`` on ``mcp://<up>/<tool>``
and another method ``mcp.rpc`` on ``mcp://<up>/<method>``, decided by the action rules alone
(deny leniently, with ``args``; allow exactly, with limits on ``params.arguments``), then budgets
(a budget's ``tool`` matched leniently).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

METHOD_OVERRIDE_HEADERS = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
MAX_BODY = 1024 * 1024
MAX_PATH_BYTES = 4096
INT64 = 2**63 - 1
AMBIGUOUS_WHEN_ENCODED = frozenset(b"/.\\%;\x00")
CORRELATION_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+=-")


@dataclass(frozen=True)
class Refusal:
    status: int
    error: str


ALLOW = None


def decode_path(raw: str) -> str | None:
    """The single decoding of a raw path, or None when two servers could read it differently."""
    if not raw.startswith("/") or len(raw.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return None
    out = bytearray()
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "%":
            pair = raw[index + 1:index + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                return None
            byte = int(pair, 16)
            if byte in AMBIGUOUS_WHEN_ENCODED or byte < 0x20 or byte == 0x7F:
                return None
            out.append(byte)
            index += 3
            continue
        if char in "\\;" or ord(char) < 0x20 or ord(char) == 0x7F:
            return None
        try:
            out += char.encode("utf-8")
        except UnicodeEncodeError:
            return None
        index += 1
    try:
        decoded = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded if one_reading(decoded) else None


LINE_CONTROLS = frozenset(chr(c) for c in range(0x80, 0xA0)) | {"\u2028", "\u2029"}


def _blank(segment: str) -> bool:
    """Only dots and whitespace: Windows servers strip trailing dots and spaces, so it may become '..'."""
    return all(char == "." or char.isspace() for char in segment)


def _shape_ok(decoded: str) -> bool:
    if any(char in LINE_CONTROLS or ord(char) < 0x20 or ord(char) == 0x7F or char in "\\;%" for char in decoded):
        return False
    segments = decoded.split("/")[1:]
    for position, segment in enumerate(segments):
        if segment == "":
            if position != len(segments) - 1:
                return False
        elif _blank(segment):
            return False
    return True


def one_reading(decoded: str) -> bool:
    """The decoded path reads the same to a server that applies Unicode compatibility (NFKC) first."""
    if not _shape_ok(decoded):
        return False
    compatible = unicodedata.normalize("NFKC", decoded)
    return compatible.count("/") == decoded.count("/") and _shape_ok(compatible)


def fold_segment(segment: str) -> str:
    """How the most forgiving router compares a segment (for deny rules)."""
    segment = unicodedata.normalize("NFKC", segment)
    segment = "".join(char for char in segment if unicodedata.category(char) != "Cf")
    segment = unicodedata.normalize("NFKC", segment.casefold())
    segment = _strip_blank_tail(segment)
    if segment.endswith("::$data"):  # IIS: the default NTFS data stream is the file itself
        segment = _strip_blank_tail(segment[:-len("::$data")])
    return segment


def _strip_blank_tail(segment: str) -> str:
    while segment and (segment[-1] == "." or segment[-1].isspace()):
        segment = segment[:-1]
    return segment


def _folded(path: str, wildcards: bool) -> list[str]:
    out = [segment if wildcards and segment in ("*", "**") else fold_segment(segment)
           for segment in path.split("/")[1:]]
    return [segment for segment in out if segment]


def lenient_glob_matches(glob: str, path: str) -> bool:
    """A deny glob catches the path as sent, folded, and folded without its last extension."""
    if glob_matches(glob, path):
        return True
    pattern = "/" + "/".join(_folded(glob, True))
    parts = _folded(path, False)
    readings = ["/" + "/".join(parts)]
    if parts and parts[-1].find(".") > 0:
        readings.append("/" + "/".join([*parts[:-1], parts[-1][:parts[-1].find(".")]]))
    return any(glob_matches(pattern, reading) for reading in readings)


def decode_resource(raw: str) -> str | None:
    """``scheme://authority/path`` (authority: plain ASCII host[:port], the path decoded like a request
    path, an empty one read as ``/``) or an absolute ``/path``; None for anything else."""
    if raw.startswith("/"):
        return decode_path(raw)
    scheme, sep, rest = raw.partition("://")
    if not sep or not scheme[:1].isascii() or not scheme[:1].isalpha() \
            or any(not (c.isascii() and (c.isalnum() or c in "+.-")) for c in scheme):
        return None
    authority, slash, path = rest.partition("/")
    if "?" in raw or "#" in raw or any(
            not (c.isascii() and (c.isalnum() or c in "._~!$&'()+,=:@[]-")) for c in authority):
        return None
    decoded = decode_path("/" + path) if slash else "/"
    return None if decoded is None else f"{scheme}://{authority}{decoded}"


def _deny_scope(rule: Mapping[str, Any], method: str, upstream: str, path: str) -> bool:
    return ((not rule.get("upstream") or rule["upstream"] == upstream)
            and (not rule.get("methods") or method in rule["methods"])
            and (not rule.get("paths") or any(lenient_glob_matches(g, path) for g in rule["paths"])))


def glob_matches(glob: str, path: str) -> bool:
    """``*`` is one whole non-empty segment, ``**`` any number of segments (zero included)."""
    if glob == "/":
        return path == "/"
    pattern, parts = glob.split("/")[1:], path.split("/")[1:]

    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(parts)
        if pattern[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(parts) + 1))
        if j == len(parts):
            return False
        if pattern[i] == "*":
            return parts[j] != "" and match(i + 1, j + 1)
        return pattern[i] == parts[j] and match(i + 1, j + 1)

    return match(0, 0)


def same_name(a: str, b: str) -> bool:
    """Go folds keys (Unicode simple folding: K→k, ſ→s), Java/.NET/JS lower or upper them."""
    return a.casefold() == b.casefold() or a.lower() == b.lower() or a.upper() == b.upper()


class _Unreadable(ValueError):
    pass


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for i, key in enumerate(keys):
        if any(same_name(key, other) for other in keys[:i]):
            raise _Unreadable("ambiguous")  # a repeated or case-colliding key: parsers pick different values
        if any(0xD800 <= ord(c) <= 0xDFFF for c in key):
            raise _Unreadable("unreadable")
    return dict(pairs)


def _no_constant(name: str) -> object:
    raise _Unreadable("unreadable")


def strict_document(raw: bytes) -> object:
    """The one strict JSON document in UTF-8 (no BOM, NaN, trailing bytes, colliding keys); raises otherwise."""
    if raw[:3] == b"\xef\xbb\xbf":
        raise _Unreadable("unreadable")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except _Unreadable:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _Unreadable("unreadable") from exc


def parse_body(raw: bytes) -> object:
    """The document a limit reads, or None when the sidecar must refuse the body (or it is not JSON)."""
    try:
        return strict_document(raw)
    except _Unreadable:
        return None


def query_names(query: str) -> list[str | None]:
    names: list[str | None] = []
    for part in re.split("[&;]", query):
        if part:
            try:
                names.append(unquote_plus(part.split("=", 1)[0], errors="strict"))
            except UnicodeDecodeError:
                names.append(None)
    return names


def query_refused(query: str, fields: set[str]) -> bool:
    """``_method`` anywhere, or (where fields are read) a field's top key or dotted path, any case."""
    names = query_names(query)
    bases = [n.split("[", 1)[0].strip(" \t\r\n\x00") for n in names if n is not None]
    if any(same_name(base, "_method") for base in bases):
        return True
    if not fields:
        return False
    wanted = set(fields) | {f.split(".")[0] for f in fields}
    return None in names or any(same_name(base, name) for base in bases for name in wanted)


JSON_MEDIA = re.compile(r"^application/(json|[a-z0-9!#$&^_.-]+\+json)$")


def body_refused(raw: bytes, headers: Sequence[tuple[str, str]], fields: set[str]) -> bool:
    """What DESIGN.md says about a non-empty body a limit or budget reads."""
    if any(n.lower() == "content-encoding" for n, _ in headers):
        return True  # the sidecar never decompresses
    types = [v.strip() for n, v in headers if n.lower() == "content-type"]
    if len(types) != 1:
        return True
    media, *params = types[0].split(";")
    if not JSON_MEDIA.match(media.strip().lower()):
        return True
    charsets = [p.split("=", 1)[1].strip().strip('"').lower() for p in params
                if "=" in p and p.split("=", 1)[0].strip().lower() == "charset"]
    if len(charsets) > 1 or (charsets and charsets[0] != "utf-8"):
        return True
    try:
        document = strict_document(raw)
    except _Unreadable:
        return True
    if isinstance(document, dict) and any(same_name(k, "_method") for k in document):
        return True
    return misspelled(document, fields)


def misspelled(document: object, fields: Iterable[str]) -> bool:
    """A field spelled otherwise than the limit reads it: ``{"AMOUNT": 5}``."""
    for dotted in fields:
        value = document
        for part in dotted.split("."):
            if not isinstance(value, dict):
                break
            spelled = [k for k in value if same_name(k, part)]
            if not spelled:
                break
            if spelled[0] != part:
                return True  # {"AMOUNT": 5}: Go charges it, a limit on "amount" would not see it
            value = value[part]
    return False


def is_form(headers: Sequence[tuple[str, str]]) -> bool:
    return any(n.lower() == "content-type" and v.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"
               for n, v in headers)


def form_refused(raw: bytes, headers: Sequence[tuple[str, str]]) -> bool:
    """A URL-encoded form is read on every upstream for ``_method`` (Rack, Laravel); compressed, it cannot be."""
    if any(n.lower() == "content-encoding" for n, _ in headers):
        return True
    names = query_names(raw.decode("latin-1"))
    return any(same_name(n.split("[", 1)[0].strip(" \t\r\n\x00"), "_method") for n in names if n is not None)


def header_bytes_ok(headers: Sequence[tuple[str, str]]) -> bool:
    """Header values as the runner sends them (surrogate escapes are raw non-UTF-8 bytes)."""
    return not any(0xDC80 <= ord(c) <= 0xDCFF for _, v in headers for c in v)


def number_at(body: object, dotted: str) -> float | int | None:
    value: object = body
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if abs(value) > INT64:
        return None
    return value


def present(body: object, dotted: str) -> bool:
    value: object = body
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def within(value: float | int | None, maximum: int) -> bool:
    """"missing/non-numeric = deny"; a fraction above the max is above it; negatives never pass."""
    return value is not None and value >= 0 and math.ceil(value) <= maximum


def _scope(rule: Mapping[str, Any], method: str, upstream: str, path: str) -> bool:
    return ((not rule.get("upstream") or rule["upstream"] == upstream)
            and (not rule.get("methods") or method in rule["methods"])
            and (not rule.get("paths") or any(glob_matches(g, path) for g in rule["paths"])))


def verdict(spec: Mapping[str, Any], method: str, upstream: str, path: str, body: object,
            receipts: Iterable[str], only_rules: Sequence[str] | None = None) -> tuple[bool, str | None]:
    """(allowed, the allow rule a receipt is minted for) under one capability spec."""
    rules = [rule for rule in spec["rules"] if not (rule.get("actions") or rule.get("resources"))]  # HTTP rules
    held = set(receipts)
    for rule in rules:
        if rule["effect"] == "deny" and _deny_scope(rule, method, upstream, path):
            return False, None
    fired = [rule["name"] for rule in rules
             if rule["effect"] == "allow" and _scope(rule, method, upstream, path)
             and all(within(number_at(body, lim["field"]), lim["max"]) for lim in rule.get("limits", ()))
             and all(required in held for required in rule.get("requires", ()))]
    return _first_allowed(fired, only_rules)


def body_fields(spec: Mapping[str, Any], upstream: str) -> set[str]:
    found = {lim["field"] for rule in spec["rules"] if rule.get("upstream") in (None, upstream)
             for lim in rule.get("limits", ())}
    found.update(b["field"] for b in spec.get("budgets", ()) if b["upstream"] == upstream)
    return found


def _readings(path: str) -> list[str]:
    """How a forgiving router reads a decoded path (a deny glob's lenient forms)."""
    parts = _folded(path, False)
    readings = ["/" + "/".join(parts)]
    if parts and parts[-1].find(".") > 0:
        readings.append("/" + "/".join([*parts[:-1], parts[-1][:parts[-1].find(".")]]))
    return readings


def mcp_covers(endpoint: str, path: str) -> bool:
    """Is ``path`` the MCP endpoint to some forgiving router (``/MCP/``, ``/mcp.json``)?"""
    return bool(set(_readings(path)) & set(_readings(endpoint)))


def fold_name(value: str) -> str:
    return fold_segment(value.strip())


def name_glob(glob: str, value: str) -> bool:
    """An ``args`` glob: ``*`` within a ``/``-segment, ``**`` across."""
    pattern = "".join(".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part)
                      for part in re.split(r"(\*\*|\*)", glob))
    return re.fullmatch(pattern, value, re.DOTALL) is not None


def string_at(arguments: object, dotted: str) -> str | None:
    value: object = arguments
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, str) else None


def _args_hold(rule: Mapping[str, Any], arguments: object) -> bool:
    """Allow rules: every ``args`` constraint holds exactly."""
    for arg in rule.get("args", ()):
        value = string_at(arguments, arg["field"])
        if value is None or ("in" in arg and value not in arg["in"]) or ("glob" in arg and not name_glob(arg["glob"],
                                                                                                          value)):
            return False
    return True


def _args_hit(rule: Mapping[str, Any], arguments: object) -> bool:
    """Deny rules: every ``args`` constraint matches leniently (folded)."""
    for arg in rule.get("args", ()):
        value = string_at(arguments, arg["field"])
        if value is None:
            return False
        if "in" in arg and fold_name(value) not in {fold_name(v) for v in arg["in"]}:
            return False
        if "glob" in arg and not (name_glob(arg["glob"], value) or name_glob(fold_name(arg["glob"]), fold_name(value))):
            return False
    return True


def _resource_hit(glob: str, resource: str, lenient: bool) -> bool:
    """``mcp://<upstream>/<path>`` globs (the generated ones name their upstream exactly)."""
    prefix, _, gpath = glob.partition("://")[2].partition("/")
    rprefix, _, rpath = resource.partition("://")[2].partition("/")
    if prefix != rprefix:
        return False
    return (lenient_glob_matches if lenient else glob_matches)("/" + gpath, "/" + rpath)


def action_verdict(spec: Mapping[str, Any], action: str, resource: str, arguments: object, receipts: Iterable[str],
                   only_rules: Sequence[str] | None = None) -> tuple[bool, str | None]:
    """(allowed, the allow rule) for an action: only action rules apply; deny first, leniently."""
    rules = [rule for rule in spec["rules"] if rule.get("actions") or rule.get("resources")]
    held = set(receipts)
    for rule in rules:
        if rule["effect"] == "deny" and action in rule.get("actions", (action,)) and any(
                _resource_hit(g, resource, True) for g in rule.get("resources", ())) and _args_hit(rule, arguments):
            return False, None
    fired = [rule["name"] for rule in rules
             if rule["effect"] == "allow" and action in rule.get("actions", (action,))
             and any(_resource_hit(g, resource, False) for g in rule.get("resources", ()))
             and all(within(number_at(arguments, lim["field"]), lim["max"]) for lim in rule.get("limits", ()))
             and _args_hold(rule, arguments)
             and all(required in held for required in rule.get("requires", ()))]
    return _first_allowed(fired, only_rules)


MCP_MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
MCP_IMPLIED = frozenset({"initialize", "server/discover", "ping", "subscriptions/listen", "tools/list",
                         "prompts/list", "resources/list", "resources/templates/list"})
NAME_HEADER_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


def header_encoding(value: str) -> str:
    """How the MCP SDK writes a name into a header: visible ASCII as is, else ``=?base64?<utf-8>?=``."""
    import base64

    if all(0x20 <= ord(c) <= 0x7E for c in value) and value == value.strip() and not (
            len(value) >= 11 and value.startswith("=?base64?") and value.endswith("?=")):
        return value
    return "=?base64?" + base64.b64encode(value.encode("utf-8", "surrogatepass")).decode() + "?="


def mcp_message_refused(body: bytes, headers: Sequence[tuple[str, str]], fields: set[str]) -> bool:
    """What DESIGN.md and the README say makes one MCP message unreadable (400), or ``False``."""
    if any(n.lower() == "content-encoding" for n, _ in headers):
        return True
    types = [v.strip() for n, v in headers if n.lower() == "content-type"]
    if len(types) != 1 or body_refused(b"{}", [("Content-Type", types[0])], set()):
        return True
    try:
        document = strict_document(body)
    except _Unreadable:
        return True
    if not isinstance(document, dict) or set(document) - MCP_MEMBERS or document.get("jsonrpc") != "2.0":
        return True
    ident = document.get("id")
    if "id" in document and (isinstance(ident, bool) or not isinstance(ident, str | int)):
        return True
    params = document.get("params", {})
    if not isinstance(params, dict):
        return True
    method = document.get("method")
    if "method" in document:
        if not isinstance(method, str) or not method or len(method) > 1024 or "result" in document \
                or "error" in document:
            return True
    elif "id" not in document or ("result" in document) == ("error" in document) or "params" in document:
        return True
    methods = [v for n, v in headers if n.lower() == "mcp-method"]
    names = [v for n, v in headers if n.lower() == "mcp-name"]
    if len(methods) > 1 or len(names) > 1 or (methods and methods[0] != method):
        return True
    member = NAME_HEADER_METHODS.get(method) if isinstance(method, str) else None
    body_name = params.get(member) if member else None
    if names and (not isinstance(body_name, str) or names[0] != header_encoding(body_name)):
        return True
    if methods and not names and body_name is not None:
        return True
    if any(n.lower().startswith("mcp-param-") for n, _ in headers):
        return True  # no list ever declared one here
    if method == "tools/call" and "id" in document:
        name = params.get("name")
        if not isinstance(name, str) or not name or len(name) > 1024 or any(c in name for c in "%?#") \
                or decode_path("/" + name) is None:
            return True
        arguments = params.get("arguments", {})
        if arguments is not None and not isinstance(arguments, dict):
            return True
        return misspelled(arguments or {}, fields)
    if (isinstance(method, str) and "id" in document and method not in MCP_IMPLIED) \
            or (isinstance(method, str) and "id" not in document and not method.startswith("notifications/")):
        return any(c in method for c in "%?#") or decode_path("/" + method) is None
    return False


@dataclass(frozen=True)
class Narrowed:
    """An ``X-Capgate-Token`` the test knows the meaning of: a capability spec, maybe narrowed to rules."""

    spec: Mapping[str, Any]
    only_rules: tuple[str, ...] | None = None
    holder: str = "agent"
    """The ServiceAccount the token was issued to; another pod's token is refused (401 ``identity``)."""


@dataclass
class Agent:
    """One agent's view of one sidecar: its capability, and the state the policy depends on."""

    spec: Mapping[str, Any]
    held: dict[str, set[str]] = field(default_factory=dict)
    """correlation -> rules with a receipt this sidecar minted (the default correlation is ``""``)."""
    spent: dict[int, int] = field(default_factory=dict)
    pending: list[tuple[int, int]] = field(default_factory=list)
    """What the last allowed request would charge; spent once the upstream is seen to get it."""
    override_host: str = "127.0.0.1"
    """Where ``--upstream-url`` points every upstream; absolute-form hosts may name it too."""

    def decide(self, *, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes,
               narrowed: Narrowed | None, carried: Mapping[str, set[str]]) -> tuple[Refusal | None, str | None]:
        """The refusal DESIGN.md demands (None: forward), and the rule a receipt would be minted for.

        ``carried`` maps correlation -> rules of the *valid* receipts the request carries.
        """
        self.pending = []
        if target.startswith("/_capgate/"):
            return Refusal(404, "bad_request"), None  # the reserved control prefix: never proxied
        upstream, path = self.route(target)
        if upstream is None:
            return Refusal(403, "denied"), None
        if path is None:
            return Refusal(400, "bad_request"), None
        names = [name.lower() for name, _ in headers]
        correlations = [v for n, v in headers if n.lower() == "x-capgate-correlation-id"]
        if len(correlations) > 1 or (correlations and not _valid_correlation(correlations[0])):
            return Refusal(400, "bad_request"), None
        correlation = correlations[0] if correlations else ""
        endpoint = next((u["mcp"]["path"] for u in self.spec["upstreams"] if u["name"] == upstream and "mcp" in u),
                        None)
        if endpoint is not None and mcp_covers(endpoint, path):
            return self.decide_mcp(method=method, upstream=upstream, query=self.query(target), headers=headers,
                                   body=body, narrowed=narrowed, receipts=self.held.get(correlation, set())
                                   | carried.get(correlation, set()))
        tokens = names.count("x-capgate-token")
        if tokens > 1:
            return Refusal(400, "bad_request"), None
        if tokens == 1 and narrowed is None:
            return Refusal(401, "invalid_token"), None
        if not header_bytes_ok(headers):
            return Refusal(400, "bad_request"), None
        fields = body_fields(self.spec, upstream)
        if query_refused(self.query(target), fields):
            return Refusal(400, "bad_request"), None
        needs = bool(fields) and bool(body)
        form = not fields and bool(body) and is_form(headers)
        if (needs or form) and len(body) > MAX_BODY:
            return Refusal(413, "too_large"), None
        if form and form_refused(body, headers):
            return Refusal(400, "bad_request"), None
        if needs and body_refused(body, headers, fields):
            return Refusal(400, "bad_request"), None
        parsed = parse_body(body) if needs else None
        receipts = self.held.get(correlation, set()) | carried.get(correlation, set())
        allowed, rule = verdict(self.spec, method, upstream, path, parsed, receipts)
        if allowed and narrowed is not None and narrowed.holder != self.spec["serviceAccountName"]:
            return Refusal(401, "invalid_token"), None
        if allowed and narrowed is not None:
            allowed, _ = verdict(narrowed.spec, method, upstream, path, parsed, receipts, narrowed.only_rules)
        if not allowed:
            return Refusal(403, "denied"), None
        charges = []
        for index, budget in enumerate(self.spec.get("budgets", ())):
            if budget["upstream"] != upstream or "tool" in budget:
                continue
            amount = number_at(parsed, budget["field"])
            if amount is None and present(parsed, budget["field"]):
                return Refusal(429, "budget_exhausted"), None  # a charge it cannot count is not free
            amount = max(0, math.ceil(amount)) if amount is not None else 0
            if self.spent.get(index, 0) + amount > budget["max"]:
                return Refusal(429, "budget_exhausted"), None
            charges.append((index, amount))
        self.pending = charges
        return ALLOW, rule

    def decide_mcp(self, *, method: str, upstream: str, query: str, headers: Sequence[tuple[str, str]], body: bytes,
                   narrowed: Narrowed | None, receipts: set[str]) -> tuple[Refusal | None, str | None]:
        """One request on an MCP endpoint (see the module docstring)."""
        if method not in ("GET", "DELETE", "POST"):
            return Refusal(405, "bad_request"), None
        if not header_bytes_ok(headers):
            return Refusal(400, "bad_request"), None
        fields = {lim["field"] for rule in self.spec["rules"] for lim in rule.get("limits", ())}
        fields |= {b["field"] for b in self.spec.get("budgets", ())}
        fields |= {arg["field"] for rule in self.spec["rules"] for arg in rule.get("args", ())}
        if method == "POST" and len(body) > MAX_BODY:
            return Refusal(413, "too_large"), None
        if query_refused(query, fields):
            return Refusal(400, "bad_request"), None
        if method == "POST" and mcp_message_refused(body, headers, fields):
            return Refusal(400, "bad_request"), None
        names = [name.lower() for name, _ in headers]
        if names.count("x-capgate-token") > 1:
            return Refusal(400, "bad_request"), None
        if "x-capgate-token" in names and narrowed is None:
            return Refusal(401, "invalid_token"), None
        if "mcp-session-id" in names:
            return Refusal(404, "bad_request"), None  # no session was ever opened here
        if method != "POST":
            return (Refusal(400, "bad_request"), None) if body else (ALLOW, None)
        document = json.loads(body)
        message = document.get("method")
        if message is None:
            return Refusal(403, "denied"), None  # an answer to a request no server sent here
        params = document.get("params", {})
        request = "id" in document
        if (message in MCP_IMPLIED and request) or (message.startswith("notifications/") and not request):
            return ALLOW, None
        if message == "tools/call" and request:
            action, name, arguments = "mcp.call", params["name"], params.get("arguments") or {}
        else:
            action, name, arguments = "mcp.rpc", message, None
        resource = f"mcp://{upstream}{decode_path('/' + name)}"
        allowed, rule = action_verdict(self.spec, action, resource, arguments, receipts)
        if allowed and narrowed is not None and narrowed.holder != self.spec["serviceAccountName"]:
            return Refusal(401, "invalid_token"), None
        if allowed and narrowed is not None:
            allowed, _ = action_verdict(narrowed.spec, action, resource, arguments, receipts, narrowed.only_rules)
        if not allowed:
            return Refusal(403, "denied"), None
        charges = []
        for index, budget in enumerate(self.spec.get("budgets", ())):
            tool = budget.get("tool")
            if budget["upstream"] != upstream or (tool is not None and (
                    action != "mcp.call" or not _resource_hit(f"mcp://{upstream}/{tool}", resource, True))):
                continue
            amount = number_at(arguments, budget["field"])
            if amount is None and present(arguments, budget["field"]):
                return Refusal(429, "budget_exhausted"), None
            amount = max(0, math.ceil(amount)) if amount is not None else 0
            if self.spent.get(index, 0) + amount > budget["max"]:
                return Refusal(429, "budget_exhausted"), None
            charges.append((index, amount))
        self.pending = charges
        # A receipt is minted only for a tool call the upstream answers with a success for its id.
        return ALLOW, rule if action == "mcp.call" and request else None

    def charged(self) -> None:
        """The upstream got the last request: the sidecar charged its budgets before forwarding it.

        A request the HTTP parser refused first (allowed for malformed HTTP) was never charged.
        """
        for index, amount in self.pending:
            self.spent[index] = self.spent.get(index, 0) + amount
        self.pending = []

    def forwarded(self, correlation: str, rule: str | None) -> None:
        """The upstream answered 2xx: the sidecar now holds a receipt of ``rule`` in ``correlation``."""
        if rule is not None:
            self.held.setdefault(correlation, set()).add(rule)

    @staticmethod
    def query(target: str) -> str:
        """The query as forwarded: after the first ``?``, of the part before any ``#`` in the path."""
        if target.startswith("/"):
            _path, _, query = target.partition("?")
            return query
        after = target.partition("://")[2]
        authority = re.match(r"[^/?#]*", after)
        rest = after[authority.end():] if authority else after
        return rest.partition("#")[0].partition("?")[2]

    def route(self, target: str) -> tuple[str | None, str | None]:
        """(upstream name, decoded path): (None, _) for no such upstream, (name, None) if ambiguous."""
        upstreams = {u["name"]: u for u in self.spec["upstreams"]}
        if target.startswith("/"):
            raw = target.partition("?")[0].partition("#")[0]
            name, sep, rest = raw[1:].partition("/")
            if name not in upstreams:
                return None, None
            return name, decode_path("/" + rest if sep else "/")
        scheme, sep, after = target.partition("://")
        if scheme != "http" or not sep:
            return None, None
        host, slash, rest = after.partition("/")
        host = host.lower()
        hostname, _, port = host.partition(":")
        if hostname in upstreams:
            chosen: str | None = hostname
        else:
            exact = [n for n, u in upstreams.items() if u["url"].partition("://")[2] == f"{hostname}:{port or 80}"]
            loose = [n for n, u in upstreams.items()
                     if hostname in (u["url"].partition("://")[2].partition(":")[0], self.override_host)]
            chosen = exact[0] if len(exact) == 1 else loose[0] if len(loose) == 1 else None
        if chosen is None:
            return None, None
        raw = "/" + rest.partition("?")[0].partition("#")[0] if slash else "/"
        return chosen, decode_path(raw)


def _valid_correlation(value: str) -> bool:
    return 1 <= len(value) <= 128 and all(c in CORRELATION_CHARS for c in value)


def _first_allowed(fired: list[str], only_rules: Sequence[str] | None) -> tuple[bool, str | None]:
    """Allowed by the first allow rule that fired, if any fired and a narrowed token keeps one of them."""
    if not fired or (only_rules is not None and not set(fired) & set(only_rules)):
        return False, None
    return True, fired[0]
