"""Blocks a holder appends offline are refused unless they are what capgate's attenuation writes.

Every hostile block here is appended with real Biscuit crypto (the holder of a token can always add a
block), so each one *verifies*; what refuses it is its shape, checked before any of it is evaluated.
Without that check the first two cases take seconds of CPU and hundreds of MiB in the library.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from capgate.capabilities import _biscuit, decision, narrowing, tokens
from capgate.capabilities.errors import AttenuationError, TokenError
from capgate.capabilities.spec import MAX_DEPTH

from . import _support
from ._support import HELPER, NOW

FACTS = " ".join(f"f({i});" for i in range(100))
BOMBS = {
    "a 3-way join rule over 100 facts": FACTS + " g($a, $b, $c) <- f($a), f($b), f($c);",
    "a 3-way join check over 100 facts": FACTS + " check if f($a), f($b), f($c), $a + $b + $c == -1;",
    "one rule, no facts": "g($a) <- allow_match($a);",
    "one extra fact": 'allow_match("charge");',
    "a check of another shape": 'check if method("GET");',
    "a capgate shape with a trusting scope": "check if time($t), $t <= 2026-03-01T12:05:00Z trusting previous;",
    "a capgate shape joined with more": 'check if principal("travel/helper"), allow_match($a), allow_match($b);',
}


def _delegating() -> tokens.Credential:
    return _support.credential(_support.parse(
        lambda spec: spec.update(delegation={"serviceAccounts": ["helper"], "maxDepth": 3})))


def _narrowed() -> tokens.Credential:
    return _support.narrow(_delegating(), rules=["search", "charge"], limits={"charge": {"amount": 500}},
                           ttl=timedelta(minutes=5), principal=HELPER)


def _load(token: str) -> tokens.Credential:
    return tokens.load(token, _support.trust(), now=NOW)


def test_every_check_capgate_writes_when_narrowing_is_accepted_and_enforced() -> None:
    child = _narrowed()
    assert child.depth == 1
    grandchild = _support.narrow(child, rules=["charge"], limits={"charge": {"amount": 100}})
    assert grandchild.depth == 2

    allowed = decision.decide([grandchild], _support.charge(100, principal=HELPER))
    over = decision.decide([grandchild], _support.charge(101, principal=HELPER))
    assert (allowed.allowed, over.allowed) == (True, False)


@pytest.mark.parametrize("source", BOMBS.values(), ids=BOMBS.keys())
def test_a_block_appended_offline_with_other_datalog_is_refused_as_malformed(source: str) -> None:
    hostile = _narrowed().parsed.append([(source, {})]).to_base64()

    with pytest.raises(TokenError) as caught:
        _load(hostile)
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize("value", [
    'x"), f($a), f($b), f($c), principal("y',
    "x\ng($a) <- f($a)",
    "x; check if true",
])
def test_a_string_that_would_print_as_datalog_is_refused(value: str) -> None:
    # Biscuit prints strings unescaped: a quote or newline inside one must not let Datalog pass as a string.
    hostile = _narrowed().parsed.append([("check if principal({p});", {"p": value})]).to_base64()

    with pytest.raises(TokenError, match="malformed"):
        _load(hostile)


def test_a_description_fact_with_datalog_characters_is_refused() -> None:
    hostile = _narrowed().parsed.append([("attenuation({j});", {"j": '{"a": "$b"}); g($x) <- f($x'})]).to_base64()

    with pytest.raises(TokenError, match="malformed"):
        _load(hostile)


def test_narrowing_blocks_with_more_statements_than_capgate_writes_are_refused() -> None:
    expiry = ("check if time($t), $t <= {exp};", {"exp": NOW + timedelta(minutes=5)})
    one_block = _narrowed().parsed.append([expiry] * (narrowing.MAX_STATEMENTS + 1))
    spread = _narrowed().parsed.append([expiry] * 40).append([expiry] * 40)  # each under, together over

    for hostile in (one_block, spread):
        with pytest.raises(TokenError, match="more than 64 statements"):
            _load(hostile.to_base64())


def test_a_token_with_more_blocks_than_any_capability_allows_is_too_deep_before_verification() -> None:
    token: _biscuit.Token = _delegating().parsed
    expiry = ("check if time($t), $t <= {exp};", {"exp": NOW + timedelta(minutes=5)})
    for _ in range(MAX_DEPTH + 1):
        token = token.append([expiry])

    with pytest.raises(TokenError) as caught:
        tokens.load(token.to_base64(), _support.trust(), now=NOW)
    assert caught.value.reason == "too_deep"


def test_attenuate_refuses_to_write_more_checks_than_loading_accepts() -> None:
    fields = [f"f{i}" for i in range(narrowing.MAX_STATEMENTS)]
    cap = _support.parse(lambda spec: spec["rules"][1].update(
        limits=[{"field": name, "max": 10} for name in fields]))
    parent = _support.credential(cap)
    with pytest.raises(AttenuationError, match="at most 64 checks"):
        tokens.attenuate(parent, limits={"charge": dict.fromkeys(fields, 1)}, now=NOW)


def test_a_block_that_would_print_megabytes_is_refused_before_it_is_printed() -> None:
    # Strings are shared through the symbol table: each reference to the authority's spec JSON costs the
    # token two bytes and its printing the whole JSON, so the bound must hold before anything is printed.
    parent = _narrowed()
    spec_json = str(parent.parsed.query_authority("q($j) <- spec($j)")[0][0])
    references = ", ".join(f"$p == {{s{i}}}" for i in range(200))
    code = (f"check if principal($p), {references};", {f"s{i}": spec_json for i in range(200)})
    hostile = parent.parsed.append([code]).to_base64()

    with pytest.raises(TokenError, match="malformed"):
        narrowing.check_encoded(hostile)
    with pytest.raises(TokenError, match="malformed"):
        _load(hostile)


def test_capgates_own_narrowings_pass_the_wire_check_at_full_depth() -> None:
    cap = _support.parse(lambda spec: spec.update(delegation={"serviceAccounts": ["helper"], "maxDepth": 8}))
    token = _support.credential(cap)
    for _ in range(8):
        token = _support.narrow(token, rules=["search", "charge"], limits={"charge": {"amount": 5}},
                                ttl=timedelta(minutes=5), principal=HELPER)
    narrowing.check_encoded(token.token)
    assert decision.decide([token], _support.charge(5, principal=HELPER)).allowed
