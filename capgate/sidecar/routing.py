"""Which upstream a request is for, and the exact path and query to send it to.

Two forms reach the agent port:

* **path form** ``/<upstream>/<path>?<query>`` — what ``CAPGATE_URL`` / the per-upstream base URL
  variables point agents at;
* **absolute form** ``GET http://<host>/<path>`` — an agent using ``HTTP_PROXY``. ``<host>``
  names an upstream either by its name or by the host of its URL (host and port first, then the
  host alone when that is unambiguous).

``CONNECT`` (HTTPS through the proxy) is refused with 405 ``bad_request``/``connect_refused``:
the sidecar cannot inspect a TLS tunnel, and a tunnel it cannot inspect is one it must not open.
Agents call upstreams over plain HTTP to the sidecar, which speaks TLS upstream itself.

The raw (still percent-encoded) path is what gets normalized and forwarded, so the path the policy
matched is byte-for-byte the path the upstream receives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from capgate.capabilities import paths, spec
from capgate.capabilities.errors import RequestError
from capgate.sidecar import errors

CONTROL_PREFIX = "/_capgate/"


@dataclass(frozen=True)
class Route:
    upstream: spec.Upstream
    base_url: str
    """The effective upstream URL (``--upstream-url`` override or the capability's), no trailing slash."""
    raw_path: str
    """Still percent-encoded, as the agent sent it, starting with ``/``."""
    path: str
    """The one decoding of ``raw_path`` that rules match."""
    query: str

    @property
    def target(self) -> str:
        """The URL to forward to; the prefix of ``base_url`` is kept (``http://h/api`` + ``/x``)."""
        return self.base_url + self.raw_path + (f"?{self.query}" if self.query else "")


def effective_url(upstream: spec.Upstream, overrides: Mapping[str, str]) -> str:
    return overrides.get(upstream.name, upstream.url).rstrip("/")


def resolve(raw_target: str, cap: spec.Capability, overrides: Mapping[str, str]) -> Route:
    """Map the request target (``request.raw_path``) to a :class:`Route`, or raise :class:`SidecarError`."""
    if raw_target.startswith("/"):
        return _path_form(raw_target, cap, overrides)
    return _absolute_form(raw_target, cap, overrides)


def _split_query(raw: str) -> tuple[str, str]:
    path, _, query = raw.partition("?")
    path, _, _fragment = path.partition("#")
    return path, query


def _normalize(raw_path: str) -> str:
    try:
        return paths.normalize(raw_path)
    except RequestError as exc:
        raise errors.bad_request("ambiguous_path", str(exc)) from exc


def _path_form(raw_target: str, cap: spec.Capability, overrides: Mapping[str, str]) -> Route:
    raw_path, query = _split_query(raw_target)
    name, sep, rest = raw_path[1:].partition("/")
    upstream = cap.upstream(name)
    if upstream is None:
        # Named without echoing the agent's input back in full: it may be long or crafted.
        raise errors.unknown_upstream(f"no upstream {name[:63]!r} in capability {cap.qualified_name}")
    rest_path = "/" + rest if sep else "/"
    return Route(upstream=upstream, base_url=effective_url(upstream, overrides), raw_path=rest_path,
                 path=_normalize(rest_path), query=query)


def _absolute_form(raw_target: str, cap: spec.Capability, overrides: Mapping[str, str]) -> Route:
    parts = urlsplit(raw_target)
    if parts.scheme != "http" or not parts.hostname:
        raise errors.bad_request("bad_target", "only http:// absolute-form requests can be proxied")
    if parts.username or parts.password:
        raise errors.bad_request("bad_target", "credentials in the request URL are not allowed")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise errors.bad_request("bad_target", "invalid port in the request URL") from exc
    upstream = match_host(parts.hostname, port, cap, overrides)
    if upstream is None:
        raise errors.unknown_upstream(f"host {parts.hostname[:253]!r} names no upstream of {cap.qualified_name}")
    raw_path = parts.path or "/"
    return Route(upstream=upstream, base_url=effective_url(upstream, overrides), raw_path=raw_path,
                 path=_normalize(raw_path), query=parts.query)


def match_host(host: str, port: int, cap: spec.Capability, overrides: Mapping[str, str]) -> spec.Upstream | None:
    host = host.lower()
    by_name = cap.upstream(host)
    if by_name is not None:
        return by_name
    exact: list[spec.Upstream] = []
    loose: list[spec.Upstream] = []
    for upstream in cap.upstreams:
        for url in {upstream.url, effective_url(upstream, overrides)}:
            target = urlsplit(url)
            if (target.hostname or "").lower() != host:
                continue
            loose.append(upstream)
            default = 443 if target.scheme == "https" else 80
            if (target.port or default) == port:
                exact.append(upstream)
    for candidates in (exact, loose):
        unique = list(dict.fromkeys(candidates))
        if len(unique) == 1:
            return unique[0]
    return None


def for_upstream(raw_target: str, upstream: spec.Upstream, overrides: Mapping[str, str]) -> Route:
    """The route of an origin-form request (``/path?query``) already known to be for ``upstream``.

    The outbound listener resolves the upstream from where the connection went (see ``egress``);
    the path is then read exactly as in path form, with the same one normalization.
    """
    if not raw_target.startswith("/"):
        raise errors.bad_request("bad_target", "a captured request must use origin form (/path)")
    raw_path, query = _split_query(raw_target)
    return Route(upstream=upstream, base_url=effective_url(upstream, overrides), raw_path=raw_path,
                 path=_normalize(raw_path), query=query)
