"""The SNI reader of the outbound listener, on ClientHellos OpenSSL itself writes (and broken ones)."""

from __future__ import annotations

import ssl
import struct

import pytest

from capgate.sidecar import clienthello


def hello_bytes(server_name: str | None) -> bytes:
    """The first flight a real client (Python's OpenSSL) sends."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def record(body: bytes) -> bytes:
    return bytes([22, 3, 1]) + struct.pack("!H", len(body)) + body


def client_hello(extensions: bytes) -> bytes:
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(extensions))
    body += extensions
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


def sni_extension(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for n in names)
    data = struct.pack("!H", len(entries)) + entries
    return struct.pack("!HH", 0, len(data)) + data


def test_reads_the_server_name_a_real_client_sends() -> None:
    assert clienthello.parse(hello_bytes("Payments.Example.com")) == clienthello.Hello(name="payments.example.com")


def test_a_hello_without_server_name_has_no_name() -> None:
    assert clienthello.parse(hello_bytes(None)) == clienthello.Hello(name=None)


def test_a_partial_record_asks_for_exactly_the_rest() -> None:
    data = hello_bytes("payments.example.com")
    assert clienthello.parse(data[:3]).need == 5
    assert clienthello.parse(data[:40]).need == len(data)
    assert clienthello.looks_like_tls(data[:1])


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",
    client_hello(sni_extension(b"a.example") + sni_extension(b"b.example")),  # two server_name extensions
    client_hello(sni_extension(b"a.example", b"b.example")),                  # two names in one
    client_hello(sni_extension(b"a.example", kind=1)),                        # not a host_name
    client_hello(sni_extension(b"evil.example\x00.payments.example.com")),    # NUL: C strings would stop early
    client_hello(sni_extension(b"payments.example.com.")),                    # trailing dot
    client_hello(sni_extension("pаyments.example.com".encode())),            # not ASCII (Cyrillic a)
    client_hello(sni_extension(b"a.example"))[:-1] + b"",                      # truncated inside the record
    record(b"\x02\x00\x00\x00"),                                             # a ServerHello, not a ClientHello
], ids=["http", "duplicate-extension", "two-names", "not-host-name", "nul", "trailing-dot", "non-ascii",
        "truncated", "server-hello"])
def test_anything_two_parsers_could_read_differently_is_malformed(data: bytes) -> None:
    result = clienthello.parse(data)
    assert result.malformed or result.need > len(data)
    if data.startswith(b"\x16") and len(data) >= 5 and result.need == 0:
        assert result.malformed


def test_a_hello_spanning_two_records_is_refused() -> None:
    whole = client_hello(sni_extension(b"a.example"))
    body = whole[5:]
    first = record(body[:20])  # the handshake message claims more than this record holds
    assert clienthello.parse(first + record(body[20:])).malformed
