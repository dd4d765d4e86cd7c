"""The compiler: deterministic, values only as parameters, user Datalog checked before it is signed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from capgate.capabilities import compiler, decision, tokens
from capgate.capabilities.errors import SpecError
from capgate.capabilities.spec import Capability

from . import _support
from ._support import NOW

EXPIRES = NOW + timedelta(hours=1)


def with_datalog(text: str) -> Capability:
    return _support.parse(lambda spec: spec.__setitem__("datalog", text))


def test_the_same_spec_and_times_compile_to_identical_code(booking: Capability) -> None:
    first = compiler.compile_authority(booking, NOW, EXPIRES)
    again = compiler.compile_authority(_support.parse(), NOW, EXPIRES)

    assert first == again
    assert compiler.compile_authority(booking, NOW, EXPIRES + timedelta(seconds=1)) != first


def test_spec_values_appear_only_as_parameters() -> None:
    cap = _support.parse(lambda spec: spec.__setitem__("delegation", {"serviceAccounts": ["helper"]}))
    code = compiler.compile_authority(cap, NOW, EXPIRES)
    templates = [source for source, _ in code if source != cap.datalog]
    values = ["search", "charge", "no-deletes", "flights", "payments", "/search", "/search/**", "/v1/charges",
              "amount", "40000", "GET", "POST", "DELETE", "travel", "booking-agent", "helper"]

    for source in templates:
        for value in values:
            assert value not in source, f"{value!r} formatted into {source!r}"
    all_params = [v for _, params in code for v in params.values()]
    flat = {x for v in all_params for x in (v if isinstance(v, frozenset) else {v})}
    for value in ("search", "charge", "no-deletes", "flights", "payments", "/search/**", "/v1/charges",
                  "amount", 40000, "GET", "POST", "DELETE", "travel/booking-agent", "travel/helper"):
        assert value in flat, f"{value!r} missing from the parameters"


def test_the_user_datalog_is_appended_verbatim_and_last(booking: Capability) -> None:
    code = compiler.compile_authority(booking, NOW, EXPIRES)

    assert code[-1] == (booking.datalog, {})


def test_one_datalog_rule_per_method_and_glob() -> None:
    cap = _support.parse(lambda spec: spec["rules"][0].__setitem__("methods", ["GET", "HEAD"]))
    search = cap.rule("search")
    assert search is not None

    assert len(list(compiler.compile_rule(search))) == 4


def test_the_embedded_spec_names_secrets_but_holds_no_secret_value(booking: Capability) -> None:
    document = compiler.spec_document(booking, NOW, EXPIRES)

    assert document["principals"] == ["travel/booking-agent"]
    assert document["expiresAt"] == "2026-03-01T13:00:00Z"
    inject = document["spec"]["upstreams"][1]["inject"]
    assert inject["secretRef"] == {"name": "payments-api-key", "key": "token"}


@pytest.mark.parametrize(
    "text",
    [
        "check if time($t), $t < 2027-01-01T00:00:00Z;",
        'check if principal($p), ["travel/booking-agent"].contains($p);',
        "note(1); check if note(1);",
        'helper($r) <- allow_match($r); check if helper("search") or req("POST", "payments");',
        "reject if body_num(\"amount\", $v), $v > 1000000;",
    ],
)
def test_valid_user_datalog_is_accepted(text: str) -> None:
    cap = with_datalog(text)

    compiler.validate(cap)
    assert tokens.mint(cap, _support.keyset(), now=NOW)


@pytest.mark.parametrize(
    "text",
    ["check if", "allow_match(", "check if time($t), $t <", "this is not datalog", 'check if x("unterminated);',
     "check if principal({p});"],
)
def test_user_datalog_that_does_not_parse_is_rejected(text: str) -> None:
    with pytest.raises(SpecError, match=r"^spec\.datalog: does not parse"):
        compiler.validate(with_datalog(text))


@pytest.mark.parametrize(
    ("text", "predicate"),
    [
        ('allow_match("x");', "allow_match"),
        ('deny_match("x");', "deny_match"),
        ("req($m, $u) <- time($m), time($u);", "req"),
        ('allow_match($r) <- receipt($r, $c);', "allow_match"),
        ('principal("travel/booking-agent");', "principal"),
        ("time(2026-01-01T00:00:00Z);", "time"),
        ('path_match("/search/**");', "path_match"),
        ('receipt("search", "session-1");', "receipt"),
        ('body_num("amount", 1);', "body_num"),
        ('correlation("session-1");', "correlation"),
        ('spec("{}");', "spec"),
        ("capgate_version(1);", "capgate_version"),
        ('attenuation("{}");', "attenuation"),
        ('check if true; ok(1); allow_match("search");', "allow_match"),
    ],
)
def test_user_datalog_may_not_define_reserved_predicates(text: str, predicate: str) -> None:
    with pytest.raises(SpecError) as info:
        compiler.validate(with_datalog(text))

    assert str(info.value) == f"spec.datalog: must not define the reserved predicate {predicate!r}"


@pytest.mark.parametrize("text", ["allow if true;", "deny if true;", "check if true; allow if true;"])
def test_user_datalog_may_not_carry_policies(text: str) -> None:
    with pytest.raises(SpecError, match=r"^spec\.datalog: "):
        compiler.validate(with_datalog(text))


def test_minting_refuses_invalid_user_datalog() -> None:
    with pytest.raises(SpecError, match=r"^spec\.datalog: must not define"):
        tokens.mint(with_datalog('allow_match("charge");'), _support.keyset(), now=NOW)


def test_a_failing_user_check_denies_as_check_failed() -> None:
    cred = _support.credential(with_datalog("check if time($t), $t < 2026-01-01T00:00:00Z;"))

    outcome = decision.decide([cred], _support.http("GET", "flights", "/search"))

    assert (outcome.allowed, outcome.code, outcome.reason) == (False, "denied", "check_failed")


def test_the_examples_own_deadline_denies_after_2027() -> None:
    late = NOW.replace(year=2027, month=1, day=1, hour=0, minute=30)
    cred = _support.credential(_support.parse(), now=late - timedelta(minutes=10))

    outcome = decision.decide([cred], _support.http("GET", "flights", "/search", now=late))

    assert (outcome.allowed, outcome.reason) == (False, "check_failed")


def test_a_user_reject_rule_denies_what_an_allow_rule_would_allow() -> None:
    cred = _support.credential(with_datalog('reject if body_num("amount", $v), $v > 100;'))

    assert decision.decide([cred], _support.charge(100)).allowed
    assert not decision.decide([cred], _support.charge(101)).allowed


def test_the_webhook_validation_checks_the_model_and_the_datalog() -> None:
    obj = _support.manifest()
    assert compiler.validate_object(obj) == _support.parse()

    obj["spec"]["datalog"] = 'allow_match("charge");'
    with pytest.raises(SpecError, match=r"^spec\.datalog: must not define"):
        compiler.validate_object(obj)
    obj["spec"]["rules"][0]["limts"] = []
    with pytest.raises(SpecError, match=r"^spec\.rules\[0\]\.limts: unknown field"):
        compiler.validate_object(obj)
