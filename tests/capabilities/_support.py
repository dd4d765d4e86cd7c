"""Shared values for the core tests: the booking example, a fixed clock, one root key set.

Plain functions rather than fixtures so hypothesis tests can use them too (hypothesis refuses
function-scoped fixtures). Every time is explicit: nothing here reads the wall clock.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from capgate.capabilities import decision, keys, tokens
from capgate.capabilities.spec import Capability, parse_capability

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "booking-agent.yaml"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
"""Before the example's own ``check if time($t), $t < 2027-01-01`` cuts in."""
PRINCIPAL = "travel/booking-agent"
HELPER = "travel/helper"
STRANGER = "travel/stranger"

Manifest = dict[str, Any]


@cache
def _example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def manifest() -> Manifest:
    """A fresh, mutable copy of the example AgentCapability."""
    return copy.deepcopy(yaml.safe_load(_example_text()))


def parse(mutate: Callable[[Manifest], object] | None = None) -> Capability:
    """The example, changed by ``mutate(spec)`` first (``spec`` is the manifest's ``spec`` mapping)."""
    obj = manifest()
    if mutate is not None:
        mutate(obj["spec"])
    return parse_capability(obj)


@cache
def keyset() -> keys.KeySet:
    return keys.KeySet.generate(NOW - timedelta(days=1))


def trust() -> keys.TrustBundle:
    return keyset().trust_bundle()


def credential(cap: Capability, *, now: datetime = NOW, keyset_: keys.KeySet | None = None) -> tokens.Credential:
    ks = keyset_ or keyset()
    return tokens.load(tokens.mint(cap, ks, now=now), ks.trust_bundle(), now=now)


def narrow(parent: tokens.Credential, *, now: datetime = NOW, **kwargs: Any) -> tokens.Credential:
    return tokens.load(tokens.attenuate(parent, now=now, **kwargs), trust(), now=now)


def http(method: str, upstream: str, path: str, **kwargs: Any) -> decision.Request:
    kwargs.setdefault("principal", PRINCIPAL)
    kwargs.setdefault("correlation", "session-1")
    kwargs.setdefault("now", NOW)
    return decision.Request(method=method, upstream=upstream, path=path, **kwargs)


def charge(amount: object = 100, **kwargs: Any) -> decision.Request:
    """POST /v1/charges with a receipt of ``search`` (unless ``receipts`` says otherwise)."""
    kwargs.setdefault("receipts", frozenset({"search"}))
    return http("POST", "payments", "/v1/charges", body={"amount": amount}, **kwargs)
