"""The ``capgate`` command: keys, minting, inspection, narrowing, and policy testing.

Everything here works without a cluster, on files, so a capability can be written and tested
(``capgate explain``, ``capgate test``) before it is ever applied. The cluster commands
(``revoke``, ``lockdown``) talk to the API server with the caller's kubeconfig.

Exit codes: 0 success (for ``explain``: the request is allowed), 1 a denial or a failed test,
2 bad input (the message names what is wrong; never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from capgate.capabilities import bodies, decision, keys, paths, spec, tokens
from capgate.capabilities import mcp as core_mcp
from capgate.capabilities.errors import CapabilityError, RequestError
from capgate.cluster import ClusterError

EXIT_OK, EXIT_DENIED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input; printed as ``capgate: <message>`` with exit code 2."""


# ---------------------------------------------------------------- keys, mint, inspect, attenuate

def cmd_keys_init(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if (folder / "root.key").exists() and not args.force:
        raise UsageError(f"{folder / 'root.key'} exists; use --force to replace it")
    keyset = keys.KeySet.generate()
    private, public = keyset.write(folder)
    print(f"wrote {private} (private, mode 0600) and {public} (trust bundle); root key id {keyset.active_id}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    if args.cluster:
        from capgate import cluster

        return cluster.cmd_keys_rotate_cluster(args)
    if not args.dir:
        raise UsageError("give --dir DIR (a local key set) or --cluster")
    path = Path(args.dir) / "root.key"
    keyset = keys.KeySet.from_file(path)
    rotated = keyset.rotate(spec.parse_duration(args.keep_old_for, "--keep-old-for")).prune(datetime.now(UTC))
    rotated.write(args.dir)
    print(f"new active root key id {rotated.active_id}; previous keys verify until their notAfter")
    return EXIT_OK


def cmd_mint(args: argparse.Namespace) -> int:
    cap = _capability(args.capability, args.namespace, args.service_account)
    keyset = keys.KeySet.from_file(args.root_key)
    ttl = spec.parse_duration(args.ttl, "--ttl") if args.ttl else None
    print(tokens.mint(cap, keyset, ttl=ttl))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    info = tokens.inspect(_read_token(args.token))
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"capability:     {info.get('capability', '?')}")
    print(f"root key id:    {info['rootKeyId']}")
    print(f"issued at:      {info.get('issuedAt', '?')}")
    print(f"expires at:     {info.get('expiresAt', '?')}")
    print(f"principals:     {', '.join(info.get('principals') or [])}")
    print("signature:      not verified (inspect needs no key; the sidecar verifies)")
    for block in info["blocks"]:
        print(f"\nblock {block['index']}  revocation id {block['revocationId']}")
        for line in block["datalog"].splitlines():
            print(f"  {line[:200]}{'…' if len(line) > 200 else ''}")
    return EXIT_OK


def cmd_attenuate(args: argparse.Namespace) -> int:
    trust = _trust(args.trust)
    parent = tokens.load(_read_token(args.token), trust)
    limits: dict[str, dict[str, int]] = {}
    for item in args.limit or []:
        target, _, value = item.partition("=")
        rule, _, field = target.partition(".")
        if not rule or not field or not value.isdigit():
            raise UsageError(f"--limit {item!r}: expected RULE.FIELD=MAX, e.g. charge.amount=10000")
        limits.setdefault(rule, {})[field] = int(value)
    principal = args.service_account
    if principal and "/" not in principal:
        principal = f"{parent.capability.namespace}/{principal}"
    print(tokens.attenuate(
        parent,
        rules=args.rules.split(",") if args.rules else None,
        limits=limits or None,
        ttl=spec.parse_duration(args.ttl, "--ttl") if args.ttl else None,
        principal=principal,
    ))
    return EXIT_OK


def _trust(path: str) -> keys.TrustBundle:
    text = Path(path).read_text(encoding="utf-8")
    if '"capgate-root-keyset"' in text:
        return keys.KeySet.from_json(text).trust_bundle()
    return keys.TrustBundle.from_json(text)


def _read_token(value: str) -> str:
    """A token given inline, as ``-`` (stdin), or as a file name; a token is never echoed in an error."""
    if value == "-":
        return sys.stdin.read().strip()
    try:
        candidate = Path(value)
        if len(value) < 1024 and candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file: {exc.strerror}") from exc
    return value.strip()


def _capability(path: str, namespace: str | None, service_account: str | None) -> spec.Capability:
    cap = spec.load_capability_file(path)
    if namespace or service_account:
        from dataclasses import replace

        cap = replace(cap, namespace=namespace or cap.namespace, service_account=service_account or cap.service_account)
    return cap


# ---------------------------------------------------------------- explain and test

@dataclass(frozen=True)
class Case:
    """One request to decide, as ``capgate explain`` flags or one entry of a ``capgate test`` file."""

    request: str
    body: object = None
    """The body as sent: a string is its bytes (``--body``), anything else is sent as its JSON."""
    receipts: tuple[str, ...] = ()
    consumed: tuple[str, ...] = ()
    """Rules whose receipt in this correlation was already consumed (a single-use gate stays shut)."""
    principal: str | None = None
    at: datetime | None = None
    content_type: str = "application/json"
    mcp: str | None = None
    """``'METHOD UPSTREAM [NAME]'`` of an MCP message (then ``body`` is ``params.arguments``)."""


def parse_request(cap: spec.Capability, case: Case, correlation: str = "explain") -> decision.Request:
    words = case.request.split()
    now = case.at or datetime.now(UTC)
    principal = case.principal or cap.principal
    base = {"principal": principal, "correlation": correlation, "receipts": _held(case),
            "unconsumed": _unconsumed(case), "body": case.body, "now": now}
    if len(words) == 3 and words[0].upper() in spec.METHODS:
        target = urlsplit(words[2]) if words[2].startswith("/") else None
        raw_path = target.path if target is not None else words[2]
        base["body"] = read_body(cap, words[1], case, target.query if target is not None else "")
        return decision.Request(method=words[0].upper(), upstream=words[1], path=paths.normalize(raw_path),
                                **base)  # type: ignore[arg-type]
    if len(words) == 2:
        return decision.Request(action=words[0], resource=paths.normalize_resource(words[1]),
                                **base)  # type: ignore[arg-type]
    raise UsageError(f"request {case.request!r}: expected 'METHOD UPSTREAM PATH' or 'ACTION RESOURCE'")


def _held(case: Case) -> frozenset[str]:
    """Every rule with a receipt in the correlation: a consumed receipt is still a receipt."""
    return frozenset(case.receipts) | frozenset(case.consumed)


def _unconsumed(case: Case) -> frozenset[str]:
    return frozenset(case.receipts) - frozenset(case.consumed)


def consumes(cap: spec.Capability, result: decision.Decision) -> tuple[str, ...]:
    """The rules whose receipt an allowed call spends (a sidecar records it before forwarding)."""
    rule = cap.rule(result.rule) if result.allowed and result.rule else None
    return rule.consumes if rule is not None else ()


def read_body(cap: spec.Capability, upstream: str, case: Case, query: str) -> object:
    """The document the sidecar would judge, through the sidecar's own reader (BodyError if it would refuse)."""
    if cap.upstream(upstream) is None:
        return None  # refused as an unknown upstream first, as the sidecar does
    fields = bodies.fields_for(cap, upstream)
    body = case.body
    raw = b"" if body is None else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    if not fields:
        bodies.check_query(query, fields)
        return None
    return bodies.read(raw, content_type=[case.content_type], content_encoding=[], query=query, fields=fields)


def evaluate(cap: spec.Capability, case: Case) -> decision.Decision:
    """Decide ``case`` against ``cap`` exactly as a sidecar would, with an ephemeral root key."""
    now = case.at or datetime.now(UTC)
    keyset = keys.KeySet.generate(now)
    token = tokens.mint(cap, keyset, now=now)
    credential = tokens.load(token, keyset.trust_bundle(), now=now)
    if case.mcp is not None:
        return _evaluate_mcp(cap, case, credential)
    try:
        request = parse_request(cap, case)
    except bodies.BodyError as exc:
        return decision.Decision(False, "denied", "bad_request", f"{exc.reason}: {exc.message}")
    except RequestError as exc:
        return decision.Decision(False, "denied", "bad_request", f"ambiguous path refused: {exc}")
    if request.upstream is not None and cap.upstream(request.upstream) is None:
        return decision.Decision(False, "denied", "unknown_upstream", f"unknown upstream {request.upstream!r}")
    return decision.decide([credential], request)


def mcp_message(case: Case) -> tuple[dict[str, object], str]:
    """The JSON-RPC message an ``--mcp 'METHOD UPSTREAM [NAME]'`` case stands for, and its upstream."""
    words = (case.mcp or "").split(maxsplit=2)
    if len(words) < 2:
        raise UsageError(f"mcp {case.mcp!r}: expected 'METHOD UPSTREAM [NAME]', e.g. 'tools/call payments charge'")
    method, upstream = words[0], words[1]
    params: dict[str, object] = {}
    named = core_mcp.NAMED.get(method)
    if named is not None:
        if len(words) != 3:
            raise UsageError(f"mcp {case.mcp!r}: {method} needs a name")
        params[named[1]] = words[2]
        if named[0] in (core_mcp.CALL, core_mcp.PROMPT):
            params["arguments"] = case.body if case.body is not None else {}
    elif len(words) == 3:
        raise UsageError(f"mcp {case.mcp!r}: {method} takes no name")
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, upstream


def _evaluate_mcp(cap: spec.Capability, case: Case, credential: tokens.Credential) -> decision.Decision:
    """Decide an MCP message as the sidecar does: the same reader, the same Request, the same core."""
    document, upstream_name = mcp_message(case)
    upstream = cap.upstream(upstream_name)
    if upstream is None or upstream.mcp is None:
        return decision.Decision(False, "denied", "unknown_upstream", f"no MCP upstream {upstream_name!r}")
    try:
        target = core_mcp.target(core_mcp.message_of(document), upstream_name)
        core_mcp.check_arguments(target.arguments, cap.limit_fields | cap.arg_fields)
    except core_mcp.McpError as exc:
        return decision.Decision(False, "denied", "bad_request", f"refused MCP message: {exc.message}")
    if target.implied:
        return decision.Decision(True, "allowed", "allowed", f"{target.method} is implied by the MCP upstream")
    return decision.decide([credential], decision.Request(
        principal=case.principal or cap.principal, correlation="explain", action=target.action,
        resource=target.resource, body=dict(target.arguments) if target.arguments is not None else None,
        receipts=_held(case), unconsumed=_unconsumed(case), now=case.at or datetime.now(UTC)))


def _mcp_args(text: str | None) -> object:
    """``--args`` read by the same strict JSON reader as the sidecar's MCP messages."""
    if text is None:
        return None
    try:
        return core_mcp.parse_json(text.encode("utf-8", "surrogatepass"))
    except core_mcp.McpError as exc:
        raise UsageError(f"--args: {exc.message}") from None


def cmd_mcp_pin(args: argparse.Namespace) -> int:
    """Pins for every tool of a ``tools/list`` answer: printed, or written into the capability file."""
    try:
        document = core_mcp.parse_json(Path(args.tools).read_bytes() if args.tools != "-" else sys.stdin.buffer.read())
    except (OSError, core_mcp.McpError) as exc:
        raise UsageError(f"--tools: {exc}") from None
    if isinstance(document, dict) and isinstance(document.get("result"), dict):
        document = document["result"]
    tools = document.get("tools") if isinstance(document, dict) else document
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise UsageError("--tools: expected a tools/list result ({\"tools\": [...]}) or its JSON-RPC answer")
    pins = {tool["name"]: core_mcp.definition_pin(tool) for tool in tools}
    if not args.write:
        print(yaml.safe_dump({"pins": pins}, sort_keys=True), end="")
        return EXIT_OK
    path = Path(args.capability)
    manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    upstream = next((u for u in manifest.get("spec", {}).get("upstreams", []) if u.get("name") == args.upstream), None)
    if upstream is None or not isinstance(upstream.get("mcp"), dict):
        raise UsageError(f"{path}: no upstream {args.upstream!r} with mcp")
    upstream["mcp"]["pins"] = pins
    spec.parse_capability(manifest)  # never write a capability that would not load
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    print(f"pinned {len(pins)} tools of {args.upstream!r} in {path} (comments are not kept)")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    cap = spec.load_capability_file(args.capability)
    if (args.request is None) == (args.mcp is None):
        raise UsageError("give exactly one of --request and --mcp")
    if args.mcp is not None and args.body is not None:
        raise UsageError("--body is for --request; an MCP call takes --args")
    at = _time_arg(args.at)
    principal = args.identity
    if args.mcp is not None:
        case = Case(request="", body=_mcp_args(args.args), receipts=tuple(args.receipt or ()),
                    consumed=tuple(args.consumed or ()), principal=principal, at=at, mcp=args.mcp)
    else:
        case = Case(request=args.request, body=args.body, receipts=tuple(args.receipt or ()),
                    consumed=tuple(args.consumed or ()), principal=principal, at=at, content_type=args.content_type)
    result = evaluate(cap, case)
    spends = consumes(cap, result)
    if args.json:
        print(json.dumps({"allowed": result.allowed, "rule": result.rule, "reason": result.reason,
                          "message": result.message, "consumes": list(spends)}))
    else:
        verdict = "ALLOWED" if result.allowed else "DENIED"
        print(f"{verdict}  {args.request or args.mcp}")
        print(f"  rule:   {result.rule or '-'}")
        print(f"  reason: {result.reason} — {result.message}")
        for name in spends:
            print(f"  consumes: the receipt of {name!r} (single-use: spent before forwarding; "
                  "a second call with it is refused, receipt_consumed)")
        upstream = args.request.split()[1] if args.request and len(args.request.split()) > 1 else None
        for budget in cap.budgets:
            if result.allowed and budget.from_response and budget.upstream == upstream:
                print(f"  after:  budget {budget.upstream}.{budget.field} ({budget.max} per "
                      f"{spec.format_duration(budget.per)}) is charged from the response; {budget.worst_case} "
                      "if its usage cannot be read; refused once spent")
    return EXIT_OK if result.allowed else EXIT_DENIED


def _time_arg(text: object) -> datetime | None:
    if text is None:
        return None
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    moment = keys.parse_time(str(text), "time")
    return moment


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    expected: str
    got: str


def run_cases(path: Path) -> tuple[list[CaseResult], spec.Capability]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: {exc}") from exc
    if not isinstance(document, Mapping) or not isinstance(document.get("cases"), list):
        raise UsageError(f"{path}: expected a mapping with 'capability' and a list of 'cases'")
    cap = spec.load_capability_file(path.parent / str(document.get("capability", "")))
    default_at = _time_arg(document.get("at"))
    results = []
    for index, entry in enumerate(document["cases"]):
        results.append(_run_case(cap, index, entry, default_at))
    return results, cap


def _run_case(cap: spec.Capability, index: int, entry: object, default_at: datetime | None) -> CaseResult:
    if (not isinstance(entry, Mapping) or ("request" in entry) == ("mcp" in entry)
            or entry.get("expect") not in ("allow", "deny")):
        raise UsageError(f"cases[{index}]: needs one of 'request' and 'mcp', and 'expect: allow|deny'")
    name = str(entry.get("name") or entry.get("request") or entry["mcp"])
    receipts = entry.get("receipts") or []
    mcp = entry.get("mcp")
    case = Case(request=str(entry.get("request", "")), body=entry.get("args") if mcp is not None else entry.get("body"),
                receipts=tuple(str(r) for r in receipts), consumed=tuple(str(r) for r in entry.get("consumed") or []),
                principal=entry.get("identity"),
                at=_time_arg(entry.get("at")) or default_at, mcp=str(mcp) if mcp is not None else None)
    result = evaluate(cap, case)
    expected = {"verdict": entry["expect"], "rule": entry.get("rule"), "reason": entry.get("reason"),
                "consumes": entry.get("consumes")}
    got = {"verdict": "allow" if result.allowed else "deny", "rule": result.rule, "reason": result.reason,
           "consumes": list(consumes(cap, result))}
    passed = all(expected[k] is None or expected[k] == got[k] for k in expected)
    return CaseResult(name=name, passed=passed, expected=_describe(expected),
                      got=f"{_describe(got)} — {result.message}")


def _describe(outcome: Mapping[str, Any]) -> str:
    extras = [f"{k}={outcome[k]}" for k in ("rule", "reason", "consumes") if outcome.get(k)]
    return str(outcome["verdict"]) + (f" ({', '.join(extras)})" if extras else "")


def cmd_test(args: argparse.Namespace) -> int:
    failed = 0
    total = 0
    for file in args.cases:
        results, cap = run_cases(Path(file))
        print(f"{file}  ({cap.qualified_name})")
        for result in results:
            total += 1
            if result.passed:
                print(f"  PASS  {result.name}")
                continue
            failed += 1
            print(f"  FAIL  {result.name}")
            print(f"          expected: {result.expected}")
            print(f"          got:      {result.got}")
    print(f"\n{total - failed} passed, {failed} failed")
    return EXIT_OK if failed == 0 else EXIT_DENIED


# ---------------------------------------------------------------- audit

EXIT_UNVERIFIED = 3
"""``audit verify``: nothing is tampered with, but not everything is proven (see :mod:`capgate.ledger`)."""


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 only when every record is covered by a verified signature and the ledger was closed;
    1 when something is tampered with; 3 when the chain holds but signatures do not prove it all."""
    from capgate import ledger

    trust = _trust(args.trust) if args.trust else None
    report = ledger.verify(Path(args.file), trust)
    if args.json:
        print(json.dumps(report.as_dict(open_ok=args.open), indent=2))
    else:
        print(report.summary(open_ok=args.open))
    verdict = report.verdict(open_ok=args.open)
    return {"VERIFIED": EXIT_OK, "TAMPERED": EXIT_DENIED}.get(verdict, EXIT_UNVERIFIED)


# ---------------------------------------------------------------- wiring

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capgate", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    keys_parser = sub.add_parser("keys", help="root key sets").add_subparsers(dest="keys_command", required=True)
    init = keys_parser.add_parser("init", help="create root.key (0600) and root.pub in --dir")
    init.add_argument("--dir", required=True)
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_keys_init)
    rotate = keys_parser.add_parser("rotate", help="add a new active root key; old keys keep verifying")
    rotate.add_argument("--dir")
    rotate.add_argument("--cluster", action="store_true", help="rotate the operator's root key Secret")
    rotate.add_argument("--operator-namespace", default="capgate-system")
    rotate.add_argument("--kubeconfig")
    rotate.add_argument("--keep-old-for", default="31d")
    rotate.set_defaults(func=cmd_keys_rotate)

    mint = sub.add_parser("mint", help="mint a credential for an AgentCapability file")
    mint.add_argument("capability")
    mint.add_argument("--root-key", required=True)
    mint.add_argument("--namespace")
    mint.add_argument("--service-account")
    mint.add_argument("--ttl")
    mint.set_defaults(func=cmd_mint)

    inspect = sub.add_parser("inspect", help="show a token's blocks, expiry and revocation ids (no key needed)")
    inspect.add_argument("token", help="the token, a file holding it, or - for stdin")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    attenuate = sub.add_parser("attenuate", help="narrow a token: fewer rules, lower limits, shorter life")
    attenuate.add_argument("token")
    attenuate.add_argument("--trust", required=True, help="root.pub (or root.key) to verify the parent")
    attenuate.add_argument("--rules", help="comma-separated allow rules to keep")
    attenuate.add_argument("--limit", action="append", help="RULE.FIELD=MAX (repeatable)")
    attenuate.add_argument("--ttl")
    attenuate.add_argument("--service-account", help="delegate to SA or NS/SA (must be listed in spec.delegation)")
    attenuate.set_defaults(func=cmd_attenuate)

    explain = sub.add_parser("explain", help="decide one request against a capability file")
    explain.add_argument("capability")
    explain.add_argument("--request", help="'METHOD UPSTREAM PATH' or 'ACTION RESOURCE'")
    explain.add_argument("--mcp", help="an MCP message: 'METHOD UPSTREAM [NAME]', e.g. 'tools/call payments charge'")
    explain.add_argument("--body", help="the request body, as sent (read exactly as the sidecar reads it)")
    explain.add_argument("--content-type", default="application/json", help="the body's Content-Type")
    explain.add_argument("--args", help="JSON arguments of an --mcp tool call or prompt (params.arguments)")
    explain.add_argument("--receipt", action="append", help="a rule with a receipt in this correlation")
    explain.add_argument("--consumed", action="append",
                         help="a rule whose receipt in this correlation was already consumed (single-use gates)")
    explain.add_argument("--identity", help="namespace/serviceaccount of the caller (default: the capability's)")
    explain.add_argument("--at", help="evaluate at this RFC 3339 time (default: now)")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=cmd_explain)

    mcp = sub.add_parser("mcp", help="MCP helpers")
    mcp_sub = mcp.add_subparsers(dest="mcp_command", required=True)
    pin = mcp_sub.add_parser("pin", help="sha256 pins of tool definitions (from a saved tools/list answer)")
    pin.add_argument("capability")
    pin.add_argument("--upstream", required=True, help="the MCP upstream the tools belong to")
    pin.add_argument("--tools", required=True, help="a tools/list result or JSON-RPC answer (file, or - for stdin)")
    pin.add_argument("--write", action="store_true", help="write the pins into the capability file")
    pin.set_defaults(func=cmd_mcp_pin)

    test = sub.add_parser("test", help="run a table of requests and expected decisions")
    test.add_argument("cases", nargs="+")
    test.set_defaults(func=cmd_test)

    audit = sub.add_parser("audit", help="audit ledgers").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check a ledger's hash chain and signed checkpoints; exit 0 verified, "
                              "1 tampered, 3 unverified (not every record covered by a signature)")
    verify.add_argument("file")
    verify.add_argument("--trust", help="root.pub to verify checkpoint signatures (without it: unverified)")
    verify.add_argument("--open", action="store_true",
                        help="the sidecar is still writing this ledger: accept a missing closing checkpoint "
                             "(still reported; an unsigned tail is never accepted)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_audit_verify)
    from capgate import cluster

    cluster.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, CapabilityError, OSError, ClusterError) as exc:
        print(f"capgate: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
