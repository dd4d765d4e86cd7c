"""The one reader of MCP's JSON-RPC messages: bytes in, what the message asks for out.

An MCP server acts on a JSON-RPC message, not on the HTTP POST that carries it, so a policy over
``POST /mcp`` decides nothing. This module turns one message into the terms the decision core
already speaks (an *action* on a *resource*), so the sidecar, ``capgate explain`` and the decision
API read the same bytes the same way:

=============================  ==============  ==========================================
method                         action          resource
=============================  ==============  ==========================================
``tools/call``                 ``mcp.call``    ``mcp://<upstream>/<tool>``
``prompts/get``                ``mcp.prompt``  ``mcp://<upstream>/<prompt>``
``resources/read|subscribe``   ``mcp.read``    ``mcp://<upstream>/<scheme>:/<rest>``
any other request              ``mcp.rpc``     ``mcp://<upstream>/<method>``
=============================  ==============  ==========================================

Protocol plumbing (``initialize``, ``server/discover``, ``ping``, ``subscriptions/listen``, client
``notifications/*`` and the client's answers to server requests) is *implied* by declaring an MCP
upstream: it carries no action. ``*/list`` methods are implied too; their results are filtered.

Strictness, because the upstream reads the same bytes with another parser: one JSON object (a
batch — a JSON array — is refused: one HTTP request, one decision), strict JSON read by the one body
reader, :mod:`capgate.capabilities.bodies` (no duplicate or case-colliding keys, no ``NaN``,
UTF-8, nothing after the document), ``jsonrpc: "2.0"``, no
members JSON-RPC does not define, an ``id`` that is a string or an integer, ``params`` an object.

Names become resource paths through :mod:`capgate.capabilities.paths` — the same normalization
as HTTP paths — after refusing ``%``, ``?`` and ``#``: a tool name is a JSON string, not a URL, so
a percent escape in it has two readings (decoded by capgate, literal to the server). A resource
URI ``scheme://authority/path`` reads as ``scheme:/authority/path`` and ``file:///p`` as
``file:/p`` (``//`` would be an empty segment, which paths refuse); the authority-less form
``scheme:/p`` is refused because it would read the same as ``scheme://p``.

The 2026-07-28 protocol mirrors the method and name into ``Mcp-Method``/``Mcp-Name`` headers, and
arguments a tool's input schema annotates with ``x-mcp-header`` into ``Mcp-Param-<token>``; an
intermediary may route by them and a server may read them, so when they disagree with the body the
message is refused with ``-32020`` (HEADER_MISMATCH). Stricter than the SDK's server, which decodes
and compares: a header value must be *exactly* what the SDK's encoder writes for the body's value
(:func:`encode_header_value`), so no second reader can decode it to something else — no
non-canonical base64, no ``42.0`` or ``042`` for ``42``, no floats (whose text differs between
languages), no duplicates, no header that no listed schema declares.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from capgate.capabilities import bodies, paths
from capgate.capabilities.errors import RequestError

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020
"""The 2026-07-28 protocol's code for transport headers that disagree with the body."""
DENIED = -32001
"""capgate's refusals (JSON-RPC's implementation-defined server range); ``data`` has the reason."""

CALL, PROMPT, READ, RPC = "mcp.call", "mcp.prompt", "mcp.read", "mcp.rpc"
ACTIONS = (CALL, PROMPT, READ, RPC)
PLUMBING = frozenset({"initialize", "server/discover", "ping", "subscriptions/listen"})
LISTS: Mapping[str, str] = {"tools/list": "tools", "prompts/list": "prompts", "resources/list": "resources",
                            "resources/templates/list": "resources"}
NAMED: Mapping[str, tuple[str, str]] = {
    "tools/call": (CALL, "name"), "prompts/get": (PROMPT, "name"), "resources/read": (READ, "uri"),
    "resources/subscribe": (READ, "uri"),
}
"""Methods that act on one named thing: the action and the params member that names it."""
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"
NAME_HEADER_METHODS = frozenset({"tools/call", "prompts/get", "resources/read"})
"""The methods whose name the SDK mirrors into ``Mcp-Name`` (``mcp.shared.inbound``)."""
MAX_NAME = 1024

_MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)
_B64_HEADER = re.compile(r"^=\?base64\?(.*)\?=$", re.DOTALL)
_HEADER_SAFE = re.compile(r"[\x20-\x7E]*")
_HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
PARAM_HEADER_PREFIX = "mcp-param-"
X_MCP_HEADER = "x-mcp-header"
HEADER_TYPES = frozenset({"string", "integer", "boolean"})
"""The JSON-Schema types ``x-mcp-header`` may annotate (``number`` is excluded: its text is not portable)."""
ParamHeaders = Mapping[tuple[str, ...], str]
"""A tool's ``Mcp-Param-*`` headers: argument path -> header token."""

Kind = Literal["request", "notification", "response"]
JsonRpcId = str | int


class McpError(RequestError):
    """A message capgate will not decide: 400 with the JSON-RPC error code ``rpc_code``."""

    def __init__(self, code: int, message: str, *, reason: str = "bad_mcp_message") -> None:
        super().__init__(message)
        self.rpc_code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Message:
    kind: Kind
    id: JsonRpcId | None
    method: str | None
    params: Mapping[str, object]
    document: Mapping[str, object]


@dataclass(frozen=True)
class Target:
    """What one message asks for, in the decision core's terms.

    ``action``/``resource`` are None for implied plumbing; ``name`` is the tool, prompt, URI or
    method as sent (for audit); ``arguments`` is what limits, budgets and ``args`` read.
    """

    method: str | None
    action: str | None
    resource: str | None
    name: str | None
    arguments: Mapping[str, object] | None = None
    listing: str | None = None

    @property
    def implied(self) -> bool:
        return self.action is None


# -- strict JSON -------------------------------------------------------------------------------
def parse_json(raw: bytes) -> object:
    """One strict JSON document, read by the one body reader (:func:`bodies.parse`)."""
    try:
        return bodies.parse(raw)
    except bodies.BodyError as exc:
        raise McpError(PARSE_ERROR, exc.message, reason=exc.reason) from None


# -- messages ----------------------------------------------------------------------------------
def parse(raw: bytes) -> Message:
    """The one JSON-RPC message in ``raw``, or :class:`McpError`."""
    document = parse_json(raw)
    if isinstance(document, list):
        raise McpError(INVALID_REQUEST, "JSON-RPC batches are refused: send one message per request",
                       reason="mcp_batch")
    return message_of(document)


def message_of(document: object) -> Message:
    if not isinstance(document, dict):
        raise McpError(INVALID_REQUEST, "a JSON-RPC message is an object")
    unknown = sorted(set(document) - _MEMBERS)
    if unknown:
        raise McpError(INVALID_REQUEST, f"members JSON-RPC does not define: {', '.join(unknown)}")
    if document.get("jsonrpc") != "2.0":
        raise McpError(INVALID_REQUEST, "jsonrpc must be \"2.0\"")
    has_id = "id" in document
    ident = document.get("id")
    if has_id and (isinstance(ident, bool) or not isinstance(ident, str | int)):
        raise McpError(INVALID_REQUEST, "id must be a string or an integer")
    params = document.get("params", {})
    if not isinstance(params, dict):
        raise McpError(INVALID_PARAMS, "params must be an object")
    if "method" in document:
        method = document["method"]
        if not isinstance(method, str) or not method or len(method) > MAX_NAME:
            raise McpError(INVALID_REQUEST, "method must be a non-empty string")
        if "result" in document or "error" in document:
            raise McpError(INVALID_REQUEST, "a message is a request or a response, not both")
        return Message("request" if has_id else "notification", ident if has_id else None,
                       method, params, document)
    if not has_id or ("result" in document) == ("error" in document) or "params" in document:
        raise McpError(INVALID_REQUEST, "a response has an id and exactly one of result and error")
    return Message("response", ident, None, {}, document)


def target(message: Message, upstream: str) -> Target:
    """What ``message`` asks of ``upstream``; names are normalized like paths (else McpError)."""
    method = message.method
    if message.kind == "response":
        return Target(None, None, None, None)
    assert method is not None
    if message.kind == "notification":
        if method.startswith("notifications/"):
            return Target(method, None, None, method)
        return Target(method, RPC, resource(upstream, method, what="method"), method)
    if method in PLUMBING:
        return Target(method, None, None, method)
    if method in LISTS:
        return Target(method, None, None, method, listing=LISTS[method])
    named = NAMED.get(method)
    if named is None:
        return Target(method, RPC, resource(upstream, method, what="method"), method)
    action, member = named
    name = message.params.get(member)
    if not isinstance(name, str) or not name:
        raise McpError(INVALID_PARAMS, f"{method} needs params.{member} as a non-empty string")
    arguments = _arguments(message.params) if action in (CALL, PROMPT) else None
    if action == READ:
        return Target(method, action, uri_resource(upstream, name), name, arguments)
    return Target(method, action, resource(upstream, name, what="name"), name, arguments)


def check_arguments(arguments: Mapping[str, object] | None, fields: Iterable[str]) -> None:
    """Refuse ``{"AMOUNT": 5}`` where a limit reads ``amount`` (:func:`bodies.check_spelling`):
    servers that match argument names case-insensitively would read what the limit does not see."""
    if arguments is None:
        return
    try:
        bodies.check_spelling(arguments, fields)
    except bodies.BodyError as exc:
        raise McpError(INVALID_PARAMS, exc.message, reason=exc.reason) from None


def _arguments(params: Mapping[str, object]) -> Mapping[str, object]:
    arguments = params.get("arguments", {})
    if arguments is None:
        return {}
    if not isinstance(arguments, dict):
        raise McpError(INVALID_PARAMS, "params.arguments must be an object")
    return arguments


def resource(upstream: str, name: str, *, what: str = "name") -> str:
    """``mcp://<upstream>/<name>``, with ``name`` read like a path (one reading or McpError)."""
    if len(name) > MAX_NAME:
        raise McpError(INVALID_PARAMS, f"the {what} is longer than {MAX_NAME} characters", reason="ambiguous_resource")
    for char in "%?#":
        if char in name:
            raise McpError(INVALID_PARAMS, f"{char!r} in an MCP {what} is ambiguous", reason="ambiguous_resource")
    return _normalized(upstream, "/" + name, what)


def uri_resource(upstream: str, uri: str) -> str:
    """``mcp://<upstream>/<scheme>:/<authority>/<path>`` for a resource URI (see the module docstring)."""
    match = _URI.fullmatch(uri)
    if match is None or len(uri) > MAX_NAME:
        raise McpError(INVALID_PARAMS, "a resource uri is 'scheme:...' of at most 1024 characters",
                       reason="ambiguous_resource")
    if "?" in uri or "#" in uri:
        raise McpError(INVALID_PARAMS, "'?' and '#' in a resource uri are ambiguous", reason="ambiguous_resource")
    scheme, rest = match.groups()
    if rest.startswith("//"):
        authority, slash, tail = rest[2:].partition("/")
        rest = ("/" + authority if authority else "") + slash + tail
    elif rest.startswith("/"):
        raise McpError(INVALID_PARAMS, f"'{scheme}:/...' reads like '{scheme}://...'; use the '//' form",
                       reason="ambiguous_resource")
    return _normalized(upstream, f"/{scheme.lower()}:{rest}", "uri")


def _normalized(upstream: str, path: str, what: str) -> str:
    try:
        return paths.normalize_resource(f"mcp://{upstream}{path}")
    except RequestError as exc:
        raise McpError(INVALID_PARAMS, f"ambiguous MCP {what}: {exc}", reason="ambiguous_resource") from None


# -- lists -------------------------------------------------------------------------------------
LIST_ITEMS: Mapping[str, tuple[str, str, str]] = {
    "tools/list": ("tools", "name", CALL), "prompts/list": ("prompts", "name", PROMPT),
    "resources/list": ("resources", "uri", READ),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", READ),
}
"""A list method: the result member holding the items, the item member naming each, the action it offers."""
_TEMPLATE_EXPRESSION = re.compile(r"\{[^{}]*\}")


def item_scope(upstream: str, method: str, item: object) -> tuple[str, str] | None:
    """(action, resource) a listed item offers, or None when it cannot be read (the item is hidden).

    A URI template is judged by one instance: each ``{expression}`` reads as the segment ``x``.
    """
    _, member, action = LIST_ITEMS[method]
    name = item.get(member) if isinstance(item, Mapping) else None
    if not isinstance(name, str) or not name:
        return None
    try:
        if action == READ:
            instance = _TEMPLATE_EXPRESSION.sub("x", name) if method == "resources/templates/list" else name
            return action, uri_resource(upstream, instance)
        return action, resource(upstream, name)
    except McpError:
        return None


def filter_list(document: Mapping[str, object], method: str, upstream: str,
                may: Callable[[str, str], bool]) -> dict[str, object] | None:
    """The list answer with only the items ``may(action, resource)`` allows, marked uncacheable.

    None when ``document`` is not a list result (an error, or no item array): passed on as is.
    ``ttlMs: 0`` / ``cacheScope: private`` (2026-07-28 caching hints) keep a shared cache from
    serving one credential's view to another.
    """
    result = document.get("result")
    key = LIST_ITEMS[method][0]
    if not isinstance(result, Mapping) or not isinstance(result.get(key), list):
        return None
    items = result[key]
    assert isinstance(items, list)
    kept = [item for item in items if (scope := item_scope(upstream, method, item)) is not None and may(*scope)]
    filtered: dict[str, object] = {**result, key: kept}
    if "ttlMs" in result or "cacheScope" in result:
        filtered["ttlMs"], filtered["cacheScope"] = 0, "private"
    return {**document, "result": filtered}


# -- transport headers -------------------------------------------------------------------------
def check_headers(message: Message, method_headers: list[str], name_headers: list[str]) -> None:
    """``Mcp-Method``/``Mcp-Name`` (every value sent) must agree with the body, else -32020; the name
    exactly as the SDK encodes it (:func:`encode_header_value`)."""
    if len(method_headers) > 1 or len(name_headers) > 1:
        raise McpError(HEADER_MISMATCH, "send Mcp-Method and Mcp-Name at most once", reason="mcp_header_mismatch")
    if method_headers and method_headers[0] != message.method:
        raise McpError(HEADER_MISMATCH, "Mcp-Method does not match the message's method",
                       reason="mcp_header_mismatch")
    member = NAMED.get(message.method or "", ("", ""))[1]
    body_name = message.params.get(member) if message.method in NAME_HEADER_METHODS else None
    if name_headers:
        if not isinstance(body_name, str) or name_headers[0] != encode_header_value(body_name):
            raise McpError(HEADER_MISMATCH, "Mcp-Name does not match the message's name",
                           reason="mcp_header_mismatch")
    elif method_headers and body_name is not None:
        raise McpError(HEADER_MISMATCH, f"Mcp-Method is sent, so Mcp-Name must name params.{member}",
                       reason="mcp_header_mismatch")


def param_headers(input_schema: object) -> dict[tuple[str, ...], str]:
    """The ``Mcp-Param-*`` headers a tool's input schema declares: argument path -> token.

    An annotation counts only on a property reached from the root through ``properties`` alone,
    on a string, integer or boolean, with an HTTP token unique case-insensitively — the SDK's
    rules. A schema with any other ``x-mcp-header`` key anywhere (counted over the whole JSON, so
    also inside ``default`` or ``anyOf``: stricter than the SDK's walk) declares none: conforming
    clients drop such a tool, and every header sent for it is refused.
    """
    found: dict[tuple[str, ...], str] = {}
    seen: set[str] = set()
    stack: list[tuple[tuple[str, ...], object]] = [((), input_schema)]
    while stack:
        path, node = stack.pop()
        properties = node.get("properties") if isinstance(node, Mapping) else None
        if not isinstance(properties, Mapping):
            continue
        for name, sub in properties.items():
            if not isinstance(sub, Mapping):
                continue
            stack.append(((*path, name), sub))
            if X_MCP_HEADER not in sub:
                continue
            token, kind = sub[X_MCP_HEADER], sub.get("type")
            if (not isinstance(token, str) or not _HEADER_TOKEN.fullmatch(token) or token.lower() in seen
                    or kind not in HEADER_TYPES):
                return {}
            seen.add(token.lower())
            found[(*path, name)] = token
    return found if _annotations(input_schema) == len(found) else {}


def _annotations(document: object) -> int:
    """How many ``x-mcp-header`` keys ``document`` holds at any depth."""
    count = 0
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            count += X_MCP_HEADER in node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def check_param_headers(message: Message, headers: Iterable[tuple[str, str]], declared: ParamHeaders | None) -> None:
    """Every ``Mcp-Param-*`` header sent must be exactly the encoding of the argument it declares.

    ``declared``: the called tool's headers as its last listed schema declared them (None when no
    list this reader saw named the tool: the SDK's client sends none then, so none may be sent).
    Absent headers are the server's business (it refuses a missing one itself; nobody routes on it).
    """
    sent: dict[str, list[str]] = {}
    for name, value in headers:
        if name.lower().startswith(PARAM_HEADER_PREFIX):
            sent.setdefault(name.lower(), []).append(value)
    if not sent:
        return
    if message.method != "tools/call":
        raise _mismatch("Mcp-Param-* headers belong to tools/call only")
    if declared is None:
        raise _mismatch("Mcp-Param-* headers for a tool no tools/list has shown here (list the tools first)")
    by_header = {PARAM_HEADER_PREFIX + token.lower(): path for path, token in declared.items()}
    arguments = message.params.get("arguments")
    for header, values in sorted(sent.items()):
        if len(values) > 1:
            raise _mismatch(f"{header} is sent more than once")
        path = by_header.get(header)
        if path is None:
            raise _mismatch(f"{header} names no argument the tool's schema declares")
        argument: object = arguments
        for key in path:
            argument = argument.get(key) if isinstance(argument, Mapping) else None
        rendered = _header_text(argument)
        if rendered is None:
            raise _mismatch(f"{header} is sent, but argument {'.'.join(path)!r} is absent or has no header form")
        if values[0] != encode_header_value(rendered):
            raise _mismatch(f"{header} is not exactly the encoding of argument {'.'.join(path)!r}")


def _header_text(value: object) -> str | None:
    """The one text of a header value: booleans ``true``/``false``, integers in decimal, strings as
    they are; None for absent values, floats (``42.0`` reads ``42`` in another language), arrays
    and objects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # beyond Python's int-to-str digit limit
            return None
    return value if isinstance(value, str) else None


def _mismatch(message: str) -> McpError:
    return McpError(HEADER_MISMATCH, message, reason="mcp_header_mismatch")


def encode_header_value(value: str) -> str:
    """The SDK's encoding of a header value (``mcp.shared.inbound``): visible ASCII without edge
    spaces as is, anything else (or text that looks encoded) as ``=?base64?<utf-8>?=``."""
    if _HEADER_SAFE.fullmatch(value) and value == value.strip() and not _B64_HEADER.match(value):
        return value
    return "=?base64?" + base64.b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii") + "?="


# -- answers -----------------------------------------------------------------------------------
def error_message(ident: JsonRpcId | None, code: int, message: str,
                  data: Mapping[str, object] | None = None) -> dict[str, object]:
    """A JSON-RPC error response (``id: null`` when the request's id could not be read)."""
    error: dict[str, object] = {"code": code, "message": message}
    if data is not None:
        error["data"] = dict(data)
    return {"jsonrpc": "2.0", "id": ident, "error": error}


PIN = re.compile(r"^sha256:[0-9a-f]{64}$")


def definition_pin(tool: Mapping[str, object]) -> str:
    """``sha256:<hex>`` of a tool definition as ``tools/list`` returns it, canonically (sorted keys,
    no insignificant white space), without ``_meta`` (servers put volatile data there). A changed
    name, description, schema or annotation — what a rug pull changes — changes the pin."""
    return "sha256:" + digest({key: value for key, value in tool.items() if key != "_meta"})


def digest(value: object) -> str:
    """sha256 of canonical JSON: the audit names what was sent without recording it."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
