"""The one reader of request bodies that limits and budgets judge.

A limit is only as good as the agreement between what the sidecar reads and what the upstream
reads from the same bytes. Upstream parsers differ — Go's ``encoding/json`` matches keys
case-insensitively (Unicode simple folding: ``AMOUNT``, ``Amount``, the Kelvin sign ``K`` for
``k``, the long s ``ſ`` for ``s``) and ignores bytes after the first document; Rails and Laravel
merge query parameters into the body's; Express decodes by the declared ``charset``;
Laravel/Symfony/Rack turn ``_method`` into another verb — so a body is read only when every
reasonable parser would read it the same way, and refused otherwise. Never "counted as 0".

A body a limit or budget reads must be:

* without ``Content-Encoding`` (the sidecar never decompresses: ``body_encoding``);
* labelled with a JSON media type — ``application/json`` or ``application/*+json``, charset (if
  any) ``utf-8`` (``body_content_type``);
* exactly one strict JSON document in UTF-8: no BOM, no ``NaN``/``Infinity``, nothing but white
  space after it, no lone surrogate in a key (``unreadable_body``);
* free of keys that repeat or collide under case folding, at any depth, with the limited field
  spelled exactly (``{"AMOUNT": 5}`` alone is refused where a limit reads ``amount``:
  ``ambiguous_body``), and without a top-level ``_method`` (``method_override``).

The query must not name a limited field (its top-level key or the dotted path, percent-decoded,
bracket suffixes ignored, compared case-insensitively: ``ambiguous_query``), nor ``_method``
(``method_override``, checked on every request, as is a URL-encoded form body; multipart forms
are not inspected). An empty body is no document: a limit on it denies with ``limit_missing``
and a budget counts it as 0, exactly like a JSON body without the field.

Pure: bytes and header values in, the document or a :class:`BodyError` out. The sidecar and
``capgate explain --body`` call the same functions, so both decide identically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Literal
from urllib.parse import unquote_plus

from capgate.capabilities import spec
from capgate.capabilities.errors import RequestError

BodyReason = Literal["body_encoding", "body_content_type", "unreadable_body", "ambiguous_body", "ambiguous_query",
                     "method_override"]
OVERRIDE_PARAMETER = "_method"
"""Rack::MethodOverride, Laravel/Symfony and Express's method-override read it from query or body."""
_JSON_MEDIA = re.compile(r"^application/(?:json|[a-z0-9!#$&^_.-]+\+json)$")
_QUERY_SEPARATORS = re.compile(r"[&;]")
"""``;`` too: some frameworks (older Python, Java servlet containers) split on it."""
_BOM = b"\xef\xbb\xbf"


class BodyError(RequestError):
    """A body or query a limit cannot read unambiguously: 400 ``bad_request`` with ``reason``."""

    def __init__(self, reason: BodyReason, message: str) -> None:
        super().__init__(message)
        self.reason: BodyReason = reason
        self.message = message


def folds(name: str) -> tuple[str, str, str]:
    """The forms under which two keys may be the same key to some parser.

    ``casefold`` covers Unicode case folding (and so Go's simple folding: ``\\u212a`` → ``k``,
    ``\\u017f`` → ``s``); ``lower``/``upper`` are what Java, .NET and JavaScript use.
    """
    return name.casefold(), name.lower(), name.upper()


def collide(names: Iterable[str]) -> bool:
    """Do any two of ``names`` repeat or differ only in case (under any of :func:`folds`)?"""
    seen: tuple[set[str], set[str], set[str]] = (set(), set(), set())
    for name in names:
        for form, bucket in zip(folds(name), seen, strict=True):
            if form in bucket:
                return True
            bucket.add(form)
    return False


# -- the query ------------------------------------------------------------------------------------
def query_keys(query: str) -> list[str | None]:
    """Each parameter name, percent- and ``+``-decoded; None where the name is not UTF-8."""
    keys: list[str | None] = []
    for part in _QUERY_SEPARATORS.split(query):
        if not part:
            continue
        try:
            keys.append(unquote_plus(part.partition("=")[0], errors="strict"))
        except UnicodeDecodeError:
            keys.append(None)
    return keys


def _base(key: str) -> str:
    """``order[total]`` and ``amount[]`` are ``order``/``amount`` to Rails and PHP; PHP trims leading spaces."""
    return key.partition("[")[0].strip(" \t\r\n\x00")


def check_query(query: str, fields: Iterable[str]) -> None:
    """Refuse ``_method`` in any query, and a query naming a field a limit or budget reads."""
    keys = query_keys(query)
    bases = [_base(key) for key in keys if key is not None]
    override = folds(OVERRIDE_PARAMETER)
    if any(_same(folds(base), override) for base in bases):
        raise BodyError("method_override", f"the query names {OVERRIDE_PARAMETER!r}, which frameworks read as "
                                           "another HTTP method; send the method itself")
    names = _field_names(fields)
    if not names:
        return
    if None in keys:
        raise BodyError("ambiguous_query", "a query parameter name is not valid UTF-8 where a limit reads fields")
    for base in bases:
        for name in names:
            if _same(folds(base), folds(name)):
                raise BodyError("ambiguous_query", f"the query names {name!r}, a field a limit or budget reads "
                                                   "from the body; upstreams may read either")


FORM = "application/x-www-form-urlencoded"


def is_form(content_type: Sequence[str]) -> bool:
    """Is this body a URL-encoded form, where Rack, Laravel and Symfony look for ``_method``?"""
    return any(value.split(";")[0].strip().lower() == FORM for value in content_type)


def check_form(raw: bytes, content_encoding: Sequence[str]) -> None:
    """Refuse a URL-encoded form body naming ``_method`` (read wherever the body is a form)."""
    if raw and content_encoding:
        raise BodyError("body_encoding", "a form body must not carry Content-Encoding: the sidecar never "
                                         "decompresses, so it could not see a _method inside")
    names = query_keys(raw.decode("latin-1"))  # 1:1 bytes; _method is ASCII however it is escaped
    override = folds(OVERRIDE_PARAMETER)
    if any(_same(folds(_base(name)), override) for name in names if name is not None):
        raise BodyError("method_override", f"the form names {OVERRIDE_PARAMETER!r}, which frameworks read as "
                                           "another HTTP method; send the method itself")


def _field_names(fields: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for dotted in fields:
        names.add(dotted)
        names.add(dotted.partition(".")[0])
    return names


def _same(left: tuple[str, str, str], right: tuple[str, str, str]) -> bool:
    return any(a == b for a, b in zip(left, right, strict=True))


# -- the body -------------------------------------------------------------------------------------
def check_content_type(values: Sequence[str]) -> None:
    """Exactly one JSON media type, charset utf-8 if stated."""
    if len(values) != 1:
        raise BodyError("body_content_type", "a body a limit reads needs exactly one Content-Type: application/json")
    media, *params = values[0].split(";")
    if not _JSON_MEDIA.match(media.strip().lower()):
        raise BodyError("body_content_type", "a body a limit reads must be labelled application/json (or *+json); "
                                             "an upstream may read another type differently")
    charsets = [value.strip().strip('"').lower() for name, _, value in (p.partition("=") for p in params)
                if name.strip().lower() == "charset"]
    if len(charsets) > 1 or (charsets and charsets[0] != "utf-8"):
        raise BodyError("body_content_type", "a JSON body a limit reads must be UTF-8 (charset=utf-8 or none)")


class _Ambiguous(ValueError):
    def __init__(self, reason: BodyReason, message: str) -> None:
        super().__init__(message)
        self.reason: BodyReason = reason


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    if collide(keys):
        raise _Ambiguous("ambiguous_body", "the JSON body repeats a key, or has keys that differ only in case, "
                                           "which parsers read differently")
    for key in keys:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise _Ambiguous("unreadable_body", "a JSON key holds a lone surrogate escape") from None
    return dict(pairs)


def _constant(name: str) -> object:
    raise _Ambiguous("unreadable_body", f"{name} is not JSON")


def parse(raw: bytes) -> object:
    """The one strict JSON document in ``raw``, or :class:`BodyError`."""
    if raw.startswith(_BOM):
        raise BodyError("unreadable_body", "the JSON body starts with a byte order mark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("unreadable_body", "the JSON body is not valid UTF-8") from None
    try:
        # str, not bytes: json.loads(bytes) would also guess UTF-16/32.
        document = json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except _Ambiguous as exc:
        raise BodyError(exc.reason, str(exc)) from None
    except (ValueError, RecursionError):
        raise BodyError("unreadable_body", "the body is not exactly one JSON document") from None
    return document


def fields_for(cap: spec.Capability, upstream: str) -> frozenset[str]:
    """Body fields some limit or budget reads for requests to ``upstream``: the body must be read."""
    found = {lim.field for rule in cap.rules if rule.upstream in (None, upstream) for lim in rule.limits}
    found.update(budget.field for budget in cap.budgets if budget.upstream == upstream and not budget.from_response)
    return frozenset(found)


def check_spelling(document: object, fields: Iterable[str]) -> None:
    """Refuse ``{"AMOUNT": 5}`` where a limit reads ``amount``: Go would charge it, a limit would not see it."""
    for dotted in fields:
        value = document
        for part in dotted.split("."):
            if not isinstance(value, dict):
                break
            spelled = next((key for key in value if _same(folds(key), folds(part))), None)
            if spelled is None:
                break
            if spelled != part:
                raise BodyError("ambiguous_body", f"the JSON body spells the field {dotted!r} in another case; "
                                                  "upstreams that match keys case-insensitively would read it")
            value = value[spelled]


def read(raw: bytes, *, content_type: Sequence[str], content_encoding: Sequence[str], query: str,
         fields: Iterable[str]) -> object:
    """The JSON document limits and budgets read (None for an empty body), or :class:`BodyError`.

    ``content_type`` and ``content_encoding`` are every value of those headers as sent.
    """
    fields = tuple(fields)
    check_query(query, fields)
    if not raw:
        return None
    if content_encoding:
        raise BodyError("body_encoding", "a body a limit reads must not carry Content-Encoding: the sidecar never "
                                         "decompresses")
    check_content_type(content_type)
    document = parse(raw)
    if isinstance(document, dict) and any(_same(folds(key), folds(OVERRIDE_PARAMETER)) for key in document):
        raise BodyError("method_override", f"the JSON body names {OVERRIDE_PARAMETER!r}, which frameworks read as "
                                           "another HTTP method")
    check_spelling(document, fields)
    return document
