"""Bodies limits and budgets read, method overrides and header bytes, as an agent and an upstream see them.

Each test is one class of bypass of issue 10: a body the sidecar reads one way and an upstream
another is refused (400), never forwarded and counted as 0.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
from typing import Any

import pytest

from tests.sidecar.conftest import BASE_SPEC, MakeSidecar, Sidecar

REFUNDS = "/payments/v1/refunds"
JSON_TYPE = {"Content-Type": "application/json"}


def budget_only_spec(budget: int = 100000) -> dict[str, Any]:
    """A rule without methods or limits: only the budget stands between the agent and the money."""
    spec = copy.deepcopy(BASE_SPEC)
    spec["rules"].append({"name": "refund", "effect": "allow", "upstream": "payments", "paths": ["/v1/refunds"]})
    spec["budgets"] = [{"upstream": "payments", "field": "amount", "max": budget, "per": "24h"}]
    return spec


def reached(sc: Sidecar, path: str = "/v1/refunds") -> list[bytes]:
    return [seen.body for seen in sc.upstream.seen if seen.path.partition("?")[0] == path]


async def error_of(response: Any) -> tuple[int, str, str]:
    body = await response.json()
    return response.status, body["error"], body["reason"]


UNREADABLE = [
    (b"amount=120000", {"Content-Type": "application/x-www-form-urlencoded"}, "body_content_type"),
    (b'{"amount": 120000}', {"Content-Type": "application/x-www-form-urlencoded"}, "body_content_type"),
    (b'{"amount": 120000}', {"Content-Type": "text/plain"}, "body_content_type"),
    (b'{"amount": 120000}', {}, "body_content_type"),
    (b'{"amount": 120000}', {"Content-Type": "application/json; charset=utf-16"}, "body_content_type"),
    (b'{"note": "x"} {"amount": 120000}', JSON_TYPE, "unreadable_body"),
    (b'{"amount": 120000, "note": "\xff"}', JSON_TYPE, "unreadable_body"),
    (b'\xef\xbb\xbf{"amount": 120000}', JSON_TYPE, "unreadable_body"),
    (b'{"amount": NaN}', JSON_TYPE, "unreadable_body"),
    (gzip.compress(b'{"amount": 120000}'), {**JSON_TYPE, "Content-Encoding": "gzip"}, "body_encoding"),
    (b'{"amount": 120000}', {**JSON_TYPE, "Content-Encoding": "x-unknown"}, "body_encoding"),
    (b'{"amount": 1, "AMOUNT": 120000}', JSON_TYPE, "ambiguous_body"),
    (b'{"AMOUNT": 120000}', JSON_TYPE, "ambiguous_body"),
    (b'{"amount": 1, "\\u0061mount": 120000}', JSON_TYPE, "ambiguous_body"),
]


@pytest.mark.parametrize(("data", "headers", "reason"), UNREADABLE)
async def test_a_body_the_budget_cannot_read_unambiguously_is_refused_not_counted_as_zero(
        sidecar: MakeSidecar, data: bytes, headers: dict[str, str], reason: str) -> None:
    sc = await sidecar(budget_only_spec())
    for _ in range(6):  # 720,000 against a budget of 100,000: not one of them may pass
        response = await sc.client.post(REFUNDS, data=data, headers=headers)
        assert await error_of(response) == (400, "bad_request", reason)
    assert reached(sc) == []
    fine = await sc.client.post(REFUNDS, json={"amount": 100000})
    assert fine.status == 200
    assert (await sc.client.post(REFUNDS, json={"amount": 1})).status == 429


@pytest.mark.parametrize("method", ["GET", "QUERY", "PROPFIND", "OPTIONS", "HEAD"])
async def test_a_json_body_is_read_and_charged_whatever_the_method(sidecar: MakeSidecar, method: str) -> None:
    sc = await sidecar(budget_only_spec())
    body = json.dumps({"amount": 60000}).encode()
    first = await sc.client.request(method, REFUNDS, data=body, headers=JSON_TYPE)
    assert first.status == 200
    second = await sc.client.request(method, REFUNDS, data=body, headers=JSON_TYPE)
    assert second.status == 429
    assert len(reached(sc)) == 1


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_chunked_body_beyond_the_limit_is_refused_not_skipped(sidecar: MakeSidecar, method: str) -> None:
    sc = await sidecar(budget_only_spec(), max_body_bytes=1024)

    async def chunks() -> Any:
        yield b'{"amount": 60000, "pad": "'
        for _ in range(4):
            yield b"x" * 512
        yield b'"}'

    response = await sc.client.request(method, REFUNDS, data=chunks(), headers=JSON_TYPE)
    assert await error_of(response) == (413, "too_large", "body_too_large")
    assert reached(sc) == []


async def test_a_get_with_a_form_body_to_a_budgeted_upstream_is_refused(sidecar: MakeSidecar) -> None:
    sc = await sidecar(budget_only_spec())
    response = await sc.client.get(REFUNDS, data=b"amount=720000",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert await error_of(response) == (400, "bad_request", "body_content_type")
    assert reached(sc) == []


async def test_a_limit_sees_the_case_colliding_charge_and_refuses_it(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    await sc.client.get("/flights/search")
    response = await sc.client.post("/payments/v1/charges", data=b'{"amount":100,"AMOUNT":5000000}',
                                    headers=JSON_TYPE)
    assert await error_of(response) == (400, "bad_request", "ambiguous_body")
    assert reached(sc, "/v1/charges") == []


@pytest.mark.parametrize("query", ["amount=5000000", "AMOUNT=5000000", "%61mount=5000000", "x=1;amount=5",
                                   "amount[]=5000000"])
async def test_a_limited_field_in_the_query_is_refused(sidecar: MakeSidecar, query: str) -> None:
    sc = await sidecar(budget_only_spec())
    response = await sc.client.post(f"{REFUNDS}?{query}", json={"amount": 100})
    assert await error_of(response) == (400, "bad_request", "ambiguous_query")
    bodiless = await sc.client.get(f"{REFUNDS}?{query}")
    assert await error_of(bodiless) == (400, "bad_request", "ambiguous_query")
    assert reached(sc) == []


async def test_a_json_body_without_the_field_still_passes_the_budget_at_zero(sidecar: MakeSidecar) -> None:
    sc = await sidecar(budget_only_spec(budget=1))
    assert (await sc.client.post(REFUNDS, json={"reason": "duplicate"})).status == 200
    assert (await sc.client.post(f"{REFUNDS}?from=web", data=b"")).status == 200
    assert len(reached(sc)) == 2


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
                                    "x-http-method-override"])
async def test_method_override_headers_never_reach_the_upstream(sidecar: MakeSidecar, header: str) -> None:
    sc = await sidecar()
    response = await sc.client.post("/flights/echo", data=b"{}", headers={header: "DELETE", **JSON_TYPE})
    assert response.status == 200
    seen = sc.upstream.seen[-1]
    assert seen.method == "POST"
    assert not {name.lower() for name in seen.headers} & {"x-http-method-override", "x-http-method",
                                                          "x-method-override"}


@pytest.mark.parametrize("target", ["/flights/echo?_method=DELETE", "/flights/echo?a=1&_METHOD=delete",
                                    "/flights/echo?%5Fmethod=DELETE"])
async def test_a_method_override_parameter_is_refused_on_every_upstream(sidecar: MakeSidecar, target: str) -> None:
    sc = await sidecar()
    response = await sc.client.post(target, data=b"x")
    assert await error_of(response) == (400, "bad_request", "method_override")
    assert sc.upstream.seen == []


@pytest.mark.parametrize("form", [b"title=x&_method=DELETE", b"_METHOD=delete", b"%5Fmethod=PUT"])
async def test_a_form_naming_method_is_refused_on_every_upstream(sidecar: MakeSidecar, form: bytes) -> None:
    sc = await sidecar()
    response = await sc.client.post("/flights/echo", data=form,
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert await error_of(response) == (400, "bad_request", "method_override")
    assert sc.upstream.seen == []
    ordinary = await sc.client.post("/flights/echo", data=b"title=x&method=POST",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert ordinary.status == 200
    assert sc.upstream.seen[-1].body == b"title=x&method=POST"


async def test_a_json_body_naming_method_is_refused_where_it_is_read(sidecar: MakeSidecar) -> None:
    sc = await sidecar(budget_only_spec())
    response = await sc.client.post(REFUNDS, json={"amount": 1, "_method": "DELETE"})
    assert await error_of(response) == (400, "bad_request", "method_override")


async def test_a_gzip_body_reaches_an_unlimited_upstream_exactly_as_sent(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    payload = gzip.compress(b"hello " * 1000)
    response = await sc.client.post("/flights/upload", data=payload, headers={"Content-Encoding": "gzip"})
    assert response.status == 200
    seen = sc.upstream.seen[-1]
    assert seen.headers["Content-Encoding"] == "gzip"
    assert seen.body == payload  # the upstream decompresses; the sidecar never did


async def test_a_gzip_bomb_is_refused_without_inflating_it(sidecar: MakeSidecar) -> None:
    sc = await sidecar(budget_only_spec())
    bomb = gzip.compress(b"0" * (200 * 1024 * 1024), compresslevel=9)  # 200 MiB inflated, ~200 KiB sent
    response = await sc.client.post(REFUNDS, data=bomb, headers={**JSON_TYPE, "Content-Encoding": "gzip"})
    assert await error_of(response) == (400, "bad_request", "body_encoding")
    assert (await sc.admin.get("/healthz")).status == 200


async def test_the_forwarder_adds_no_headers_of_its_own(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.client.port)
    writer.write(b"POST /flights/upload HTTP/1.1\r\nHost: sidecar\r\nContent-Length: 3\r\nConnection: close\r\n"
                 b"\r\nabc")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    names = {name.lower() for name in sc.upstream.seen[-1].headers}
    assert names.isdisjoint({"accept", "accept-encoding", "content-type", "user-agent"}), names


async def test_agent_headers_the_client_would_otherwise_set_are_forwarded_as_sent(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.post("/flights/upload", data=b"abc",
                                    headers={"Content-Type": "text/csv", "Accept": "text/csv", "User-Agent": "agent/1"})
    assert response.status == 200
    seen = sc.upstream.seen[-1].headers
    assert (seen["Content-Type"], seen["Accept"], seen["User-Agent"]) == ("text/csv", "text/csv", "agent/1")


@pytest.mark.parametrize("raw_header", [b"X-Note: caf\xe9", b"X-Note: \xff\xfe", b"X-Trace: ok\xc0\xae"])
async def test_header_bytes_that_are_not_utf8_are_refused_not_dropped(sidecar: MakeSidecar, raw_header: bytes) -> None:
    sc = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.client.port)
    writer.write(b"GET /flights/search HTTP/1.1\r\nHost: sidecar\r\n" + raw_header + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'"bad_header"' in answer
    assert sc.upstream.seen == []


async def test_attenuating_to_a_limit_beyond_64_bits_is_a_bad_request(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    for limit in (10**30, -1, 2**63, "100", True):
        response = await sc.client.post("/_capgate/v1/attenuate", json={"limits": {"charge": {"amount": limit}}})
        assert await error_of(response) == (400, "bad_request", "bad_attenuation"), limit
