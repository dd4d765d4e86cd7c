"""The only shapes a narrowing block may take, checked before any Datalog of it is evaluated.

Anyone holding a token can append a block offline, so an agent controls every block after the
authority block. Biscuit's authorizer limits do not bound such a block: the library checks
``max_facts``, ``max_iterations`` and ``max_time`` only *between* fixpoint iterations, after every
rule has been applied once, and evaluates checks with no limit at all. One iteration of
``g($a, $b, $c) <- f($a), f($b), f($c)`` over 100 facts materialises 10^6 facts (~4 s and
~300 MiB measured) before the 1,000-fact limit is even looked at; a check joining the same facts
takes as long and produces nothing the limit counts. And the library holds the GIL throughout, so
no thread can keep the event loop answering meanwhile.

So the bound is structural: a block after the authority block may contain only what
:func:`capgate.capabilities.tokens.attenuate` writes — the ``attenuation`` description fact and
checks of four fixed shapes (allowed rules, a lowered limit, an expiry, a holder binding), each
evaluated in time linear in the request's facts — at most :data:`MAX_STATEMENTS` of them in all,
at most :data:`MAX_SOURCE_BYTES` per block. Anything else (a rule, another fact, another check, a scope
annotation) refuses the token with 401 ``invalid_token`` / ``malformed``. Narrowing by hand
(``biscuit attenuate``) with other Datalog is therefore not supported: ask the sidecar
(``/_capgate/v1/attenuate``) or ``capgate attenuate``.

Printing a block is itself a cost the agent controls: a block refers to strings by index into the
token's symbol table, so 2,000 references to the authority block's 10 KiB spec JSON fit in a 64 KiB
token and print to 20 MB (~130 ms and ~60 MiB measured). So :func:`check_encoded` first walks the
blocks in their wire format (the Biscuit protobuf schema, read here because the library exposes no
structure, only printing): no rules, scopes, third-party signatures or ``check all``/``reject``
kinds, at most :data:`MAX_STATEMENTS` facts and checks, and at most :data:`MAX_REFERENCED_BYTES`
of strings referenced in all — which bounds what printing can produce before anything is printed.

The shapes are matched on the library's printing of the block, which does not escape quotes
inside strings. Every string a shape admits is therefore restricted to characters that cannot
close a literal or start Datalog syntax (no quote, ``(``, ``)``, ``$``, ``;``, ``<``, newline),
so a printed line matching a shape can only come from a statement of that shape; the JSON
description may contain quotes, but no character a rule or a check needs.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence

from capgate.capabilities.errors import TokenError

MAX_STATEMENTS = 64
"""Across all narrowing blocks of a token: each capgate narrowing writes a description fact, a rules
check, an expiry, a binding and one check per lowered limit, so eight narrowings of a capability with
a few limited fields stay well below. Every check is evaluated on every request (and per scope of an
``authorize`` call), so this is also what bounds a decision's cost: ~1 ms at 64."""
MAX_SOURCE_BYTES = 16 * 1024
"""The printed block; capgate's own narrowing of a 64-rule capability prints in ~2 KiB."""

MAX_REFERENCED_BYTES = 64 * 1024
"""Bytes of strings all narrowing blocks may refer to: eight descriptions of at most 8 KiB each."""
MAX_NODES = 16 * 1024
"""Protobuf fields all narrowing blocks may hold: capgate's 64 statements use a few hundred."""

_STRING = r'"[A-Za-z0-9_./:@-]{1,256}"'
"""Rule names, field paths, principals: no quote, comma, space or Datalog punctuation."""
_INTEGER = r"-?[0-9]{1,19}"
_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"
_SHAPES = (
    re.compile(r'attenuation\("\{[A-Za-z0-9_./:@{}\[\]", -]{0,8192}\}"\);'),
    re.compile(rf"check if allow_match\(\$r\), \{{{_STRING}(?:, {_STRING}){{0,255}}\}}\.contains\(\$r\);"),
    re.compile(rf"check if allow_match\(\$r\), \$r != {_STRING} or body_num\({_STRING}, \$v\), "
               rf"\$v >= 0, \$v <= {_INTEGER};"),
    re.compile(rf"check if time\(\$t\), \$t <= {_DATE};"),
    re.compile(rf"check if principal\({_STRING}\);"),
)


def statements(source: str) -> int:
    return sum(1 for line in source.split("\n") if line)


def check_blocks(sources: Sequence[str]) -> None:
    """Refuse the narrowing blocks (printed as ``sources``, block 1 first) unless made of capgate's shapes."""
    total = 0
    for index, source in enumerate(sources, start=1):
        if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise TokenError("malformed", f"narrowing block {index} is larger than {MAX_SOURCE_BYTES} bytes")
        lines = [line for line in source.split("\n") if line]
        total += len(lines)
        if total > MAX_STATEMENTS:
            raise TokenError("malformed", f"narrowing blocks hold more than {MAX_STATEMENTS} statements")
        for line in lines:
            if not any(shape.fullmatch(line) for shape in _SHAPES):
                raise TokenError("malformed", f"narrowing block {index} holds Datalog capgate does not write "
                                              "(only the checks of /_capgate/v1/attenuate are accepted)")


# -- the wire format, read only to bound what printing can cost ----------------------------------
_DEFAULT_SYMBOLS = 28
"""Biscuit's default symbol table (read, write, ..., query); token symbols start at index 1024."""
_REF, _SCALAR, _REJECT = "ref", "scalar", "reject"
_SCHEMA: dict[str, dict[int, str]] = {
    # message -> field number -> child message, a symbol reference, a scalar, or refused outright
    "Block": {1: _SCALAR, 2: _SCALAR, 3: _SCALAR, 4: "FactV2", 5: _REJECT, 6: "CheckV2", 7: _REJECT, 8: _REJECT},
    "FactV2": {1: "PredicateV2"},
    "CheckV2": {1: "RuleV2", 2: _SCALAR},
    "RuleV2": {1: "PredicateV2", 2: "PredicateV2", 3: "ExpressionV2", 4: _REJECT},
    "PredicateV2": {1: _REF, 2: "TermV2"},
    "TermV2": {1: _SCALAR, 2: _SCALAR, 3: _REF, 4: _SCALAR, 5: _SCALAR, 6: _SCALAR, 7: "Terms", 8: _SCALAR,
               9: "Terms", 10: "Map"},
    "Terms": {1: "TermV2"},
    "Map": {1: "MapEntry"},
    "MapEntry": {1: "MapKey", 2: "TermV2"},
    "MapKey": {1: _SCALAR, 2: _REF},
    "ExpressionV2": {1: "Op"},
    "Op": {1: "TermV2", 2: "OpKind", 3: "OpKind", 4: "OpClosure"},
    "OpKind": {1: _SCALAR, 2: _REF},
    "OpClosure": {1: _SCALAR, 2: "Op"},
}


class _Malformed(ValueError):
    pass


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protobuf message, without a schema."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, wire, value))
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise _Malformed
            out.append((number, wire, data[pos:pos + size]))
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            out.append((number, wire, 0))
        else:
            raise _Malformed  # groups: never written by Biscuit
    if pos != len(data):
        raise _Malformed
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


class _Walk:
    def __init__(self, symbols: list[bytes]) -> None:
        self.symbols = symbols
        self.referenced = 0
        self.nodes = 0

    def message(self, kind: str, data: bytes, depth: int = 0) -> None:
        if depth > 32:
            raise _Malformed
        schema = _SCHEMA[kind]
        for number, wire, value in _fields(data):
            self.nodes += 1
            role = schema.get(number, _REJECT)
            if kind == "CheckV2" and number == 2:
                if value != 0:
                    raise _Malformed  # check all / reject if: not a shape capgate writes
                continue
            if role == _REJECT:
                raise _Malformed
            if role == _REF:
                if wire != 0 or not isinstance(value, int):
                    raise _Malformed
                self.referenced += len(self.symbol(value))
            elif role != _SCALAR:
                if wire != 2 or not isinstance(value, bytes):
                    raise _Malformed
                self.message(role, value, depth + 1)
        if self.nodes > MAX_NODES or self.referenced > MAX_REFERENCED_BYTES:
            raise _Malformed

    def symbol(self, index: int) -> bytes:
        if index < _DEFAULT_SYMBOLS:
            return b"ip_address"  # the longest of the default names
        if 1024 <= index < 1024 + len(self.symbols):
            return self.symbols[index - 1024]
        raise _Malformed


def check_encoded(token: str) -> None:
    """Refuse narrowing blocks whose printing could cost more than capgate's own would, before printing."""
    try:
        raw = base64.urlsafe_b64decode(token.strip() + "=" * (-len(token.strip()) % 4))
        top = _fields(raw)
        signed = ([value for number, _, value in top if number == 2 and isinstance(value, bytes)][:1]
                  + [value for number, _, value in top if number == 3 and isinstance(value, bytes)])
        symbols: list[bytes] = []
        walk = _Walk(symbols)
        statements = 0
        for index, block in enumerate(signed):
            parts = _fields(block)
            if any(number == 4 for number, _, _ in parts):
                raise _Malformed  # a third-party block: capgate never writes one
            payload = next(value for number, _, value in parts if number == 1 and isinstance(value, bytes))
            fields = _fields(payload)
            symbols.extend(value for number, _, value in fields if number == 1 and isinstance(value, bytes))
            if index == 0:
                continue  # the authority block is the operator's, signed by the root key
            statements += sum(1 for number, _, _ in fields if number in (4, 6))
            if statements > MAX_STATEMENTS:
                raise TokenError("malformed", f"narrowing blocks hold more than {MAX_STATEMENTS} statements")
            walk.message("Block", payload)
    except TokenError:
        raise
    except (_Malformed, StopIteration, binascii.Error, ValueError) as exc:
        raise TokenError("malformed", "narrowing blocks hold Datalog capgate does not write") from exc
