"""The request flow of DESIGN.md, as an agent and an upstream see it."""

from __future__ import annotations

import asyncio
import copy
import gzip

import pytest
from yarl import URL

from tests.sidecar.conftest import API_KEY, BASE_SPEC, MakeSidecar

CHARGE = "/payments/v1/charges"
CORR = {"X-Capgate-Correlation-Id": "booking-42"}


async def test_search_then_charge_with_carried_receipt(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    search = await sc.client.get("/flights/search?from=SFO&to=JFK", headers=CORR)
    assert search.status == 200
    receipt = search.headers["X-Capgate-Receipt"]
    assert receipt.startswith("v1.")
    # A fresh sidecar holds nothing for this correlation: only the carried receipt can pass the gate.
    other = await sidecar()
    charge = await other.client.post(CHARGE, json={"amount": 30000},
                                     headers={**CORR, "X-Capgate-Receipt": receipt})
    assert charge.status == 200, await charge.text()
    assert other.upstream.seen[-1].path == "/v1/charges"


async def test_search_then_charge_with_held_receipt_needs_no_headers(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    assert (await sc.client.get("/flights/search")).status == 200
    charge = await sc.client.post(CHARGE, json={"amount": 30000})
    assert charge.status == 200, await charge.text()
    assert "X-Capgate-Receipt" in charge.headers


async def test_charge_without_search_is_denied_with_missing_receipt(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.post(CHARGE, json={"amount": 100})
    assert response.status == 403
    body = await response.json()
    assert body["error"] == "denied"
    assert body["reason"] == "missing_receipt"
    assert body["rule"] == "charge"
    assert body["decision_id"] == response.headers["X-Capgate-Decision-Id"]
    assert sc.upstream.seen == []


async def test_charge_over_the_limit_is_denied(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    await sc.client.get("/flights/search")
    response = await sc.client.post(CHARGE, json={"amount": 500000})
    body = await response.json()
    assert (response.status, body["reason"], body["rule"]) == (403, "limit_exceeded", "charge")
    assert not any(s.path == "/v1/charges" for s in sc.upstream.seen)


async def test_charge_with_a_json_body_without_the_field_is_denied_as_missing_it(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    await sc.client.get("/flights/search")
    response = await sc.client.post(CHARGE, json={"note": "no amount"})
    assert response.status == 403
    assert (await response.json())["reason"] == "limit_missing"


async def test_deny_rule_refuses_deletes_everywhere(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.delete("/payments/v1/charges/ch_1")
    body = await response.json()
    assert (response.status, body["reason"], body["rule"]) == (403, "deny_rule", "no-deletes")


async def test_unknown_upstream_is_denied(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.get("/bank/accounts")
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (403, "denied", "unknown_upstream")


async def test_receipt_from_another_correlation_does_not_open_the_gate(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    search = await sc.client.get("/flights/search", headers={"X-Capgate-Correlation-Id": "trip-a"})
    receipt = search.headers["X-Capgate-Receipt"]
    response = await sc.client.post(CHARGE, json={"amount": 100},
                                    headers={"X-Capgate-Correlation-Id": "trip-b", "X-Capgate-Receipt": receipt})
    assert response.status == 403
    assert (await response.json())["reason"] == "missing_receipt"
    assert sc.decisions()[-1]["receipts_ignored"] == ["wrong_correlation"]


async def test_expired_receipt_is_ignored(sidecar: MakeSidecar) -> None:
    from datetime import UTC, datetime, timedelta

    from capgate.capabilities import receipts

    sc = await sidecar()
    loaded = sc.gate.store.current
    assert loaded is not None
    old = receipts.mint(loaded.session, rule="search", correlation="booking-42", ttl=timedelta(seconds=5),
                        decision_id="old", now=datetime.now(UTC) - timedelta(minutes=2))
    response = await sc.client.post(CHARGE, json={"amount": 100}, headers={**CORR, "X-Capgate-Receipt": old})
    assert response.status == 403
    assert sc.decisions()[-1]["receipts_ignored"] == ["expired"]


async def test_several_receipts_may_be_carried_comma_separated_or_repeated(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    first = (await sc.client.get("/flights/search", headers=CORR)).headers["X-Capgate-Receipt"]
    other = await sidecar()
    response = await other.client.post(
        CHARGE, json={"amount": 100},
        headers=[("X-Capgate-Correlation-Id", "booking-42"), ("X-Capgate-Receipt", "garbage," + first),
                 ("X-Capgate-Receipt", "v1.x.y.z.w")])
    assert response.status == 200
    assert sorted(other.decisions()[-1]["receipts_ignored"]) == ["malformed", "malformed"]


async def test_upstream_never_sees_agent_authorization_or_capgate_headers(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    await sc.client.get("/flights/search", headers={
        "Authorization": "Bearer agent-stolen", "Proxy-Authorization": "Basic x", "X-Capgate-Correlation-Id": "c1",
        "X-Capgate-Anything": "1", "Connection": "X-Private, keep-alive", "X-Private": "hop", "TE": "trailers",
        "X-Kept": "yes"})
    seen = {k.lower(): v for k, v in sc.upstream.seen[-1].headers.items()}
    assert "authorization" not in seen
    assert "proxy-authorization" not in seen
    assert "x-private" not in seen
    assert "te" not in seen
    assert not [k for k in seen if k.startswith("x-capgate-")]
    assert seen["x-kept"] == "yes"


async def test_upstream_credential_is_injected_and_replaces_the_agents(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    await sc.client.get("/flights/search")
    await sc.client.post(CHARGE, json={"amount": 100}, headers={"Authorization": "Bearer agent-made-up"})
    seen = sc.upstream.seen[-1]
    assert seen.path == "/v1/charges"
    assert [v for k, v in seen.headers.items() if k.lower() == "authorization"] == [f"Bearer {API_KEY}"]
    assert "Authorization" not in {k for k, _ in sc.upstream.seen[0].headers.items()}  # flights: no inject


async def test_upstream_response_cannot_smuggle_capgate_headers(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.get("/flights/search")
    assert response.headers["X-Capgate-Receipt"] != "forged-by-upstream"


async def test_rate_limit_answers_429_with_retry_after(sidecar: MakeSidecar) -> None:
    spec = copy.deepcopy(BASE_SPEC)
    spec["rateLimit"] = {"requests": 2, "per": "1h"}
    sc = await sidecar(spec)
    assert [(await sc.client.get("/flights/search")).status for _ in range(2)] == [200, 200]
    response = await sc.client.get("/flights/search")
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (429, "rate_limited", "rate_limited")
    assert int(response.headers["Retry-After"]) > 0


async def test_budget_is_exhausted_across_charges(sidecar: MakeSidecar) -> None:
    spec = copy.deepcopy(BASE_SPEC)
    spec["budgets"] = [{"upstream": "payments", "field": "amount", "max": 50000, "per": "24h"}]
    sc = await sidecar(spec)
    await sc.client.get("/flights/search")
    assert (await sc.client.post(CHARGE, json={"amount": 30000})).status == 200
    response = await sc.client.post(CHARGE, json={"amount": 30000})
    body = await response.json()
    assert (response.status, body["error"]) == (429, "budget_exhausted")
    assert "Retry-After" in response.headers
    assert (await sc.client.post(CHARGE, json={"amount": 20000})).status == 200


async def test_audit_mode_forwards_and_logs_would_deny(sidecar: MakeSidecar) -> None:
    spec = copy.deepcopy(BASE_SPEC)
    spec["mode"] = "audit"
    sc = await sidecar(spec)
    response = await sc.client.post(CHARGE, json={"amount": 999999})
    assert response.status == 200
    assert "X-Capgate-Receipt" not in response.headers
    assert sc.upstream.seen[-1].path == "/v1/charges"
    record = sc.decisions()[-1]
    assert (record["outcome"], record["reason"]) == ("would_deny", "missing_receipt")


async def test_audit_mode_still_refuses_invalid_tokens(sidecar: MakeSidecar) -> None:
    spec = copy.deepcopy(BASE_SPEC)
    spec["mode"] = "audit"
    sc = await sidecar(spec)
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": "not-a-token"})
    assert response.status == 401
    assert sc.upstream.seen == []


async def test_body_over_the_limit_is_413_when_a_rule_must_read_it(sidecar: MakeSidecar) -> None:
    sc = await sidecar(max_body_bytes=1024)
    await sc.client.get("/flights/search")
    response = await sc.client.post(CHARGE, data=b'{"amount": 1, "pad": "' + b"x" * 4096 + b'"}')
    body = await response.json()
    assert (response.status, body["error"]) == (413, "too_large")

    async def chunks():  # no Content-Length: caught while reading
        for _ in range(8):
            yield b"x" * 512
    response = await sc.client.post(CHARGE, data=chunks())
    assert response.status == 413


async def test_bodies_no_rule_reads_stream_through_unbounded(sidecar: MakeSidecar) -> None:
    sc = await sidecar(max_body_bytes=1024)
    async def payload():
        for _ in range(48):
            yield b"y" * 65536
    response = await sc.client.post("/flights/upload", data=payload())
    assert response.status == 200
    assert (await response.json())["received"] == 48 * 65536


async def test_slow_upstream_is_504(sidecar: MakeSidecar) -> None:
    sc = await sidecar(read_timeout=0.2)
    response = await sc.client.get("/flights/slow")
    body = await response.json()
    assert (response.status, body["error"]) == (504, "upstream_timeout")
    assert "X-Capgate-Decision-Id" in response.headers


async def test_resetting_upstream_is_502(sidecar: MakeSidecar) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sc = await sidecar(upstream_urls={"flights": f"http://127.0.0.1:{port}", "payments": "http://127.0.0.1:1"})
        response = await sc.client.get("/flights/search")
        body = await response.json()
        assert (response.status, body["error"], body["reason"]) == (502, "upstream_unavailable", "reset")
        down = await sc.client.get("/flights/search")  # nobody listens on port 1
        assert down.status == 502
    finally:
        server.close()
        await server.wait_closed()


async def test_unreachable_upstream_is_502(sidecar: MakeSidecar) -> None:
    sc = await sidecar(upstream_urls={"flights": "http://127.0.0.1:1", "payments": "http://127.0.0.1:1"})
    response = await sc.client.get("/flights/search")
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (502, "upstream_unavailable", "unreachable")


async def test_redirects_are_returned_not_followed(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.get("/flights/redirect", allow_redirects=False)
    assert response.status == 302
    assert [s.path for s in sc.upstream.seen] == ["/redirect"]


async def test_compressed_bodies_pass_through_untouched(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.get("/flights/gzip", auto_decompress=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == b"\x1f\x8b-not-really-gzip"
    assert gzip  # the payload is deliberately not valid gzip: any decompression would fail loudly


async def test_concurrent_requests_are_all_decided_and_forwarded(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    responses = await asyncio.gather(*(sc.client.get(f"/flights/search/{i}") for i in range(50)))
    assert [r.status for r in responses] == [200] * 50
    assert len({r.headers["X-Capgate-Decision-Id"] for r in responses}) == 50
    assert len(sc.upstream.seen) == 50


@pytest.mark.parametrize("path", [
    "/flights/search/../admin", "/flights/search%2F..%2Fadmin", "/flights//search", "/flights/search;x=1",
    "/flights/search/%2e%2e/admin", "/flights/search%5cadmin",
])
async def test_ambiguous_paths_are_400(sidecar: MakeSidecar, path: str) -> None:
    sc = await sidecar()
    response = await sc.client.session.get(URL(str(sc.client.make_url("")).rstrip("/") + path, encoded=True))
    body = await response.json()
    assert (response.status, body["error"]) == (400, "bad_request")
    assert sc.upstream.seen == []


async def test_query_strings_are_forwarded_exactly(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    await sc.client.get("/flights/search?from=SFO&to=J%20FK")
    assert sc.upstream.seen[-1].path == "/search?from=SFO&to=J%20FK"


async def test_head_and_other_methods_are_decided_by_policy(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    assert (await sc.client.put("/flights/search")).status == 403
    assert (await sc.client.head("/flights/gzip")).status == 200
