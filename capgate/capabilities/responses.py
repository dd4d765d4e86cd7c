"""The one reader of upstream responses that response budgets (LLM token usage) charge from.

``budgets[].from: response`` charges a call *after* it ran, by a field of the upstream's answer
(``usage.total_tokens``). The response is relayed to the agent as it arrives; this reader sees the
same chunks on the way past, in bounded memory, and says at the end what the call used:

* ``application/json`` (one document, read by :func:`capgate.capabilities.bodies.parse`, so the
  same strict rules as request bodies: no duplicate or case-colliding keys, no ``NaN``, nothing
  after the document, the field spelled exactly);
* ``text/event-stream``: events are framed as the WHATWG algorithm (and the ``openai`` client's
  decoder) frame them — lines end at CR, LF or CRLF, ``data:`` lines join with LF, an empty line
  dispatches, ``:`` starts a comment — and a ``data`` that starts with ``[DONE]`` ends the stream,
  as it ends the client's reading. The amount is the field in the *last* event that carries it
  (OpenAI chat completions with ``stream_options.include_usage`` put ``usage`` in the final chunk;
  the others carry ``"usage": null``). Every other data event must also be one strict JSON
  document: an event two JSON readers could disagree on makes the whole stream unreadable.

Anything else is **unreadable** and the budget charges its declared ``worstCase`` — or what was
read, if that is more — never 0: an error status, a ``Content-Encoding`` (the sidecar never
decompresses; it asks upstreams for ``identity``), another media type, a missing or uncountable
field, a body or an event over :data:`MAX_BYTES`, a stream cut short (upstream reset, the agent
going away) or ending mid-event.

Pure: bytes and header values in, a :class:`Usage` per field out; no HTTP, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from capgate.capabilities import bodies, spec
from capgate.capabilities.errors import RequestError

MAX_BYTES = 1024 * 1024
"""The most of a JSON body, or of one event's data, held to read usage (the relay itself is unbounded)."""
_LINE_END = re.compile(rb"[\r\n]")
_DONE = "[DONE]"

Unreadable = Literal["error_status", "encoded", "media_type", "not_json", "ambiguous", "missing", "uncountable",
                     "too_large", "truncated"]


@dataclass(frozen=True)
class Usage:
    """What one response says about one field: the amount read, or why it could not be read."""

    amount: int | None
    why: Unreadable | None = None
    """None when ``amount`` was read cleanly."""

    def charge(self, worst_case: int) -> int:
        """What the budget charges: the amount read, else the worst case (or more, if more was seen)."""
        if self.why is None and self.amount is not None:
            return self.amount
        return max(worst_case, self.amount or 0)


class UsageReader:
    """Fed the response chunks as they are relayed; :meth:`result` at the end."""

    def __init__(self, fields: Sequence[str], *, status: int, content_type: Sequence[str],
                 content_encoding: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self._seen: dict[str, int] = {}
        self._why: Unreadable | None = None
        self._kind: Literal["json", "sse"] | None = None
        if not 200 <= status < 300:
            self._why = "error_status"
        elif content_encoding:
            self._why = "encoded"
        else:
            self._kind = _kind(content_type)
            if self._kind is None:
                self._why = "media_type"
        self._body = bytearray()
        self._line = bytearray()
        self._skip_lf = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._done = False

    def feed(self, chunk: bytes) -> None:
        if self._why is not None or self._done or not chunk:
            return
        if self._kind == "json":
            if len(self._body) + len(chunk) > MAX_BYTES:
                self._fail("too_large")
                self._body.clear()
                return
            self._body.extend(chunk)
            return
        start = 0
        for match in _LINE_END.finditer(chunk):
            end = match.start()
            if self._skip_lf and end == start and chunk[end] == 0x0A:
                self._skip_lf = False
                start = end + 1
                continue
            self._skip_lf = chunk[end] == 0x0D
            if not self._append_line(chunk[start:end]):
                return
            self._line_done()
            if self._why is not None or self._done:
                return
            start = end + 1
        if start < len(chunk):
            self._skip_lf = False
            self._append_line(chunk[start:])

    def result(self, *, complete: bool) -> dict[str, Usage]:
        """What each field's budget is charged; ``complete`` is False when the relay was cut short."""
        why = self._why
        if why is None and self._kind == "json":
            why = self._read_json() if complete else "truncated"
        elif why is None and not self._done and (not complete or self._line or self._data):
            why = "truncated"  # cut short, or ended inside an event the client would drop too
        out: dict[str, Usage] = {}
        for name in self.fields:
            amount = self._seen.get(name)
            out[name] = Usage(amount, why if why is not None or amount is not None else "missing")
        return out

    # -- JSON ---------------------------------------------------------------------------------------
    def _read_json(self) -> Unreadable | None:
        found = _document(bytes(self._body), self.fields)
        self._body.clear()
        if isinstance(found, str):
            return found
        self._seen.update(found)
        return None

    # -- server-sent events -------------------------------------------------------------------------
    def _append_line(self, part: bytes) -> bool:
        if len(self._line) + len(part) + self._data_size > MAX_BYTES:
            self._fail("too_large")
            return False
        self._line.extend(part)
        return True

    def _line_done(self) -> None:
        line = bytes(self._line)
        self._line.clear()
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            value = value[1:] if value.startswith(b" ") else value
            self._data.append(value)
            self._data_size += len(value) + 1

    def _dispatch(self) -> None:
        if not self._data:
            return
        raw = b"\n".join(self._data)
        self._data.clear()
        self._data_size = 0
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("not_json")
            return
        if text.startswith(_DONE):
            self._done = True
            return
        found = _document(raw, self.fields)
        if isinstance(found, str):
            self._fail(found)
            return
        self._seen.update(found)  # the last event that carries a field wins, as it is the client's last word

    def _fail(self, why: Unreadable) -> None:
        if self._why is None:
            self._why = why


def _kind(content_type: Sequence[str]) -> Literal["json", "sse"] | None:
    if len(content_type) != 1:
        return None
    media = content_type[0].split(";")[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    try:
        bodies.check_content_type(content_type)
    except RequestError:
        return None
    return "json"


def _document(raw: bytes, fields: Sequence[str]) -> dict[str, int] | Unreadable:
    """The fields one JSON document carries (absent or ``null``: not carried), or why it is unreadable."""
    try:
        document = bodies.parse(raw)
        bodies.check_spelling(document, fields)
    except bodies.BodyError as exc:
        return "ambiguous" if exc.reason == "ambiguous_body" else "not_json"
    found: dict[str, int] = {}
    for name in fields:
        if spec.field_value(document, name)[1] is None:
            continue
        amount = spec.numeric_field(document, name)
        if amount is None or amount < 0:  # "57", 1e300, -5: a client may read something else, or nothing
            return "uncountable"
        found[name] = amount
    return found

