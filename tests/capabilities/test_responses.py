"""The response reader: what a response budget charges, decided as the client would read the answer."""

from __future__ import annotations

import json

import pytest

from capgate.capabilities import responses
from capgate.capabilities.responses import Usage

FIELD = "usage.total_tokens"
JSON = ["application/json"]
SSE = ["text/event-stream; charset=utf-8"]


def read(chunks: list[bytes], *, content_type: list[str] = JSON, status: int = 200, encoding: list[str] | None = None,
         complete: bool = True, fields: tuple[str, ...] = (FIELD,)) -> dict[str, Usage]:
    reader = responses.UsageReader(fields, status=status, content_type=content_type, content_encoding=encoding or [])
    for chunk in chunks:
        reader.feed(chunk)
    return reader.result(complete=complete)


def chunk(usage: object = None, *, word: str = "hi") -> bytes:
    data: dict[str, object] = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": word}}]}
    data["usage"] = usage
    return b"data: " + json.dumps(data).encode() + b"\n\n"


STREAM = chunk() + chunk(word="there") + chunk({"total_tokens": 57}) + b"data: [DONE]\n\n"


def test_a_json_answer_is_charged_its_usage() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "total_tokens": 19}}).encode()
    assert read([body[:5], body[5:]]) == {FIELD: Usage(19)}
    assert read([body], fields=(FIELD, "usage.prompt_tokens"))["usage.prompt_tokens"] == Usage(7)


def test_a_stream_is_charged_the_last_event_that_carries_the_field_however_it_is_split() -> None:
    for size in (1, 2, 3, 7, 64, len(STREAM)):
        parts = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
        assert read(parts, content_type=SSE) == {FIELD: Usage(57)}, size
    two = chunk({"total_tokens": 5}) + chunk({"total_tokens": 60}) + b"data: [DONE]\n\n"
    assert read([two], content_type=SSE)[FIELD] == Usage(60)


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_every_line_ending_the_event_stream_format_allows_frames_events_alike(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    assert read([stream[i:i + 1] for i in range(len(stream))], content_type=SSE) == {FIELD: Usage(57)}


def test_multi_line_data_comments_and_other_fields_are_read_as_the_client_reads_them() -> None:
    stream = (b": keep-alive\n\nevent: message\nid: 1\ndata: {\"usage\":\ndata: {\"total_tokens\": 9}}\n\n"
              b"data: [DONE]\n\n")
    assert read([stream], content_type=SSE) == {FIELD: Usage(9)}


def test_nothing_after_done_is_read_because_the_client_stops_there() -> None:
    stream = chunk({"total_tokens": 3}) + b"data: [DONE]\n\n" + chunk({"total_tokens": 99999}) + b"data: {oops\n\n"
    assert read([stream], content_type=SSE) == {FIELD: Usage(3)}


@pytest.mark.parametrize(("chunks", "kwargs", "why"), [
    ([b'{"usage": {"total_tokens": 5}}'], {"status": 500}, "error_status"),
    ([b'{"usage": {"total_tokens": 5}}'], {"status": 429}, "error_status"),
    ([b'{"usage": {"total_tokens": 5}}'], {"encoding": ["gzip"]}, "encoded"),
    ([b'{"usage": {"total_tokens": 5}}'], {"content_type": ["text/plain"]}, "media_type"),
    ([b'{"usage": {"total_tokens": 5}}'], {"content_type": ["application/json", "application/json"]}, "media_type"),
    ([b'{"usage": {"total_tokens": 5}}'], {"content_type": ["application/json; charset=latin-1"]}, "media_type"),
    ([b'{"choices": []}'], {}, "missing"),
    ([b'{"usage": null}'], {}, "missing"),
    ([b'{"usage": {"total_tokens": 5}'], {}, "not_json"),
    ([b'{"usage": {"total_tokens": NaN}}'], {}, "not_json"),
    ([b'{"usage": {"total_tokens": 5}} {"usage": {"total_tokens": 1}}'], {}, "not_json"),
    ([b'{"usage": {"total_tokens": 5000}, "usage": {"total_tokens": 5}}'], {}, "ambiguous"),
    ([b'{"usage": {"total_tokens": 5000, "Total_Tokens": 5}}'], {}, "ambiguous"),
    ([b'{"Usage": {"total_tokens": 5000}}'], {}, "ambiguous"),
    ([b'{"usage": {"total_tokens": "5000"}}'], {}, "uncountable"),
    ([b'{"usage": {"total_tokens": -5}}'], {}, "uncountable"),
    ([b'{"usage": {"total_tokens": 1e300}}'], {}, "uncountable"),
    ([b'{"usage": {"total_tokens": 5}}'], {"complete": False}, "truncated"),
    ([b"x" * (responses.MAX_BYTES + 1)], {}, "too_large"),
])
def test_an_answer_whose_usage_cannot_be_read_unambiguously_is_unreadable(
        chunks: list[bytes], kwargs: dict[str, object], why: str) -> None:
    (usage,) = read(chunks, **kwargs).values()  # type: ignore[arg-type]
    assert usage.why == why
    assert usage.charge(4000) == 4000


@pytest.mark.parametrize(("stream", "complete", "why"), [
    (chunk() + chunk() + b"data: [DONE]\n\n", True, "missing"),  # no stream_options.include_usage
    (chunk() + chunk({"total_tokens": 57}), False, "truncated"),  # reset before [DONE]
    (chunk() + chunk({"total_tokens": 57})[:-1], True, "truncated"),  # ends inside an event: the client drops it
    (chunk() + b"data: not json\n\n" + chunk({"total_tokens": 57}) + b"data: [DONE]\n\n", True, "not_json"),
    (chunk() + b'data: {"usage": {"total_tokens": 1}, "usage": {"total_tokens": 9000}}\n\n', True, "ambiguous"),
    (b"data: \xff\xfe\n\n", True, "not_json"),
    (b"data: " + b"x" * responses.MAX_BYTES + b"\n\n", True, "too_large"),
])
def test_a_stream_whose_usage_cannot_be_read_is_unreadable(stream: bytes, complete: bool, why: str) -> None:
    assert read([stream], content_type=SSE, complete=complete)[FIELD].why == why


def test_an_unreadable_answer_is_charged_the_worst_case_or_what_it_showed_if_more() -> None:
    usage = read([chunk({"total_tokens": 9000})], content_type=SSE, complete=False)[FIELD]
    assert usage == Usage(9000, "truncated")
    assert usage.charge(4000) == 9000
    assert Usage(10, "truncated").charge(4000) == 4000
    assert Usage(10).charge(4000) == 10
    assert Usage(0).charge(4000) == 0


def test_memory_stays_bounded_however_long_the_stream() -> None:
    reader = responses.UsageReader((FIELD,), status=200, content_type=SSE, content_encoding=[])
    for _ in range(20000):
        reader.feed(chunk(word="word " * 20))
    reader.feed(chunk({"total_tokens": 20000}) + b"data: [DONE]\n\n")
    assert reader.result(complete=True) == {FIELD: Usage(20000)}
    assert len(reader._line) == 0 and reader._data == []
