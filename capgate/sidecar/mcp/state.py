"""What the MCP proxy remembers across requests, per sidecar (held in the agent app, never global).

* :class:`Sessions` — which token opened each MCP session;
* :class:`Pending` — the old transport's posted requests waiting for their answer on the stream,
  the sidecar's own events for a session's stream, the server-to-client requests a client may
  answer, which pinned tool definitions a list has verified, and which ``Mcp-Param-*`` headers
  each listed tool's schema declares.

Every map is bounded (``MAX_SESSIONS``); the oldest entry goes first.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capgate.sidecar.mcp import Context, Exchange

SESSION_HEADER = "Mcp-Session-Id"
MAX_SESSIONS = 10_000
"""Bound sessions kept per sidecar; the oldest is forgotten first (its next message gets 404)."""


def _never() -> str | None:
    return None


@dataclass
class Binding:
    """Who opened a session, and how to tell (and make) it end."""

    owner: str
    ended: Callable[[], str | None] = _never
    """Why the tokens that opened it can no longer act (revoked, expired, lockdown), or None."""
    end: Callable[[], Coroutine[Any, Any, None]] | None = None
    """Ends the session on the upstream too (streamable HTTP: DELETE with its id)."""
    tokens: Hashable = None
    """The opening tokens' identity: sessions opened by the same tokens end together, so a sweep
    asks :attr:`ended` once per set of tokens, not once per session."""


class Sessions:
    """Which token opened each MCP session (2025-11-25 ``Mcp-Session-Id``) on this sidecar.

    A session belongs to the token that opened it: the pod's own credential, or one narrowed
    token. Another token presenting its id — or any token presenting an id this sidecar never saw
    open — gets 404, which the protocol answers by opening a new session, so one sub-agent can
    never ride (or end) another's session and its server-side state.

    A session whose opening tokens are revoked, expire or are locked down is *closed*: forgotten,
    ended on the upstream, and remembered (bounded) so its id gets 404 ``session_closed`` — also
    from the credential that replaces a revoked one.
    """

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._owners: OrderedDict[tuple[str, str], Binding] = OrderedDict()
        self._closed: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._limit = limit

    def bind(self, upstream: str, session: str, owner: str, ended: Callable[[], str | None] = _never,
             end: Callable[[], Coroutine[Any, Any, None]] | None = None, tokens: Hashable = None) -> None:
        self._owners[(upstream, session)] = Binding(owner, ended, end, tokens)
        self._owners.move_to_end((upstream, session))
        while len(self._owners) > self._limit:
            self._owners.popitem(last=False)

    def owned(self, upstream: str, session: str, owner: str) -> bool:
        binding = self._owners.get((upstream, session))
        return binding is not None and binding.owner == owner

    def binding(self, upstream: str, session: str) -> Binding | None:
        return self._owners.get((upstream, session))

    def forget(self, upstream: str, session: str) -> None:
        self._owners.pop((upstream, session), None)

    def closed(self, upstream: str, session: str) -> str | None:
        """Why capgate closed this session, if it did."""
        return self._closed.get((upstream, session))

    def close_ended(self) -> list[tuple[str, str, str, Binding]]:
        """Close every session whose tokens can no longer act: (upstream, session, why, binding)."""
        out = []
        verdicts: dict[Hashable, str | None] = {}
        for key, binding in list(self._owners.items()):
            if binding.tokens not in verdicts:
                verdicts[binding.tokens] = binding.ended()
            why = verdicts[binding.tokens]
            if why is not None:
                out.append((*key, why, binding))
                self.close(*key, why)
        return out

    def close(self, upstream: str, session: str, why: str) -> Binding | None:
        binding = self._owners.pop((upstream, session), None)
        self._closed[(upstream, session)] = why
        while len(self._closed) > self._limit:
            self._closed.popitem(last=False)
        return binding

    def __len__(self) -> int:
        return len(self._owners)


class Pending:
    """Requests waiting for their answer on the session's GET stream, by (upstream, session, id).

    The old HTTP+SSE transport answers a POST with 202 and the result arrives on the GET stream;
    a streamable HTTP answer stream cut before its answer is resumed by a GET with
    ``Last-Event-ID``. Either stream looks the request up here to filter a list or mint a
    receipt — once: the entry goes with its answer, so a replayed answer finds nothing.
    """

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._waiting: OrderedDict[tuple[str, str, str], tuple[Context, Exchange]] = OrderedDict()
        self._limit = limit
        self._outboxes: dict[tuple[str, str], asyncio.Queue[bytes]] = {}
        self._asked: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._answered: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._definitions: dict[tuple[str, str], bool] = {}
        self._param_headers: OrderedDict[tuple[str, str], Mapping[tuple[str, ...], str]] = OrderedDict()
        self._rounds: OrderedDict[Hashable, str] = OrderedDict()

    def paid_round(self, key: Hashable, rule: str) -> None:
        """A call allowed by ``rule`` (its budgets charged, its receipts spent) was answered
        ``input_required``: its retry — ``key`` names the same tool, arguments and ``requestState``
        — continues that call, already paid for, once."""
        self._rounds[key] = rule
        self._rounds.move_to_end(key)
        while len(self._rounds) > self._limit:
            self._rounds.popitem(last=False)

    def retry_of(self, key: Hashable) -> str | None:
        """The rule that paid for the call this retry continues (forgotten as it is asked), or None."""
        return self._rounds.pop(key, None)

    def open_outbox(self, upstream: str, session: str) -> asyncio.Queue[bytes]:
        """Events the sidecar itself must deliver on a session's stream (its refusals)."""
        box: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)
        self._outboxes[(upstream, session)] = box
        return box

    def outbox(self, upstream: str, session: str) -> asyncio.Queue[bytes] | None:
        return self._outboxes.get((upstream, session))

    def close_outbox(self, upstream: str, session: str) -> None:
        self._outboxes.pop((upstream, session), None)

    def add(self, key: tuple[str, str, str], ctx: Context, exchange: Exchange) -> None:
        self._waiting[key] = (ctx, exchange)
        while len(self._waiting) > self._limit:
            self._waiting.popitem(last=False)

    def pop(self, key: tuple[str, str, str]) -> tuple[Context, Exchange] | None:
        return self._waiting.pop(key, None)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a reply the sidecar sends on its own (kept referenced: asyncio holds tasks weakly)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def verified(self, upstream: str, tool: str, matches: bool) -> None:
        """The last listed definition of a pinned tool matched its pin (or not)."""
        self._definitions[(upstream, tool)] = matches

    def forget_definitions(self, upstream: str) -> None:
        for key in [key for key in self._definitions if key[0] == upstream]:
            del self._definitions[key]

    def is_verified(self, upstream: str, tool: str) -> bool | None:
        return self._definitions.get((upstream, tool))

    def declare_headers(self, upstream: str, tool: str, headers: Mapping[tuple[str, ...], str]) -> None:
        """The ``Mcp-Param-*`` headers the tool's last listed schema declares (what its calls may send)."""
        self._param_headers[(upstream, tool)] = headers
        self._param_headers.move_to_end((upstream, tool))
        while len(self._param_headers) > self._limit:
            self._param_headers.popitem(last=False)

    def declared_headers(self, upstream: str, tool: str) -> Mapping[tuple[str, ...], str] | None:
        return self._param_headers.get((upstream, tool))

    def ask(self, upstream: str, session: str, ident: object) -> None:
        """The server asked the client something on this session (its answer may pass, once).

        A resumed stream replays the question; an id already answered stays answered."""
        key = (upstream, session, json.dumps(ident))
        if key in self._answered:
            return
        self._asked[key] = None
        while len(self._asked) > self._limit:
            self._asked.popitem(last=False)

    def answer(self, upstream: str, session: str, ident: object) -> bool:
        """Is this a first answer to a request the server really sent on this session?"""
        key = (upstream, session, json.dumps(ident))
        if key not in self._asked:
            return False
        del self._asked[key]
        self._answered[key] = None
        while len(self._answered) > self._limit:
            self._answered.popitem(last=False)
        return True
