"""The adapter's authorizer limits apply to every way it evaluates Datalog.

The library checks them between fixpoint iterations, so what they can stop is a program that needs
many iterations (here: one new fact per iteration, forever); a single huge join is stopped by the
shape check on narrowing blocks instead (test_narrowing.py).
"""

from __future__ import annotations

import pytest

from capgate.capabilities import _biscuit

from . import _support


def _chain(length: int) -> str:
    return (" ".join(f"e({i}, {i + 1});" for i in range(length))
            + f' n(0); n($x) <- n($y), e($y, $x); allow_match("r") <- n({length});')


ENDLESS = _chain(150)
"""One new fact per iteration: would allow after 150 iterations; the limit (100) must end it first, with a deny."""


def _token() -> _biscuit.Token:
    keyset = _support.keyset()
    assert keyset.active.private is not None
    return _biscuit.mint([(ENDLESS, {})], keyset.active.private, keyset.active_id)


def test_authorizing_a_token_stops_at_the_iteration_limit_and_denies() -> None:
    result = _token().authorize([])
    assert not result.allowed
    assert result.error is not None and "limit" in result.error.lower()


def test_a_prepared_authorizer_keeps_the_limits_through_its_snapshot() -> None:
    result = _biscuit.Prepared([(ENDLESS, {})]).authorize([])
    assert not result.allowed
    assert result.error is not None and "limit" in result.error.lower()


def test_reading_the_authority_block_stops_at_the_limit_too() -> None:
    with pytest.raises(Exception, match=r"(?i)limit"):
        _token().query_authority("q($x) <- n($x)")


def test_the_same_program_within_the_limits_allows() -> None:
    short = _chain(50)
    keyset = _support.keyset()
    assert keyset.active.private is not None
    token = _biscuit.mint([(short, {})], keyset.active.private, keyset.active_id)
    assert token.authorize([]).allowed
