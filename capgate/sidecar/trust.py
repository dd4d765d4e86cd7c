"""Per-upstream TLS trust: the private CA an ``upstreams[].tls.caSecretRef`` names, and only it.

In a pod the webhook projects each referenced Secret key into ``--upstream-ca-dir/<upstream>`` (the
sidecar container only, like the injected keys). An upstream that declares ``tls`` is verified with
that bundle alone, with hostname checking on: declaring a private CA narrows trust, it never adds
the system roots to it. Upstreams without ``tls`` keep the default context (system roots, or
``SSL_CERT_FILE``).

Fail closed: a declared upstream whose bundle is missing, empty or not PEM gets no connection at
all (502 ``no_upstream_trust``, before anything is sent, so never recorded as forwarded), rather
than a fallback to the system roots.

The kubelet updates a Secret volume by swapping a symlink, so the file is re-read when its
``stat`` changes: a rotated CA (cert-manager renewing it) is picked up without a restart, and an
unchanged one costs one ``stat`` per request.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from capgate.capabilities.spec import Upstream
from capgate.sidecar import errors

log = logging.getLogger("capgate.sidecar.trust")

MAX_BUNDLE_BYTES = 1024 * 1024
"""Far above any real CA bundle (Mozilla's whole root store is ~220 KiB)."""

_Stamp = tuple[int, int, int]


class UpstreamTrust:
    """Builds and caches the SSL context of every upstream that declares its own CA."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._cache: dict[str, tuple[_Stamp, ssl.SSLContext]] = {}

    def context(self, upstream: Upstream) -> ssl.SSLContext | None:
        """The context for ``upstream``; None means the client's default trust."""
        if upstream.tls is None:
            return None
        if self._directory is None:
            raise _untrusted(upstream, "the sidecar was started without --upstream-ca-dir")
        path = self._directory / upstream.name
        try:
            status = path.stat()
        except OSError as exc:
            raise _untrusted(upstream, f"its CA bundle is not mounted ({type(exc).__name__})") from exc
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        cached = self._cache.get(upstream.name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        context = _load(upstream, path, status.st_size)
        self._cache[upstream.name] = (stamp, context)
        log.info("loaded the CA bundle of upstream %s", upstream.name)
        return context


def _load(upstream: Upstream, path: Path, size: int) -> ssl.SSLContext:
    if not 0 < size <= MAX_BUNDLE_BYTES:
        raise _untrusted(upstream, "its CA bundle is empty or too large")
    try:
        pem = path.read_text(encoding="ascii")
        # cadata given: create_default_context loads no system roots, so this bundle is the only trust.
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem)
    except (OSError, UnicodeError, ssl.SSLError, ValueError) as exc:
        raise _untrusted(upstream, f"its CA bundle cannot be read as PEM ({type(exc).__name__})") from exc


def _untrusted(upstream: Upstream, why: str) -> errors.SidecarError:
    log.error("upstream %s declares tls.caSecretRef but %s; its calls fail with 502", upstream.name, why)
    return errors.SidecarError(502, "upstream_unavailable", "no_upstream_trust",
                               f"upstream {upstream.name!r} cannot be verified: {why}")
