"""SSE events are split exactly as sent, whatever the chunking, and bounded."""

from __future__ import annotations

import pytest

from capgate.sidecar.mcp.sse import SseEvents

STREAM = b': ping\r\n\r\nid: 7\r\nretry: 100\r\nevent: message\r\ndata: {"a":\r\ndata: 1}\r\n\r\ndata: x\n\ndata: y\r\r'


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_events_come_out_byte_for_byte_however_the_stream_is_chunked(size: int) -> None:
    events = SseEvents(1024)
    out = [e for start in range(0, len(STREAM), size) for e in events.feed(STREAM[start:start + size])]
    out += events.feed(b"", final=True)
    assert b"".join(e.raw for e in out) + events.rest() == STREAM
    assert [e.data for e in out] == [None, '{"a":\n1}', "x", "y"]
    assert out[1].name == "message"


def test_replacing_the_data_keeps_id_and_event() -> None:
    (_, event, *_) = SseEvents(1024).feed(STREAM)
    assert event.with_data(b'{"b":2}') == b'id: 7\nretry: 100\nevent: message\ndata: {"b":2}\n\n'


def test_an_endless_event_is_refused() -> None:
    events = SseEvents(64)
    with pytest.raises(ValueError, match="larger"):
        events.feed(b"data: " + b"x" * 100)


def test_an_event_the_stream_ends_inside_is_passed_on_but_not_read() -> None:
    events = SseEvents(1024)
    assert events.feed(b"data: half") == [] and events.feed(b"", final=True) == []
    assert events.rest() == b"data: half"
