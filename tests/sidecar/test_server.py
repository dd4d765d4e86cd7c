"""Clients that stall or flood: every connection is bounded in time and bytes, and the probes keep answering.

Raw sockets against the real sidecar (its own runner and connection watchdog) on loopback; each
refusal is an HTTP answer with capgate's JSON error shape before the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import timedelta

import pytest

from capgate.capabilities import tokens
from capgate.sidecar import buffers, server
from tests.sidecar.conftest import MakeSidecar, Sidecar

SLOW_HEAD = b"GET /flights/search HTTP/1.1\r\nHost: x\r\nX-Slow: "
CHARGE_HEAD = (b"POST /payments/v1/charges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n")


async def _open(sc: Sidecar, data: bytes, *, admin: bool = False
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = (sc.admin if admin else sc.client).server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


def _answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


async def _close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def test_a_head_that_is_never_finished_is_answered_408_and_closed(sidecar: MakeSidecar) -> None:
    sc = await sidecar(header_timeout=0.5)
    reader, writer = await _open(sc, SLOW_HEAD)
    try:
        writer.write(b"a")  # still sending, just never done
        status, body = _answer(await asyncio.wait_for(reader.read(), 5))
    finally:
        await _close(writer)
    assert (status, body["reason"]) == (408, "header_timeout")
    assert (await sc.client.get("/flights/search")).status == 200
    metrics = await (await sc.admin.get("/metrics")).text()
    assert 'capgate_connections_refused_total{listener="agent",reason="header_timeout"} 1.0' in metrics


async def test_a_slow_second_head_on_a_kept_alive_connection_is_cut_too(sidecar: MakeSidecar) -> None:
    sc = await sidecar(header_timeout=0.5)
    reader, writer = await _open(sc, b"GET /flights/search HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        first = await asyncio.wait_for(reader.readuntil(b'"/search"}'), 5)
        assert first.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.7)  # idle is fine: aiohttp's keep-alive timeout governs it
        writer.write(SLOW_HEAD)
        status, body = _answer(await asyncio.wait_for(reader.read(), 5))
    finally:
        await _close(writer)
    assert (status, body["reason"]) == (408, "header_timeout")


async def test_a_head_over_128_kib_is_refused_with_431(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    line = b"X-Pad: " + b"a" * 60_000 + b"\r\n"
    reader, writer = await _open(sc, b"GET /flights/search HTTP/1.1\r\nHost: x\r\n" + line * 3)
    try:
        status, body = _answer(await asyncio.wait_for(reader.read(), 5))
    finally:
        await _close(writer)
    assert (status, body["reason"]) == (431, "header_too_large")
    assert sc.upstream.seen == []


async def test_a_body_the_sidecar_must_inspect_that_stalls_is_answered_408(sidecar: MakeSidecar) -> None:
    sc = await sidecar(body_timeout=0.5)
    reader, writer = await _open(sc, CHARGE_HEAD % 100 + b'{"amount": 1')
    try:
        status, body = _answer(await asyncio.wait_for(reader.readuntil(b"}"), 5))
    finally:
        await _close(writer)
    assert (status, body["reason"]) == (408, "body_timeout")
    assert sc.upstream.seen == []
    assert sc.decisions()[-1]["reason"] == "body_timeout"


async def test_bodies_beyond_the_in_flight_cap_are_refused_503_and_the_cap_is_given_back(
        sidecar: MakeSidecar) -> None:
    sc = await sidecar(max_inflight_bytes=64 * 1024)
    budget = sc.client.server.app[buffers.BUDGET]
    _, held = await _open(sc, CHARGE_HEAD % 60_000 + b'{"amount": 1, "pad": "')
    try:
        await _until(lambda: budget.used >= 60_000)  # the sidecar now holds that body's reservation
        refused = await sc.client.post("/payments/v1/charges", data=b'{"amount": 1, "pad": "' + b"a" * 10_000 + b'"}',
                                       headers={"Content-Type": "application/json"})
        assert refused.status == 503
        assert (await refused.json())["reason"] == "buffer_full"
        assert refused.headers["Retry-After"] == "1"
    finally:
        await _close(held)
    await _until(lambda: budget.used == 0)
    for _ in range(3):  # each request returns what it reserved
        response = await sc.client.post("/payments/v1/charges", json={"amount": 1, "pad": "a" * 30_000})
        assert response.status != 503


async def test_one_connection_too_many_evicts_the_one_waiting_longest_for_its_head(sidecar: MakeSidecar) -> None:
    sc = await sidecar(max_connections=4)
    stalled = [await _open(sc, SLOW_HEAD) for _ in range(4)]
    try:
        response = await sc.client.get("/flights/search")
        assert response.status == 200
        status, body = _answer(await asyncio.wait_for(stalled[0][0].read(), 5))
        assert (status, body["reason"]) == (503, "connection_limit")
    finally:
        await _close(*(writer for _, writer in stalled))


async def test_the_admin_port_answers_probes_while_the_agent_floods_both_ports(sidecar: MakeSidecar) -> None:
    sc = await sidecar(max_inflight_bytes=64 * 1024, max_connections=16)
    flood = [await _open(sc, SLOW_HEAD + b"a" * 4000) for _ in range(24)]
    flood += [await _open(sc, SLOW_HEAD, admin=True) for _ in range(server.ADMIN_CONNECTIONS + 8)]
    try:
        for _ in range(3):
            response = await asyncio.wait_for(sc.admin.get("/healthz"), 5)
            assert response.status == 200
    finally:
        await _close(*(writer for _, writer in flood))


async def test_a_narrowed_token_with_a_datalog_bomb_appended_offline_is_401_malformed(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    narrowed = await sc.client.post("/_capgate/v1/attenuate", json={"ttl": "5m"})
    token = (await narrowed.json())["token"]
    loaded = sc.gate.store.current
    assert loaded is not None
    parent = tokens.load(token, loaded.trust)
    bomb = " ".join(f"f({i});" for i in range(100)) + " g($a, $b, $c) <- f($a), f($b), f($c);"
    hostile = parent.parsed.append([(bomb, {})]).to_base64()
    assert parent.expires_at - parent.issued_at <= timedelta(hours=1)

    probe = asyncio.create_task(sc.admin.get("/healthz"))
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": hostile})
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (401, "invalid_token", "malformed")
    assert (await probe).status == 200
    assert sc.upstream.seen == []


async def test_an_unread_body_after_a_refusal_is_not_mistaken_for_a_head(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    body = b"x" * 300_000  # refused before it is needed; aiohttp drops it after the answer
    reader, writer = await _open(sc, b"POST /flights/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                 % len(body) + body + b"GET /flights/search HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        await _close(writer)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"header_too_large" not in answer


async def test_an_agent_vanishing_mid_body_is_recorded_as_disconnected_not_as_an_internal_error(
        sidecar: MakeSidecar, caplog: pytest.LogCaptureFixture) -> None:
    sc = await sidecar()
    _, writer = await _open(sc, CHARGE_HEAD % 1000 + b'{"amount": 1')
    await _until(lambda: sc.client.server.app[buffers.BUDGET].used >= 1000)
    writer.transport.abort()
    await _until(lambda: bool(sc.decisions()))
    assert sc.decisions()[-1]["reason"] == "client_disconnected"
    assert "internal error" not in caplog.text
