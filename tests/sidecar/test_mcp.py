"""MCP through the sidecar, with the official SDK on both sides: every tool call is decided."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx2
import mcp_types
import pytest
import yaml
from aiohttp import web
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from capgate import cli
from capgate.capabilities import keys
from capgate.capabilities.spec import load_capability_file
from capgate.sidecar import app as sidecar_app
from capgate.sidecar.limits import Limits
from capgate.sidecar.watch import FileSource
from tests.sidecar.conftest import MakeSidecar, Sidecar
from tests.sidecar.mcp_server import Booking, Events, running, running_sse
from tests.sidecar.test_credentials import HeardOnce, write_credential_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mcp-booking-agent.yaml"


def example_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())["spec"]
    return spec


@pytest.fixture
def booking() -> Booking:
    return Booking()


@pytest.fixture(params=["modern", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    return "auto" if request.param == "modern" else "legacy"


@pytest.fixture
async def mcp_sidecar(sidecar: MakeSidecar, booking: Booking) -> AsyncIterator[Sidecar]:
    async with running(booking) as url:
        yield await sidecar(example_spec(), upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)


def url_of(side: Sidecar) -> str:
    return str(side.client.make_url("/booking/mcp"))


def mcp_records(side: Sidecar) -> list[dict[str, Any]]:
    return [r for r in side.decisions() if r.get("kind") == "mcp"]


async def test_an_allowed_tool_call_reaches_the_server(mcp_sidecar: Sidecar, booking: Booking, mode: str) -> None:
    async with Client(url_of(mcp_sidecar), mode=mode) as client:
        result = await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
    assert not result.is_error
    assert booking.tools() == ["search_flights"]
    record = next(r for r in mcp_records(mcp_sidecar) if r.get("action") == "mcp.call")
    assert record["resource"] == "mcp://booking/search_flights"
    assert record["outcome"] == "allowed" and record["rule"] == "search"
    assert record["mcp"]["method"] == "tools/call" and record["mcp"]["name"] == "search_flights"
    if mode == "legacy":  # the 2025-11-25 era has sessions; their records carry its digest, not its id
        assert len(record["mcp"]["session_digest"]) == 32
    assert len(record["mcp"]["arguments_digest"]) == 64 and "LHR" not in json.dumps(record)


async def test_a_deny_rule_stops_delete_booking_and_the_sdk_says_why(mcp_sidecar: Sidecar, booking: Booking,
                                                                     mode: str) -> None:
    async with Client(url_of(mcp_sidecar), mode=mode) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("delete_booking", {"booking_id": "b1"})
    assert "delete_booking" not in booking.tools()
    assert caught.value.data["reason"] == "deny_rule" and caught.value.data["rule"] == "no-deletes"
    denied = [r for r in mcp_records(mcp_sidecar) if r["outcome"] == "denied"]
    assert [(r["status"], r["reason"], r["mcp"]["name"]) for r in denied] == [(403, "deny_rule", "delete_booking")]


async def test_a_tool_no_rule_names_is_denied(mcp_sidecar: Sidecar, booking: Booking) -> None:
    async with Client(url_of(mcp_sidecar)) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("transfer_funds", {"to": "mallory"})
    assert caught.value.data["reason"] == "no_matching_rule"
    assert booking.tools() == []


async def test_charge_over_the_argument_limit_is_denied(mcp_sidecar: Sidecar, booking: Booking, mode: str) -> None:
    async with Client(url_of(mcp_sidecar), mode=mode) as client:
        await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        with pytest.raises(MCPError) as caught:
            await client.call_tool("charge", {"amount": 5000, "currency": "EUR"})
        assert caught.value.data["reason"] == "limit_exceeded"
        with pytest.raises(MCPError) as caught:
            await client.call_tool("charge", {"amount": 100, "currency": "GBP"})
        assert caught.value.data["reason"] == "limit_exceeded"
        result = await client.call_tool("charge", {"amount": 400, "currency": "EUR"})
    assert not result.is_error
    assert booking.calls[1:] == [("charge", {"amount": 400, "currency": "EUR"})]


async def test_charge_requires_a_successful_search_first(mcp_sidecar: Sidecar, booking: Booking, mode: str) -> None:
    async with Client(url_of(mcp_sidecar), mode=mode) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("charge", {"amount": 100, "currency": "EUR"})
        assert caught.value.data["reason"] == "missing_receipt"
        failed = await client.call_tool("search_flights", {"origin": "nowhere", "destination": "JFK"})
        assert failed.is_error
        with pytest.raises(MCPError) as caught:
            await client.call_tool("charge", {"amount": 100, "currency": "EUR"})
        assert caught.value.data["reason"] == "missing_receipt", "a failed search must not unlock charge"
        await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        result = await client.call_tool("charge", {"amount": 100, "currency": "EUR"})
    assert not result.is_error
    assert booking.tools() == ["search_flights", "search_flights", "charge"]
    minted = [r["mcp"]["name"] for r in mcp_records(mcp_sidecar) if r.get("receipt_minted")]
    assert minted == ["search_flights", "charge"]


async def test_a_deny_rule_with_args_denies_only_matching_arguments(mcp_sidecar: Sidecar, booking: Booking) -> None:
    async with Client(url_of(mcp_sidecar)) as client:
        await client.call_tool("add_note", {"trip": "t-1", "text": "window seat"})
        with pytest.raises(MCPError) as caught:
            await client.call_tool("add_note", {"trip": "vip-7", "text": "upgrade"})
    assert caught.value.data["rule"] == "no-vip-notes"
    assert booking.calls == [("add_note", {"trip": "t-1", "text": "window seat"})]


async def test_tools_list_shows_only_what_this_credential_may_call(mcp_sidecar: Sidecar, mode: str) -> None:
    async with Client(url_of(mcp_sidecar), mode=mode) as client:
        listed = await client.list_tools()
    # delete_booking: a deny rule; transfer_funds: no rule. charge stays (it needs a receipt and arguments).
    assert sorted(tool.name for tool in listed.tools) == ["add_note", "charge", "list_bookings", "search_flights"]


async def test_a_json_answering_server_is_decided_the_same(sidecar: MakeSidecar, booking: Booking) -> None:
    async with running(booking, json_response=True, stateless=True) as url:
        side = await sidecar(example_spec(), upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        async with Client(url_of(side), mode="legacy") as client:
            assert sorted(t.name for t in (await client.list_tools()).tools) == [
                "add_note", "charge", "list_bookings", "search_flights"]
            await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
            await client.call_tool("charge", {"amount": 50, "currency": "USD"})
            with pytest.raises(MCPError):
                await client.call_tool("delete_booking", {"booking_id": "b1"})
    assert booking.tools() == ["search_flights", "charge"]


def tool_call(name: str, ident: object = 1, **arguments: object) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize(("headers", "reason"), [
    ({"Mcp-Method": "tools/call", "Mcp-Name": "search_flights"}, "mcp_header_mismatch"),
    ({"Mcp-Method": "tools/list", "Mcp-Name": "delete_booking"}, "mcp_header_mismatch"),
    ({"Mcp-Method": "tools/call"}, "mcp_header_mismatch"),
])
async def test_headers_that_disagree_with_the_body_are_refused_with_32020(
        mcp_sidecar: Sidecar, booking: Booking, headers: dict[str, str], reason: str) -> None:
    response = await mcp_sidecar.client.post("/booking/mcp", json=tool_call("delete_booking", 9, booking_id="b1"),
                                             headers={**HEADERS, **headers})
    body = await response.json()
    assert response.status == 400
    assert body["id"] == 9 and body["error"]["code"] == -32020 and body["error"]["data"]["reason"] == reason
    assert booking.calls == []


async def test_a_batch_is_refused_before_the_server_sees_it(mcp_sidecar: Sidecar, booking: Booking) -> None:
    batch = [tool_call("search_flights", 1, origin="a", destination="b"),
             tool_call("delete_booking", 2, booking_id="x")]
    response = await mcp_sidecar.client.post("/booking/mcp", data=json.dumps(batch), headers=HEADERS)
    body = await response.json()
    assert response.status == 400 and body["error"]["code"] == -32600 and body["error"]["data"]["reason"] == "mcp_batch"
    assert booking.calls == []


@pytest.mark.parametrize("raw", [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_flights","name":"delete_booking",'
    b'"arguments":{"booking_id":"b1"}}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_flights","Name":"delete_booking"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x/../delete_booking"}}',
])
async def test_a_message_two_parsers_could_read_differently_is_refused(mcp_sidecar: Sidecar, booking: Booking,
                                                                       raw: bytes) -> None:
    response = await mcp_sidecar.client.post("/booking/mcp", data=raw, headers=HEADERS)
    assert response.status == 400
    assert booking.calls == []


async def test_a_denied_message_is_a_json_rpc_error_with_its_id_and_http_status(mcp_sidecar: Sidecar) -> None:
    response = await mcp_sidecar.client.post("/booking/mcp", json=tool_call("transfer_funds", "req-7", to="m"),
                                             headers=HEADERS)
    body = await response.json()
    assert response.status == 403
    assert body["jsonrpc"] == "2.0" and body["id"] == "req-7" and body["error"]["code"] == -32001
    assert body["error"]["data"]["error"] == "denied" and body["error"]["data"]["decision_id"]


async def test_other_http_methods_on_the_mcp_path_are_refused(mcp_sidecar: Sidecar, booking: Booking) -> None:
    response = await mcp_sidecar.client.put("/booking/mcp", json=tool_call("delete_booking", booking_id="b1"))
    assert response.status == 405
    assert booking.calls == []


@pytest.mark.parametrize(("tool", "arguments"), [
    ("search_flights", {"origin": "LHR", "destination": "JFK"}),
    ("charge", {"amount": 100, "currency": "EUR"}),
    ("delete_booking", {"booking_id": "b1"}),
    ("add_note", {"trip": "vip-7", "text": "x"}),
    ("add_note", {"trip": "t-1", "text": "x"}),
    ("transfer_funds", {"to": "m"}),
])
async def test_capgate_explain_gives_the_sidecars_verdict(mcp_sidecar: Sidecar, tool: str,
                                                          arguments: dict[str, object]) -> None:
    explained = cli.evaluate(load_capability_file(EXAMPLE), cli.Case(request="", mcp=f"tools/call booking {tool}",
                                                                     body=arguments))
    async with Client(url_of(mcp_sidecar), mode="legacy") as client:
        try:
            result = await client.call_tool(tool, arguments)
            assert not result.is_error
            record = next(r for r in mcp_records(mcp_sidecar) if r["mcp"].get("name") == tool)
            sidecar = (record["reason"], record["rule"])
        except MCPError as exc:
            sidecar = (exc.data["reason"], exc.data["rule"])
    assert sidecar == (explained.reason, explained.rule)


async def narrowed(side: Sidecar, **request: object) -> str:
    response = await side.client.post("/_capgate/v1/attenuate", json=request)
    body = await response.json()
    assert response.status == 200, body
    token: str = body["token"]
    return token


async def test_a_narrowed_token_limits_a_sub_agent_to_its_tools(mcp_sidecar: Sidecar, booking: Booking) -> None:
    token = await narrowed(mcp_sidecar, rules=["search"], ttl="5m")
    http = httpx2.AsyncClient(headers={"X-Capgate-Token": token}, timeout=30)
    async with http, Client(streamable_http_client(url_of(mcp_sidecar), http_client=http), mode="legacy") as client:
        listed = await client.list_tools()
        assert [tool.name for tool in listed.tools] == ["search_flights"]
        await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        with pytest.raises(MCPError) as caught:
            await client.call_tool("list_bookings", {})
    assert caught.value.data["reason"] == "check_failed"
    assert booking.tools() == ["search_flights"]


async def test_a_narrowed_token_lowers_a_tools_argument_limit(mcp_sidecar: Sidecar, booking: Booking) -> None:
    token = await narrowed(mcp_sidecar, limits={"charge": {"amount": 50}}, ttl="5m")
    http = httpx2.AsyncClient(headers={"X-Capgate-Token": token}, timeout=30)
    async with http, Client(streamable_http_client(url_of(mcp_sidecar), http_client=http)) as client:
        # A lowered limit keeps the tool listed (the 2026-07-28 client mirrors charge's annotated
        # arguments into Mcp-Param-* headers only once it has listed it).
        assert "charge" in [tool.name for tool in (await client.list_tools()).tools]
        await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        with pytest.raises(MCPError):
            await client.call_tool("charge", {"amount": 100, "currency": "EUR"})
        await client.call_tool("charge", {"amount": 50, "currency": "EUR"})
    assert booking.calls[-1] == ("charge", {"amount": 50, "currency": "EUR"})


async def test_lockdown_stops_tool_calls_but_not_the_protocol_or_read_only_tools(sidecar: MakeSidecar, booking: Booking,
                                                              tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"lockdown": {"all": True}}))
    async with running(booking) as url:
        side = await sidecar(example_spec(), upstream_urls={"booking": url}, revocations=revocations,
                             read_timeout=5.0, total_timeout=10.0)
        assert FileSource(revocations).read(side.gate.revocations)
        async with Client(url_of(side)) as client:
            assert (await client.list_tools()).tools
            await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})  # readOnly
            with pytest.raises(MCPError) as caught:
                await client.call_tool("add_note", {"trip": "t-1", "text": "x"})
    assert caught.value.data["error"] == "lockdown"
    assert booking.tools() == ["search_flights"]


INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "0"}}}


async def initialize(side: Sidecar, headers: dict[str, str] | None = None) -> str:
    response = await side.client.post("/booking/mcp", json=INITIALIZE, headers={**HEADERS, **(headers or {})})
    assert response.status == 200, await response.text()
    await response.read()
    return response.headers["Mcp-Session-Id"]


async def test_a_session_belongs_to_the_token_that_opened_it(mcp_sidecar: Sidecar, booking: Booking) -> None:
    session = await initialize(mcp_sidecar)
    token = await narrowed(mcp_sidecar, rules=["search"], ttl="5m")
    call = tool_call("search_flights", 5, origin="a", destination="b")
    other = await mcp_sidecar.client.post("/booking/mcp", json=call,
                                          headers={**HEADERS, "Mcp-Session-Id": session, "X-Capgate-Token": token})
    body = await other.json()
    assert other.status == 404 and body["id"] == 5 and body["error"]["data"]["reason"] == "unknown_session"
    ended = await mcp_sidecar.client.delete("/booking/mcp", headers={"Mcp-Session-Id": session,
                                                                     "X-Capgate-Token": token})
    assert ended.status == 404
    unknown = await mcp_sidecar.client.post("/booking/mcp", json=call,
                                            headers={**HEADERS, "Mcp-Session-Id": "made-up"})
    assert unknown.status == 404
    assert booking.calls == []


async def test_the_owner_ends_its_session_and_then_it_is_gone(mcp_sidecar: Sidecar) -> None:
    session = await initialize(mcp_sidecar)
    assert (await mcp_sidecar.client.delete("/booking/mcp", headers={"Mcp-Session-Id": session})).status == 200
    again = await mcp_sidecar.client.delete("/booking/mcp", headers={"Mcp-Session-Id": session})
    assert again.status == 404


@pytest.mark.parametrize(("arguments", "headers", "reason"), [
    ({"AMOUNT": 5000, "currency": "EUR"}, {}, "ambiguous_body"),
    ({"amount": 50, "currency": "EUR"}, {"Content-Encoding": "gzip"}, "body_encoding"),
    ({"amount": 50, "currency": "EUR"}, {"Content-Type": "text/plain"}, "body_content_type"),
])
async def test_what_the_body_reader_refuses_is_refused_in_an_mcp_message_too(
        mcp_sidecar: Sidecar, booking: Booking, arguments: dict[str, object], headers: dict[str, str],
        reason: str) -> None:
    response = await mcp_sidecar.client.post("/booking/mcp", data=json.dumps(tool_call("charge", 3, **arguments)),
                                             headers={**HEADERS, **headers})
    body = await response.json()
    assert response.status == 400 and body["id"] in (3, None) and body["error"]["data"]["reason"] == reason
    assert booking.calls == []


async def test_the_old_sse_transport_is_decided_message_by_message(sidecar: MakeSidecar, booking: Booking) -> None:
    spec = example_spec()
    spec["upstreams"][0]["mcp"] = {"sse": "/sse", "messages": "/messages/"}
    async with running_sse(booking) as url:
        side = await sidecar(spec, upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        with anyio.fail_after(20):  # the old transport hangs, rather than fails, when an answer is lost
            await _old_transport_session(side)
    assert booking.tools() == ["search_flights", "charge"]
    denied = next(r for r in mcp_records(side) if r["outcome"] == "denied")
    assert (denied["status"], denied["reason"], denied["mcp"]["name"]) == (403, "deny_rule", "delete_booking")


async def _old_transport_session(side: Sidecar) -> None:
    async with sse_client(str(side.client.make_url("/booking/sse"))) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        listed = await session.list_tools()
        assert sorted(t.name for t in listed.tools) == ["add_note", "charge", "list_bookings", "search_flights"]
        with pytest.raises(MCPError) as caught:
            await session.call_tool("delete_booking", {"booking_id": "b1"})
        assert caught.value.data["reason"] == "deny_rule"
        await session.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        result = await session.call_tool("charge", {"amount": 100, "currency": "EUR"})
        assert not result.is_error


async def open_stream(side: Sidecar) -> Any:
    session = await initialize(side)
    await side.client.post("/booking/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                           headers={**HEADERS, "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25"})
    stream = await side.client.get("/booking/mcp", headers={"Accept": "text/event-stream", "Mcp-Session-Id": session,
                                                              "Mcp-Protocol-Version": "2025-11-25"})
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    return stream


async def read_to_end(stream: Any) -> None:
    with anyio.fail_after(5):  # a hang guard, not a latency assertion
        while await stream.content.readany():
            pass


async def test_revoking_the_credential_closes_its_open_stream(sidecar: MakeSidecar, booking: Booking,
                                                              tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"revokedIds": []}))
    async with running(booking) as url:
        side = await sidecar(example_spec(), upstream_urls={"booking": url}, revocations=revocations,
                             read_timeout=5.0, total_timeout=10.0)
        source = FileSource(revocations)
        assert source.read(side.gate.revocations)
        stream = await open_stream(side)
        current = side.gate.store.current
        assert current is not None
        revocations.write_text(json.dumps({"revokedIds": list(current.credential.revocation_ids)}))
        assert source.read(side.gate.revocations)
        await read_to_end(stream)
    closed = next(r for r in mcp_records(side) if r["mcp"]["kind"] == "stream")
    assert closed["mcp"]["closed"] == "revoked"


async def test_a_lockdown_closes_open_streams(sidecar: MakeSidecar, booking: Booking, tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"revokedIds": []}))
    async with running(booking) as url:
        side = await sidecar(example_spec(), upstream_urls={"booking": url}, revocations=revocations,
                             read_timeout=5.0, total_timeout=10.0)
        source = FileSource(revocations)
        assert source.read(side.gate.revocations)
        stream = await open_stream(side)
        revocations.write_text(json.dumps({"lockdown": {"all": True}}))
        assert source.read(side.gate.revocations)
        await read_to_end(stream)
    assert next(r for r in mcp_records(side) if r["mcp"]["kind"] == "stream")["mcp"]["closed"] == "lockdown"


def spec_with(*rules: dict[str, Any]) -> dict[str, Any]:
    spec = example_spec()
    spec["rules"] = [*rules, *spec["rules"]]
    return spec


INTERACTIVE = {"name": "interactive", "effect": "allow", "actions": ["mcp.call"],
               "resources": ["mcp://booking/confirm_booking", "mcp://booking/summarize"]}


async def test_an_elicitation_round_trip_passes(sidecar: MakeSidecar, booking: Booking) -> None:
    # ctx.elicit() is a server-to-client request: the 2025-11-25 era (2026-07-28 uses InputRequiredResult)
    asked: list[str] = []

    async def elicit(context: Any, params: Any) -> Any:
        asked.append(params.message)
        return mcp_types.ElicitResult(action="accept", content={"ok": True})

    async with running(booking) as url:
        side = await sidecar(spec_with(INTERACTIVE), upstream_urls={"booking": url}, read_timeout=5.0,
                             total_timeout=10.0)
        with anyio.fail_after(20):
            async with Client(url_of(side), mode="legacy", elicitation_callback=elicit) as client:
                result = await client.call_tool("confirm_booking", {"booking_id": "b1"})
    assert asked == ["Book b1?"]
    assert not result.is_error and booking.calls == [("confirm_booking", {"booking_id": "b1", "answer": "accept"})]


async def test_sampling_needs_a_rule_and_the_agent_never_sees_an_unallowed_request(
        sidecar: MakeSidecar, booking: Booking) -> None:
    sampled: list[object] = []

    async def sample(context: Any, params: Any) -> Any:
        sampled.append(params)
        return mcp_types.CreateMessageResult(role="assistant", model="m",
                                             content=mcp_types.TextContent(type="text", text="short"))

    async with running(booking) as url:
        side = await sidecar(spec_with(INTERACTIVE), upstream_urls={"booking": url}, read_timeout=5.0,
                             total_timeout=10.0)
        with anyio.fail_after(20):
            async with Client(url_of(side), mode="legacy", sampling_callback=sample) as client:
                with pytest.raises(MCPError, match="no rule allows the server request sampling/createMessage"):
                    await client.call_tool("summarize", {"text": "a long text"})
        assert sampled == [] and booking.calls == []
        allowed = await sidecar(spec_with(INTERACTIVE, {"name": "sampling", "effect": "allow", "actions": ["mcp.rpc"],
                                                        "resources": ["mcp://booking/sampling/createMessage"]}),
                                upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        with anyio.fail_after(20):
            async with Client(url_of(allowed), mode="legacy", sampling_callback=sample) as client:
                result = await client.call_tool("summarize", {"text": "a long text"})
    assert not result.is_error and len(sampled) == 1


async def test_an_answer_to_a_request_the_server_never_sent_is_refused(mcp_sidecar: Sidecar) -> None:
    session = await initialize(mcp_sidecar)
    forged = {"jsonrpc": "2.0", "id": 77, "result": {"action": "accept", "content": {"ok": True}}}
    response = await mcp_sidecar.client.post("/booking/mcp", json=forged,
                                             headers={**HEADERS, "Mcp-Session-Id": session})
    body = await response.json()
    assert response.status == 403 and body["error"]["data"]["reason"] == "unknown_request_id"


@contextlib.asynccontextmanager
async def production_port(side: Sidecar) -> AsyncIterator[int]:
    """The same sidecar served as capgate-sidecar serves it: aiohttp does not cancel a handler when
    its client goes away (the test server would, which is not what production does)."""
    agent, _ = sidecar_app.create_apps(side.settings, env={"PAYMENTS_API_KEY": "unused"})
    runner = web.AppRunner(agent, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def wait_for_record(side: Sidecar, text: str) -> None:
    with anyio.fail_after(5):  # a hang guard: a record is written once the sidecar lets go of the request
        while text not in Path(side.settings.audit_log).read_text().replace(" ", ""):
            await asyncio.sleep(0.05)


async def test_an_agent_hanging_up_ends_its_upstream_stream(mcp_sidecar: Sidecar) -> None:
    async with production_port(mcp_sidecar) as port, aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        response = await http.post("/booking/mcp", json=INITIALIZE, headers=HEADERS)
        session = response.headers["Mcp-Session-Id"]
        await response.read()
        stream = await http.get("/booking/mcp", headers={"Accept": "text/event-stream", "Mcp-Session-Id": session,
                                                          "Mcp-Protocol-Version": "2025-11-25"})
        assert stream.status == 200
        stream.close()
        await wait_for_record(mcp_sidecar, '"closed":"client_disconnected"')


async def test_an_agent_hanging_up_cancels_a_quiet_tool_call(sidecar: MakeSidecar, booking: Booking) -> None:
    rule = {"name": "slow", "effect": "allow", "actions": ["mcp.call"], "resources": ["mcp://booking/wait_long"]}
    async with running(booking, json_response=True) as url:
        side = await sidecar(spec_with(rule), upstream_urls={"booking": url}, read_timeout=60.0, total_timeout=60.0)
        async with production_port(side) as port:
            body = (f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"wait_long",'
                    f'"arguments":{{}},{MODERN_META}}}}}')
            http = aiohttp.ClientSession(f"http://127.0.0.1:{port}")
            call = asyncio.create_task(http.post("/booking/mcp", data=body.encode(), headers={
                **HEADERS, "Mcp-Method": "tools/call", "Mcp-Name": "wait_long", "MCP-Protocol-Version": "2026-07-28"}))
            with anyio.fail_after(5):
                while "wait_long" not in booking.tools():
                    await asyncio.sleep(0.02)
            call.cancel()
            await http.close()
            await wait_for_record(side, '"reason":"client_disconnected"')


async def wire_tools(url: str) -> bytes:
    """The tools/list answer exactly as the server sends it (a 2026-07-28 single request)."""
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list",
                                                       "params": {"_meta": meta}},
                                   headers={**HEADERS, "Mcp-Method": "tools/list",
                                            "MCP-Protocol-Version": "2026-07-28"})
        assert response.status == 200, await response.text()
        return await response.read()


async def test_pinned_tools_are_hidden_and_refused_when_their_definition_changes(
        sidecar: MakeSidecar, booking: Booking, tmp_path: Path, mode: str) -> None:
    capability = tmp_path / "capability.yaml"
    capability.write_text(EXAMPLE.read_text())
    async with running(booking, json_response=True) as url:
        tools = tmp_path / "tools.json"
        tools.write_bytes(await wire_tools(url))
        assert cli.main(["mcp", "pin", str(capability), "--upstream", "booking", "--tools", str(tools), "--write"]) == 0
        spec = yaml.safe_load(capability.read_text())["spec"]
        pins = spec["upstreams"][0]["mcp"]["pins"]
        assert set(pins) >= {"search_flights", "charge"}
        side = await sidecar(spec, upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        async with Client(url_of(side), mode=mode) as client:
            with pytest.raises(MCPError) as caught:  # not yet checked against its pin
                await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
            assert caught.value.data["reason"] == "definition_changed"
            assert "search_flights" in [t.name for t in (await client.list_tools()).tools]
            assert not (await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})).is_error

        pins["search_flights"] = "sha256:" + "0" * 64  # what a changed (rug-pulled) definition looks like
        changed = await sidecar(spec, upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        async with Client(url_of(changed)) as client:
            assert "search_flights" not in [t.name for t in (await client.list_tools()).tools]
            with pytest.raises(MCPError) as caught:
                await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
    assert caught.value.data["reason"] == "definition_changed"
    assert booking.tools() == ["search_flights"]
    refused = [r for r in mcp_records(changed) if r["mcp"].get("name") == "search_flights"]
    assert refused[-1]["mcp"]["pin"] == "sha256:" + "0" * 64
    listed = next(r for r in mcp_records(changed) if r["mcp"].get("method") == "tools/list")
    assert listed["mcp"]["definition_changed"] == ["search_flights"]
    metrics = await (await changed.admin.get("/metrics")).text()
    assert 'capgate_mcp_definition_changed_total{upstream="booking"} 1.0' in metrics


async def test_a_live_list_changed_makes_a_changed_pinned_tool_disappear(sidecar: MakeSidecar, booking: Booking,
                                                                         tmp_path: Path) -> None:
    capability = tmp_path / "capability.yaml"
    capability.write_text(EXAMPLE.read_text())
    changes: list[str] = []

    async def on_message(message: Any) -> None:
        method = getattr(getattr(message, "root", message), "method", None)
        if method == "notifications/tools/list_changed":
            changes.append(method)

    async with running(booking, json_response=True) as url:
        tools = tmp_path / "tools.json"
        tools.write_bytes(await wire_tools(url))
        assert cli.main(["mcp", "pin", str(capability), "--upstream", "booking", "--tools", str(tools), "--write"]) == 0
        spec = yaml.safe_load(capability.read_text())["spec"]
        spec["rules"].insert(0, {"name": "offers", "effect": "allow", "actions": ["mcp.call"],
                                 "resources": ["mcp://booking/change_offer"]})
        side = await sidecar(spec, upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        with anyio.fail_after(20):
            async with Client(url_of(side), mode="legacy", message_handler=on_message) as client:
                assert "search_flights" in [t.name for t in (await client.list_tools()).tools]
                await client.call_tool("change_offer", {})
                while not changes:
                    await asyncio.sleep(0.02)
                with pytest.raises(MCPError) as caught:
                    await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
                assert caught.value.data["reason"] == "definition_changed"
                assert "search_flights" not in [t.name for t in (await client.list_tools()).tools]
    assert "search_flights" not in booking.tools()


MODERN_META = ('"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
               '"io.modelcontextprotocol/clientCapabilities":{}}')


@pytest.mark.parametrize("arguments", [
    '{"amount":"5000","currency":"EUR"}', '{"amount":5000.0,"currency":"EUR"}', '{"amount":4e3,"currency":"EUR"}',
    '{"amount":400.5,"currency":"EUR"}', '{"amount":true,"currency":"EUR"}', '{"amount":[5000],"currency":"EUR"}',
    '{"amount":" 5000","currency":"EUR"}', '{"amount":300,"amount":5000,"currency":"EUR"}',
    '{"AMOUNT":5000,"currency":"EUR"}', '{"amount":300,"Amount":5000,"currency":"EUR"}',
    '{"amount":5000,"currency":"EUR","currency":"EUR"}', '{"amount":9223372036854775808,"currency":"EUR"}',
    '{"amount":-1,"currency":"EUR"}', '{"amount":1e400,"currency":"EUR"}', '{"amount":5000,"currency":"eur"}',
])
async def test_argument_tricks_never_charge_more_than_the_limit(mcp_sidecar: Sidecar, booking: Booking,
                                                                arguments: str) -> None:
    search = (f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search_flights",'
              f'"arguments":{{"origin":"a","destination":"b"}},{MODERN_META}}}}}')
    charge = (f'{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"charge",'
              f'"arguments":{arguments},{MODERN_META}}}}}')
    for body, name in ((search, "search_flights"), (charge, "charge")):
        response = await mcp_sidecar.client.post("/booking/mcp", data=body.encode(), headers={
            **HEADERS, "Mcp-Method": "tools/call", "Mcp-Name": name, "MCP-Protocol-Version": "2026-07-28"})
        await response.read()
    assert booking.tools()[:1] == ["search_flights"], "the search ran: a refusal is not for a missing receipt"
    charged = [call[1]["amount"] for call in booking.calls if call[0] == "charge"]
    assert all(isinstance(amount, int) and 0 <= amount <= 400 for amount in charged), charged
    assert response.status in (400, 403), "each of these is refused by the sidecar itself"


async def test_a_per_tool_budget_counts_only_that_tools_calls(sidecar: MakeSidecar, booking: Booking) -> None:
    spec = spec_with({"name": "refunds", "effect": "allow", "actions": ["mcp.call"],
                      "resources": ["mcp://booking/refund"]})
    spec["budgets"] = [{"upstream": "booking", "tool": "charge", "field": "amount", "max": 500, "per": "1h"}]
    async with running(booking) as url:
        side = await sidecar(spec, upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        async with Client(url_of(side)) as client:
            await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
            await client.call_tool("charge", {"amount": 400, "currency": "EUR"})
            await client.call_tool("refund", {"amount": 300})  # another tool: not this budget's
            await client.call_tool("refund", {"amount": 300})
            with pytest.raises(MCPError) as caught:
                await client.call_tool("charge", {"amount": 200, "currency": "EUR"})
            await client.call_tool("charge", {"amount": 100, "currency": "EUR"})
    assert caught.value.data["error"] == "budget_exhausted"
    assert [call for call in booking.calls if call[0] != "search_flights"] == [
        ("charge", {"amount": 400, "currency": "EUR"}), ("refund", {"amount": 300}), ("refund", {"amount": 300}),
        ("charge", {"amount": 100, "currency": "EUR"})]


def header_hook(change: Callable[[httpx2.Headers], None], sent: list[dict[str, str]]) -> httpx2.AsyncClient:
    """An SDK HTTP client whose tools/call requests for charge are changed on the wire (an agent
    that speaks the protocol but lies in its headers); every request's headers are recorded."""
    async def hook(request: httpx2.Request) -> None:
        if request.headers.get("mcp-name") == "charge":
            change(request.headers)
        sent.append(dict(request.headers))
    return httpx2.AsyncClient(event_hooks={"request": [hook]}, timeout=30)


async def test_mcp_param_headers_the_sdk_sends_pass_base64_included(mcp_sidecar: Sidecar, booking: Booking) -> None:
    sent: list[dict[str, str]] = []
    http = header_hook(lambda headers: None, sent)
    async with http, Client(streamable_http_client(url_of(mcp_sidecar), http_client=http)) as client:
        await client.list_tools()
        await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        await client.call_tool("charge", {"amount": 400, "currency": "USD"})
        await client.call_tool("add_note", {"trip": "Zürich 1", "text": "window"})
    assert booking.calls[1:] == [("charge", {"amount": 400, "currency": "USD"}),
                                 ("add_note", {"trip": "Zürich 1", "text": "window"})]
    params = [{k: v for k, v in h.items() if k.startswith("mcp-param-")} for h in sent]
    assert {"mcp-param-amount": "400", "mcp-param-currency": "USD"} in params
    assert {"mcp-param-trip": "=?base64?WsO8cmljaCAx?="} in params  # non-ASCII travels base64-wrapped


@pytest.mark.parametrize("change", [
    pytest.param(lambda h: h.__setitem__("Mcp-Param-Amount", "5000"), id="another-value"),
    pytest.param(lambda h: h.__setitem__("Mcp-Param-Amount", "=?base64?MTAw?="), id="needless-base64"),
    pytest.param(lambda h: h.__setitem__("Mcp-Param-Amount", "100.0"), id="numerically-equal"),
    pytest.param(lambda h: h.__setitem__("Mcp-Param-Amount", "0100"), id="leading-zero"),
    pytest.param(lambda h: h.__setitem__("Mcp-Param-Destination", "JFK"), id="undeclared-header"),
    pytest.param(lambda h: h.__setitem__("Mcp-Param-Currency", "=?base64?RVVS?="), id="base64-of-the-same"),
])
async def test_mcp_param_headers_that_are_not_exactly_the_bodys_are_refused(
        mcp_sidecar: Sidecar, booking: Booking, change: Callable[[httpx2.Headers], None]) -> None:
    http = header_hook(change, [])
    async with http, Client(streamable_http_client(url_of(mcp_sidecar), http_client=http)) as client:
        await client.list_tools()
        await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        with pytest.raises(MCPError) as caught:
            await client.call_tool("charge", {"amount": 100, "currency": "EUR"})
    assert caught.value.code == -32020 and caught.value.data["reason"] == "mcp_header_mismatch"
    assert booking.tools() == ["search_flights"]


async def test_mcp_param_headers_for_a_tool_never_listed_here_are_refused(mcp_sidecar: Sidecar,
                                                                          booking: Booking) -> None:
    # The SDK's client lists a tool before it mirrors its arguments; a raw agent need not.
    response = await mcp_sidecar.client.post("/booking/mcp", json=tool_call("search_flights", 4, origin="a",
                                                                            destination="b"),
                                             headers={**HEADERS, "Mcp-Param-Origin": "a"})
    body = await response.json()
    assert response.status == 400 and body["id"] == 4 and body["error"]["code"] == -32020
    assert body["error"]["data"]["reason"] == "mcp_header_mismatch" and booking.calls == []


PING = {"jsonrpc": "2.0", "id": 70, "method": "ping"}


async def server_knows(url: str, session: str) -> bool:
    """Ask the SDK server itself (not through the sidecar) whether the session still exists."""
    async with aiohttp.ClientSession() as http, http.post(f"{url}/mcp", json=PING, headers={
            **HEADERS, "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25"}) as reply:
        await reply.read()
        assert reply.status in (200, 404), reply.status
        return reply.status == 200


@pytest.mark.parametrize("revoke", ["narrowed", "lockdown"])
async def test_a_revoked_tokens_session_is_ended_upstream_and_refused_after(
        sidecar: MakeSidecar, booking: Booking, tmp_path: Path, revoke: str) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"revokedIds": []}))
    async with running(booking) as url:
        side = await sidecar(example_spec(), upstream_urls={"booking": url}, revocations=revocations,
                             read_timeout=5.0, total_timeout=10.0)
        source = FileSource(revocations)
        assert source.read(side.gate.revocations)
        token = await narrowed(side, rules=["search"], ttl="5m")
        opened: list[str] = []

        async def remember(response: httpx2.Response) -> None:
            opened.extend(response.headers.get_list("mcp-session-id"))
        http = httpx2.AsyncClient(headers={"X-Capgate-Token": token}, timeout=30,
                                  event_hooks={"response": [remember]})
        async with http, Client(streamable_http_client(url_of(side), http_client=http), mode="legacy") as client:
            await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
            session = opened[0]
            assert await server_knows(url, session)
            if revoke == "narrowed":
                child = side.gate.store.verifier.load(token)  # type: ignore[union-attr]
                revocations.write_text(json.dumps({"revokedIds": [child.revocation_ids[-1]]}))
            else:
                revocations.write_text(json.dumps({"lockdown": {"all": True}}))
            assert source.read(side.gate.revocations)
            with anyio.fail_after(5):  # a hang guard: the RevocationList update wakes the reaper at once
                while await server_knows(url, session):
                    await asyncio.sleep(0.05)
            # The client's own session is gone too: whatever it sends next is refused.
            with pytest.raises(MCPError):
                await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
        if revoke == "lockdown":
            revocations.write_text(json.dumps({"revokedIds": []}))
            assert source.read(side.gate.revocations)
        again = await side.client.post("/booking/mcp", json=PING, headers={
            **HEADERS, "Mcp-Session-Id": session, **({"X-Capgate-Token": token} if revoke == "lockdown" else {})})
        body = await again.json()
    assert again.status == 404 and body["id"] == 70 and body["error"]["data"]["reason"] == "session_closed"
    closed = [r for r in mcp_records(side) if r.get("mcp", {}).get("kind") == "session_closed"]
    assert [r["reason"] for r in closed] == ["revoked" if revoke == "narrowed" else "lockdown"]
    assert closed[0]["mcp"]["session_digest"] and session not in json.dumps(closed)


async def test_a_credential_rotated_in_after_a_revocation_does_not_inherit_the_revoked_ones_session(
        sidecar: MakeSidecar, booking: Booking, tmp_path: Path) -> None:
    keyset = keys.KeySet.generate()
    folder = tmp_path / "credential"
    write_credential_dir(folder, keyset, example_spec())
    async with running(booking) as url:
        side = await sidecar(capability=None, root_key=None, credential_dir=folder, poll_seconds=0.02,
                             revocation_source=HeardOnce(), limits=Limits(), upstream_urls={"booking": url})
        session = await initialize(side)
        assert await server_knows(url, session)
        first = side.gate.store.current
        assert first is not None
        changed = side.gate.store.changed
        side.gate.revocations.apply({"revokedIds": [{"id": i, "expiresAt": "2099-01-01T00:00:00Z"}
                                                    for i in first.credential.revocation_ids]})
        write_credential_dir(folder, keyset, example_spec())  # the operator's next credential
        await changed.wait()
        again = await side.client.post("/booking/mcp", json=PING, headers={**HEADERS, "Mcp-Session-Id": session})
        body = await again.json()
        alive = await server_knows(url, session)
    assert again.status == 404 and body["error"]["data"]["reason"] == "session_closed"
    assert not alive, "the upstream still holds the revoked credential's session"


PAY = {"name": "pay", "effect": "allow", "actions": ["mcp.call"], "resources": ["mcp://booking/pay"],
       "requires": ["search"], "limits": [{"field": "amount", "max": 400}]}


async def accept(context: Any, params: Any) -> Any:
    return mcp_types.ElicitResult(action="accept", content={"ok": True})


async def test_a_multi_round_trip_call_is_decided_each_round_and_mints_one_receipt(
        sidecar: MakeSidecar, booking: Booking) -> None:
    async with running(booking) as url:
        side = await sidecar(spec_with(PAY), upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        with anyio.fail_after(20):
            async with Client(url_of(side), elicitation_callback=accept) as client:  # 2026-07-28: input_required
                await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
                result = await client.call_tool("pay", {"amount": 300})
    assert not result.is_error and booking.calls[1:] == [("pay", {"amount": 300, "answer": "accept"})]
    rounds = [r for r in mcp_records(side) if r["mcp"].get("name") == "pay"]
    assert [(r["outcome"], r["rule"]) for r in rounds] == [("allowed", "pay"), ("allowed", "pay")]
    assert rounds[0]["mcp"]["id"] != rounds[1]["mcp"]["id"], "one record per message, the retry is a new request"
    assert [bool(r.get("receipt_minted")) for r in rounds] == [False, True], "no receipt for the interim result"


NO_VIP_PAY = {"name": "no-vip-pay", "effect": "deny", "actions": ["mcp.call"], "resources": ["mcp://booking/pay"],
              "args": [{"field": "memo", "glob": "vip*"}]}


@pytest.mark.parametrize(("retry", "reason"), [
    ({"amount": 5000}, "limit_exceeded"), ({}, "limit_missing"), ({"amount": 300, "memo": "vip-7"}, "deny_rule")])
async def test_the_retry_of_an_input_required_call_cannot_change_its_arguments_past_a_rule(
        sidecar: MakeSidecar, booking: Booking, retry: dict[str, object], reason: str) -> None:
    async with running(booking) as url:
        side = await sidecar(spec_with(PAY, NO_VIP_PAY), upstream_urls={"booking": url}, read_timeout=5.0,
                             total_timeout=10.0)
        with anyio.fail_after(20):
            async with Client(url_of(side)) as client:
                await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
                first = await client.session.call_tool("pay", {"amount": 300}, allow_input_required=True)
                assert isinstance(first, mcp_types.InputRequiredResult) and first.request_state
                answers: mcp_types.InputResponses = {"confirm": mcp_types.ElicitResult(action="accept",
                                                                                        content={"ok": True})}
                with pytest.raises(MCPError) as caught:
                    await client.session.call_tool("pay", retry, input_responses=answers,
                                                   request_state=first.request_state)
                done = await client.session.call_tool("pay", {"amount": 300}, input_responses=answers,
                                                      request_state=first.request_state)
    assert caught.value.data["reason"] == reason
    assert isinstance(done, mcp_types.CallToolResult) and not done.is_error
    assert [call for call in booking.calls if call[0] == "pay"] == [("pay", {"amount": 300, "answer": "accept"})]
    rounds = [r for r in mcp_records(side) if r["mcp"].get("name") == "pay"]
    assert [r["outcome"] for r in rounds] == ["allowed", "denied", "allowed"]
    assert [bool(r.get("receipt_minted")) for r in rounds] == [False, False, True]


def resumable_spec() -> dict[str, Any]:
    spec = example_spec()
    spec["rules"][0]["resources"].append("mcp://booking/slow_search")  # the search rule: charge requires it
    return spec


async def test_a_cut_answer_stream_resumed_with_last_event_id_delivers_the_result_and_its_receipt(
        sidecar: MakeSidecar, booking: Booking) -> None:
    async with running(booking, events=Events()) as url:
        side = await sidecar(resumable_spec(), upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        resumed: list[str] = []

        async def remember(request: httpx2.Request) -> None:
            if request.method == "GET" and "last-event-id" in request.headers:
                resumed.append(request.headers["last-event-id"])
        http = httpx2.AsyncClient(timeout=30, event_hooks={"request": [remember]})
        with anyio.fail_after(20):
            async with http, Client(streamable_http_client(url_of(side), http_client=http), mode="legacy") as client:
                result = await client.call_tool("slow_search", {"origin": "LHR"})
                charged = await client.call_tool("charge", {"amount": 100, "currency": "EUR"})  # requires search
            await wait_for_record(side, '"resumed":')
    assert resumed, "the SDK client resumed the cut stream"
    assert not result.is_error and not charged.is_error
    assert booking.tools() == ["slow_search", "charge"]
    minted = [r for r in mcp_records(side) if r.get("receipt_minted")]
    assert sorted(r["mcp"]["kind"] for r in minted) == ["request", "stream"], "the resumed stream's answer minted it"


async def resumable_call(side: Sidecar, session: str, call: dict[str, Any]) -> list[str]:
    """Post ``call`` on ``session`` and read its answer stream to the end: the event ids it carried."""
    response = await side.client.post("/booking/mcp", json=call, headers={
        **HEADERS, "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25"})
    assert response.status == 200
    text = await response.text()
    return [line[3:].strip() for line in text.splitlines() if line.startswith("id:")]


async def resume(side: Sidecar, session: str, last: str, until: str, token: str | None = None) -> tuple[int, str]:
    """GET the session's stream from ``last`` on and read it until the event where ``until`` shows
    ends (a resumed stream stays open after its replay)."""
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25",
               "Last-Event-ID": last, **({"X-Capgate-Token": token} if token else {})}
    response = await side.client.get("/booking/mcp", headers=headers)
    text = ""
    with anyio.fail_after(5):  # a hang guard
        while response.status == 200 and not (until in text and text.endswith("\n\n")):  # to the event's end
            line = await response.content.readline()
            assert line, f"the stream ended before {until!r}: {text}"
            text += line.decode().replace("\r\n", "\n")  # the SDK server ends lines with CRLF
    if response.status != 200:
        text = await response.text()
    response.close()
    return response.status, text


def event_ids(text: str) -> list[str]:
    return [line[3:].strip() for line in text.splitlines() if line.startswith("id:")]


async def opened_session(side: Sidecar) -> str:
    session = await initialize(side)
    await side.client.post("/booking/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                           headers={**HEADERS, "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25"})
    return session


async def test_a_replayed_answer_mints_no_second_receipt_and_another_token_cannot_resume(
        sidecar: MakeSidecar, booking: Booking) -> None:
    async with running(booking, events=Events()) as url:
        side = await sidecar(resumable_spec(), upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        session = await opened_session(side)
        ids = await resumable_call(side, session, tool_call("slow_search", 8, origin="LHR"))
        assert ids, "the cut stream carried a priming event id"
        token = await narrowed(side, rules=["search"], ttl="5m")
        other = await resume(side, session, ids[0], "", token)
        first = await resume(side, session, ids[0], "LH123")
        again = await resume(side, session, ids[0], f"id: {event_ids(first[1])[-1]}\n")
        await wait_for_record(side, '"resumed":8')
    assert other[0] == 404 and "unknown_session" in other[1]
    assert first[0] == 200 and '"id":8' in first[1].replace(" ", "")
    assert "LH123" not in again[1], "an answer already delivered is not delivered again"
    assert [r["mcp"].get("kind") for r in mcp_records(side) if r.get("receipt_minted")] == ["stream"]
    metrics = await (await side.admin.get("/metrics")).text()
    assert "capgate_receipts_minted_total 1.0" in metrics


async def test_a_replayed_server_request_cannot_be_answered_twice(sidecar: MakeSidecar, booking: Booking) -> None:
    async with running(booking, events=Events()) as url:
        side = await sidecar(spec_with(INTERACTIVE), upstream_urls={"booking": url}, read_timeout=5.0,
                             total_timeout=10.0)
        session = await opened_session(side)
        headers = {**HEADERS, "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25"}
        stream = await side.client.post("/booking/mcp", json=tool_call("confirm_booking", 3, booking_id="b1"),
                                        headers=headers)
        events: list[str] = []
        asked: dict[str, Any] | None = None
        with anyio.fail_after(5):
            while asked is None:
                line = (await stream.content.readline()).decode()
                if line.startswith("id:"):
                    events.append(line[3:].strip())
                if line.startswith("data:") and '"elicitation/create"' in line:
                    asked = json.loads(line[5:])
        answer = {"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept", "content": {"ok": True}}}
        assert (await side.client.post("/booking/mcp", json=answer, headers=headers)).status == 202
        await read_to_end(stream)
        status, replayed = await resume(side, session, events[0], "elicitation/create")
        twice = await side.client.post("/booking/mcp", json=answer, headers=headers)
        body = await twice.json()
    assert status == 200 and "elicitation/create" in replayed, "the replay carried the server's request again"
    assert twice.status == 403 and body["error"]["data"]["reason"] == "unknown_request_id"
    assert booking.calls == [("confirm_booking", {"booking_id": "b1", "answer": "accept"})]


async def test_a_replayed_list_answer_never_reaches_the_agent_unfiltered(sidecar: MakeSidecar,
                                                                         booking: Booking) -> None:
    async with running(booking, events=Events()) as url:
        side = await sidecar(example_spec(), upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        session = await opened_session(side)
        response = await side.client.post("/booking/mcp", json={"jsonrpc": "2.0", "id": 4, "method": "tools/list"},
                                          headers={**HEADERS, "Mcp-Session-Id": session,
                                                   "Mcp-Protocol-Version": "2025-11-25"})
        listed = await response.text()
        ids = event_ids(listed)
        status, replayed = await resume(side, session, ids[0], f"id: {ids[-1]}\n")
    assert "search_flights" in listed and "delete_booking" not in listed
    assert status == 200 and "delete_booking" not in replayed


@pytest.mark.parametrize("charged", ["consumed-receipt", "budget"])
async def test_a_multi_round_trip_call_is_charged_once(sidecar: MakeSidecar, booking: Booking, charged: str) -> None:
    if charged == "budget":
        spec = spec_with(PAY)
        spec["budgets"] = [{"upstream": "booking", "tool": "pay", "field": "amount", "max": 500, "per": "1h"}]
    else:
        spec = spec_with({**PAY, "requires": [{"rule": "search", "consume": True}]})
    async with running(booking) as url:
        side = await sidecar(spec, upstream_urls={"booking": url}, read_timeout=5.0, total_timeout=10.0)
        with anyio.fail_after(20):
            async with Client(url_of(side), elicitation_callback=accept) as client:
                await client.call_tool("search_flights", {"origin": "LHR", "destination": "JFK"})
                paid = await client.call_tool("pay", {"amount": 300})
                with pytest.raises(MCPError) as caught:  # a second payment: the search was spent / 600 > 500
                    await client.call_tool("pay", {"amount": 300})
    assert not paid.is_error
    assert caught.value.data["reason"] == ("receipt_consumed" if charged == "consumed-receipt" else "budget_exhausted")
    assert [call for call in booking.calls if call[0] == "pay"] == [("pay", {"amount": 300, "answer": "accept"})]
    rounds = [r for r in mcp_records(side) if r["mcp"].get("name") == "pay"]
    assert [(r["outcome"], r["mcp"].get("continues", False)) for r in rounds] == [
        ("allowed", False), ("allowed", True), ("denied", False)]
