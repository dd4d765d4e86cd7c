"""Server-sent events, split without changing a byte: what the MCP proxy reads answers from.

The WHATWG event-stream rules: lines end with CRLF, LF or CR; a blank line ends an event; ``data:``
lines join with LF; ``event:`` names it; everything else (``id:``, ``retry:``, ``:`` comments the
servers use as pings) is kept as sent. A lone CR at the end of a chunk may be half of a CRLF, so
it waits for the next chunk. Events are bounded: a stream cannot make the sidecar buffer forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EOL = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True)
class Event:
    raw: bytes
    """The event exactly as the upstream sent it, blank line included."""
    data: str | None
    name: str | None

    def with_data(self, data: bytes) -> bytes:
        """This event with its data replaced by one ``data:`` line (``id:``, ``event:`` kept)."""
        kept = [line for line in EOL.split(self.raw) if line and not line.startswith(b"data")]
        return b"".join(line + b"\n" for line in kept) + b"data: " + data + b"\n\n"


class SseEvents:
    """Split an SSE byte stream into whole events without changing a byte (WHATWG's line rules)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = b""
        self._raw: list[bytes] = []
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes, *, final: bool = False) -> list[Event]:
        """The events ``chunk`` completes; ``final`` at the end of the stream (a last CR is a line end)."""
        self._buffer += chunk
        out: list[Event] = []
        while True:
            match = EOL.search(self._buffer)
            if match is None or (not final and match.group() == b"\r" and match.end() == len(self._buffer)):
                break  # a lone CR at the end may be half of CRLF
            line, raw = self._buffer[:match.start()], self._buffer[:match.end()]
            self._buffer = self._buffer[match.end():]
            self._raw.append(raw)
            self._size += len(raw)
            if line:
                self._lines.append(line)
                continue
            out.append(self._event())
        if self._size + len(self._buffer) > self._limit:
            raise ValueError(f"an SSE event is larger than {self._limit} bytes")
        return out

    def rest(self) -> bytes:
        """Bytes of an unfinished event at the end of the stream: passed on, never decided on (an
        event-stream reader discards an event the stream ends inside)."""
        return b"".join(self._raw) + self._buffer

    def _event(self) -> Event:
        data: list[str] = []
        name = None
        for line in self._lines:
            key, _, value = line.decode("utf-8", "replace").partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "data":
                data.append(value)
            elif key == "event":
                name = value
        event = Event(b"".join(self._raw), "\n".join(data) if data else None, name)
        self._raw, self._lines, self._size = [], [], 0
        return event
