"""Reading the server name (SNI) from the first TLS record of a captured connection, before any TLS.

The outbound listener must decide whether a TLS connection goes to a declared ``https://`` upstream
*before* it answers the handshake: an undeclared name is refused by closing the socket, and no
certificate is ever minted for it. OpenSSL reads the same ClientHello again during the handshake;
the listener later checks that OpenSSL's reading of the name equals this one, so a ClientHello the
two parsers read differently is refused rather than trusted.

Only what RFC 8446 §4.1.2 / RFC 6066 §3 allow is accepted: a handshake record (type 22) whose
first message is a ClientHello wholly inside that record, at most one ``server_name`` extension
holding exactly one ``host_name`` entry that is an ASCII DNS name. Anything else is
:data:`MALFORMED`; the caller refuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RECORD_HEADER = 5
MAX_RECORD = 16384 + 2048
"""The largest TLSPlaintext fragment (2^14) plus slack a ClientHello never needs; bounds what we peek."""
HANDSHAKE = 22
CLIENT_HELLO = 1
SERVER_NAME_EXTENSION = 0
HOST_NAME = 0
HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")


@dataclass(frozen=True)
class Hello:
    """What the first bytes say: ``need`` more bytes, a ``name`` (None = no SNI), or ``malformed``."""

    need: int = 0
    name: str | None = None
    malformed: bool = False


MALFORMED = Hello(malformed=True)


def looks_like_tls(first: bytes) -> bool:
    return first[:1] == bytes([HANDSHAKE])


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    @property
    def done(self) -> bool:
        return self.at == len(self.data)


def parse(data: bytes) -> Hello:
    """Read the SNI of the ClientHello at the start of ``data`` (the bytes peeked so far)."""
    if len(data) < RECORD_HEADER:
        return Hello(need=RECORD_HEADER)
    if data[0] != HANDSHAKE or data[1] != 3:
        return MALFORMED
    length = int.from_bytes(data[3:5], "big")
    if not 4 <= length <= MAX_RECORD:
        return MALFORMED
    if len(data) < RECORD_HEADER + length:
        return Hello(need=RECORD_HEADER + length)
    try:
        return _hello(data[RECORD_HEADER:RECORD_HEADER + length])
    except ValueError:
        return MALFORMED


def _hello(record: bytes) -> Hello:
    outer = _Cursor(record)
    if outer.number(1) != CLIENT_HELLO:
        return MALFORMED
    body = _Cursor(outer.take(outer.number(3)))  # a ClientHello split across records raises: refused
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # legacy_session_id
    body.vector(2)  # cipher_suites
    body.vector(1)  # legacy_compression_methods
    if body.done:
        return Hello(name=None)  # no extensions at all: no SNI
    extensions = _Cursor(body.vector(2))
    if not body.done:
        return MALFORMED
    seen: set[int] = set()
    name: str | None = None
    while not extensions.done:
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            return MALFORMED  # RFC 8446 §4.2: one extension of each type
        seen.add(kind)
        if kind == SERVER_NAME_EXTENSION:
            name = _server_name(data)
    return Hello(name=name)


def _server_name(data: bytes) -> str:
    outer = _Cursor(data)
    names = _Cursor(outer.vector(2))
    if not outer.done:
        raise ValueError("trailing bytes")
    if names.number(1) != HOST_NAME:
        raise ValueError("not a host_name")
    raw = names.vector(2)
    if not names.done:
        raise ValueError("more than one name")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError("not ASCII") from exc
    # RFC 6066: no trailing dot; compared case-insensitively, so fold once here.
    name = text.lower()
    if not HOSTNAME.match(name):
        raise ValueError("not a DNS name")
    return name
