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

The shapes are matched on the library's printing of the block, which does not escape quotes
inside strings. Every string a shape admits is therefore restricted to characters that cannot
close a literal or start Datalog syntax (no quote, ``(``, ``)``, ``$``, ``;``, ``<``, newline),
so a printed line matching a shape can only come from a statement of that shape; the JSON
description may contain quotes, but no character a rule or a check needs.
"""

from __future__ import annotations

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
