"""Request paths and resource names, and the globs that match them: one reader for both.

Path confusion is the classic way past a path-based policy: the proxy matches ``/search/../admin``
leniently while the upstream resolves it to ``/admin``. So a request path that two servers could
read differently is refused (400), never "cleaned up": dot segments, empty segments, segments of
only dots and spaces (Windows servers strip trailing dots and spaces, so ``...`` or ``. .`` can
become ``..``), encoded slashes, dots and backslashes, NUL and control bytes (C0, DEL, C1 and the
Unicode line separators), double encoding, ``;`` path parameters (which Java servers strip), and
paths whose compatibility form (NFKC, which some servers and file systems apply: ``．．`` is ``..``,
``／`` is ``/``) would have another shape. What is left decodes one way only, and rules match that
decoding.

Resource names (the decision API, action rules, MCP's ``mcp://<upstream>/<tool>``) go through the
same reader: ``scheme://authority/path`` keeps its scheme and authority as written (ASCII, no
percent-encoding) and its path part is normalized exactly like an HTTP path (an empty path reads as
``/``). A resource without a scheme must be an absolute path and is normalized as one; anything
else (``secrets/key``, ``urn:x``, a query or fragment) is refused, because a second reader could
resolve it against something capgate does not see.

Globs: ``*`` is exactly one whole, non-empty segment (``/users/*`` does not match the listing
``/users/``), ``**`` is any number of segments (zero included); in a resource glob the authority
may be ``*`` (any one authority). They are checked when a capability is loaded with the same
rules as requests, so a bad glob is a spec error, not a runtime surprise.

Allow rules match exactly. Deny rules match *leniently* (:func:`lenient_forms`): what a
case-insensitive, trailing-slash-tolerant, Windows or Unicode-folding router would route to the
same handler must not slip past ``deny /admin/**`` as ``/ADMIN/x``, ``/admin/``, ``/admin./x``,
``/admin%20/x``, ``/ａｄｍｉｎ/x``, ``/admin::$DATA/x`` (IIS) or ``/admin.json`` (Spring's suffix
patterns, Rails' formats). Leniency can only add denials, so it is safe to over-approximate. What
no string rule can know is not covered: Windows 8.3 short names (``ADMINI~1``), or routes an
upstream maps by other means — deny the upstream's real names, and prefer narrow allow rules.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from urllib.parse import unquote

from capgate.capabilities.errors import RequestError

MAX_PATH_BYTES = 4096
"""Longer paths and resource names are refused: no API we front needs more, and it bounds matching cost."""
MAX_DOUBLE_STAR = 2
"""Each ``**`` is a loop in the matcher; two keep the worst case small."""

_ENCODED_FORBIDDEN = re.compile(r"%(2[fF]|2[eE]|5[cC]|00|25|3[bB])")
_PERCENT_TRIPLET = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BLANK_SEGMENT = re.compile(r"[\s.]+")
"""A segment of only dots and whitespace: ``.``, ``..``, ``...``, `` ``, ``. .``."""
_TRAILING_BLANK = re.compile(r"[\s.]+$")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_RESOURCE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
_AUTHORITY = re.compile(r"[A-Za-z0-9._~!$&'()+,=:@\[\]-]*")
"""RFC 3986 reg-name, userinfo and port characters, without percent-encoding, ``;`` or ``*``."""


# -- paths -------------------------------------------------------------------------------------
def normalize(raw_path: str) -> str:
    """Return the one decoding of ``raw_path`` (without query string), or raise :class:`RequestError`."""
    if len(raw_path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise RequestError(f"path longer than {MAX_PATH_BYTES} bytes")
    if not raw_path.startswith("/"):
        raise RequestError("path must start with '/'")
    if "\\" in raw_path:
        raise RequestError("backslash in path")
    if _CONTROL.search(raw_path):
        raise RequestError("control character in path")
    if ";" in raw_path:
        raise RequestError("';' path parameters are ambiguous")
    encoded = _ENCODED_FORBIDDEN.search(raw_path)
    if encoded:
        raise RequestError(f"encoded {encoded.group(0)!r} in path is ambiguous")
    if "%" in _PERCENT_TRIPLET.sub("", raw_path):
        raise RequestError("malformed percent-encoding in path")
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError as exc:
        raise RequestError("path is not valid UTF-8") from exc
    if _CONTROL.search(decoded):
        raise RequestError("encoded control character in path")
    problem = _shape_problem(decoded, glob=False)
    if problem:
        raise RequestError(problem)
    return decoded


def _shape_problem(decoded: str, *, glob: bool) -> str | None:
    """Why the segments of ``decoded`` (a path or path glob) could be read another way, or None."""
    problem = _segments_problem(decoded.split("/")[1:], glob=glob)
    if problem or decoded.isascii():
        return problem
    compatible = unicodedata.normalize("NFKC", decoded)
    if compatible.count("/") != decoded.count("/") or "\\" in compatible or ";" in compatible \
            or "%" in compatible or _CONTROL.search(compatible):
        return "characters whose compatibility form (NFKC) is a separator or control are ambiguous"
    if _segments_problem(compatible.split("/")[1:], glob=glob):
        return "segments whose compatibility form (NFKC) is '.', '..' or blank are ambiguous"
    return None


def _segments_problem(segments: list[str], *, glob: bool) -> str | None:
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            return f"'{segment}' segments are not allowed"
        if segment == "":
            if index != len(segments) - 1:
                return "empty segment ('//') is not allowed" if glob else "empty path segment ('//')"
            continue
        if _BLANK_SEGMENT.fullmatch(segment):
            return f"segments of only dots and spaces ({segment!r}) are ambiguous"
    return None


def validate_glob(glob: str) -> str | None:
    """Return why ``glob`` is not a valid path glob, or None when it is (the rules of :func:`normalize`)."""
    if not glob.startswith("/"):
        return "must start with '/'"
    if len(glob) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} characters"
    if "\\" in glob or _CONTROL.search(glob):
        return "backslashes and control characters are not allowed"
    if "%" in glob:
        return "percent-encoding is not allowed (globs match decoded paths)"
    if ";" in glob:
        return "';' is not allowed"
    if glob == "/":
        return None
    problem = _shape_problem(glob, glob=True)
    if problem:
        return problem
    segments = glob.split("/")[1:]
    if any("*" in segment and segment not in ("*", "**") for segment in segments):
        return "'*' and '**' must be whole segments"
    if segments.count("**") > MAX_DOUBLE_STAR:
        return f"at most {MAX_DOUBLE_STAR} '**' segments"
    return None


def _glob_regex(glob: str) -> str:
    if glob == "/":
        return "/"
    parts: list[str] = []
    for segment in glob.split("/")[1:]:
        if segment == "**":
            parts.append(r"(?:/[^/]*)*")
        elif segment == "*":
            parts.append(r"/[^/]+")
        else:
            parts.append("/" + re.escape(segment))
    return "".join(parts)


@lru_cache(maxsize=4096)
def compile_glob(glob: str) -> re.Pattern[str]:
    """Compile a validated path glob to an anchored regular expression over decoded paths."""
    return re.compile("^" + _glob_regex(glob) + "$", re.DOTALL)


def glob_matches(glob: str, path: str) -> bool:
    """True when the normalized ``path`` matches ``glob`` exactly (allow rules)."""
    return compile_glob(glob).match(path) is not None


# -- lenient (deny) matching -------------------------------------------------------------------
_NTFS_STREAM = "::$data"
"""IIS serves ``name::$DATA`` (the file's default NTFS data stream) as ``name``."""


def _fold_segment(segment: str) -> str:
    """A segment as the most forgiving router reads it: NFKC, case-folded, no format characters,
    no default NTFS stream suffix, no trailing dots or whitespace."""
    if not segment.isascii():
        segment = unicodedata.normalize("NFKC", segment)
        segment = "".join(char for char in segment if unicodedata.category(char) != "Cf")
        segment = unicodedata.normalize("NFKC", segment.casefold())
    else:
        segment = segment.lower()
    segment = _TRAILING_BLANK.sub("", segment)
    if segment.endswith(_NTFS_STREAM):
        segment = _TRAILING_BLANK.sub("", segment[:-len(_NTFS_STREAM)])
    return segment


def _fold(path: str, *, keep_wildcards: bool) -> list[str]:
    out = []
    for segment in path.split("/")[1:]:
        folded = segment if keep_wildcards and segment in ("*", "**") else _fold_segment(segment)
        if folded:  # a trailing '/' (and a segment that folds away) is no segment at all
            out.append(folded)
    return out


def lenient_forms(path: str) -> tuple[str, ...]:
    """The readings of a normalized path that deny globs are matched against (any one matching denies).

    The folded path, and, when its last segment has an extension, the folded path without it.
    """
    segments = _fold(path, keep_wildcards=False)
    folded = "/" + "/".join(segments)
    last = segments[-1] if segments else ""
    dot = last.find(".")
    if dot <= 0:
        return (folded,)
    return folded, "/" + "/".join([*segments[:-1], last[:dot]])


@lru_cache(maxsize=4096)
def compile_lenient_glob(glob: str) -> re.Pattern[str]:
    """A validated path glob folded like :func:`lenient_forms`, compiled."""
    return compile_glob("/" + "/".join(_fold(glob, keep_wildcards=True)))


def lenient_glob_matches(glob: str, path: str) -> bool:
    """True when a deny ``glob`` matches the normalized ``path`` exactly or some lenient reading of it."""
    pattern = compile_lenient_glob(glob)
    return glob_matches(glob, path) or any(pattern.match(form) for form in lenient_forms(path))


# -- resource names ----------------------------------------------------------------------------
def _split_resource(value: str) -> tuple[str, str] | str:
    """(``scheme://authority``, path part) of a resource or resource glob, or why it has no such shape."""
    if value.startswith("/"):
        return "", value
    match = _RESOURCE.fullmatch(value)
    if match is None:
        if _SCHEME.match(value):
            return "a resource with a scheme is 'scheme://authority/path'"
        return "a resource is 'scheme://authority/path' or an absolute '/path'"
    if "?" in value or "#" in value:
        return "'?' and '#' are not allowed in resource names"
    scheme, authority, path = match.groups()
    return f"{scheme}://{authority}", path or "/"


def _authority_problem(prefix: str, *, glob: bool) -> str | None:
    authority = prefix.partition("://")[2]
    if glob and authority == "*":
        return None
    if not _AUTHORITY.fullmatch(authority):
        return "the authority must be ASCII host[:port] characters, without percent-encoding"
    return None


def normalize_resource(raw: str) -> str:
    """The one reading of a resource name, or raise :class:`RequestError` (400)."""
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise RequestError(f"resource longer than {MAX_PATH_BYTES} bytes")
    if _CONTROL.search(raw):
        raise RequestError("control character in resource")
    parts = _split_resource(raw)
    if isinstance(parts, str):
        raise RequestError(parts)
    prefix, path = parts
    problem = _authority_problem(prefix, glob=False) if prefix else None
    if problem:
        raise RequestError(problem)
    return prefix + normalize(path)


def validate_resource_glob(glob: str) -> str | None:
    """Why ``glob`` is not a valid resource glob, or None (the rules of :func:`normalize_resource`)."""
    if not glob or len(glob) > MAX_PATH_BYTES:
        return f"must be 1 to {MAX_PATH_BYTES} characters"
    if _CONTROL.search(glob):
        return "control characters are not allowed"
    parts = _split_resource(glob)
    if isinstance(parts, str):
        return parts
    prefix, path = parts
    problem = _authority_problem(prefix, glob=True) if prefix else None
    if problem:
        return problem
    if "*" in prefix.partition("://")[0]:
        return "the scheme cannot be a glob"
    return validate_glob(path)


def _resource_regex(prefix: str, path_regex: str) -> str:
    scheme, sep, authority = prefix.partition("://")
    head = re.escape(scheme + sep) + ("[^/]+" if authority == "*" else re.escape(authority))
    return "^" + head + path_regex + "$"


@lru_cache(maxsize=4096)
def compile_resource_glob(glob: str) -> re.Pattern[str]:
    """Compile a validated resource glob to an anchored regular expression over normalized resources."""
    parts = _split_resource(glob)
    assert not isinstance(parts, str), "validate_resource_glob first"
    prefix, path = parts
    return re.compile(_resource_regex(prefix, _glob_regex(path)), re.DOTALL)


def resource_glob_matches(glob: str, resource: str) -> bool:
    """True when the normalized ``resource`` matches ``glob`` exactly (allow rules)."""
    return compile_resource_glob(glob).match(resource) is not None


def _fold_prefix(prefix: str) -> str:
    """``scheme://authority`` as a forgiving reader compares it: lower case, without userinfo, port
    or a trailing dot (``mcp://x@Payments.:443`` is ``mcp://payments``)."""
    if not prefix:
        return prefix
    scheme, sep, authority = prefix.lower().partition("://")
    if authority != "*":
        authority = authority.rpartition("@")[2]
        if not authority.startswith("["):  # an IPv6 literal keeps its colons
            authority = authority.partition(":")[0]
        authority = authority.rstrip(".")
    return scheme + sep + authority


@lru_cache(maxsize=4096)
def compile_lenient_resource_glob(glob: str) -> re.Pattern[str]:
    parts = _split_resource(glob)
    assert not isinstance(parts, str), "validate_resource_glob first"
    prefix, path = parts
    folded = "/" + "/".join(_fold(path, keep_wildcards=True))
    return re.compile(_resource_regex(_fold_prefix(prefix), _glob_regex(folded)), re.DOTALL)


def lenient_resource_forms(resource: str) -> tuple[str, ...]:
    """:func:`lenient_forms` for a normalized resource; its scheme and authority folded too."""
    parts = _split_resource(resource)
    assert not isinstance(parts, str), "normalize_resource first"
    prefix, path = parts
    return tuple(_fold_prefix(prefix) + form for form in lenient_forms(path))


def lenient_resource_glob_matches(glob: str, resource: str) -> bool:
    """True when a deny resource ``glob`` matches the normalized ``resource`` exactly or leniently."""
    pattern = compile_lenient_resource_glob(glob)
    return resource_glob_matches(glob, resource) or any(
        pattern.match(form) for form in lenient_resource_forms(resource))


# -- action names ------------------------------------------------------------------------------
def validate_name_glob(glob: str) -> str | None:
    """Return why ``glob`` is not a valid action glob (``*`` within a segment, ``**`` across)."""
    if not glob or len(glob) > MAX_PATH_BYTES:
        return "must be 1 to 4096 characters"
    if _CONTROL.search(glob):
        return "control characters are not allowed"
    if glob.count("**") > MAX_DOUBLE_STAR:
        return f"at most {MAX_DOUBLE_STAR} '**'"
    return None


@lru_cache(maxsize=4096)
def compile_name_glob(glob: str) -> re.Pattern[str]:
    """Compile an action glob: ``*`` stays within a ``/``-segment, ``**`` crosses them."""
    out: list[str] = []
    index = 0
    while index < len(glob):
        if glob.startswith("**", index):
            out.append(".*")
            index += 2
        elif glob[index] == "*":
            out.append("[^/]*")
            index += 1
        else:
            out.append(re.escape(glob[index]))
            index += 1
    return re.compile("^" + "".join(out) + "$", re.DOTALL)


def name_glob_matches(glob: str, value: str) -> bool:
    """True when an action name matches ``glob`` exactly (allow rules)."""
    return compile_name_glob(glob).match(value) is not None


def fold_name(value: str) -> str:
    """An action name as a forgiving reader compares it (deny rules): NFKC, case-folded, trimmed."""
    return _fold_segment(value.strip())


def lenient_name_glob_matches(glob: str, value: str) -> bool:
    """True when a deny action ``glob`` matches ``value`` exactly or leniently."""
    return name_glob_matches(glob, value) or compile_name_glob(fold_name(glob)).match(fold_name(value)) is not None
