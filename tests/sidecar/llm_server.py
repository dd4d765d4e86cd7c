"""A loopback server speaking the OpenAI chat completions API, as far as the tests need it.

``POST /v1/chat/completions`` answers the way api.openai.com does: a ``chat.completion`` JSON
document with ``usage``, or with ``"stream": true`` a ``text/event-stream`` of ``chat.completion.chunk``
events ending in ``data: [DONE]``, whose last chunk before it carries ``usage`` when the request
asked for ``stream_options: {include_usage: true}`` (the others carry ``"usage": null``). The
token counts come from :attr:`LlmServer.usage` (what the test decides the call "used"); a few
``mode`` values make the answers a sidecar must treat as unreadable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

WORDS = ["Flights", " from", " SFO", " to", " JFK", " start", " at", " $300", "."]


@dataclass
class LlmServer:
    usage: int = 100
    """total_tokens of the next answers (prompt_tokens is a third of it)."""
    mode: str = "ok"
    """ok | error (500 with an OpenAI error body) | cut (stream reset before [DONE]) | gzip | hold (stream
    the first chunk, then wait for ``release``)."""
    calls: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    """The raw bytes of each answer's body, as written (to compare with what the agent received)."""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post("/v1/chat/completions", self.completions)
        return application

    def _usage(self) -> dict[str, int]:
        prompt = self.usage // 3
        return {"prompt_tokens": prompt, "completion_tokens": self.usage - prompt, "total_tokens": self.usage}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "error":
            return web.json_response({"error": {"message": "The server had an error", "type": "server_error"}},
                                     status=500)
        if body.get("stream"):
            return await self._stream(request, body)
        answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "".join(WORDS)}}],
                  "usage": self._usage()}
        raw = json.dumps(answer).encode()
        self.sent.append(raw)
        headers = {"Content-Type": "application/json"}
        if self.mode == "gzip":
            headers["Content-Encoding"] = "gzip"  # not really compressed: a sidecar must not look inside
        return web.Response(body=raw, headers=headers)

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        written = bytearray()

        async def event(data: str) -> None:
            chunk = f"data: {data}\n\n".encode()
            written.extend(chunk)
            await response.write(chunk)

        try:
            for index, word in enumerate(WORDS):
                chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                         "model": body["model"],
                                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                if include:
                    chunk["usage"] = None
                await event(json.dumps(chunk))
                if index == 0 and self.mode == "hold":
                    await self.release.wait()
                if index == 3 and self.mode == "cut":
                    assert request.transport is not None
                    request.transport.abort()
                    return response
            if include:
                await event(json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                        "model": body["model"], "choices": [], "usage": self._usage()}))
            await event("[DONE]")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.gone.set()
            raise
        finally:
            self.sent.append(bytes(written))
        return response


async def start(llm: LlmServer) -> AsyncIterator[LlmServer]:
    llm.server = TestServer(llm.app())
    await llm.server.start_server()
    yield llm
    llm.release.set()
    await llm.server.close()
