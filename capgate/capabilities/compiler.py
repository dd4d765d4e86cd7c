"""AgentCapability → Biscuit authority block, as parameterised Datalog.

The shape of the compiled block (values are always ``{parameters}``, never formatted in)::

    capgate_version(1);
    spec({canonical JSON});                       what the sidecar routes, limits and explains by
    check if time($t), $t <= {expires_at};        the credential's lifetime
    check if principal($p), {principals}.contains($p);      namespace/serviceaccount binding
    allow_match({rule}) <- req({method}, {upstream}), path_match({glob}),
                           body_num({field}, $v0), $v0 <= {max},
                           receipt({required_rule}, $c), correlation($c),
                           unconsumed_receipt({consumed_rule}, $c);   requires: [{rule, consume: true}]
    deny_match({rule})  <- req($m, $u), ...

One Datalog rule per (method × glob) combination with constant terms only: Biscuit joins on
constants cheaply, while set membership and regexes in rule bodies cost 2–10× more per request
(measured: bench/decision.py). Glob matching itself is done by the verifier, which supplies a
``path_match(glob)`` fact for each glob of the capability that the normalized path matches
exactly, and a ``deny_path_match(glob)`` fact for each glob of a *deny* rule that it matches
leniently (:func:`capgate.capabilities.paths.lenient_forms`). Deny rules read only the
``deny_*`` facts, allow rules only the exact ones, so one glob can be exact in an allow rule and
lenient in a deny rule. (Credentials compiled before deny rules read ``deny_*`` facts still
decide exactly as they did: the verifier keeps supplying ``path_match`` for every glob.)

The request facts a verifier supplies are therefore: ``req(method, upstream)``,
``path_match(glob)``, ``action_match(glob)``, ``resource_match(glob)``, their lenient
``deny_path_match``/``deny_action_match``/``deny_resource_match``, ``principal(p)``,
``correlation(c)``, ``receipt(rule, c)``, ``unconsumed_receipt(rule, c)`` (a receipt of ``rule``
this sidecar has not seen consumed: the sidecar records its consumption before forwarding),
``body_num(field, value)``, ``arg_str(field, value)``,
``arg_match(field, glob)`` and ``time(t)``.

Action arguments (MCP's ``params.arguments``) are the body of an action request, so ``limits``
read them through ``body_num`` exactly as for HTTP bodies. ``args`` string constraints compile to
``arg_str({field}, $a), {values}.contains($a)`` (``in``) and ``arg_match({field}, {glob})``
(``glob``; the verifier matches the glob, as it does for paths); deny rules read the lenient
``deny_arg_str`` (folded value against folded values) and ``deny_arg_match``, like their globs.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from capgate import timestamps
from capgate.capabilities import _biscuit, paths
from capgate.capabilities.errors import SpecError
from capgate.capabilities.spec import Capability, Rule, parse_capability, to_spec

FORMAT_VERSION = 1
RESERVED_PREDICATES = frozenset({
    "allow_match", "deny_match", "req", "path_match", "action_match", "resource_match", "deny_path_match",
    "deny_action_match", "deny_resource_match", "principal", "correlation", "receipt", "body_num", "time", "spec",
    "capgate_version", "attenuation", "arg_str", "unconsumed_receipt", "arg_match", "deny_arg_str", "deny_arg_match",
})
"""Predicates whose meaning capgate defines; user Datalog may read them but never derive them."""

_HEAD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_:]*)\s*\(")
_CHECK = re.compile(r"^\s*(check|reject|deny|allow)\s+(if|all)\b")

Code = _biscuit.Code


def spec_document(cap: Capability, issued_at: datetime, expires_at: datetime) -> dict[str, Any]:
    """The canonical JSON embedded in the token (no secret values: Secret *names* only)."""
    return {
        "name": cap.name,
        "namespace": cap.namespace,
        "issuedAt": timestamps.iso(issued_at),
        "expiresAt": timestamps.iso(expires_at),
        "principals": sorted({cap.principal, *cap.delegation.principals}),
        "spec": to_spec(cap),
    }


def compile_authority(cap: Capability, issued_at: datetime, expires_at: datetime) -> list[Code]:
    """The authority block for ``cap``; a pure function of its inputs (same spec, same Datalog)."""
    document = spec_document(cap, issued_at, expires_at)
    code: list[Code] = [
        ("capgate_version({v});", {"v": FORMAT_VERSION}),
        ("spec({json});", {"json": json.dumps(document, sort_keys=True, separators=(",", ":"))}),
        ("check if time($t), $t <= {exp};", {"exp": expires_at}),
        ("check if principal($p), {principals}.contains($p);", {"principals": frozenset(document["principals"])}),
    ]
    for rule in cap.rules:
        code.extend(compile_rule(rule))
    if cap.datalog.strip():
        code.append((cap.datalog, {}))
    return code


def compile_rule(rule: Rule) -> Iterator[Code]:
    """One Datalog rule per alternative way ``rule`` can match; see the module docstring."""
    head = "allow_match" if rule.effect == "allow" else "deny_match"
    match = "" if rule.effect == "allow" else "deny_"
    for alternative in _alternatives(rule):
        body: list[str] = []
        params: dict[str, _biscuit.Term] = {"rule": rule.name}
        for key, value in alternative.items():
            params[key] = value
        if rule.is_http:
            method = "{method}" if "method" in alternative else "$method"
            upstream = "{upstream}" if rule.upstream else "$upstream"
            if rule.upstream:
                params["upstream"] = rule.upstream
            body.append(f"req({method}, {upstream})")
            if "glob" in alternative:
                body.append(f"{match}path_match({{glob}})")
        else:
            if "action" in alternative:
                body.append(f"{match}action_match({{action}})")
            if "resource" in alternative:
                body.append(f"{match}resource_match({{resource}})")
        for index, limit in enumerate(rule.limits):
            body.append(f"body_num({{field{index}}}, $v{index}), $v{index} >= 0, $v{index} <= {{max{index}}}")
            params[f"field{index}"] = limit.field
            params[f"max{index}"] = limit.max
        body.extend(_arg_clauses(rule, params, match))
        for index, required in enumerate(rule.requires):
            # A consuming gate reads its own fact, supplied only for a receipt not yet consumed: a
            # verifier that does not know single-use receipts never supplies it, so it fails closed.
            fact = "unconsumed_receipt" if required in rule.consumes else "receipt"
            body.append(f"{fact}({{requires{index}}}, $correlation), correlation($correlation)")
            params[f"requires{index}"] = required
        yield f"{head}({{rule}}) <- {', '.join(body)};", params


def _arg_clauses(rule: Rule, params: dict[str, _biscuit.Term], match: str) -> list[str]:
    """``args`` as Datalog; a deny rule (``match == "deny_"``) compares folded values, like its globs."""
    clauses = []
    for index, arg in enumerate(rule.args):
        params[f"afield{index}"] = arg.field
        if arg.one_of:
            clauses.append(f"{match}arg_str({{afield{index}}}, $a{index}), {{avalues{index}}}.contains($a{index})")
            values = {paths.fold_name(v) for v in arg.one_of} if match else set(arg.one_of)
            params[f"avalues{index}"] = frozenset(values)
        else:
            assert arg.glob is not None
            clauses.append(f"{match}arg_match({{afield{index}}}, {{aglob{index}}})")
            params[f"aglob{index}"] = arg.glob
    return clauses


def _alternatives(rule: Rule) -> Iterator[dict[str, str]]:
    if rule.is_http:
        methods: Sequence[str | None] = rule.methods or (None,)
        globs: Sequence[str | None] = rule.paths or (None,)
        for method, glob in itertools.product(methods, globs):
            yield {k: v for k, v in (("method", method), ("glob", glob)) if v is not None}
    else:
        actions: Sequence[str | None] = rule.actions or (None,)
        resources: Sequence[str | None] = rule.resources or (None,)
        for action, resource in itertools.product(actions, resources):
            yield {k: v for k, v in (("action", action), ("resource", resource)) if v is not None}


def validate(cap: Capability) -> None:
    """What the schema cannot say: the raw Datalog parses and derives no reserved predicate."""
    if not cap.datalog.strip():
        return
    problem = _biscuit.parse_error(cap.datalog)
    if problem:
        raise SpecError("spec.datalog", f"does not parse: {problem}")
    for line in _biscuit.canonical_source(cap.datalog).splitlines():
        if _CHECK.match(line):
            if _CHECK.match(line).group(1) in ("allow", "deny"):  # type: ignore[union-attr]
                raise SpecError("spec.datalog", "policies (allow if / deny if) belong to the verifier")
            continue
        head = _HEAD.match(line)
        if head and head.group(1) in RESERVED_PREDICATES:
            raise SpecError("spec.datalog", f"must not define the reserved predicate {head.group(1)!r}")


def validate_object(obj: Mapping[str, Any]) -> Capability:
    """Everything the validating webhook checks: the strict model, then the Datalog."""
    cap = parse_capability(obj)
    validate(cap)
    return cap


@dataclass(frozen=True)
class PathMatch:
    """The capability's path globs a normalized path matches: exactly (read by allow rules) and
    leniently (the globs of deny rules, read by deny rules). Hashable: it keys prepared authorizers."""

    exact: frozenset[str] = frozenset()
    lenient: frozenset[str] = frozenset()


def deny_globs(cap: Capability, kind: str = "paths") -> tuple[str, ...]:
    """The ``paths``, ``actions`` or ``resources`` globs of the capability's deny rules."""
    return tuple(sorted({glob for rule in cap.rules if rule.effect == "deny" for glob in getattr(rule, kind)}))


def match_path(cap: Capability, path: str) -> PathMatch:
    """Which globs of ``cap`` the normalized ``path`` matches, exactly and (deny rules) leniently."""
    exact = frozenset(glob for glob in cap.sorted_globs if paths.glob_matches(glob, path))
    denying = deny_globs(cap)
    if not denying:
        return PathMatch(exact)
    forms = paths.lenient_forms(path)
    lenient = frozenset(glob for glob in denying if glob in exact
                        or any(paths.compile_lenient_glob(glob).match(form) for form in forms))
    return PathMatch(exact, lenient)


def prune(code: Sequence[Code], *, method: str | None, upstream: str | None,
          globs: PathMatch | None = None) -> list[Code]:
    """``code`` without the compiled rules that cannot fire for this request.

    A compiled rule fires only through its ``req(method, upstream)`` (HTTP) or
    ``action_match``/``resource_match`` (action) facts, and a request supplies exactly one
    ``req`` fact or only action facts. A rule whose constants differ from the request's, or of
    the other kind, derives nothing for it, so dropping it leaves the fixpoint unchanged; so does
    a rule whose glob is not among the ``globs`` the request's path matched (exactly for allow
    rules, leniently for deny rules). The
    ``spec`` fact is dropped unless some Datalog reads it. User Datalog and every check are kept.
    """
    kept: list[Code] = []
    reads_spec = any("spec(" in source for source, _ in code if not source.startswith("spec("))
    for source, params in code:
        if source.startswith("spec(") and not reads_spec:
            continue  # a large inert fact; nothing in the policy reads it
        if source.startswith(("allow_match({rule}) <-", "deny_match({rule}) <-")) and not _can_fire(
                source, params, method, upstream, globs):
            continue
        kept.append((source, params))
    return kept


def _can_fire(source: str, params: _biscuit.Params, method: str | None, upstream: str | None,
              globs: PathMatch | None) -> bool:
    http_rule = "req(" in source
    if method is None:
        return not http_rule
    if not http_rule or params.get("method", method) != method or params.get("upstream", upstream) != upstream:
        return False
    if globs is None or "glob" not in params:
        return True
    return params["glob"] in (globs.lenient if "deny_path_match(" in source else globs.exact)
