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
4. a body a limit or budget must read is at most 1 MiB (else 413);
5. deny rules first — matched leniently: case-insensitive (NFKC + case folding), trailing ``/``,
   trailing dots and whitespace of a segment, format characters, IIS's ``::$DATA`` and a
   last-segment extension tolerated — then allow rules, matched exactly (scope, limits on the JSON body, required
   receipts in the correlation), default deny (403) — under the base capability and under the
   narrowed one;
6. budgets (429); then the upstream sees the request.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
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


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate("duplicate key")  # two parsers may pick different values: ambiguous
    return dict(pairs)


def has_duplicate_keys(raw: bytes) -> bool:
    """A JSON object repeating a key: first-wins and last-wins parsers read different amounts."""
    try:
        json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate:
        return True
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return False


def parse_body(raw: bytes) -> object:
    """The JSON document a limit reads, or None when it is not JSON (NaN/Infinity parse, but count as no number)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


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
    rules = spec["rules"]
    held = set(receipts)
    for rule in rules:
        if rule["effect"] == "deny" and _deny_scope(rule, method, upstream, path):
            return False, None
    fired = [rule["name"] for rule in rules
             if rule["effect"] == "allow" and _scope(rule, method, upstream, path)
             and all(within(number_at(body, lim["field"]), lim["max"]) for lim in rule.get("limits", ()))
             and all(required in held for required in rule.get("requires", ()))]
    if not fired:
        return False, None
    if only_rules is not None and not set(fired) & set(only_rules):
        return False, None
    return True, fired[0]


def body_fields(spec: Mapping[str, Any], upstream: str) -> set[str]:
    found = {lim["field"] for rule in spec["rules"] if rule.get("upstream") in (None, upstream)
             for lim in rule.get("limits", ())}
    found.update(b["field"] for b in spec.get("budgets", ()) if b["upstream"] == upstream)
    return found


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
    override_host: str = "127.0.0.1"
    """Where ``--upstream-url`` points every upstream; absolute-form hosts may name it too."""

    def decide(self, *, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes,
               narrowed: Narrowed | None, carried: Mapping[str, set[str]]) -> tuple[Refusal | None, str | None]:
        """The refusal DESIGN.md demands (None: forward), and the rule a receipt would be minted for.

        ``carried`` maps correlation -> rules of the *valid* receipts the request carries.
        """
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
        tokens = names.count("x-capgate-token")
        if tokens > 1:
            return Refusal(400, "bad_request"), None
        if tokens == 1 and narrowed is None:
            return Refusal(401, "invalid_token"), None
        needs = method in BODY_METHODS and bool(body_fields(self.spec, upstream))
        if needs and len(body) > MAX_BODY:
            return Refusal(413, "too_large"), None
        if needs and has_duplicate_keys(body):
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
            if budget["upstream"] != upstream:
                continue
            amount = number_at(parsed, budget["field"])
            if amount is None and present(parsed, budget["field"]):
                return Refusal(429, "budget_exhausted"), None  # a charge it cannot count is not free
            amount = max(0, math.ceil(amount)) if amount is not None else 0
            if self.spent.get(index, 0) + amount > budget["max"]:
                return Refusal(429, "budget_exhausted"), None
            charges.append((index, amount))
        for index, amount in charges:
            self.spent[index] = self.spent.get(index, 0) + amount
        return ALLOW, rule

    def forwarded(self, correlation: str, rule: str | None) -> None:
        """The upstream answered 2xx: the sidecar now holds a receipt of ``rule`` in ``correlation``."""
        if rule is not None:
            self.held.setdefault(correlation, set()).add(rule)

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
