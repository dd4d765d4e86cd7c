"""AgentCapability samples shared by the unit and e2e agreement tests.

Each sample says what the CRD schema alone decides ("schema") and what capgate's model decides
("model"). They may only differ where the validating webhook covers what a structural schema
cannot express; those samples say so in ``webhook``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "booking-agent.yaml"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


@dataclass(frozen=True)
class Sample:
    name: str
    mutate: Callable[[dict[str, Any]], None]
    schema_accepts: bool
    model_accepts: bool
    webhook: bool = False

    def build(self) -> dict[str, Any]:
        obj = copy.deepcopy(example())
        self.mutate(obj)
        return obj


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        target: Any = obj
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        if value is _DELETE:
            del target[last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return mutate


def _both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        for change in mutations:
            change(obj)
    return mutate


_DELETE = object()

SAMPLES = [
    Sample("the example", lambda o: None, True, True),
    Sample("audit mode", _set("spec.mode", "audit"), True, True),
    Sample("unknown mode", _set("spec.mode", "yolo"), False, False),
    Sample("missing service account", _set("spec.serviceAccountName", _DELETE), False, False),
    Sample("uppercase service account", _set("spec.serviceAccountName", "Booking"), False, False),
    Sample("no upstreams", _set("spec.upstreams", []), False, False),
    Sample("upstream without url", _set("spec.upstreams.0.url", _DELETE), False, False),
    Sample("ftp upstream", _set("spec.upstreams.0.url", "ftp://flights"), False, False),
    Sample("upstream url with credentials", _set("spec.upstreams.0.url", "http://user:pw@flights"), False, False),
    Sample("duplicate upstream names", _set("spec.upstreams.1.name", "flights"), False, False),
    Sample("duplicate rule names", _set("spec.rules.1.name", "search"), False, False),
    Sample("lowercase method", _set("spec.rules.0.methods", ["get"]), False, False),
    Sample("relative path glob", _set("spec.rules.0.paths", ["search"]), False, False),
    Sample("unknown effect", _set("spec.rules.0.effect", "maybe"), False, False),
    Sample("negative limit", _set("spec.rules.1.limits.0.max", -1), False, False),
    Sample("string limit", _set("spec.rules.1.limits.0.max", "400"), False, False),
    Sample("bad limit field", _set("spec.rules.1.limits.0.field", "amount..x"), False, False),
    Sample("bad duration", _set("spec.credential.ttl", "1 hour"), False, False),
    Sample("unknown spec field", _set("spec.limts", []), False, False),
    Sample("unknown rule field", _set("spec.rules.0.limts", []), False, False),
    Sample("injecting over http", _set("spec.upstreams.1.url", "http://payments.example.com"), False, False),
    Sample("injecting over http, opted in", _both(_set("spec.upstreams.1.url", "http://payments.example.com"),
                                                   _set("spec.upstreams.1.inject.allowInsecureTransport", True)),
           True, True),
    Sample("injecting over http, opt-in false", _both(_set("spec.upstreams.1.url", "http://payments.example.com"),
                                                       _set("spec.upstreams.1.inject.allowInsecureTransport", False)),
           False, False),
    Sample("opt-in on an https upstream", _set("spec.upstreams.1.inject.allowInsecureTransport", True), True, True),
    Sample("opt-in that is not a boolean", _both(_set("spec.upstreams.1.url", "http://payments.example.com"),
                                                  _set("spec.upstreams.1.inject.allowInsecureTransport", "true")),
           False, False),
    Sample("private CA for an https upstream",
           _set("spec.upstreams.1.tls", {"caSecretRef": {"name": "payments-ca", "key": "ca.crt"}}), True, True),
    Sample("private CA for an http upstream",
           _set("spec.upstreams.0.tls", {"caSecretRef": {"name": "flights-ca", "key": "ca.crt"}}), False, False),
    Sample("private CA without a key", _set("spec.upstreams.1.tls", {"caSecretRef": {"name": "payments-ca"}}),
           False, False),
    Sample("skipping verification", _set("spec.upstreams.1.tls", {"insecureSkipVerify": True}), False, False),
    Sample("a response budget", _both(_set("spec.budgets.0.from", "response"), _set("spec.budgets.0.worstCase", 4096)),
           True, True),
    Sample("a response budget without worstCase", _set("spec.budgets.0.from", "response"), False, False),
    Sample("a request budget with worstCase", _set("spec.budgets.0.worstCase", 10), False, False),
    Sample("an explicit request budget", _set("spec.budgets.0.from", "request"), True, True),
    Sample("a response budget with worstCase 0", _both(_set("spec.budgets.0.from", "response"),
                                                        _set("spec.budgets.0.worstCase", 0)), False, False),
    Sample("a response budget on an MCP upstream", _both(_set("spec.upstreams.1.mcp", {"path": "/mcp"}),
                                                          _set("spec.budgets.0.from", "response"),
                                                          _set("spec.budgets.0.worstCase", 5)), True, False,
           webhook=True),
    Sample("an MCP upstream", _set("spec.upstreams.0.mcp", {"path": "/mcp"}), True, True),
    Sample("an HTTP+SSE MCP upstream", _set("spec.upstreams.0.mcp", {"sse": "/sse", "messages": "/messages/"}),
           True, True),
    Sample("MCP with both transports", _set("spec.upstreams.0.mcp", {"path": "/mcp", "sse": "/sse"}), False, False),
    Sample("MCP sse without messages", _set("spec.upstreams.0.mcp", {"sse": "/sse"}), False, False),
    Sample("MCP without a transport", _set("spec.upstreams.0.mcp", {}), False, False),
    Sample("MCP pins", _set("spec.upstreams.0.mcp", {"path": "/mcp", "pins": {"charge": "sha256:" + "0" * 64}}),
           True, True),
    Sample("MCP pin that is not sha256", _set("spec.upstreams.0.mcp", {"path": "/mcp", "pins": {"charge": "md5:x"}}),
           False, False),
    Sample("MCP relative path", _set("spec.upstreams.0.mcp", {"path": "mcp"}), False, False),
    Sample("MCP dot-dot path", _set("spec.upstreams.0.mcp", {"path": "/a/../mcp"}), True, False, webhook=True),
    Sample("args on an action rule", _set("spec.rules.2", {"name": "t", "effect": "deny", "actions": ["mcp.call"],
                                                           "args": [{"field": "env", "in": ["prod"]},
                                                                    {"field": "host", "glob": "*.internal"}]}),
           True, True),
    Sample("args with in and glob", _set("spec.rules.2", {"name": "t", "effect": "deny", "actions": ["mcp.call"],
                                                          "args": [{"field": "env", "in": ["a"], "glob": "b"}]}),
           False, False),
    Sample("args with an empty in", _set("spec.rules.2", {"name": "t", "effect": "deny", "actions": ["mcp.call"],
                                                          "args": [{"field": "env", "in": []}]}), False, False),
    Sample("a readOnly action rule", _set("spec.rules.2", {"name": "t", "effect": "allow", "actions": ["mcp.call"],
                                                           "readOnly": True}), True, True),
    Sample("a readOnly HTTP rule", _set("spec.rules.0.readOnly", True), True, False, webhook=True),
    Sample("args on an HTTP rule", _set("spec.rules.0.args", [{"field": "env", "in": ["a"]}]), True, False,
           webhook=True),
    Sample("injected hop-by-hop header", _set("spec.upstreams.1.inject.header", "Connection"), True, False,
           webhook=True),
    Sample("dot-dot glob", _set("spec.rules.0.paths", ["/search/../admin"]), True, False, webhook=True),
    Sample("partial-segment glob", _set("spec.rules.0.paths", ["/search*"]), True, False, webhook=True),
    Sample("rule naming an unknown upstream", _set("spec.rules.0.upstream", "hotels"), True, False, webhook=True),
    Sample("requires naming an unknown rule", _set("spec.rules.1.requires", ["lookup"]), True, False, webhook=True),
    Sample("a consuming requires", _set("spec.rules.1.requires", [{"rule": "search", "consume": True}]), True, True),
    Sample("a requires entry with an unknown field", _set("spec.rules.1.requires", [{"rule": "search", "once": True}]),
           True, False, webhook=True),
    Sample("a requires entry that is a number", _set("spec.rules.1.requires", [7]), True, False, webhook=True),
    Sample("limits on a deny rule", _set("spec.rules.2.limits", [{"field": "amount", "max": 1}]), True, False,
           webhook=True),
    Sample("rotateBefore longer than ttl", _set("spec.credential.rotateBefore", "2h"), True, False, webhook=True),
    Sample("datalog that does not parse", _set("spec.datalog", "check if time($t), $t <"), True, False,
           webhook=True),
    Sample("datalog defining a reserved predicate", _set("spec.datalog", 'allow_match("search");'), True, False,
           webhook=True),
]
