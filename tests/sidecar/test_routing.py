"""Absolute-form proxy requests, CONNECT, and the decision id on every response."""

from __future__ import annotations

import asyncio

import pytest

from capgate.capabilities import spec
from capgate.capabilities.spec import parse_capability
from capgate.sidecar import routing
from capgate.sidecar.errors import SidecarError
from tests.sidecar.conftest import MakeSidecar, Sidecar, Upstream, capability_document


async def raw_request(sc: Sidecar, head: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as written (test clients normalise request targets)."""
    reader, writer = await asyncio.open_connection(sc.client.host, sc.client.port)
    writer.write(head)
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


async def test_connect_is_refused_with_json(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    status, data = await raw_request(
        sc, b"CONNECT payments.example.com:443 HTTP/1.1\r\nHost: payments.example.com:443\r\nConnection: close\r\n\r\n")
    assert status == 405
    assert b'"connect_refused"' in data
    assert b"X-Capgate-Decision-Id" in data


async def test_absolute_form_request_through_http_proxy_reaches_the_named_upstream(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    status, data = await raw_request(
        sc, b"GET http://flights/search?x=1 HTTP/1.1\r\nHost: flights\r\nConnection: close\r\n\r\n")
    assert status == 200, data
    assert sc.upstream.seen[-1].path == "/search?x=1"


async def test_absolute_form_may_name_the_upstream_by_its_url_host(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    status, _ = await raw_request(
        sc, b"GET http://flights.travel.svc:8080/search HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200


async def test_absolute_form_with_an_unknown_host_is_denied(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    status, data = await raw_request(
        sc, b"GET http://evil.example/search HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert status == 403
    assert b'"unknown_upstream"' in data


async def test_every_response_carries_a_decision_id(sidecar: MakeSidecar, upstream: Upstream) -> None:
    sc = await sidecar(upstream_urls={"flights": upstream.url, "payments": "http://127.0.0.1:1"})
    responses = [
        await sc.client.get("/flights/search"),                       # forwarded
        await sc.client.get("/nowhere/x"),                            # 403 unknown upstream
        await sc.client.delete("/flights/search"),                    # 403 deny rule
        await sc.client.get("/flights/search", headers={"X-Capgate-Token": "x"}),  # 401
        await sc.client.get("/flights/search", headers={"X-Capgate-Correlation-Id": "bad id!"}),  # 400
        await sc.client.get("/_capgate/v1/whoami"),                   # control
        await sc.client.get("/_capgate/v1/nope"),                     # 404
        await sc.client.post("/payments/v1/charges", json={"amount": 1}),  # 502 (after the search above)
    ]
    assert responses[-1].status == 502
    for response in responses:
        assert len(response.headers["X-Capgate-Decision-Id"]) == 32, response.status


def test_path_form_keeps_the_upstream_url_prefix() -> None:
    cap = parse_capability(capability_document())
    route = routing.resolve("/flights/search/a%20b?q=1", cap, {"flights": "http://h:1/api"})
    assert route.target == "http://h:1/api/search/a%20b?q=1"
    assert route.path == "/search/a b"
    assert route.upstream == cap.upstream("flights")


def test_bare_upstream_name_routes_to_its_root() -> None:
    cap = parse_capability(capability_document())
    assert routing.resolve("/flights", cap, {}).raw_path == "/"


def test_https_only_absolute_form_is_a_bad_request() -> None:
    cap = parse_capability(capability_document())
    with pytest.raises(SidecarError) as caught:
        routing.resolve("https://flights/search", cap, {})
    assert caught.value.status == 400


def test_host_match_prefers_host_and_port() -> None:
    cap = parse_capability(capability_document())
    assert routing.match_host("payments.example.com", 80, cap, {}) == cap.upstream("payments")
    assert isinstance(cap.upstream("payments"), spec.Upstream)
    assert routing.match_host("unknown", 80, cap, {}) is None
