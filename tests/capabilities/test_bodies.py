"""The one body reader: exactly one unambiguous JSON document, or a refusal with a reason."""

from __future__ import annotations

import pytest

from capgate.capabilities import bodies

JSON = ["application/json"]
FIELDS = ("amount", "order.total")


def read(raw: bytes, *, content_type: list[str] = JSON, content_encoding: list[str] | None = None,
         query: str = "", fields: tuple[str, ...] = FIELDS) -> object:
    return bodies.read(raw, content_type=content_type, content_encoding=content_encoding or [], query=query,
                       fields=fields)


def refusal(raw: bytes, **kwargs: object) -> str:
    with pytest.raises(bodies.BodyError) as refused:
        read(raw, **kwargs)  # type: ignore[arg-type]
    return refused.value.reason


def test_a_plain_json_document_is_read() -> None:
    assert read(b'{"amount": 100, "order": {"total": 5}}') == {"amount": 100, "order": {"total": 5}}
    assert read(b' {"amount": 1}\r\n', content_type=["application/json; charset=UTF-8"]) == {"amount": 1}
    assert read(b'{"amount": 1}', content_type=["Application/Merge-Patch+JSON"]) == {"amount": 1}


def test_an_empty_body_is_no_document_so_limits_see_the_field_missing() -> None:
    assert read(b"", content_type=[]) is None


@pytest.mark.parametrize("raw", [
    b'{"amount":100,"AMOUNT":5000000}', b'{"amount":1,"Amount":2}', b'{"x":{"Total":1,"total":2}}',
    b'[{"k":1,"\\u212a":2}]',  # Kelvin sign folds to k (Go's simple folding)
    b'{"s":1,"\xc5\xbf":2}',  # long s folds to s
    b'{"amount":1,"amount":2}', b'{"amount":1,"\\u0061mount":2}', b'{"deep":[[{"a":{"b":1,"B":2}}]]}',
])
def test_keys_that_collide_under_case_folding_at_any_depth_are_ambiguous(raw: bytes) -> None:
    assert refusal(raw) == "ambiguous_body"


@pytest.mark.parametrize("raw", [b'{"AMOUNT": 5000000}', b'{"Amount": 1}', b'{"order": {"TOTAL": 9}}',
                                 b'{"ORDER": {"total": 1}, "amount": 1}'])
def test_a_limited_field_spelled_in_another_case_is_ambiguous(raw: bytes) -> None:
    # Alone it collides with nothing, yet Go decodes AMOUNT into Amount: the budget must not count 0.
    assert refusal(raw) == "ambiguous_body"


@pytest.mark.parametrize("raw", [
    b'{"amount": 1}{"amount": 99}', b'{"amount": 1} x', b'{"amount": NaN}', b'{"amount": Infinity}',
    b'{"amount": -Infinity}', b'\xef\xbb\xbf{"amount": 1}', b'{"amount": 1, "note": "\xff"}', b"amount=1",
    b'{"\\ud800": 1}', b" ", b"[" * 5000 + b"]" * 5000, b'{"amount": 01}', b"\xff\xfe{\x00",
    '{"amount": 1}'.encode("utf-16"),
])
def test_anything_but_one_strict_utf8_json_document_is_unreadable(raw: bytes) -> None:
    assert refusal(raw) == "unreadable_body"


@pytest.mark.parametrize("content_type", [
    [], ["application/x-www-form-urlencoded"], ["text/plain"], ["multipart/form-data; boundary=x"],
    ["application/json", "application/json"], ["application/json; charset=utf-16"], ["application/jsonx"],
    ["application/json, application/x-www-form-urlencoded"], ["application/json; charset=utf-8; charset=latin1"],
])
def test_a_body_not_labelled_as_one_utf8_json_type_is_refused(content_type: list[str]) -> None:
    assert refusal(b'{"amount": 1}', content_type=content_type) == "body_content_type"


@pytest.mark.parametrize("encoding", [["gzip"], ["identity"], ["br"], ["deflate", "gzip"]])
def test_a_content_encoded_body_is_refused_never_inflated(encoding: list[str]) -> None:
    assert refusal(b'\x1f\x8b{"amount": 1}', content_encoding=encoding) == "body_encoding"


@pytest.mark.parametrize("query", ["amount=5000000", "AMOUNT=1", "a=1&%61mount=2", "x=1;amount=2", "amount[]=1",
                                   "order[total]=3", "order.total=3", "Order=1", "+amount=1", "amount"])
def test_a_query_naming_a_limited_field_is_ambiguous(query: str) -> None:
    assert refusal(b'{"amount": 1}', query=query) == "ambiguous_query"
    assert refusal(b"", content_type=[], query=query) == "ambiguous_query"


def test_a_query_with_other_names_is_fine_and_undecodable_names_are_refused() -> None:
    assert read(b'{"amount": 1}', query="from=SFO&amounts=2&total=3&q=amount") == {"amount": 1}
    assert refusal(b'{"amount": 1}', query="%ff=1") == "ambiguous_query"


@pytest.mark.parametrize("query", ["_method=DELETE", "_METHOD=delete", "a=1&%5Fmethod=PUT", "_method[]=x"])
def test_method_override_parameters_are_refused_even_where_no_limit_reads(query: str) -> None:
    with pytest.raises(bodies.BodyError) as refused:
        bodies.check_query(query, ())
    assert refused.value.reason == "method_override"


def test_a_json_body_naming_method_is_a_method_override() -> None:
    assert refusal(b'{"amount": 1, "_method": "DELETE"}') == "method_override"


@pytest.mark.parametrize("raw", [b"_method=DELETE", b"a=1&_METHOD=delete", b"%5Fmethod=PUT", b"x=1;_method=DELETE",
                                 b"_method[]=DELETE"])
def test_a_form_body_naming_method_is_a_method_override(raw: bytes) -> None:
    assert bodies.is_form(["application/x-www-form-urlencoded; charset=utf-8"])
    with pytest.raises(bodies.BodyError) as refused:
        bodies.check_form(raw, [])
    assert refused.value.reason == "method_override"


def test_an_ordinary_form_passes_and_a_compressed_one_is_refused() -> None:
    bodies.check_form(b"name=caf%C3%A9&method=x&q=_method", [])
    with pytest.raises(bodies.BodyError) as refused:
        bodies.check_form(b"\x1f\x8b...", ["gzip"])
    assert refused.value.reason == "body_encoding"
