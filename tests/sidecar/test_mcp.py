"""MCP through the sidecar, with the official SDK on both sides: every tool call is decided."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.sidecar.conftest import MakeSidecar, Sidecar
from tests.sidecar.mcp_server import Booking, running

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
