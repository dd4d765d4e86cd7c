"""Token budgets read from the upstream's answer (``budgets[].from: response``), end to end.

The official ``openai`` client calls a real loopback server speaking the chat completions API
(:mod:`tests.sidecar.llm_server`) through a real sidecar: the tokens charged are the answer's
``usage``, the answer reaches the client unchanged, an exhausted budget refuses the next call with
an error the client raises, and every answer whose usage cannot be read costs the declared worst case.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from capgate.sidecar import usage
from capgate.sidecar.metrics import Metrics
from tests.sidecar import llm_server
from tests.sidecar.conftest import BASE_SPEC, MakeSidecar, Sidecar
from tests.sidecar.test_usage import MemoryStore

TOKENS = "usage.total_tokens"
WORST = 4000
MESSAGES: list[Any] = [{"role": "user", "content": "flights SFO to JFK?"}]


def llm_spec(max_tokens: int = 1000, *, extra_budgets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    spec["upstreams"].append({"name": "llm", "url": "http://llm.example.internal"})
    spec["rules"].append({"name": "chat", "effect": "allow", "upstream": "llm", "methods": ["POST"],
                          "paths": ["/v1/chat/completions"]})
    spec["budgets"] = [{"upstream": "llm", "field": TOKENS, "max": max_tokens, "per": "24h", "from": "response",
                        "worstCase": WORST}, *(extra_budgets or [])]
    return spec


@pytest.fixture
async def llm() -> AsyncIterator[llm_server.LlmServer]:
    async for server in llm_server.start(llm_server.LlmServer()):
        yield server


async def llm_sidecar(sidecar: MakeSidecar, llm: llm_server.LlmServer, max_tokens: int = 1000,
                      limits: Any = None) -> Sidecar:
    sc = await sidecar(llm_spec(max_tokens), limits=limits)
    sc.settings.upstream_urls["llm"] = llm.url
    return sc


def client_for(sc: Sidecar, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="sk-agent-made-up", base_url=f"http://{sc.client.host}:{sc.client.port}/llm/v1",
                              **options)


def charged(sc: Sidecar) -> list[dict[str, Any]]:
    """What each forwarded LLM call was charged, from the audit ledger."""
    return [r["usage"][TOKENS] for r in sc.decisions() if r.get("upstream") == "llm" and "usage" in r]


async def test_json_answers_are_charged_their_usage_and_the_next_call_after_exhaustion_is_refused(
        sidecar: MakeSidecar, llm: llm_server.LlmServer) -> None:
    sc = await llm_sidecar(sidecar, llm, max_tokens=1000)
    client = client_for(sc)  # default retries: the refusal must not be retried
    answers = []
    for used in (400, 350, 300):  # 0 -> 400 -> 750 -> 1050: the third call overshoots by its own usage
        llm.usage = used
        answers.append(await client.chat.completions.create(model="gpt-test", messages=MESSAGES))
    assert [a.usage.total_tokens for a in answers if a.usage] == [400, 350, 300]
    assert answers[0].choices[0].message.content == "".join(llm_server.WORDS)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    await client.close()
    body = refused.value.response.json()  # the client's .body is our "error" field alone
    assert (refused.value.body, body["error"]) == ("budget_exhausted", "budget_exhausted")
    assert "1050 of 1000" in body["message"]
    assert len(llm.calls) == 3, "the refused call never reached the upstream"
    assert [r["outcome"] for r in sc.decisions()].count("denied") == 1, "the client did not retry a spent budget"
    assert refused.value.response.headers["X-Should-Retry"] == "false", "nor would clients that ignore Retry-After"
    assert charged(sc) == [{"charged": 400}, {"charged": 350}, {"charged": 300}]
    assert sc.gate.metrics.response_charged.labels(f"llm.{TOKENS}")._value.get() == 1050


async def test_a_stream_is_relayed_as_it_arrives_and_charged_the_usage_of_its_last_chunk(
        sidecar: MakeSidecar, llm: llm_server.LlmServer) -> None:
    sc = await llm_sidecar(sidecar, llm)
    llm.usage = 123
    client = client_for(sc)
    stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True,
                                                  stream_options={"include_usage": True})
    words, usages = [], []
    async for chunk in stream:
        words.extend(choice.delta.content or "" for choice in chunk.choices)
        if chunk.usage is not None:
            usages.append(chunk.usage.total_tokens)
    await client.close()
    assert "".join(words) == "".join(llm_server.WORDS)
    assert usages == [123]
    assert charged(sc) == [{"charged": 123}]


async def test_the_answer_reaches_the_agent_byte_for_byte_before_the_stream_ends(
        sidecar: MakeSidecar, llm: llm_server.LlmServer) -> None:
    sc = await llm_sidecar(sidecar, llm)
    llm.mode = "hold"  # the server sends one chunk, then waits: the sidecar must not buffer the stream
    response = await sc.client.post("/llm/v1/chat/completions", json={
        "model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
    assert first.startswith(b"data: {") and b'"Flights"' in first
    llm.release.set()
    rest = await response.content.read()
    assert first + rest == llm.sent[-1]
    assert llm.headers[-1]["Accept-Encoding"] == "identity", "usage must be readable: no compression asked for"
    assert charged(sc) == [{"charged": llm.usage}]


@pytest.mark.parametrize(("mode", "stream", "include", "why"), [
    ("ok", True, False, "missing"),          # a stream without stream_options.include_usage
    ("error", False, False, "error_status"),  # a 500 may still have run (and been billed)
    ("cut", True, True, "truncated"),         # the upstream reset the stream before its usage chunk
    ("gzip", False, False, "encoded"),        # the sidecar never decompresses
])
async def test_an_answer_whose_usage_cannot_be_read_is_charged_the_worst_case(
        sidecar: MakeSidecar, llm: llm_server.LlmServer, mode: str, stream: bool, include: bool, why: str) -> None:
    sc = await llm_sidecar(sidecar, llm, max_tokens=1000000)
    llm.mode = mode
    request: dict[str, Any] = {"model": "m", "messages": MESSAGES, "stream": stream}
    if include:
        request["stream_options"] = {"include_usage": True}
    url = f"http://{sc.client.host}:{sc.client.port}/llm/v1/chat/completions"
    async with aiohttp.ClientSession(auto_decompress=False) as raw, raw.post(url, json=request) as response:
        with pytest.raises(aiohttp.ClientPayloadError) if mode == "cut" else _nothing():
            await response.read()  # as the agent got it: bytes, never inflated
    await asyncio.wait_for(_until(lambda: charged(sc)), 5)
    assert charged(sc) == [{"charged": WORST, "unreadable": why}]


async def test_an_agent_hanging_up_mid_stream_is_charged_the_worst_case(
        sidecar: MakeSidecar, llm: llm_server.LlmServer) -> None:
    sc = await llm_sidecar(sidecar, llm)
    llm.mode = "hold"
    response = await sc.client.post("/llm/v1/chat/completions", json={
        "model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    await response.content.readuntil(b"\n\n")
    response.close()  # the agent goes away; the upstream is still generating (and billing)
    llm.release.set()
    await asyncio.wait_for(_until(lambda: charged(sc)), 5)
    assert charged(sc) == [{"charged": WORST, "unreadable": "truncated"}]


async def test_a_call_that_never_reached_the_upstream_costs_nothing(sidecar: MakeSidecar,
                                                                    llm: llm_server.LlmServer) -> None:
    sc = await llm_sidecar(sidecar, llm)
    sc.settings.upstream_urls["llm"] = "http://127.0.0.1:9"  # discard port: connection refused
    response = await sc.client.post("/llm/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert response.status == 502
    assert charged(sc) == [{"charged": 0}]


async def test_fleet_wide_the_shared_window_records_every_token_used_and_refuses_once_spent(
        sidecar: MakeSidecar, llm: llm_server.LlmServer) -> None:
    store = MemoryStore()
    chargers = [usage.FleetLimits(store, "travel/booking-agent", Metrics()) for _ in range(2)]
    sidecars = [await llm_sidecar(sidecar, llm, max_tokens=2000, limits=charger) for charger in chargers]
    clients = [client_for(sc, max_retries=0) for sc in sidecars]
    llm.usage = 300
    allowed, refusals = 0, []
    for index in range(10):
        try:
            await clients[index % 2].chat.completions.create(model="m", messages=MESSAGES)
            allowed += 1
        except openai.RateLimitError as exc:
            refusals.append(exc.body)
    assert refusals and set(refusals) == {"budget_exhausted"}
    for charger in chargers:
        await charger.idle()
    for client in clients:
        await client.close()
    key = f"budget/llm/response:{TOKENS}/86400s"
    spent = store.status["windows"][key]["spent"]
    assert allowed * 300 <= spent, "every token used is recorded in the shared window"
    assert 2000 <= allowed * 300 < 2000 + 2 * 300, "refused once spent; the overshoot is the calls in flight"
    assert len(llm.calls) == allowed


async def test_a_sidecar_that_cannot_record_what_was_used_refuses_further_calls(
        sidecar: MakeSidecar, llm: llm_server.LlmServer) -> None:
    store = MemoryStore()
    charger = usage.FleetLimits(store, "travel/booking-agent", Metrics())
    sc = await llm_sidecar(sidecar, llm, max_tokens=80000, limits=charger)
    client = client_for(sc, max_retries=0)
    llm.usage = 100
    await client.chat.completions.create(model="m", messages=MESSAGES)  # leases 80000 // 8 = 10000
    store.down = True
    llm.usage = 30000  # more than the lease in hand: the rest is owed to the shared window
    await client.chat.completions.create(model="m", messages=MESSAGES)  # passes on the lease in hand
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert refused.value.response.json()["reason"] == "usage_unavailable"
    assert len(llm.calls) == 2
    store.down = False
    charger._retry_at = 0.0
    await client.chat.completions.create(model="m", messages=MESSAGES)
    await charger.idle()
    await client.close()
    assert store.status["windows"][f"budget/llm/response:{TOKENS}/86400s"]["spent"] >= 100 + 30000 + 30000


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
