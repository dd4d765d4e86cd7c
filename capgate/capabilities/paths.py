"""Request paths and the globs that match them, strict by design.

Path confusion is the classic way past a path-based policy: the proxy matches ``/search/../admin``
leniently while the upstream resolves it to ``/admin``. So a request path that two servers could
read differently is refused (400), never "cleaned up": dot segments, empty segments, encoded
slashes, dots and backslashes, NUL and control bytes, double encoding, and ``;`` path parameters
(which Java servers strip). What is left decodes one way only, and rules match that decoding.

Globs: ``*`` is exactly one whole, non-empty segment (``/users/*`` does not match the listing
``/users/``), ``**`` is any number of segments (zero included). They
are checked when a capability is loaded, so a bad glob is a spec error, not a runtime surprise.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote

from capgate.capabilities.errors import RequestError

MAX_PATH_BYTES = 4096
"""Longer paths are refused: no API we front needs more, and it bounds matching cost."""
MAX_DOUBLE_STAR = 2
"""Each ``**`` is a loop in the matcher; two keep the worst case small."""

_ENCODED_FORBIDDEN = re.compile(r"%(2[fF]|2[eE]|5[cC]|00|25|3[bB])")
_PERCENT_TRIPLET = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    segments = decoded.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            raise RequestError(f"'{segment}' segments are not allowed")
        if segment == "" and index != len(segments) - 1:
            raise RequestError("empty path segment ('//')")
    return decoded


def validate_glob(glob: str) -> str | None:
    """Return why ``glob`` is not a valid path glob, or None when it is."""
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
    segments = glob.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            return f"'{segment}' segments are not allowed"
        if segment == "" and index != len(segments) - 1:
            return "empty segment ('//') is not allowed"
        if "*" in segment and segment not in ("*", "**"):
            return "'*' and '**' must be whole segments"
    if segments.count("**") > MAX_DOUBLE_STAR:
        return f"at most {MAX_DOUBLE_STAR} '**' segments"
    return None


@lru_cache(maxsize=4096)
def compile_glob(glob: str) -> re.Pattern[str]:
    """Compile a validated path glob to an anchored regular expression over decoded paths."""
    if glob == "/":
        return re.compile(r"^/$")
    parts: list[str] = []
    for segment in glob.split("/")[1:]:
        if segment == "**":
            parts.append(r"(?:/[^/]*)*")
        elif segment == "*":
            parts.append(r"/[^/]+")
        else:
            parts.append("/" + re.escape(segment))
    return re.compile("^" + "".join(parts) + "$")


def glob_matches(glob: str, path: str) -> bool:
    """True when the normalized ``path`` matches ``glob``."""
    return compile_glob(glob).match(path) is not None


def validate_name_glob(glob: str) -> str | None:
    """Return why ``glob`` is not a valid action/resource glob (``*`` within a segment, ``**`` across)."""
    if not glob or len(glob) > MAX_PATH_BYTES:
        return "must be 1 to 4096 characters"
    if _CONTROL.search(glob):
        return "control characters are not allowed"
    if glob.count("**") > MAX_DOUBLE_STAR:
        return f"at most {MAX_DOUBLE_STAR} '**'"
    return None


@lru_cache(maxsize=4096)
def compile_name_glob(glob: str) -> re.Pattern[str]:
    """Compile an action/resource glob: ``*`` stays within a ``/``-segment, ``**`` crosses them."""
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
    """True when an action or resource name matches ``glob``."""
    return compile_name_glob(glob).match(value) is not None
