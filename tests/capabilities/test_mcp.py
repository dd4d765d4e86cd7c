"""One JSON-RPC reader: every MCP message reads one way, or is refused."""

from __future__ import annotations

import json

import pytest

from capgate.capabilities import mcp


def message(method: str | None = None, *, ident: object = 1, params: object = None, **extra: object) -> bytes:
    doc: dict[str, object] = {"jsonrpc": "2.0"}
    if ident is not None:
        doc["id"] = ident
    if method is not None:
        doc["method"] = method
    if params is not None:
        doc["params"] = params
    doc.update(extra)
    return json.dumps(doc).encode()


def target(raw: bytes, upstream: str = "booking") -> mcp.Target:
    return mcp.target(mcp.parse(raw), upstream)


def test_a_tool_call_is_the_action_mcp_call_on_the_tool() -> None:
    got = target(message("tools/call", params={"name": "charge", "arguments": {"amount": 500}}))
    assert (got.action, got.resource, got.name) == ("mcp.call", "mcp://booking/charge", "charge")
    assert got.arguments == {"amount": 500}


def test_a_tool_call_without_arguments_reads_as_empty_arguments() -> None:
    assert target(message("tools/call", params={"name": "search"})).arguments == {}


@pytest.mark.parametrize(("method", "params", "action", "resource"), [
    ("prompts/get", {"name": "greet", "arguments": {"who": "x"}}, "mcp.prompt", "mcp://booking/greet"),
    ("resources/read", {"uri": "file:///data/trips.json"}, "mcp.read", "mcp://booking/file:/data/trips.json"),
    ("resources/subscribe", {"uri": "booking://trips/42"}, "mcp.read", "mcp://booking/booking:/trips/42"),
    ("resources/read", {"uri": "urn:isbn:123"}, "mcp.read", "mcp://booking/urn:isbn:123"),
    ("completion/complete", {"ref": {}}, "mcp.rpc", "mcp://booking/completion/complete"),
    ("tasks/get", {"taskId": "t"}, "mcp.rpc", "mcp://booking/tasks/get"),
    ("logging/setLevel", {"level": "debug"}, "mcp.rpc", "mcp://booking/logging/setLevel"),
])
def test_named_and_other_methods_map_to_actions(method: str, params: dict[str, object], action: str,
                                                resource: str) -> None:
    got = target(message(method, params=params))
    assert (got.action, got.resource) == (action, resource)


@pytest.mark.parametrize("raw", [
    message("initialize", params={"protocolVersion": "2025-11-25"}),
    message("server/discover"),
    message("ping"),
    message("subscriptions/listen"),
    message("notifications/initialized", ident=None),
    message(None, result={}),
    message(None, error={"code": -1, "message": "no"}),
])
def test_protocol_plumbing_is_implied(raw: bytes) -> None:
    assert target(raw).implied


def test_lists_are_implied_and_say_what_they_list() -> None:
    assert target(message("tools/list")).listing == "tools"
    assert target(message("resources/templates/list")).listing == "resources"


def test_a_request_named_like_a_notification_is_not_plumbing() -> None:
    got = target(message("notifications/initialized"))
    assert (got.action, got.resource) == ("mcp.rpc", "mcp://booking/notifications/initialized")


def test_an_unknown_notification_needs_an_rpc_rule() -> None:
    assert target(message("custom/poke", ident=None)).action == "mcp.rpc"


@pytest.mark.parametrize(("raw", "code"), [
    (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', mcp.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete"}}', mcp.PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","Name":"delete"}}', mcp.PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping"} {"jsonrpc":"2.0","id":2,"method":"ping"}', mcp.PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"c","arguments":{"amount":NaN}}}',
     mcp.PARSE_ERROR),
    (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', mcp.PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping\xff"}', mcp.PARSE_ERROR),
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', mcp.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', mcp.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', mcp.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}', mcp.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["delete"]}', mcp.INVALID_PARAMS),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}', mcp.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', mcp.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":""}', mcp.INVALID_REQUEST),
    (b'"ping"', mcp.INVALID_REQUEST),
])
def test_messages_two_readers_could_disagree_on_are_refused(raw: bytes, code: int) -> None:
    with pytest.raises(mcp.McpError) as caught:
        mcp.parse(raw)
    assert caught.value.rpc_code == code


def test_a_batch_is_refused_with_its_own_reason() -> None:
    with pytest.raises(mcp.McpError) as caught:
        mcp.parse(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]')
    assert caught.value.reason == "mcp_batch"


@pytest.mark.parametrize("name", ["../delete_booking", "a/../b", "a//b", "del%65te", "a?b", "a#b", "a\x00b",
                                  "a\nb", "search/.", "x" * 2000])
def test_tool_names_with_two_readings_are_refused(name: str) -> None:
    with pytest.raises(mcp.McpError) as caught:
        target(message("tools/call", params={"name": name}))
    assert caught.value.reason == "ambiguous_resource"


@pytest.mark.parametrize("uri", ["file:/data/x", "noscheme", "file:///a/../b", "docs://x/a?b", "1x://a"])
def test_resource_uris_with_two_readings_are_refused(uri: str) -> None:
    with pytest.raises(mcp.McpError):
        target(message("resources/read", params={"uri": uri}))


@pytest.mark.parametrize("params", [{}, {"name": 5}, {"name": ""}, {"name": "x", "arguments": [1]}])
def test_a_tool_call_must_name_a_tool_and_pass_an_object(params: dict[str, object]) -> None:
    with pytest.raises(mcp.McpError) as caught:
        target(message("tools/call", params=params))
    assert caught.value.rpc_code == mcp.INVALID_PARAMS


def call(name: str = "charge") -> mcp.Message:
    return mcp.parse(message("tools/call", params={"name": name}))


def test_headers_that_agree_with_the_body_pass() -> None:
    mcp.check_headers(call(), ["tools/call"], ["charge"])
    mcp.check_headers(call(), [], [])
    mcp.check_headers(call("café"), ["tools/call"], ["=?base64?Y2Fmw6k=?="])


@pytest.mark.parametrize(("methods", "names"), [
    (["tools/list"], ["charge"]),
    (["tools/call"], ["search"]),
    (["tools/call"], []),
    (["tools/call", "tools/call"], ["charge"]),
    ([], ["search"]),
    (["tools/call"], ["=?base64?!!?="]),
    (["tools/call"], ["=?base64?Y2hhcmdl?="]),  # "charge", but wrapped: a reader that does not decode sees another name
])
def test_headers_that_disagree_with_the_body_are_refused_with_32020(methods: list[str], names: list[str]) -> None:
    with pytest.raises(mcp.McpError) as caught:
        mcp.check_headers(call(), methods, names)
    assert caught.value.rpc_code == mcp.HEADER_MISMATCH == -32020


def _schema(**properties: object) -> dict[str, object]:
    return {"type": "object", "properties": properties}


AMOUNT = {"type": "integer", "x-mcp-header": "Amount"}


@pytest.mark.parametrize(("schema", "declared"), [
    (_schema(amount=AMOUNT, note={"type": "string"}), {("amount",): "Amount"}),
    (_schema(trip=_schema(region={"type": "string", "x-mcp-header": "Region"})), {("trip", "region"): "Region"}),
    (_schema(amount={"type": "number", "x-mcp-header": "Amount"}), {}),  # numbers have no portable text
    (_schema(a=AMOUNT, b={**AMOUNT, "x-mcp-header": "AMOUNT"}), {}),  # case-insensitively the same header
    (_schema(amount={**AMOUNT, "x-mcp-header": "Am ount"}), {}),  # not an HTTP token
    ({**_schema(amount=AMOUNT), "anyOf": [_schema(x={"type": "string", "x-mcp-header": "X"})]}, {}),
    ({**_schema(amount=AMOUNT), "x-mcp-header": "Root"}, {}),
    (None, {}),
])
def test_the_headers_a_schema_declares_follow_the_sdks_rules_or_none_are_declared(
        schema: object, declared: dict[tuple[str, ...], str]) -> None:
    assert mcp.param_headers(schema) == declared


def charge_call(**arguments: object) -> mcp.Message:
    return mcp.parse(message("tools/call", params={"name": "charge", "arguments": arguments}))


DECLARED = {("amount",): "Amount", ("note",): "Note", ("vip",): "Vip"}


def test_param_headers_that_are_the_sdks_encoding_of_the_arguments_pass() -> None:
    mcp.check_param_headers(charge_call(amount=5, note="café", vip=True),
                            [("Mcp-Param-Amount", "5"), ("mcp-param-note", "=?base64?Y2Fmw6k=?="),
                             ("MCP-PARAM-VIP", "true"), ("Accept", "*/*")], DECLARED)
    mcp.check_param_headers(charge_call(amount=5), [], DECLARED)  # a missing header is the server's to refuse
    mcp.check_param_headers(charge_call(amount=5), [], None)


@pytest.mark.parametrize(("arguments", "headers", "declared"), [
    ({"amount": 5}, [("Mcp-Param-Amount", "5"), ("Mcp-Param-Amount", "5")], DECLARED),
    ({"amount": 5}, [("Mcp-Param-Amount", "5"), ("mcp-param-amount", "5")], DECLARED),
    ({"amount": 5}, [("Mcp-Param-Amount", "5")], None),
    ({"amount": 5}, [("Mcp-Param-Other", "5")], DECLARED),
    ({}, [("Mcp-Param-Amount", "5")], DECLARED),
    ({"amount": None}, [("Mcp-Param-Amount", "null")], DECLARED),
    ({"amount": 5.0}, [("Mcp-Param-Amount", "5.0")], DECLARED),
    ({"amount": 5.0}, [("Mcp-Param-Amount", "5")], DECLARED),
    ({"amount": [5]}, [("Mcp-Param-Amount", "[5]")], DECLARED),
    ({"note": " x"}, [("Mcp-Param-Note", " x")], DECLARED),
    ({"note": "x\u00e9"}, [("Mcp-Param-Note", "x\u00c3\u00a9")], DECLARED),  # raw UTF-8 read as Latin-1
    ({"note": "=?base64?eA==?="}, [("Mcp-Param-Note", "=?base64?eA==?=")], DECLARED),
    ({"vip": True}, [("Mcp-Param-Vip", "True")], DECLARED),
    ({"vip": 1}, [("Mcp-Param-Vip", "true")], DECLARED),
])
def test_param_headers_two_readers_could_read_apart_are_refused(
        arguments: dict[str, object], headers: list[tuple[str, str]],
        declared: dict[tuple[str, ...], str] | None) -> None:
    with pytest.raises(mcp.McpError) as caught:
        mcp.check_param_headers(charge_call(**arguments), headers, declared)
    assert caught.value.rpc_code == -32020 and caught.value.reason == "mcp_header_mismatch"


def test_param_headers_on_another_method_are_refused() -> None:
    with pytest.raises(mcp.McpError):
        mcp.check_param_headers(mcp.parse(message("tools/list")), [("Mcp-Param-Amount", "5")], DECLARED)


def test_an_error_answer_carries_the_request_id_and_data() -> None:
    answer = mcp.error_message(7, mcp.DENIED, "denied", {"reason": "deny_rule"})
    assert answer == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32001, "message": "denied",
                                                           "data": {"reason": "deny_rule"}}}


def test_the_argument_digest_ignores_key_order_but_not_values() -> None:
    assert mcp.digest({"a": 1, "b": 2}) == mcp.digest({"b": 2, "a": 1})
    assert mcp.digest({"a": 1}) != mcp.digest({"a": 2})


def test_a_list_keeps_only_items_the_predicate_allows_and_turns_caching_private() -> None:
    answer = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "search"}, {"name": "delete"},
                                                             {"name": "../x"}, {"nom": "y"}],
                                                   "nextCursor": "c", "ttlMs": 60000, "cacheScope": "public"}}
    filtered = mcp.filter_list(answer, "tools/list", "booking",
                               lambda action, resource: resource != "mcp://booking/delete")
    assert filtered == {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "search"}], "nextCursor": "c",
                                                              "ttlMs": 0, "cacheScope": "private"}}


def test_resource_templates_are_judged_by_one_instance() -> None:
    assert mcp.item_scope("b", "resources/templates/list", {"uriTemplate": "booking://trips/{id}"}) == (
        "mcp.read", "mcp://b/booking:/trips/x")
    assert mcp.item_scope("b", "resources/list", {"uri": "file:///a"}) == ("mcp.read", "mcp://b/file:/a")


def test_an_error_answer_to_a_list_is_not_rewritten() -> None:
    assert mcp.filter_list({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x"}}, "tools/list", "b",
                           lambda a, r: True) is None
