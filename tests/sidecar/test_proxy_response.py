"""After forwarding: an upstream answer the sidecar cannot relay is a 502, recorded as forwarded.

The upstream here is a raw socket server, so it can send what no HTTP library would: control bytes
in a header value or the reason phrase, bytes that are not UTF-8, bodies cut short. The call has
reached the upstream by then (the charge ran), so the ledger must say so, never ``denied``.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import openai
import pytest

from tests.sidecar.conftest import BASE_SPEC, MakeSidecar, Sidecar

CHARGE = "/payments/v1/charges"
OK_BODY = b'{"ok":true}'


def answer(status_line: bytes, *headers: bytes, body: bytes = OK_BODY, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return b"\r\n".join([status_line, *headers, b"Content-Length: %d" % size, b"", body])


@dataclass
class RawUpstream:
    """Answers each path with canned bytes and records which requests arrived."""

    answers: dict[str, bytes]
    seen: list[tuple[str, str]] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = head.split(b" ", 2)[:2]
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                path = target.decode()
                self.seen.append((method.decode(), path))
                if path == "/reset":  # read the whole request, act on it, never answer
                    writer.transport.abort()
                    return
                if path == "/stream":  # a head and half a body, the rest only after `hold`
                    writer.write(answer(b"HTTP/1.1 200 OK", body=b"x" * 10, length=20_000_000))
                    await writer.drain()
                    await self.hold.wait()
                    for _ in range(400):
                        writer.write(b"y" * 50_000)
                        await writer.drain()
                writer.write(self.answers[path])
                await writer.drain()
                if path == "/search/cut":
                    break  # closes with the body short of its Content-Length
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(answers={
        "/search": answer(b"HTTP/1.1 200 OK", b"X-Trace: a\x01b"),
        "/v1/charges": answer(b"HTTP/1.1 201 Cre\x01ted"),
        "/v1/chat/completions": answer(b"HTTP/1.1 200 OK", b"Content-Type: application/json", b"X-Id: \x7f"),
        "/search/latin1": answer(b"HTTP/1.1 200 OK", b"X-Name: caf\xe9"),
        "/search/nul": answer(b"HTTP/1.1 200 OK", b"X-Name: a\x00b"),
        "/search/cut": answer(b"HTTP/1.1 200 OK", body=b"partial", length=100),
        "/search/fine": answer(b"HTTP/1.1 200 OK", b"X-Name: caf\xc3\xa9\tok"),
    })
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    upstream.hold.set()
    server.close()
    await server.wait_closed()


async def raw_sidecar(sidecar: MakeSidecar, upstream: RawUpstream, *extra_paths: str, **settings: object) -> Sidecar:
    spec = copy.deepcopy(BASE_SPEC)
    if extra_paths:
        spec["rules"].append({"name": "extra", "effect": "allow", "upstream": "flights",
                              "methods": ["GET", "POST"], "paths": list(extra_paths)})
    return await sidecar(spec, upstream_urls={"flights": upstream.url, "payments": upstream.url}, **settings)


async def test_a_control_byte_in_a_header_is_502_and_recorded_as_forwarded(sidecar: MakeSidecar,
                                                                          raw_upstream: RawUpstream) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream)
    response = await sc.client.get("/flights/search")
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (502, "upstream_unavailable", "bad_response")
    assert "answered 200" in body["message"]
    record = sc.decisions()[-1]
    assert (record["outcome"], record["forwarded"], record["upstream_status"], record["status"]) == (
        "allowed", True, 200, 502)
    assert record["reason"] == "bad_response"


async def test_a_charge_whose_reason_phrase_has_a_control_byte_is_not_denied_nor_invited_to_retry(
        sidecar: MakeSidecar, raw_upstream: RawUpstream) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream)
    await sc.client.get("/flights/search")  # executed upstream, so its held receipt counts
    charge = await sc.client.post(CHARGE, json={"amount": 30000})
    body = await charge.json()
    assert (charge.status, body["reason"]) == (502, "bad_response")
    assert charge.headers["X-Should-Retry"] == "false"
    assert raw_upstream.seen == [("GET", "/search"), ("POST", "/v1/charges")]
    record = sc.decisions()[-1]
    assert (record["outcome"], record["forwarded"], record["upstream_status"]) == ("allowed", True, 201)
    assert record["receipt_minted"] is True  # the charge ran: the step happened
    assert not any(r["outcome"] == "denied" for r in sc.decisions())


async def test_the_official_openai_client_does_not_charge_twice(sidecar: MakeSidecar,
                                                               raw_upstream: RawUpstream) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream, "/v1/chat/completions")
    client = openai.AsyncOpenAI(api_key="unused", base_url=f"http://{sc.client.host}:{sc.client.port}/flights/v1",
                                max_retries=3)
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert raised.value.status_code == 502
    assert raw_upstream.seen == [("POST", "/v1/chat/completions")]


@pytest.mark.parametrize(("path", "why"), [("/search/latin1", "bad_response"), ("/search/nul", "bad_response")])
async def test_header_bytes_no_reader_agrees_on_are_502_not_silently_rewritten(
        sidecar: MakeSidecar, raw_upstream: RawUpstream, path: str, why: str) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream)
    response = await sc.client.get(f"/flights{path}")
    assert response.status == 502
    assert (await response.json())["reason"] == why
    record = sc.decisions()[-1]
    assert (record["outcome"], record["forwarded"]) == ("allowed", True)


async def test_utf8_and_tabs_in_header_values_are_relayed_exactly(sidecar: MakeSidecar,
                                                                 raw_upstream: RawUpstream) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream)
    response = await sc.client.get("/flights/search/fine")
    assert response.status == 200
    assert response.raw_headers[[k for k, _ in response.raw_headers].index(b"X-Name")][1] == b"caf\xc3\xa9\tok"


async def test_a_body_cut_short_aborts_the_agent_and_is_recorded_as_forwarded(sidecar: MakeSidecar,
                                                                             raw_upstream: RawUpstream) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream)
    response = await sc.client.get("/flights/search/cut")
    assert response.status == 200
    with pytest.raises(Exception):  # noqa: B017, PT011 - whichever way the client reports the cut
        await response.read()
    record = sc.decisions()[-1]
    assert (record["outcome"], record["forwarded"], record["status"]) == ("allowed", True, 200)
    assert record["reason"] == "reset_mid_response"


async def test_an_agent_that_leaves_mid_stream_is_recorded_as_forwarded(sidecar: MakeSidecar,
                                                                       raw_upstream: RawUpstream) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream, "/stream", read_timeout=5.0)
    reader, writer = await asyncio.open_connection(sc.client.host, sc.client.port)
    writer.write(b"GET /flights/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.abort()
    raw_upstream.hold.set()
    await asyncio.wait_for(raw_upstream.closed.wait(), 10)
    for _ in range(100):  # the record is written as the handler unwinds, just after the upstream closes
        if sc.decisions():
            break
        await asyncio.sleep(0.02)
    record = sc.decisions()[-1]
    assert (record["outcome"], record["forwarded"], record["status"]) == ("allowed", True, 200)
    assert record["reason"] == "client_disconnected"


async def test_an_unreachable_upstream_is_not_recorded_as_forwarded(sidecar: MakeSidecar) -> None:
    sc = await sidecar(upstream_urls={"flights": "http://127.0.0.1:1", "payments": "http://127.0.0.1:1"})
    response = await sc.client.get("/flights/search")
    assert response.status == 502
    assert "X-Should-Retry" not in response.headers
    record = sc.decisions()[-1]
    assert record["outcome"] == "error"
    assert "forwarded" not in record


async def test_a_post_the_upstream_read_and_then_reset_is_recorded_as_forwarded(sidecar: MakeSidecar,
                                                                               raw_upstream: RawUpstream) -> None:
    sc = await raw_sidecar(sidecar, raw_upstream, "/reset")
    response = await sc.client.post("/flights/reset", json={"amount": 1})
    body = await response.json()
    assert (response.status, body["reason"]) == (502, "reset")
    assert "may have taken effect" in body["message"]
    assert response.headers["X-Should-Retry"] == "false"
    record = sc.decisions()[-1]
    assert (record["outcome"], record["forwarded"]) == ("allowed", True)
    assert "upstream_status" not in record
