"""A hostile agent inside the pod: ignores HTTP_PROXY, dials addresses itself, prints one JSON result.

``python agent.py http URL [HOST]`` (plain HTTP, optionally a forged Host header),
``https URL`` (urllib, trusting ``SSL_CERT_FILE``), ``https-host URL HOST`` (another Host inside TLS),
``tls IP PORT SNI`` (a bare handshake),
``tcp IP PORT`` / ``tcp6 IP PORT`` (raw bytes), ``udp IP PORT`` (one datagram, waits for an echo).
Standard library only: it runs as an unprivileged UID with the system interpreter.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

TIMEOUT = 3.0


def http_call(url: str, host: str | None = None) -> dict[str, object]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT)
    conn.putrequest("GET", parts.path or "/", skip_host=host is not None)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    return {"status": response.status, "body": json.loads(response.read() or b"null")}


def https_call(url: str) -> dict[str, object]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return {"status": response.status, "body": json.loads(response.read())}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": json.loads(exc.read())}


def https_with_host(url: str, host: str) -> dict[str, object]:
    """TLS to the URL's host (SNI and certificate check as usual), then a Host header naming another."""
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=TIMEOUT,
                                       context=ssl.create_default_context())
    conn.putrequest("GET", parts.path or "/", skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    return {"status": response.status, "body": json.loads(response.read() or b"null")}


def tls_handshake(ip: str, port: str, sni: str) -> dict[str, object]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((ip, int(port)), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname=sni):
        return {"handshake": True}


def tcp_call(family: int, ip: str, port: str) -> dict[str, object]:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((ip, int(port)))
        sock.sendall(b"\x00\x01 raw bytes, not HTTP\r\n\r\n")
        return {"connected": True, "received": sock.recv(100).decode(errors="replace")}


def udp_call(ip: str, port: str) -> dict[str, object]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.5)
        sock.sendto(b"exfiltrate", (ip, int(port)))
        return {"reply": sock.recvfrom(100)[0].decode()}


def main() -> None:
    command, *args = sys.argv[1:]
    actions = {"http": lambda: http_call(*args), "https": lambda: https_call(*args),
               "https-host": lambda: https_with_host(*args),
               "tls": lambda: tls_handshake(*args), "tcp": lambda: tcp_call(socket.AF_INET, *args),
               "tcp6": lambda: tcp_call(socket.AF_INET6, *args), "udp": lambda: udp_call(*args)}
    try:
        result = actions[command]()
    except (OSError, http.client.HTTPException) as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
