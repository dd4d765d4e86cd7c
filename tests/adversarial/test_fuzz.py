"""Property tests: what an attacker can put on the wire never buys more than the capability grants.

The judge is :mod:`tests.adversarial.oracle`, written from DESIGN.md without importing capgate's
decision code. ``bench/adversarial.py`` runs the same campaigns at 100,000 requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capgate.capabilities import bodies, compiler, decision, keys, paths, receipts, spec, tokens
from capgate.capabilities.errors import ReceiptError, RequestError, TokenError
from tests.adversarial import generate, oracle, rig

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_no_adversarial_request_is_forwarded_that_the_design_refuses(seed: int) -> None:
    counts = asyncio.run(rig.run(seed, campaigns=1, requests=80))
    assert counts.tried == 80
    assert counts.false_allows == 0, counts.examples
    assert counts.header_leaks == 0, counts.examples
    assert counts.crashes == 0, counts.examples
    assert (counts.false_denies, counts.disagreements) == (0, 0), counts.examples
    assert counts.ledger_lies == 0, counts.examples


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_mcp_messages_are_generated_judged_and_never_forwarded_against_the_design(seed: int) -> None:
    counts = asyncio.run(rig.run(seed, campaigns=2, requests=100, mcp=True))
    assert counts.mcp_tried > 0, "the generator must keep sending JSON-RPC messages to MCP endpoints"
    assert (counts.false_allows, counts.header_leaks, counts.crashes) == (0, 0, 0), counts.examples
    assert (counts.false_denies, counts.disagreements, counts.ledger_lies) == (0, 0, 0), counts.examples


PATH_ALPHABET = st.sampled_from(["/", ".", "%", "2", "e", "E", "f", "F", "5", "c", "0", "a", ";", "\\", "\x00", "\n",
                                 "\u00e9", "\uff0e", "C", "3", "A", "9", "*", "~", "$", '"'])


@FAST
@given(raw=st.text(PATH_ALPHABET, max_size=24).map(lambda s: "/" + s))
def test_a_path_decodes_one_way_or_is_refused(raw: str) -> None:
    expected = oracle.decode_path(raw)
    try:
        got = paths.normalize(raw)
    except RequestError:
        got = None
    assert got == expected


RESOURCE_ALPHABET = st.sampled_from(["/", ".", "%2e", "%2f", "%00", "a", "A", ":", "//", "?", "#", "\n", "%", "mcp",
                                     "file", "@", "\uff0e", "%41", " ", "*", "x.y", "~"])


@FAST
@given(raw=st.lists(RESOURCE_ALPHABET, max_size=12).map("".join))
def test_a_resource_decodes_one_way_or_is_refused(raw: str) -> None:
    expected = oracle.decode_resource(raw)
    try:
        got = paths.normalize_resource(raw)
    except RequestError:
        got = None
    assert got == expected


LENIENT_SEGMENT = st.sampled_from(["admin", "ADMIN", "Admin", "admin.", "admin ", "admin.json", "\uff41dmin",
                                   "ad\u200bmin", "admin::$DATA", "x", "x.json", "*", "**"])


@FAST
@given(glob=st.lists(LENIENT_SEGMENT, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)),
       path=st.tuples(st.lists(LENIENT_SEGMENT.filter(lambda s: "*" not in s), max_size=3), st.booleans()).map(
           lambda d: "/" + "/".join(d[0]) + ("/" if d[1] and d[0] else "")))
def test_deny_globs_match_leniently_as_the_design_says(glob: str, path: str) -> None:
    if paths.validate_glob(glob) is not None:
        return
    assert paths.lenient_glob_matches(glob, paths.normalize(path)) == oracle.lenient_glob_matches(glob, path)


SEGMENT = st.sampled_from(["a", "b", "search", "*", "**", "", "x.json"])


@FAST
@given(glob=st.lists(SEGMENT, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)),
       path=st.lists(st.sampled_from(["a", "b", "search", "x.json", "c"]), max_size=5).map(lambda s: "/" + "/".join(s)))
def test_globs_match_exactly_the_paths_the_design_says(glob: str, path: str) -> None:
    if paths.validate_glob(glob) is not None:
        return
    assert paths.glob_matches(glob, path) == oracle.glob_matches(glob, path)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["amount", "order",
                                                                                                "total", "x"]),
                                                                               inner, max_size=3), max_leaves=10)


FIELDS = frozenset(generate.FIELDS)
JSON_HEADERS = [("Content-Type", "application/json")]


def capgate_reads(raw: bytes, headers: list[tuple[str, str]], query: str = "") -> object:
    """The document the sidecar's body reader returns, or the exception it refuses with."""
    try:
        return bodies.read(raw, content_type=[v for n, v in headers if n.lower() == "content-type"],
                           content_encoding=[v for n, v in headers if n.lower() == "content-encoding"],
                           query=query, fields=FIELDS)
    except bodies.BodyError as exc:
        return exc


@FAST
@given(document=JSON, maximum=st.sampled_from([0, 1, 100, 40000, 2**63 - 1]))
def test_a_limit_passes_only_a_number_within_it(document: object, maximum: int) -> None:
    raw = json.dumps(document).encode()
    parsed = capgate_reads(raw, JSON_HEADERS)
    assert isinstance(parsed, bodies.BodyError) == oracle.body_refused(raw, JSON_HEADERS, set(FIELDS))
    if isinstance(parsed, bodies.BodyError):
        return
    for field in FIELDS:
        value = spec.numeric_field(parsed, field)
        capgate_passes = value is not None and 0 <= value <= maximum
        assert capgate_passes == oracle.within(oracle.number_at(oracle.parse_body(raw), field), maximum)


@FAST
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_as_a_body_are_read_or_refused_exactly_as_the_design_says(data: bytes) -> None:
    got = capgate_reads(data, JSON_HEADERS)
    assert isinstance(got, bodies.BodyError) == (bool(data) and oracle.body_refused(data, JSON_HEADERS, set(FIELDS)))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_generated_bodies_headers_and_queries_are_refused_exactly_when_the_oracle_refuses(seed: int) -> None:
    rng = random.Random(seed)
    raw, _ = generate.random_body(rng)
    raw, headers = generate.body_headers(rng, raw)
    query = rng.choice(("", *generate.QUERY_TRICKS))
    got = capgate_reads(raw, headers, query)
    expected = oracle.query_refused(query, set(FIELDS)) or (bool(raw) and oracle.body_refused(raw, headers,
                                                                                               set(FIELDS)))
    assert isinstance(got, bodies.BodyError) == expected, (raw[:80], headers, query, got)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_generated_form_bodies_are_refused_exactly_when_the_oracle_refuses(seed: int) -> None:
    rng = random.Random(seed)
    raw, _ = generate.random_body(rng)
    raw, headers = generate.body_headers(rng, raw)
    if not raw or not oracle.is_form(headers):
        return
    try:
        bodies.check_form(raw, [v for n, v in headers if n.lower() == "content-encoding"])
        refused = False
    except bodies.BodyError:
        refused = True
    assert refused == oracle.form_refused(raw, headers), (raw[:80], headers)


@pytest.mark.parametrize("raw", [b'{"amount": 99999999, "amount": 1}', b'{"a": {"amount": 1, "\\u0061mount": 2}}',
                                 b'{"amount":100,"AMOUNT":5000000}', b'{"AMOUNT":5000000}'])
def test_a_body_repeating_the_limited_field_in_any_case_is_refused_not_read_leniently(raw: bytes) -> None:
    # A first-wins upstream would charge 99999999 where a last-wins check saw 1; Go folds case.
    got = capgate_reads(raw, JSON_HEADERS)
    assert isinstance(got, bodies.BodyError)
    assert got.reason == "ambiguous_body"
    assert oracle.body_refused(raw, JSON_HEADERS, set(FIELDS))


KEYSET = keys.KeySet.generate()
CAP = spec.parse_capability(generate.document({
    "serviceAccountName": "agent", "upstreams": [{"name": "alpha", "url": "http://alpha.svc:8080"}],
    "rules": [{"name": "r0", "effect": "allow", "upstream": "alpha", "methods": ["GET"], "paths": ["/a/*"]}]}))
TOKEN = tokens.mint(CAP, KEYSET)


@FAST
@given(cut=st.integers(min_value=0, max_value=len(TOKEN) - 1), flip=st.integers(min_value=0, max_value=255),
       mode=st.sampled_from(["flip", "truncate", "insert"]))
def test_a_tampered_token_is_refused_or_means_exactly_the_same(cut: int, flip: int, mode: str) -> None:
    if mode == "flip":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        tampered = TOKEN[:cut] + alphabet[flip % 64] + TOKEN[cut + 1:]
    elif mode == "truncate":
        tampered = TOKEN[:cut]
    else:
        tampered = TOKEN[:cut] + chr(flip) + TOKEN[cut:]
    try:
        loaded = tokens.load(tampered, KEYSET.trust_bundle())
    except TokenError:
        return
    original = tokens.load(TOKEN, KEYSET.trust_bundle())
    assert (loaded.capability, loaded.expires_at, loaded.revocation_ids) == (
        original.capability, original.expires_at, original.revocation_ids)


def test_a_token_of_another_root_is_refused_as_unknown_root() -> None:
    other = tokens.mint(CAP, keys.KeySet.generate())
    with pytest.raises(TokenError) as refused:
        tokens.load(other, KEYSET.trust_bundle())
    assert refused.value.reason in ("unknown_root", "bad_signature")


SESSION = receipts.SessionKey.issue(KEYSET, capability="fuzz/agent", credential="c")
RECEIPT = receipts.mint(SESSION, rule="search", correlation="trip-1", ttl=timedelta(minutes=5), decision_id="d")


@FAST
@given(cut=st.integers(min_value=0, max_value=len(RECEIPT) - 1), char=st.sampled_from("AB_-.x=/+ \x00"),
       mode=st.sampled_from(["flip", "truncate", "insert"]))
def test_a_tampered_receipt_is_ignored_or_proves_exactly_the_same(cut: int, char: str, mode: str) -> None:
    tampered = {"flip": RECEIPT[:cut] + char + RECEIPT[cut + 1:], "truncate": RECEIPT[:cut],
                "insert": RECEIPT[:cut] + char + RECEIPT[cut:]}[mode]
    try:
        got = receipts.verify(tampered, trust=KEYSET.trust_bundle(), correlation="trip-1", capability="fuzz/agent")
    except ReceiptError:
        return
    assert (got.rule, got.correlation, got.capability) == ("search", "trip-1", "fuzz/agent")


DATALOG_TEXT = st.text(st.sampled_from([*'ab$"(){};,.<-=!|&\\\' r0allow_match', "\u00e9"]),
                       min_size=1, max_size=20)


@FAST
@given(segment=DATALOG_TEXT)
def test_datalog_looking_globs_match_only_their_literal_path(segment: str) -> None:
    glob = "/" + segment.replace("/", "")
    if paths.validate_glob(glob) is not None or glob.count("*"):
        return
    cap = spec.parse_capability(generate.document({
        "serviceAccountName": "agent", "upstreams": [{"name": "alpha", "url": "http://alpha.svc:8080"}],
        "rules": [{"name": "r0", "effect": "allow", "upstream": "alpha", "methods": ["GET"], "paths": [glob]}]}))
    compiler.validate(cap)
    credential = tokens.load(tokens.mint(cap, KEYSET), KEYSET.trust_bundle())
    now = datetime.now(UTC)
    for path in (glob, "/admin", glob + "x", "/"):
        verdict = decision.decide([credential], decision.Request(principal="fuzz/agent", correlation="c",
                                                                 method="GET", upstream="alpha", path=path, now=now))
        assert verdict.allowed == oracle.glob_matches(glob, path), (glob, path, verdict)


@FAST
@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(2**70), max_value=2**70))
def test_numbers_at_the_edges_of_a_limit_are_judged_as_the_design_says(value: float) -> None:
    for maximum in (0, 100, 2**63 - 1):
        got = spec.numeric_field({"amount": value}, "amount")
        capgate_passes = got is not None and 0 <= got <= maximum
        if isinstance(value, float) and math.isfinite(value) and abs(value) > 2**63:
            assert not capgate_passes
        assert capgate_passes == oracle.within(oracle.number_at({"amount": value}, "amount"), maximum)
