"""Faults around one sidecar, each with the fail-closed outcome a user should see.

Upstreams that reset, die mid-answer, refuse or hang; agents that send headers byte by byte or
half-close their socket; clocks at the edges of a credential's and a receipt's validity.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from capgate.capabilities import receipts
from capgate.sidecar import app as sidecar_app
from tests.sidecar.conftest import MakeSidecar


@pytest.fixture
async def faulty() -> AsyncIterator[str]:
    """An upstream that fails in the ways networks do, by path."""
    hang = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        if tail == "search/reset":
            assert request.transport is not None
            request.transport.abort()  # RST before any answer
            await hang.wait()
        if tail == "search/midway":
            response = web.StreamResponse(headers={"Content-Length": "100000"})
            await response.prepare(request)
            await response.write(b"x" * 1000)
            assert request.transport is not None
            request.transport.abort()
            return response
        if tail == "search/hang":
            await hang.wait()
        return web.json_response({"ok": True})

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(application)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    hang.set()
    await server.close()


async def test_an_upstream_that_resets_the_connection_answers_502(sidecar: MakeSidecar, faulty: str) -> None:
    sc = await sidecar(upstream_urls={"flights": faulty, "payments": faulty})
    response = await sc.client.get("/flights/search/reset")
    body = await response.json()
    assert (response.status, body["error"]) == (502, "upstream_unavailable")
    assert "Traceback" not in await response.text()
    assert (await sc.client.get("/flights/search/ok")).status == 200  # and the sidecar carries on


async def test_an_upstream_dying_mid_answer_aborts_the_agents_response_rather_than_shortening_it(
        sidecar: MakeSidecar, faulty: str) -> None:
    sc = await sidecar(upstream_urls={"flights": faulty, "payments": faulty})
    response = await sc.client.get("/flights/search/midway")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert (await sc.client.get("/flights/search/ok")).status == 200


async def test_an_upstream_refusing_connections_answers_502(sidecar: MakeSidecar) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sc = await sidecar(upstream_urls={"flights": closed, "payments": closed})
    response = await sc.client.get("/flights/search")
    assert (response.status, (await response.json())["error"]) == (502, "upstream_unavailable")


async def test_an_upstream_that_never_answers_times_out_with_504(sidecar: MakeSidecar, faulty: str) -> None:
    sc = await sidecar(upstream_urls={"flights": faulty, "payments": faulty})
    response = await sc.client.get("/flights/search/hang")
    assert (response.status, (await response.json())["error"]) == (504, "upstream_timeout")


async def _slowloris(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /flights/search HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        writers.append(writer)
    return writers


async def _close(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def test_slowloris_clients_do_not_stop_the_sidecar_answering_others(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    port = sc.client.server.port
    assert port is not None
    writers = await _slowloris(port, 200)
    try:
        for writer in writers[:50]:
            writer.write(b"a")  # a byte now and then keeps a slowloris connection "busy"
        for _ in range(20):
            response = await asyncio.wait_for(sc.client.get("/flights/search"), 2)
            assert response.status == 200
    finally:
        await _close(writers)


async def test_a_slowloris_client_is_disconnected_after_a_few_seconds(sidecar: MakeSidecar) -> None:
    sc = await sidecar(header_timeout=2.0)
    assert sc.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.client.server.port)
    try:
        writer.write(b"GET /flights/search HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 4)
    finally:
        await _close([writer])
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"reason": "header_timeout"' in answer


async def test_a_half_closed_client_is_let_go_and_the_sidecar_keeps_serving(sidecar: MakeSidecar) -> None:
    # aiohttp treats EOF from the client as the client leaving: the request is cancelled and the
    # connection closed (nginx's "499"), so the agent gets no answer but no hang either.
    sc = await sidecar()
    assert sc.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.client.server.port)
    try:
        writer.write(b"GET /flights/search HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 200")
    finally:
        await _close([writer])
    assert sc.decisions()[0]["reason"] == "client_disconnected"  # and the ledger says so
    assert (await sc.client.get("/flights/search")).status == 200


async def test_a_client_vanishing_mid_request_leaves_the_sidecar_serving(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    assert sc.client.server.port is not None
    for cut in (10, 30, 60):
        _reader, writer = await asyncio.open_connection("127.0.0.1", sc.client.server.port)
        request = b'POST /payments/v1/charges HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"amount": 1'
        writer.write(request[:cut])
        await writer.drain()
        writer.transport.abort()
    assert (await sc.client.get("/flights/search")).status == 200
    assert sc.upstream.seen[-1].path == "/search"


# -- clocks at the edges ---------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.moment = datetime.now(UTC)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = self

        class Frozen(datetime):
            @classmethod
            def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
                return clock.moment

        monkeypatch.setattr(sidecar_app, "datetime", Frozen)


@pytest.mark.parametrize(("offset", "status"), [(-1, 200), (29, 200), (31, 401)])
async def test_a_credential_is_honoured_up_to_30_seconds_of_skew_past_its_expiry(
        sidecar: MakeSidecar, monkeypatch: pytest.MonkeyPatch, offset: int, status: int) -> None:
    sc = await sidecar()
    loaded = sc.gate.store.current
    assert loaded is not None
    clock = _Clock()
    clock.moment = loaded.credential.expires_at + timedelta(seconds=offset)
    clock.install(monkeypatch)
    response = await sc.client.get("/flights/search")
    assert response.status == status
    if status == 401:
        body = await response.json()
        assert (body["error"], body["reason"]) == ("invalid_token", "expired")


@pytest.mark.parametrize(("offset", "status"), [(-1, 200), (29, 200), (31, 403)])
async def test_a_carried_receipt_is_honoured_up_to_30_seconds_of_skew_past_its_expiry(
        sidecar: MakeSidecar, monkeypatch: pytest.MonkeyPatch, offset: int, status: int) -> None:
    sc = await sidecar()
    loaded = sc.gate.store.current
    assert loaded is not None
    minted_at = datetime.now(UTC).replace(microsecond=0)
    receipt = receipts.mint(loaded.session, rule="search", correlation="edge", ttl=timedelta(seconds=10),
                            decision_id="d", now=minted_at)
    clock = _Clock()
    clock.moment = minted_at + timedelta(seconds=10 + offset)
    clock.install(monkeypatch)
    response = await sc.client.post("/payments/v1/charges", json={"amount": 100},
                                    headers={"X-Capgate-Correlation-Id": "edge", "X-Capgate-Receipt": receipt})
    assert response.status == status
    if status == 403:
        assert (await response.json())["reason"] == "missing_receipt"
        assert sc.decisions()[-1]["receipts_ignored"] == ["expired"]
