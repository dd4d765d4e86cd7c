"""Random capabilities and adversarial requests, from a seeded ``random.Random``.

Shared by the hypothesis tests (which draw the seed, so a failure replays) and
``bench/adversarial.py`` (which runs the same generator for 100,000 requests). Some capabilities
declare an MCP upstream; half the requests to it are JSON-RPC messages (:func:`mcp_attempt`). Capabilities are
plain ``spec`` dicts as a user would write them; requests are raw HTTP pieces, because the tricks
that matter (``%2e``, ``//``, NUL, duplicate headers, smuggling) are lost by any client library
that "helps".
"""

from __future__ import annotations

import base64
import gzip
import json
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
UPSTREAM_NAMES = ("alpha", "beta", "pay", "mcp-tools")
FIELDS = ("amount", "order.total", "cost")
# Literal segments, including Datalog-looking ones: values reach Biscuit only as parameters.
SEGMENTS = ("search", "v1", "charges", "admin", "a", "b", "x.json", "caf\u00e9", 'q")or(true', "{r0}", "$x",
            "allow_match(r0)", "sp ace", "..a", "a..")
MAX_VALUES = (0, 1, 100, 40000, 2**63 - 1)
API_KEY = "sk_live_CANARY_fuzz_7f3a9c2e51d04b68"


def random_spec(rng: random.Random, *, mcp: bool = False) -> dict[str, Any]:
    """A random capability; ``mcp``: one of its upstreams surely speaks MCP (else it may)."""
    names = rng.sample(UPSTREAM_NAMES, rng.randint(1, 3))
    upstreams: list[dict[str, Any]] = [{"name": n, "url": f"http://{n}.svc:8080"} for n in names]
    # The rig's upstream is plain HTTP on loopback, so the injecting upstream opts in to cleartext.
    upstreams[0]["inject"] = {"secretRef": {"name": "api-key", "key": "token"},
                              "header": rng.choice(["Authorization", "X-Api-Key"]),
                              "valuePrefix": rng.choice(["", "Bearer "]), "allowInsecureTransport": True}
    rules: list[dict[str, Any]] = []
    for index in range(rng.randint(1, 6)):
        rule: dict[str, Any] = {"name": f"r{index}", "effect": "deny" if rng.random() < 0.2 else "allow"}
        if rng.random() < 0.7:
            rule["upstream"] = rng.choice(names)
        if rng.random() < 0.6:
            rule["methods"] = rng.sample(METHODS, rng.randint(1, 3))
        if rng.random() < 0.75:
            rule["paths"] = list(dict.fromkeys(random_glob(rng) for _ in range(rng.randint(1, 3))))
        if not any(k in rule for k in ("upstream", "methods", "paths")):
            rule["upstream"] = names[0]
        if rule["effect"] == "allow" and rng.random() < 0.3:
            rule["limits"] = [{"field": rng.choice(FIELDS), "max": rng.choice(MAX_VALUES)}]
        rules.append(rule)
    allow = [r["name"] for r in rules if r["effect"] == "allow"]
    for rule in rules:
        others = [n for n in allow if n != rule["name"]]
        if rule["effect"] == "allow" and others and rng.random() < 0.25:
            rule["requires"] = rng.sample(others, 1)
    spec: dict[str, Any] = {"serviceAccountName": "agent", "upstreams": upstreams, "rules": rules}
    if rng.random() < 0.2:
        spec["budgets"] = [{"upstream": rng.choice(names), "field": "amount", "max": rng.choice((100, 50000)),
                            "per": "24h"}]
    if mcp or rng.random() < 0.45:
        add_mcp(rng, spec)
    return spec


TOOLS = ("search", "charge", "delete_all", "add_note", "notes/read")
MCP_FIELDS = ("amount", "order.total")
ARG_VALUES = ("prod", "PROD", "\uff50rod", "prod.", " prod", "staging", "vip-7", "VIP-7", "vip-", "x")


def add_mcp(rng: random.Random, spec: dict[str, Any]) -> None:
    """One upstream speaks MCP at ``/mcp``; action rules (allow and deny, with limits, ``args`` and
    ``requires``) on its tools, and maybe a budget on one tool."""
    upstream = rng.choice(spec["upstreams"])
    upstream["mcp"] = {"path": "/mcp"}
    name = upstream["name"]
    rules: list[dict[str, Any]] = spec["rules"]
    for index in range(rng.randint(1, 4)):
        effect = "deny" if rng.random() < 0.3 else "allow"
        rule: dict[str, Any] = {"name": f"m{index}", "effect": effect}
        if rng.random() < 0.15:
            rule["actions"], rule["resources"] = ["mcp.rpc"], [f"mcp://{name}/custom/*"]
        else:
            rule["actions"] = ["mcp.call"]
            rule["resources"] = list(dict.fromkeys(
                f"mcp://{name}/{rng.choice((*TOOLS, '*', 'notes/*'))}" for _ in range(rng.randint(1, 2))))
        if effect == "allow" and rng.random() < 0.35:
            rule["limits"] = [{"field": rng.choice(MCP_FIELDS), "max": rng.choice((0, 100, 40000))}]
        if rng.random() < 0.3:
            rule["args"] = [rng.choice(({"field": "env", "in": ["prod", "staging"]},
                                        {"field": "target", "glob": "vip-*"}))]
        rules.append(rule)
    allow = [r["name"] for r in rules if r["effect"] == "allow"]
    for rule in rules[-4:]:
        others = [n for n in allow if n != rule["name"]]
        if rule["name"].startswith("m") and rule["effect"] == "allow" and others and rng.random() < 0.2:
            rule["requires"] = rng.sample(others, 1)
    if rng.random() < 0.3:
        spec.setdefault("budgets", []).append({"upstream": name, "tool": rng.choice(("charge", "*")),
                                               "field": "amount", "max": rng.choice((100, 50000)), "per": "24h"})


def random_glob(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return "/"
    parts = [rng.choice((*SEGMENTS, "*", "*", "**")) for _ in range(rng.randint(1, 3))]
    while parts.count("**") > 2:
        parts.remove("**")
    return "/" + "/".join(parts) + ("/" if rng.random() < 0.05 else "")


def document(spec: dict[str, Any], name: str = "agent") -> dict[str, Any]:
    return {"apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
            "metadata": {"name": name, "namespace": "fuzz"}, "spec": spec}


# -- requests -----------------------------------------------------------------------------------
PATH_TRICKS = (
    "/..", "/.", "/%2e%2e", "/%2E%2e", "/.%2e", "%2F", "%2f", "//", "\\", "%5c", "%5C", "%00", ";x=1", "%3b",
    "%252e%252e", "%25", "%", "%zz", "%C0%AE%C0%AE", "%E2%80%AE", "/\uff0e\uff0e", "%ef%bc%8e", "/%20",
    "?q=/../admin", "#/../admin", "/%0a", "%7e", "/%73earch", "\u00e9", "/%C3%A9",
)
RAW_TRICKS = (b"\x00", b"\t", b"\xc0\xae", b"\xff")
"""Bytes no HTTP parser should accept in a request target; refusing them at the parser is fine."""


@dataclass
class Attempt:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_target: bytes | None = None
    """Set when the target holds bytes a str cannot carry honestly (NUL, invalid UTF-8)."""
    http_weird: bool = False
    """Malformed at the HTTP level: the parser may refuse it (400, or closing) before the sidecar sees it."""
    close: bool = False
    token: str | None = None
    """Which known token this sends (a key of the runner's token table), or None."""
    carried: list[tuple[str, str, str]] = field(default_factory=list)
    """Genuine receipts carried: (receipt, correlation, rule)."""
    mcp: bool = False
    """A JSON-RPC message to an MCP endpoint (generated by :func:`mcp_attempt`)."""

    def correlation(self) -> str:
        values = [v for n, v in self.headers if n.lower() == "x-capgate-correlation-id"]
        return values[0] if len(values) == 1 else ""

    def encode(self, request_id: int) -> bytes:
        target = self.raw_target if self.raw_target is not None else self.target.encode("utf-8", "surrogateescape")
        lines = [self.method.encode() + b" " + target + b" HTTP/1.1", b"Host: sidecar",
                 f"X-Fuzz-Id: {request_id}".encode()]
        lines += [f"{n}: {v}".encode("utf-8", "surrogateescape") for n, v in self.headers]
        names = {n.lower() for n, _ in self.headers}
        if "content-length" not in names and "transfer-encoding" not in names and (self.body or self.method in (
                "POST", "PUT", "PATCH")):
            lines.append(f"Content-Length: {len(self.body)}".encode())
        if self.close:
            lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def instantiate(rng: random.Random, glob: str) -> str:
    """A concrete path a glob matches (segments percent-encoded as a client would)."""
    out: list[str] = []
    for segment in glob.split("/")[1:]:
        if segment == "**":
            out += [rng.choice(SEGMENTS) for _ in range(rng.randint(0, 2))]
        elif segment == "*":
            out.append(rng.choice(SEGMENTS))
        else:
            out.append(segment)
    return "/" + "/".join(quote(s, safe="") for s in out)


def random_path(rng: random.Random, upstreams: list[str],
                globs: list[str] | None = None) -> tuple[str, bytes | None, bool]:
    """(target, raw bytes if not representable, http_weird)."""
    if globs and rng.random() < 0.8:
        path = instantiate(rng, rng.choice(globs))
        if rng.random() < 0.15:
            trick = rng.choice(PATH_TRICKS)
            at = rng.randint(1, len(path))
            path = path[:at] + trick + path[at:]
        target = f"/{rng.choice(upstreams)}{path}"
        return target, None, any(ord(c) > 0x7E or c in '"{}' for c in target)
    roll = rng.random()
    if roll < 0.85:
        name = rng.choice(upstreams)
    elif roll < 0.9:
        name = rng.choice(("nope", "ALPHA", "al%70ha", "..", "_capgate", ""))
    else:
        name = quote(rng.choice(upstreams), safe="")
    segments = [rng.choice((*SEGMENTS, "x", "1", "search", "charges", "v1")) for _ in range(rng.randint(0, 4))]
    path = "/" + "/".join(quote(s, safe="$(){}\"") for s in segments)
    if rng.random() < 0.05:
        path += "/"
    if rng.random() < 0.45:
        trick = rng.choice(PATH_TRICKS)
        at = rng.randint(0, len(path))
        path = path[:at] + trick + path[at:]
    if not path.startswith("/"):
        path = "/" + path
    query = "?" + rng.choice(("a=1", "next=/admin", "x=%2e%2e", "")) if rng.random() < 0.2 else ""
    if rng.random() < 0.06:
        host = rng.choice((name, f"{name}.svc:8080", f"{name}:1234", "127.0.0.1", "evil.example"))
        target = f"http://{host}{path}{query}"
        return target, None, not host.partition(":")[0] or any(ord(c) > 0x7E or c in '"{}' for c in target)
    target = f"/{name}{path}{query}"
    weird = any(ord(c) > 0x7E or c in '"{}' for c in target)
    if rng.random() < 0.02:
        raw = target.encode()
        at = rng.randint(1, len(raw))
        return target, raw[:at] + rng.choice(RAW_TRICKS) + raw[at:], True
    if rng.random() < 0.01:
        return "/" + name + "/" + "a" * rng.choice((4200, 9000)), None, True
    return target, None, weird


LOOKALIKES = ("upper", "title", "slash", "dot", "space", "tab", "nbsp", "zwsp", "fullwidth", "extension",
              "dots", "dot-space", "ntfs-stream")
"""How a case-insensitive, trailing-slash-tolerant, Windows or Unicode-folding router reads a path
the same as another: deny rules must catch these; allow rules must not widen to them."""


def lookalike(rng: random.Random, target: str) -> str:
    """``/<upstream>/<path>`` with one path segment spelled as a forgiving router would still route it."""
    head, _, rest = target[1:].partition("/")
    segments = rest.split("/") if rest else [""]
    at = rng.randrange(len(segments))
    segment, kind = segments[at], rng.choice(LOOKALIKES)
    if kind == "upper":
        segment = segment.upper()
    elif kind == "title":
        segment = segment[:1].upper() + segment[1:]
    elif kind == "slash":
        segments.append("")
    elif kind == "fullwidth":
        segment = quote("".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in segment), safe="%")
    else:
        segment += {"dot": ".", "space": "%20", "tab": "%09", "nbsp": "%C2%A0", "zwsp": "%E2%80%8B",
                    "extension": ".json", "dots": "...", "dot-space": ".%20", "ntfs-stream": "::$DATA"}.get(kind, "")
    segments[at] = segment
    return f"/{head}/" + "/".join(segments)


CONTENT_TYPES = ("application/json", "application/json; charset=utf-8", "application/vnd.api+json",
                 "application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-16",
                 "multipart/form-data; boundary=x", "application/json, text/plain", "APPLICATION/JSON")


def body_headers(rng: random.Random, body: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """A Content-Type (usually JSON, sometimes a lie, missing or doubled) and sometimes a Content-Encoding."""
    roll = rng.random()
    headers: list[tuple[str, str]] = []
    if not body.startswith(b"{") and rng.random() < 0.4:
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))
    elif roll < 0.75:
        headers.append(("Content-Type", "application/json"))
    elif roll < 0.93:
        headers.append(("Content-Type", rng.choice(CONTENT_TYPES)))
    elif roll < 0.96:
        headers += [("Content-Type", "application/json"), ("Content-Type", rng.choice(CONTENT_TYPES))]
    if rng.random() < 0.04:
        encoding = rng.choice(("gzip", "deflate", "br", "identity", "x-unknown"))
        if encoding == "gzip":
            body = gzip.compress(body)
        headers.append(("Content-Encoding", encoding))
    return body, headers


def random_body(rng: random.Random) -> tuple[bytes, bool]:
    """(body, http_weird)."""
    roll = rng.random()
    amount = rng.choice((0, 1, 99, 100, 101, 39999, 40000, 40001, -1, 2**63, 10**30))
    choices: list[Any] = [
        lambda: json.dumps({"amount": amount}).encode(),
        lambda: json.dumps({"order": {"total": amount}, "amount": amount}).encode(),
        lambda: json.dumps({"amount": rng.choice((0.5, 99.5, 100.0, 40000.01, -0.0, 1e-300, 1e300))}).encode(),
        lambda: rng.choice((b'{"amount": NaN}', b'{"amount": Infinity}', b'{"amount": -Infinity}',
                            b'{"amount": 1e400}')),
        lambda: b'{"amount": 1, "amount": 99999999}',
        lambda: b'{"amount": 99999999, "amount": 1}',
        lambda: b'{"amount": 1, "\\u0061mount": 99999999}',
        lambda: json.dumps({"amount": rng.choice(("100", True, None, [1], {"v": 1}))}).encode(),
        lambda: b"[" * rng.choice((100, 5000, 100000)) + b"]" * rng.choice((0, 100)),
        lambda: b'{"a":' * 3000 + b"1" + b"}" * 3000,
        lambda: b"amount=1",
        lambda: b"\xff\xfe{\x00",
        lambda: b"",
        # Issue 10: bodies two parsers read differently.
        lambda: rng.choice((b'{"amount":100,"AMOUNT":5000000}', b'{"AMOUNT":5000000}', b'{"Amount":1}',
                            b'{"order":{"total":1,"TOTAL":99999999}}', b'{"order":{"Total":99999999}}',
                            b'{"ORDER":{"total":99999999}}', b'{"cost":1,"co\xc5\xbft":99999999}',
                            b'{"co\xc5\xbft":99999999}', b'{"\xe2\x84\xaa":1,"k":2}', b'{"x":[{"a":1,"A":2}]}')),
        lambda: rng.choice((b'{"amount":1}{"amount":99999999}', b'{"amount":1} trailing', b'{"amount":1}\x00',
                            b'\xef\xbb\xbf{"amount":1}', b'{"amount":1,"note":"\xff"}', b'{"amount":1,"\\ud800":2}',
                            '{"amount":1}'.encode("utf-16"), b'{"amount":01}', b" ")),
        lambda: rng.choice((b'{"amount":1,"_method":"DELETE"}', b'{"_METHOD":"DELETE"}', b"_method=DELETE",
                            b"a=1&%5Fmethod=PUT", b"title=x&method=DELETE")),
    ]
    if rng.random() < 0.003:
        return b'{"amount": 1' + b" " * (1024 * 1024 + 10) + b"}", False
    if roll < 0.55:
        return choices[0](), False
    body = rng.choice(choices)()
    return body, False


MCP_METHODS = ("initialize", "ping", "tools/list", "notifications/initialized", "notifications/x", "custom/x",
               "admin/reset", "sampling/createMessage", "tools/delete", "server/discover", "custom/a%2Fb",
               "subscriptions/listen", "Tools/Call")
TOOL_TRICKS = ("DELETE_ALL", "delete_all.", "delete_all ", "\uff44elete_all", "delete_all::$DATA", "Search",
               "x/../delete_all", "a%2Fb", "search?x", "search#x", "notes//read", "notes/./read", "", "a\u0000b",
               "charge\u200b", "a\\b", "caf\u00e9")


def mcp_attempt(rng: random.Random, spec: dict[str, Any], upstream: str) -> tuple[str, str, bytes,
                                                                                  list[tuple[str, str]]]:
    """(method, target, body, headers) of one MCP message to ``upstream``'s ``/mcp``, maybe spoiled the
    ways two readers could disagree: header vs body, batches, unknown methods, argument tricks."""
    path = "/mcp" if rng.random() < 0.85 else rng.choice(("/MCP", "/mcp/", "/mcp.json", "/Mcp.", "/mcp/x"))
    query = "" if rng.random() < 0.9 else "?" + rng.choice(("amount=5", "_method=GET", "session_id=x", "a=1"))
    method = "POST" if rng.random() < 0.92 else rng.choice(("GET", "DELETE", "PUT", "HEAD"))
    tools = [r.rpartition("/")[2] for rule in spec["rules"] for r in rule.get("resources", ())
             if r.startswith(f"mcp://{upstream}/")]
    roll = rng.random()
    if roll < 0.4 and tools:
        tool: object = rng.choice(tools).replace("*", rng.choice(TOOLS))
    elif roll < 0.75:
        tool = rng.choice(TOOLS)
    elif roll < 0.95:
        tool = rng.choice(TOOL_TRICKS)
    else:
        tool = rng.choice((5, None, ["search"]))
    arguments: dict[str, Any] = {}
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(("amount", "order", "env", "target", "note"))
        if key == "amount":
            arguments[key] = rng.choice((0, 1, 99, 100, 101, 40000, 40001, -1, 0.5, 100.5, "100", None, 2**63))
        elif key == "order":
            arguments[key] = {"total": rng.choice((1, 100, 40001, "1"))}
        else:
            arguments[key] = rng.choice((*ARG_VALUES, 5, None))
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rng.choice((1, 2, "a", 99))}
    kind = rng.random()
    if kind < 0.65:
        params: dict[str, Any] = {"name": tool}
        if rng.random() < 0.9:
            params["arguments"] = arguments if rng.random() < 0.95 else rng.choice((None, [1], "x"))
        message.update(method="tools/call", params=params)
    elif kind < 0.9:
        message["method"] = rng.choice(MCP_METHODS)
        if rng.random() < 0.5:
            message["params"] = {"arguments": arguments} if rng.random() < 0.5 else {}
        if message["method"].startswith("notifications/") or rng.random() < 0.1:
            del message["id"]
    else:
        message = rng.choice(({"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 1, "error": {}},
                              {"jsonrpc": "1.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": True,
                               "method": "ping"}, {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
                              {"jsonrpc": "2.0", "id": 1, "method": "ping", "extra": 1},
                              {"jsonrpc": "2.0", "id": 1, "method": "", "params": {}},
                              {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["search"]},
                              {"jsonrpc": "2.0", "method": "tools/call", "id": 1, "result": {}}))
    body = json.dumps(message, ensure_ascii=rng.random() < 0.5).encode()
    trick = rng.random()
    if trick < 0.04:
        body = json.dumps([message, message]).encode()  # a batch
    elif trick < 0.1:
        body = rng.choice((
            body + b" trailing", body + body, b"\xef\xbb\xbf" + body, body.replace(b"2.0", b"2.0\xff", 1),
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete_all"}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","Name":"delete_all"}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"charge",'
            b'"arguments":{"amount":1,"AMOUNT":99999999}}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"charge","arguments":{"AMOUNT":999}}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"charge","arguments":{"amount":NaN}}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"charge","arguments":{"amount":1e400}}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"charge","arguments":{"Env":"prod",'
            b'"env":"x"}}}', b"", b"null", b"[]"))
    headers: list[tuple[str, str]] = []
    roll = rng.random()
    if roll < 0.92:
        headers.append(("Content-Type", "application/json"))
    elif roll < 0.98:
        headers.append(("Content-Type", rng.choice(CONTENT_TYPES)))
    if rng.random() < 0.03:
        body = gzip.compress(body) if rng.random() < 0.5 else body
        headers.append(("Content-Encoding", rng.choice(("gzip", "identity"))))
    sent_method = message.get("method") if isinstance(message.get("method"), str) else None
    if rng.random() < 0.2:
        headers.append(("Mcp-Method", sent_method if sent_method and rng.random() < 0.8 else
                        rng.choice(("tools/call", "tools/list", "ping"))))
    if rng.random() < 0.2:
        name = tool if isinstance(tool, str) and rng.random() < 0.8 else rng.choice(("search", "delete_all"))
        headers.append(("Mcp-Name", rng.choice((name, name, name.upper(), "=?base64?" + base64.b64encode(
            name.encode()).decode() + "?=")) if name.isascii() and name.isprintable() else
            "=?base64?" + base64.b64encode(name.encode("utf-8", "surrogatepass")).decode() + "?="))
    if rng.random() < 0.04:
        headers.append(("Mcp-Method", "tools/call"))
    if rng.random() < 0.06:
        headers.append((rng.choice(("Mcp-Param-Amount", "mcp-param-env")), rng.choice(("1", "prod", "99999"))))
    if rng.random() < 0.03:
        headers.append(("Mcp-Session-Id", "made-up"))
    return method, f"/{upstream}{path}{query}", body, headers


HEADER_TRICKS: tuple[tuple[str, str], ...] = (
    ("X-Capgate-Principal", "fuzz/admin"), ("X-Capgate-Mode", "audit"), ("X-Capgate-Decision-Id", "forged"),
    ("X-Capgate-Rule", "r0"), ("X-Capgate-Allowed", "true"), ("Authorization", "Bearer agent-made-up"),
    ("Authorization", f"Bearer {API_KEY}"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Connection", "X-Private"), ("X-Private", "hop"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
    ("Upgrade", "websocket"), ("X-Api-Key", "agent-made-up"), ("X-Forwarded-For", "10.0.0.1"),
    ("Forwarded", "for=evil"), ("Trailer", "X-Capgate-Token"),
    ("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE"), ("X-Method-Override", "PUT"),
    ("x-http-method-override", "GET"), ("X-Note", "caf\udce9"), ("X-Note", "\udcff\udcfe"),
)
QUERY_TRICKS = ("amount=5000000", "AMOUNT=1", "%61mount=1", "amount[]=1", "order[total]=9", "order.total=9",
                "x=1;amount=2", "+amount=1", "_method=DELETE", "_METHOD=put", "%5Fmethod=DELETE", "co%C5%BFt=1",
                "amounts=1", "%ff=1", "q=amount")


@dataclass
class Tokens:
    """Tokens the runner knows: ``valid`` maps key -> meaning (the oracle's Narrowed), ``invalid`` strings."""

    valid: dict[str, Any] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)


def random_attempt(rng: random.Random, spec: dict[str, Any], tokens: Tokens,
                   receipts: list[tuple[str, str, str]], correlations: tuple[str, ...]) -> Attempt:
    upstreams = [u["name"] for u in spec["upstreams"]]
    speaks_mcp = [u["name"] for u in spec["upstreams"] if "mcp" in u]
    message = mcp_attempt(rng, spec, speaks_mcp[0]) if speaks_mcp and rng.random() < 0.5 else None
    aimed = rng.choice(spec["rules"]) if rng.random() < 0.5 else None
    if message is not None:
        method, target, raw, weird = message[0], message[1], None, False
    elif aimed is not None:
        # Aim at one rule (its upstream, a method and a path it names), then maybe spoil it.
        globs = list(aimed.get("paths") or ["/**"])
        target, raw, weird = random_path(rng, [aimed.get("upstream") or rng.choice(upstreams)], globs)
        if rng.random() < (0.5 if aimed["effect"] == "deny" else 0.15):
            target = lookalike(rng, target)
        method = rng.choice(aimed.get("methods") or (*METHODS, "QUERY", "PROPFIND"))
    else:
        target, raw, weird = random_path(rng, upstreams)
        method = rng.choice(METHODS) if rng.random() < 0.97 else rng.choice(("get", "PROPFIND", "TRACE", "FOO"))
    weird = weird or method not in METHODS
    headers: list[tuple[str, str]] = []
    correlation_roll = rng.random()
    if correlation_roll < 0.6:
        headers.append(("X-Capgate-Correlation-Id", rng.choice(correlations)))
    elif correlation_roll < 0.65:
        headers.append(("X-Capgate-Correlation-Id", rng.choice(("x" * 129, "a b", "\u00e9t\u00e9", "*", ""))))
    elif correlation_roll < 0.68:
        headers += [("X-Capgate-Correlation-Id", correlations[0]), ("X-Capgate-Correlation-Id", correlations[1])]
    attempt = Attempt(method=method, target=target, headers=headers, body=b"", raw_target=raw, http_weird=weird)
    for _ in range(rng.choice((0, 0, 0, 1, 2, 4))):
        headers.append(rng.choice(HEADER_TRICKS))
    token_roll = rng.random()
    if token_roll < 0.08 and tokens.valid:
        attempt.token = rng.choice(sorted(tokens.valid))
        headers.append(("X-Capgate-Token", attempt.token))
    elif token_roll < 0.2 and tokens.invalid:
        headers.append(("X-Capgate-Token", rng.choice(tokens.invalid)))
    elif token_roll < 0.21 and tokens.valid:
        key = rng.choice(sorted(tokens.valid))
        headers += [("X-Capgate-Token", key), ("X-Capgate-Token", key)]
    receipt_roll = rng.random()
    if receipt_roll < 0.25 and receipts:
        chosen = rng.sample(receipts, min(len(receipts), rng.randint(1, 3)))
        attempt.carried = chosen
        if rng.random() < 0.5:
            headers.append(("X-Capgate-Receipt", ", ".join(r for r, _, _ in chosen)))
        else:
            headers += [("X-Capgate-Receipt", r) for r, _, _ in chosen]
    elif receipt_roll < 0.4:
        headers.append(("X-Capgate-Receipt", forge_receipt(rng, receipts)))
    if message is not None:
        attempt.body = message[2]
        headers += message[3]
        attempt.mcp = True
    elif method in ("POST", "PUT", "PATCH", "DELETE") or rng.random() < 0.12:
        attempt.body, body_weird = random_body(rng)
        attempt.http_weird = attempt.http_weird or body_weird
        if attempt.body:
            attempt.body, extra = body_headers(rng, attempt.body)
            headers += extra
            # aiohttp's parser refuses a doubled Content-Type itself (400, before the sidecar sees it).
            attempt.http_weird = attempt.http_weird or sum(n == "Content-Type" for n, _ in extra) > 1
    if rng.random() < 0.08 and "#" not in attempt.target and attempt.raw_target is None and message is None:
        attempt.target += ("&" if "?" in attempt.target else "?") + rng.choice(QUERY_TRICKS)
    if rng.random() < 0.02:
        smuggle(rng, attempt)
    if rng.random() < 0.01:
        attempt.headers.append(("X-Big", "b" * 9000))
        attempt.http_weird = True
    if any(len(name) + len(value) + 2 > 8190 for name, value in headers):
        attempt.http_weird = True  # over aiohttp's header field limit: refused by the parser
    if sum(len(name) + len(value) + 4 for name, value in headers) > 120 * 1024:
        attempt.http_weird = True  # near the sidecar's 128 KiB limit on a whole head (431)
    if rng.random() < 0.01:
        headers.append(("Host", "evil.example"))  # a second Host header: the parser refuses it
        attempt.http_weird = True
    rng.shuffle(headers)
    return attempt


def forge_receipt(rng: random.Random, receipts: list[tuple[str, str, str]]) -> str:
    if receipts and rng.random() < 0.7:
        genuine = rng.choice(receipts)[0]
        kind = rng.randrange(4)
        if kind == 0:
            return genuine[: rng.randint(1, len(genuine) - 1)]
        if kind == 1:
            at = rng.randrange(3, len(genuine))
            flipped = "A" if genuine[at] != "A" else "B"
            return genuine[:at] + flipped + genuine[at + 1:]
        if kind == 2:  # swap the payload of one receipt with another's signature
            other = rng.choice(receipts)[0]
            a, b = genuine.split("."), other.split(".")
            return ".".join([a[0], b[1], *a[2:]]) if a[1] != b[1] else genuine + "x"
        return genuine + "." + genuine
    return rng.choice(("v1.x.y.z.w", "garbage", "v1....", "v2." + "A" * 40, "v1." + "%%%" * 10, "a" * 5000))


def smuggle(rng: random.Random, attempt: Attempt) -> None:
    """Request smuggling attempts; the hidden request names no upstream, so forwarding it would show."""
    hidden = b"GET /__smuggled__/x HTTP/1.1\r\nHost: x\r\n\r\n"
    kind = rng.randrange(3)
    attempt.close = True
    attempt.http_weird = True
    if kind == 0:
        attempt.headers += [("Content-Length", "4"), ("Transfer-Encoding", "chunked")]
        attempt.body = b"0\r\n\r\n" + hidden
    elif kind == 1:
        attempt.headers += [("Transfer-Encoding", "chunked, identity")]
        attempt.body = b"5\r\nhello\r\n0\r\n\r\n" + hidden
    else:
        attempt.headers += [("Content-Length", "2"), ("Content-Length", "40")]
        attempt.body = b"{}" + hidden
